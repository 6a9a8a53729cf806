"""Instruction tuning at CPU scale: held-out task families, zero- and few-shot, MDM vs ARM, vs task-specific.

The Ye et al. protocol, tiny: train families (``speaker``, ``continue``, ``reverse``, ``count``, ``wine`` from
``tasks.py``) are prepared with ``mdm-data prepare-sft`` (packed, one directory per task, mixed with
``mdm-data mixture`` weights and a per-task cap) and an MDM and the ARM baseline of the same shape are
instruction-tuned on them from scratch with the same steps and batch (the same compute, 6·N·D). The held-out
families (``last_word``, ``iris``) are never trained on by these models; each is scored zero-shot and
``--shots``-shot (demonstrations from the family's own training split prepended to the prompt) by likelihood
ranking of its answer choices (iris: the 3 species; last_word: the distinct words of the line): the ARM by
its exact log-likelihood, the MDM by the Monte Carlo ELBO bound with common random numbers over the choices
(``examples/reversal_curse/run.py``'s ``mdm_scores``). Next to them, task-specific models (same shape, steps and
batch) trained on the held-out family's training split alone.

    nice -n 15 python examples/instruction_tuning/run.py --out runs/instruction_tuning
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from tasks import CORPUS, build  # noqa: E402

TRAIN = ("speaker", "continue", "reverse", "count", "wine")
HELD_OUT = ("last_word", "iris")


def _reversal():
    spec = importlib.util.spec_from_file_location("reversal_run", REPO / "examples" / "reversal_curse" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reversal_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def choices_of(task: str, rec: dict) -> list[str]:
    if task == "iris":
        return [" setosa", " versicolor", " virginica"]
    line = rec["prompt"].split("What is the last word of: ", 1)[1].rsplit("\nAnswer:", 1)[0]
    return list(dict.fromkeys(" " + w for w in re.findall(r"[A-Za-z']+", line)))


def split_held_out(path: str, n_test: int) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(x) for x in Path(path).read_text().splitlines()]
    return recs[:n_test], recs[n_test:]


def train(args, name: str, objective: str, data_path: list[str], tok: Path, out: Path) -> Path:
    save = out / "runs" / f"{name}_{objective}"
    if (save / f"iter_{args.steps:07d}" / "metadata.json").is_file():  # a re-run keeps finished models
        return save
    from megatron_mdm.launch import pretrain_command

    cmd = pretrain_command([
        "--preset", args.preset, "--objective", objective,
        "--tokenizer", str(tok), "--data-path", *data_path, "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.batch), "--global-batch-size", str(args.batch),
        "--train-iters", str(args.steps), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-warmup-iters", str(args.steps // 10), "--lr-decay-style", "cosine", "--log-interval",
        str(max(1, args.steps // 5)), "--seed", str(args.seed), "--save", str(save), "--transformer-impl", "local",
        "--num-workers", "0"], torchrun=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log = out / "runs" / f"{name}_{objective}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"training {name} {objective} failed (exit {rc}); see {log}:\n" +
                         "\n".join(log.read_text().splitlines()[-15:]))
    print(f"[instruction_tuning] trained {name} {objective.upper()} in {time.time() - t0:.0f}s ({log})", flush=True)
    return save


def score(rv, logits_fn, objective: str, tok, test: list[dict], demos: list[dict], task: str, args) -> float:
    prefix = "".join(d["prompt"] + d["completion"] + "\n\n" for d in demos)
    hits = 0
    for rec in test:
        prompt = tok.encode(prefix + rec["prompt"])
        choices = choices_of(task, rec)
        cands = [tok.encode(c) for c in choices]
        if objective == "mdm":
            s = rv.mdm_scores(logits_fn, prompt, cands, max(len(c) for c in cands) + 1, tok.mask_id, tok.eos_id,
                              tok.vocab_size, args.mc_samples, args.seed)
        else:
            s = rv.ar_loglik(logits_fn, prompt, [c + [tok.eos_id] for c in cands], tok.vocab_size)
        hits += int(max(range(len(s)), key=lambda i: s[i]) == choices.index(rec["completion"]))
    return 100.0 * hits / len(test)


def chance(task: str, test: list[dict]) -> float:
    return 100.0 * sum(1 / len(choices_of(task, r)) for r in test) / len(test)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/instruction_tuning")
    p.add_argument("--preset", default="tiny-4l")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--per-task", type=int, default=400, help="examples per family (held-out: test + train split)")
    p.add_argument("--n-test", type=int, default=60, help="test examples per held-out family")
    p.add_argument("--cap", type=int, default=300, help="examples cap per training family (mixture weights)")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--mc-samples", type=int, default=8, help="MDM: Monte Carlo draws per choice")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_mdm.data.prepare_sft import mixture_weights, prepare_sft
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.tokenization import MDMTokenizer, train_bpe_tokenizer

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = build(out / "tasks", args.per_task, seed=0)
    tok_dir = out / "tok"
    if not tok_dir.exists():
        train_bpe_tokenizer([str(CORPUS)], 1024, tok_dir, max_docs=3000)
    tok = MDMTokenizer.load(tok_dir)
    data = out / "data"
    for t in TRAIN:
        prepare_sft([files[t]], str(tok_dir), str(data / t), args.seq_length, truncate=True)
    held: dict[str, tuple[list[dict], list[dict]]] = {}
    for t in HELD_OUT:
        test, tr = split_held_out(files[t], args.n_test)
        held[t] = (test, tr)
        p = out / "tasks" / f"{t}_train.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in tr))
        prepare_sft([str(p)], str(tok_dir), str(data / f"{t}_train"), args.seq_length, truncate=True)
    blend = [x for w, d in mixture_weights([str(data / t) for t in TRAIN], args.cap) for x in (f"{w:.6g}", d)]
    runs = {}
    for obj in ("mdm", "arm"):
        runs[("instruct", obj)] = train(args, "instruct", obj, blend, tok_dir, out)
        for t in HELD_OUT:
            runs[(f"task_{t}", obj)] = train(args, f"task_{t}", obj, [str(data / f"{t}_train")], tok_dir, out)
    rv = _reversal()
    rows = []
    for (name, obj), run in runs.items():
        logits_fn, _, _ = load_megatron_for_inference(run)
        for t in HELD_OUT:
            if name.startswith("task_") and name != f"task_{t}":
                continue
            test, tr = held[t]
            demos = random.Random(args.seed).sample(tr, args.shots)
            t0 = time.time()
            row = {"model": obj.upper(), "training": "instruction mixture (held out)" if name == "instruct"
                   else "task-specific", "task": t, "n": len(test), "chance": chance(t, test),
                   "zero_shot": score(rv, logits_fn, obj, tok, test, [], t, args),
                   f"{args.shots}_shot": score(rv, logits_fn, obj, tok, test, demos, t, args)}
            print(f"[instruction_tuning] {obj.upper()} {name} on {t}: zero-shot {row['zero_shot']:.1f}%, "
                  f"{args.shots}-shot {row[f'{args.shots}_shot']:.1f}% (chance {row['chance']:.1f}%, "
                  f"{time.time() - t0:.0f}s)", flush=True)
            rows.append(row)
    res = {"config": vars(args), "rows": rows, "seconds": time.time() - t_start}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    k = f"{args.shots}_shot"
    print(f"\n| model | training | task | n | chance % | zero-shot % | {args.shots}-shot % |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['training']} | {r['task']} | {r['n']} | {r['chance']:.1f} | "
              f"{r['zero_shot']:.1f} | {r[k]:.1f} |")
    print(f"\nend to end: {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
