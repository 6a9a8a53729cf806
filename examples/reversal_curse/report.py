"""Statistics and figure of reversal-curse runs over seeds, from their per-prompt results.

    python examples/reversal_curse/report.py docs/results/reversal_curse/seed*.jsonl.gz \\
        --markdown docs/results/reversal_curse/summary.md --figure docs/figures/reversal_curse_seeds.png

Input: the ``per_prompt.jsonl`` of ``run.py`` runs, plain or gzipped (``.jsonl.gz``): one line per model,
test file and prompt (seed, model, file, index, person, rank, person_rank, num_candidates, and per guidance
scale w the generation and whether it matches: ``exact`` (the generation starts with the gold) and
``contains`` (SMDM's ``evaluate_reverse.py`` rule: the lower-cased gold occurs in it)).

Per model and test file, every metric is given per seed (mean over the file's prompts), as the mean over
seeds with the seeds' standard deviation, and with a 95 % interval clustered by person: the prompts
of one person (10 paraphrases per file) and the seeds are averaged into one value per person, and the 30
people are resampled (percentile bootstrap, ``scipy.stats.bootstrap``). MDM against ARM on the same file
is paired by person: the per-person difference of the seed-averaged metric, its mean with the same
interval, and a Wilcoxon signed-rank test over the people.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

FILES = ("d2p_prompts_test", "p2d_reverse_prompts_test", "p2d_prompts_test", "d2p_reverse_prompts_test")
DIRECTION = {"p2d_prompts_test": "same: name -> description", "d2p_prompts_test": "same: description -> name",
             "p2d_reverse_prompts_test": "reverse: description -> name",
             "d2p_reverse_prompts_test": "reverse: name -> description"}
BOOT = 10_000


def read_records(paths: list[str | Path]) -> list[dict]:
    recs = []
    for p in paths:
        raw = Path(p).read_bytes()
        text = (gzip.decompress(raw) if str(p).endswith(".gz") else raw).decode("utf-8")
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"report: {p}:{k}: not a JSON line") from None
    if not recs:
        raise SystemExit("report: no per-prompt records in " + ", ".join(map(str, paths)))
    return recs


def metrics(rec: dict) -> dict[str, float]:
    """The per-prompt values averaged by the report (generation matches in %, so means are percentages)."""
    out = {"top1": 100.0 * (rec["rank"] == 1), "rank": float(rec["rank"]),
           "person_top1": 100.0 * (rec["person_rank"] == 1), "person_rank": float(rec["person_rank"])}
    for w, hit in rec["contains"].items():
        out[f"match_w{float(w):g}"] = 100.0 * bool(hit)
    for w, hit in rec["exact"].items():
        out[f"prefix_w{float(w):g}"] = 100.0 * bool(hit)
    return out


def _ci(per_person: np.ndarray, seed: int = 0) -> list[float]:
    if len(per_person) < 2 or np.all(per_person == per_person[0]):
        return [float(per_person.mean())] * 2
    res = stats.bootstrap((per_person,), np.mean, n_resamples=BOOT, method="percentile",
                          rng=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def summarise(recs: list[dict]) -> dict:
    """Per (model, file, metric): per-seed means, mean and sd over seeds, person-clustered interval; per
    file and metric the paired MDM - ARM difference by person."""
    by: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))  # (model, file) -> metric -> [(seed, person, v)]
    n_cand: dict[str, int] = {}
    for r in recs:
        n_cand[r["file"]] = r["num_candidates"]
        for k, v in metrics(r).items():
            by[(r["model"], r["file"])][k].append((r["seed"], r["person"], v))
    out: dict = {"results": [], "paired": [], "seeds": sorted({r["seed"] for r in recs}),
                 "chance": {f: {"rank": (n + 1) / 2, "top1": 100.0 / n} for f, n in n_cand.items()}}
    person_means: dict[tuple, dict[str, float]] = {}
    for (model, file), ms in sorted(by.items()):
        for metric, vals in sorted(ms.items()):
            seeds = sorted({s for s, _, _ in vals})
            per_seed = {s: float(np.mean([v for s2, _, v in vals if s2 == s])) for s in seeds}
            people: dict[str, list[float]] = defaultdict(list)
            for _, who, v in vals:
                people[who].append(v)
            pm = {who: float(np.mean(v)) for who, v in people.items()}
            person_means[(model, file, metric)] = pm
            arr = np.array(list(pm.values()))
            out["results"].append({
                "model": model, "file": file, "metric": metric, "n_prompts": len(vals) // len(seeds),
                "n_people": len(pm), "per_seed": per_seed, "mean": float(np.mean(list(per_seed.values()))),
                "seed_sd": float(np.std(list(per_seed.values()), ddof=1)) if len(seeds) > 1 else None,
                "ci": _ci(arr)})
    for file in sorted({f for _, f in by}):
        for metric in sorted(set(by.get(("mdm", file), {})) & set(by.get(("arm", file), {}))):
            a, b = person_means[("mdm", file, metric)], person_means[("arm", file, metric)]
            who = sorted(set(a) & set(b))
            d = np.array([a[w] - b[w] for w in who])
            nonzero = d[d != 0]
            p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
            out["paired"].append({"file": file, "metric": metric, "n_people": len(who), "mdm_minus_arm": float(d.mean()),
                                  "ci": _ci(d), "wilcoxon_p": p, "mdm_higher": int((d > 0).sum()),
                                  "mdm_lower": int((d < 0).sum()), "ties": int((d == 0).sum())})
    return out


def _row(s: dict, model: str, file: str, metric: str) -> dict | None:
    return next((r for r in s["results"] if (r["model"], r["file"], r["metric"]) == (model, file, metric)), None)


def _cell(r: dict | None, spec: str = ".1f") -> str:
    if r is None:
        return "—"
    seeds = " / ".join(f"{v:{spec}}" for v in r["per_seed"].values())
    return f"{r['mean']:{spec}} [{r['ci'][0]:{spec}}, {r['ci'][1]:{spec}}] ({seeds})"


def _seeds(s: dict) -> str:
    n = len(s["seeds"])
    return ("Seed " if n == 1 else "Seeds ") + ", ".join(map(str, s["seeds"])) + (" (one seed)" if n == 1 else "")


def markdown(s: dict) -> str:
    """Two tables: every metric per model and file; the paired MDM - ARM differences."""
    cfg = sorted({r["metric"] for r in s["results"] if r["metric"].startswith("match_w") and r["metric"] != "match_w0"})
    lines = [f"{_seeds(s)}; every prompt of each file. Cells: mean over seeds "
             "[95 % interval clustered by person] (per seed)."
             + (" With one seed the interval covers the draw of people and prompts, not the training noise."
                if len(s["seeds"]) == 1 else ""), "",
             "| model | test file | direction | n | SMDM match % (w = 0) | "
             + " | ".join(f"SMDM match % (CFG w = {m[7:]})" for m in cfg)
             + " | top-1 % | mean rank | person mean rank |",
             "|" + "---|" * (8 + len(cfg))]
    for model in ("mdm", "arm"):
        for f in FILES:
            if _row(s, model, f, "rank") is None:
                continue
            n = _row(s, model, f, "rank")["n_prompts"]
            lines.append(f"| {model.upper()} | {f} | {DIRECTION[f]} | {n} | {_cell(_row(s, model, f, 'match_w0'))} | "
                         + " | ".join(_cell(_row(s, model, f, m)) for m in cfg)
                         + f" | {_cell(_row(s, model, f, 'top1'))} | {_cell(_row(s, model, f, 'rank'), '.2f')} "
                         f"| {_cell(_row(s, model, f, 'person_rank'), '.2f')} |")
    lines += ["", "Chance: " + "; ".join(f"{f} mean rank {c['rank']:.1f}, top-1 {c['top1']:.1f} %"
                                         for f, c in sorted(s["chance"].items())), "",
              "MDM - ARM, paired by person (the 30 people of a file; seed-averaged):", "",
              "| test file | metric | MDM - ARM [95 % interval] | people MDM higher / lower / tied | Wilcoxon p |",
              "|---|---|---|---|---|"]
    keep = ("match_w0", "top1", "rank", "person_rank")
    for p in s["paired"]:
        if p["metric"] in keep:
            lines.append(f"| {p['file']} | {p['metric']} | {p['mdm_minus_arm']:+.2f} [{p['ci'][0]:+.2f}, "
                         f"{p['ci'][1]:+.2f}] | {p['mdm_higher']} / {p['mdm_lower']} / {p['ties']} "
                         f"| {p['wilcoxon_p']:.2g} |")
    return "\n".join(lines) + "\n"


def figure(s: dict, path: str | Path) -> Path:
    """Mean rank of the gold (name files) and of its person (description files), and the generation match,
    per model: seeds as dots, the seed mean with its person-clustered interval as a bar."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mdm.sweep.curves import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    cfg = sorted({r["metric"] for r in s["results"] if r["metric"].startswith("match_w") and r["metric"] != "match_w0"})
    panels = [(axes[0], "rank", ("d2p_prompts_test", "p2d_reverse_prompts_test"),
               "mean rank of the gold name (of 30; lower is better)"),
              (axes[1], "person_rank", ("p2d_prompts_test", "d2p_reverse_prompts_test"),
               "mean rank of the gold's person (descriptions; of 30)"),
              (axes[2], None, FILES, "generation match % (SMDM rule)")]
    for ax, metric, files, title in panels:
        series = [("mdm", metric or "match_w0", "MDM" + ("" if metric else " w=0"), "C0"),
                  *(([("mdm", m, f"MDM CFG w={m[7:]}", "C9") for m in cfg]) if metric is None else []),
                  ("arm", metric or "match_w0", "ARM", "C3")]
        width = 0.8 / len(series)
        for k, (model, m, label, color) in enumerate(series):
            for i, f in enumerate(files):
                r = _row(s, model, f, m)
                if r is None:
                    continue
                x = i + (k - (len(series) - 1) / 2) * width
                ax.bar(x, r["mean"], width * 0.9, color=color, alpha=0.6, label=label if i == 0 else None)
                ax.errorbar(x, r["mean"], yerr=[[r["mean"] - r["ci"][0]], [r["ci"][1] - r["mean"]]], color="k",
                            capsize=3, linewidth=1)
                ax.plot([x] * len(r["per_seed"]), list(r["per_seed"].values()), "k.", markersize=5)
        if metric is not None:
            ax.axhline(15.5, color="k", linestyle=":", linewidth=0.8, label="chance 15.5")
        ax.set_xticks(range(len(files)))
        ax.set_xticklabels([f"{f.replace('_prompts_test', '')}\n({DIRECTION[f].split(':')[0]})" for f in files],
                           fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Reversal curse, {_seeds(s).lower()}: bars = mean over seeds, "
                 "whiskers = 95 % interval clustered by person, dots = seeds", fontsize=10)
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("per_prompt", nargs="+", help="per_prompt.jsonl files of run.py (one per seed)")
    ap.add_argument("--markdown", default=None, help="write the tables here (default: print them)")
    ap.add_argument("--json", default=None, help="write every statistic here")
    ap.add_argument("--figure", default=None, help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    s = summarise(read_records(args.per_prompt))
    md = markdown(s)
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
        print(f"wrote {args.markdown}")
    else:
        print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.figure:
        print(f"wrote {figure(s, args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
