"""The reversal-curse experiment: a small MDM and its ARM baseline, same size, data and steps.

    python examples/reversal_curse/run.py --output runs/reversal_curse            # everything
    python examples/reversal_curse/run.py --steps 5 --preset tiny --max-test 4 --output /tmp/rc  # smoke

1. trains a byte-level BPE tokenizer (``--vocab-size``, default 2000) on the three train files and the
   test prompts (or reuses ``--tokenizer`` / the ``--load`` checkpoint's tokenizer);
2. trains (or, with ``--load``, finetunes) an MDM and an ARM on ``p2d_prompts_train``,
   ``d2p_prompts_train`` and ``both_prompts_train`` together with ``pretrain/pretrain_mdm.py
   --sft-data --sft-train-on-prompt``: each fact is trained as one whole sequence (prompt +
   completion + EOS padding, every position masked at rate t and in the loss), the protocol of SMDM's
   reversal-curse finetuning; ``--prompt-out-of-loss`` keeps prompts unmasked and out of the loss
   instead (plain SFT, which can only learn the prompt -> completion direction). Launched with torchrun;
3. scores the same-direction (``p2d_prompts_test``, ``d2p_prompts_test``) and reverse-direction
   (``p2d_reverse_prompts_test``, ``d2p_reverse_prompts_test``) test prompts:

   * **exact match**: greedy generation (MDM: ``sampling.generate``, low-confidence remasking,
     temperature 0, one token per step, gen length = longest completion of the file in tokens + 4,
     stop at EOS; ARM: greedy next-token decoding, same length, stop at EOS) decoded and compared with
     the gold completion after whitespace normalisation; a hit is a generation that *starts with* the
     gold (its final '.' dropped), as the paper's exact-match of the answer;
   * **rank** of the gold completion among the candidates = the distinct completions of that test file,
     by log-likelihood (MDM: the estimator of ``likelihood.mc_conditional_loglik``, the Monte Carlo
     ELBO bound of log p(span | prompt) where span = candidate + EOS padding to the gen length,
     ``--mc-samples`` antithetic draws with the same seed, hence the same masks, for every candidate
     (common random numbers), batched over the candidates; ARM: the exact
     autoregressive log p(candidate + EOS | prompt)). Rank = 1 + number of candidates scoring >= gold
     (ties count against the gold). For the description files several paraphrases of one person's
     description are candidates; ``person_top1`` / ``person_rank`` rank the people instead (a person's
     score = their best paraphrase; 30 people per file);

4. prints a table (model x test file) and writes ``results.json`` and ``results.md`` to ``--output``.

The data directory defaults to ``../shared/data/reversal_curse`` next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a clone without installing
    sys.path.insert(0, str(REPO))

from megatron_mdm.launch import pretrain_command  # noqa: E402 - after the checkout is on sys.path

TRAIN_FILES = ("p2d_prompts_train", "d2p_prompts_train", "both_prompts_train")
# test file -> (the training direction of its people, same/reverse direction)
TEST_FILES = {
    "p2d_prompts_test": ("p2d", "same"),
    "d2p_prompts_test": ("d2p", "same"),
    "p2d_reverse_prompts_test": ("p2d", "reverse"),
    "d2p_reverse_prompts_test": ("d2p", "reverse"),
}
# a description test file and the name test file of the same people (names in the first's prompts)
NAME_FILE_OF = {"p2d_prompts_test": "p2d_reverse_prompts_test", "d2p_reverse_prompts_test": "d2p_prompts_test"}
GEN_EXTRA = 4


# ---- data ------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    return REPO.parent / "shared" / "data" / "reversal_curse"


def resolve_data_dir(path: str | os.PathLike | None) -> Path:
    """The data directory, checked to hold every train and test file; SystemExit with a clear message."""
    d = Path(path) if path is not None else default_data_dir()
    missing = [f"{n}.jsonl" for n in (*TRAIN_FILES, *TEST_FILES) if not (d / f"{n}.jsonl").is_file()]
    if not d.is_dir() or missing:
        what = "does not exist" if not d.is_dir() else f"lacks {', '.join(missing)}"
        raise SystemExit(
            f"reversal_curse: data directory {d} {what}. Pass --data-dir DIR holding the jsonl files of "
            "lukasberglund/reversal_curse data/reverse_experiments/june_version_7921032488 "
            "({prompt, completion} per line).")
    return d


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append((rec["prompt"], rec["completion"]))
    return out


@dataclass
class TestSet:
    """One test file: examples, the candidate set and who each candidate belongs to.

    Attributes:
        name: file stem.
        prompts, golds: the (subsampled) examples.
        candidates: distinct completions of the whole file, in first-seen order.
        gold_index: index into ``candidates`` of each example's gold.
        groups: person of each candidate (the candidate itself for name files).
    """

    name: str
    prompts: list[str]
    golds: list[str]
    candidates: list[str]
    gold_index: list[int]
    groups: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # line of each example in the file (0-based)

    @property
    def direction(self) -> str:
        return TEST_FILES[self.name][1]


def _person_in(prompt: str, names: list[str]) -> str | None:
    hits = [n for n in names if n in prompt]
    return max(hits, key=len) if hits else None


def load_test_set(data_dir: Path, name: str, max_test: int | None = None, seed: int = 0) -> TestSet:
    """Read a test file; the candidates are its distinct completions; subsample ``max_test`` examples."""
    pairs = read_pairs(data_dir / f"{name}.jsonl")
    candidates = list(dict.fromkeys(c for _, c in pairs))
    if name in NAME_FILE_OF:  # descriptions: the person is named in the prompt
        names = sorted({c.strip() for _, c in read_pairs(data_dir / f"{NAME_FILE_OF[name]}.jsonl")})
        person_of: dict[str, str] = {}
        for p, c in pairs:
            who = _person_in(p, names)
            if who is None:
                raise ValueError(f"{name}: no known person named in prompt {p!r}")
            if person_of.setdefault(c, who) != who:
                raise ValueError(f"{name}: completion {c!r} belongs to {person_of[c]} and {who}")
        groups = [person_of[c] for c in candidates]
    else:
        groups = [c.strip() for c in candidates]
    idx = list(range(len(pairs)))
    if max_test is not None and max_test < len(pairs):
        idx = sorted(random.Random(seed).sample(idx, max_test))
    pos = {c: i for i, c in enumerate(candidates)}
    return TestSet(name, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], candidates,
                   [pos[pairs[i][1]] for i in idx], groups, idx)


# ---- metrics ---------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_exact_match(generated: str, gold: str) -> bool:
    """The generation starts with the gold completion (whitespace-normalised, gold's final '.' dropped),
    ending there or at a non-alphanumeric character ("Uriah Hawthorne." matches "Uriah Hawthorne")."""
    g, t = normalize(generated), normalize(gold).rstrip(".").rstrip()
    if not t or not g.startswith(t):
        return False
    return len(g) == len(t) or not g[len(t)].isalnum()


def contains_match(generated: str, gold: str) -> bool:
    """SMDM's exact match (``evaluate_reverse.py``): the gold, stripped and lower-cased, occurs anywhere in
    the stripped, lower-cased generation."""
    return gold.strip().lower() in generated.strip().lower()


def rank_of(scores: list[float], gold: int) -> int:
    """1 + number of other candidates scoring at least the gold's score (ties count against the gold)."""
    s = scores[gold]
    return 1 + sum(1 for i, x in enumerate(scores) if i != gold and x >= s)


def group_rank(scores: list[float], groups: list[str], gold: int) -> int:
    """Rank of the gold's group, a group scoring as its best candidate (ties against the gold)."""
    best: dict[str, float] = {}
    for x, g in zip(scores, groups):
        best[g] = max(best.get(g, float("-inf")), x)
    mine = groups[gold]
    return 1 + sum(1 for g, x in best.items() if g != mine and x >= best[mine])


# ---- models as LogitsFn: generation and scoring ----------------------------------------------------


def _torch():
    import torch

    return torch


def ar_greedy_generate(logits_fn, prompts: list[list[int]], gen_length: int, eos_id: int,
                       vocab_size: int | None = None) -> list[list[int]]:
    """Greedy next-token decoding with a causal model (no KV cache), cut before EOS.

    Rows are grouped by prompt length so no padding is ever fed. Returns the generated ids per row.
    """
    torch = _torch()
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for idx in by_len.values():
            x = torch.tensor([prompts[i] for i in idx], dtype=torch.long)  # [g, p]
            done = torch.zeros(len(idx), dtype=torch.bool)
            for _ in range(gen_length):
                logits = logits_fn(x)[:, -1]  # [g, V_padded]
                if vocab_size is not None:
                    logits = logits[:, :vocab_size]
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                x = torch.cat([x, nxt[:, None]], dim=1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            p = len(prompts[idx[0]])
            for row, i in zip(x[:, p:].tolist(), idx):
                out[i] = row[: row.index(eos_id)] if eos_id in row else row
    return out


def ar_loglik(logits_fn, prompt: list[int], completions: list[list[int]], vocab_size: int | None = None,
              batch_size: int = 64) -> list[float]:
    """Exact log p(completion | prompt) under a causal model, summed over the completion's tokens.

    Completions of different lengths are right-padded (a causal model never sees the padding from
    the scored positions). The prompt must be non-empty.
    """
    torch = _torch()
    if not prompt:
        raise ValueError("ar_loglik needs a non-empty prompt")
    p = len(prompt)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(completions), batch_size):
            chunk = completions[start : start + batch_size]
            width = p + max(len(c) for c in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, c in enumerate(chunk):
                x[r, : p + len(c)] = torch.tensor(prompt + list(c))
            logits = logits_fn(x[:, :-1])  # [b, width-1, V]
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            logp = torch.log_softmax(logits.double(), dim=-1)
            tok = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [b, width-1]: log p(x[j+1] | x[:j+1])
            for r, c in enumerate(chunk):
                out.append(float(tok[r, p - 1 : p - 1 + len(c)].sum()))
    return out


def mdm_scores(logits_fn, prompt: list[int], completions: list[list[int]], span: int, mask_id: int, eos_id: int,
               vocab_size: int | None, num_samples: int, seed: int, method: str = "mc",
               batch_size: int = 256) -> list[float]:
    """log p(completion + EOS padding to ``span`` | prompt) for each candidate under an MDM.

    ``mc``: ``likelihood.mc_conditional_loglik_candidates`` (ELBO bound, antithetic t, generator seeded
    with ``seed``): all candidates have the same length (prompt + span) and share one set of draws
    (common random numbers); the values equal ``mc_conditional_loglik(..., generator=
    Generator().manual_seed(seed))`` per candidate (tested). ``mc-loop``: that call per candidate (slow;
    the reference). ``chain``: ``likelihood.chain_rule_loglik`` with the greedy order (one forward per
    token: slow).
    """
    torch = _torch()
    from megatron_mdm.likelihood import (
        chain_rule_loglik,
        mc_conditional_loglik,
        mc_conditional_loglik_candidates,
    )

    spans = [list(c)[:span] + [eos_id] * max(span - len(c), 0) for c in completions]
    if method in ("mc-loop", "chain"):
        out = []
        for ids in spans:
            if method == "mc-loop":
                r = mc_conditional_loglik(logits_fn, prompt, ids, mask_id, num_samples, t_sampling="antithetic",
                                          generator=torch.Generator().manual_seed(seed), vocab_size=vocab_size)
            else:
                r = chain_rule_loglik(logits_fn, prompt, ids, mask_id, order="greedy", vocab_size=vocab_size)
            out.append(r.loglik)
        return out
    if method != "mc":
        raise ValueError(f"unknown MDM likelihood method {method!r}")
    results = mc_conditional_loglik_candidates(
        logits_fn, prompt, spans, mask_id, num_samples, t_sampling="antithetic",
        generator=torch.Generator().manual_seed(seed), vocab_size=vocab_size, batch_size=batch_size)
    return [r.loglik for r in results]


def generations(logits_fn, objective: str, tokenizer, prompts: list[list[int]], gen_length: int,
                cfg_scales: tuple[float, ...]) -> dict[float, list[str]]:
    """Greedy generations of every prompt, decoded, per guidance scale. MDM: the decoding loop
    (``decoding.loop.generate``), low-confidence remasking, temperature 0, one token per step, stop at EOS,
    unsupervised CFG of scale w (the prompt replaced by masks in the unconditional half; w = 0 none), as
    SMDM's ``evaluate_reverse.py`` decodes. ARM: greedy next-token decoding (no CFG; one entry, w = 0)."""
    from megatron_mdm.decoding.loop import generate

    if objective != "mdm":
        return {0.0: [tokenizer.decode(g) for g in ar_greedy_generate(logits_fn, prompts, gen_length,
                                                                       tokenizer.eos_id, tokenizer.vocab_size)]}
    out = {}
    for w in cfg_scales:
        gen = generate(logits_fn, prompts, gen_length=gen_length, steps=gen_length, mask_id=tokenizer.mask_id,
                       temperature=0.0, remasking="low_confidence", cfg_scale=w, eos_id=tokenizer.eos_id,
                       vocab_size=tokenizer.vocab_size).completions()
        out[float(w)] = [tokenizer.decode(g) for g in gen]
    return out


def evaluate(logits_fn, objective: str, tokenizer, test_sets: list[TestSet], mc_samples: int = 8,
             mdm_loglik: str = "mc", seed: int = 0, cfg_scales: tuple[float, ...] = (0.0,), log=print) -> list[dict]:
    """Generation matches and likelihood rank of one model on every test set; one result dict per set,
    with the per-prompt results in ``records``.

    ``tokenizer`` needs ``encode``, ``decode``, ``mask_id``, ``eos_id`` and ``vocab_size``. The MDM generates
    once per scale of ``cfg_scales``; ``exact_match`` / ``contains`` are those of the first scale, the others
    are in ``by_cfg``.
    """
    rows = []
    for ts in test_sets:
        t0 = time.time()
        cand_ids = [tokenizer.encode(c) for c in ts.candidates]
        gen_length = max(len(c) for c in cand_ids) + GEN_EXTRA
        prompts = [tokenizer.encode(p) for p in ts.prompts]
        gens = generations(logits_fn, objective, tokenizer, prompts, gen_length, tuple(cfg_scales))
        exact = {w: [is_exact_match(t, gold) for t, gold in zip(texts, ts.golds)] for w, texts in gens.items()}
        contains = {w: [contains_match(t, gold) for t, gold in zip(texts, ts.golds)] for w, texts in gens.items()}
        first = next(iter(gens))
        texts, hits = gens[first], exact[first]
        ranks, pranks = [], []
        for p, gi in zip(prompts, ts.gold_index):
            if objective == "mdm":
                s = mdm_scores(logits_fn, p, cand_ids, gen_length, tokenizer.mask_id, tokenizer.eos_id,
                               tokenizer.vocab_size, mc_samples, seed, mdm_loglik)
            else:
                s = ar_loglik(logits_fn, p, [c + [tokenizer.eos_id] for c in cand_ids], tokenizer.vocab_size)
            ranks.append(rank_of(s, gi))
            pranks.append(group_rank(s, ts.groups, gi))
        n = len(ts.prompts)
        row = {
            "model": objective, "test_file": ts.name, "direction": ts.direction, "n": n,
            "exact_match": 100.0 * sum(hits) / n,
            "contains": 100.0 * sum(contains[first]) / n,
            "by_cfg": {str(w): {"exact_match": 100.0 * sum(exact[w]) / n, "contains": 100.0 * sum(contains[w]) / n}
                       for w in gens},
            "top1": 100.0 * sum(r == 1 for r in ranks) / n,
            "mean_rank": sum(ranks) / n,
            "num_candidates": len(ts.candidates),
            "person_top1": 100.0 * sum(r == 1 for r in pranks) / n,
            "person_mean_rank": sum(pranks) / n,
            "num_people": len(set(ts.groups)),
            "gen_length": gen_length,
            "seconds": round(time.time() - t0, 1),
            "examples": [{"prompt": p, "gold": g, "generated": t, "exact": h, "rank": r}
                         for p, g, t, h, r in list(zip(ts.prompts, ts.golds, texts, hits, ranks))[:5]],
            "records": [{"file": ts.name, "index": idx, "person": ts.groups[gi], "rank": r, "person_rank": pr,
                         "num_candidates": len(ts.candidates),
                         "generated": {str(w): gens[w][k] for w in gens},
                         "exact": {str(w): exact[w][k] for w in gens},
                         "contains": {str(w): contains[w][k] for w in gens}}
                        for k, (idx, gi, r, pr) in enumerate(zip(ts.indices, ts.gold_index, ranks, pranks))],
        }
        log(f"  {objective} {ts.name}: exact {row['exact_match']:.1f}% (CFG: " + ", ".join(
            f"w={w} {v['contains']:.1f}%" for w, v in row["by_cfg"].items()) + f" contains) top1 {row['top1']:.1f}% "
            f"mean rank {row['mean_rank']:.2f}/{row['num_candidates']} ({row['seconds']}s)")
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: generation matches (greedy; SMDM's 'contains' rule without and with CFG), likelihood
    ranks of the gold and of the gold's person."""
    head = ("| model | test file | direction | n | exact match % | SMDM match % | SMDM match % with CFG "
            "| top-1 by likelihood % | mean rank | candidates | person top-1 % | person mean rank | people |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        cfg = {float(w): v for w, v in r.get("by_cfg", {}).items() if float(w) > 0}
        guided = "—" if not cfg else f"{cfg[max(cfg)]['contains']:.1f} (w={max(cfg):g})"
        lines.append(
            f"| {r['model'].upper()} | {r['test_file']} | {r['direction']} | {r['n']} | {r['exact_match']:.1f} "
            f"| {r.get('contains', float('nan')):.1f} | {guided} | {r['top1']:.1f} | {r['mean_rank']:.2f} "
            f"| {r['num_candidates']} | {r['person_top1']:.1f} | {r['person_mean_rank']:.2f} | {r['num_people']} |")
    return "\n".join(lines)


# ---- the pipeline ----------------------------------------------------------------------------------


def train_tokenizer(data_dir: Path, out_dir: Path, vocab_size: int) -> Path:
    from megatron_mdm.tokenization import train_bpe_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "tokenizer_corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for n in TRAIN_FILES:
            for p, c in read_pairs(data_dir / f"{n}.jsonl"):
                f.write(json.dumps({"text": p + c}) + "\n")
        for n in TEST_FILES:
            for p, _ in read_pairs(data_dir / f"{n}.jsonl"):
                f.write(json.dumps({"text": p}) + "\n")
    tok_dir = out_dir / "tokenizer"
    train_bpe_tokenizer([str(corpus)], vocab_size, tok_dir)
    return tok_dir


def train_seq_length(data_dir: Path, tok_dir: Path, multiple: int = 16) -> int:
    """Longest train sample (prompt + completion + EOS) in tokens, rounded up to ``multiple``."""
    from megatron_mdm.tokenization import MDMTokenizer

    tok = MDMTokenizer.load(tok_dir)
    pairs = [pc for n in TRAIN_FILES for pc in read_pairs(data_dir / f"{n}.jsonl")]
    longest = max(len(p) + len(c) for p, c in zip(tok.encode_batch([p for p, _ in pairs]),
                                                   tok.encode_batch([c for _, c in pairs]))) + 1
    return -(-longest // multiple) * multiple


def _checkpoint_dir(load: str) -> Path:
    from megatron_mdm.checkpoint.checkpointing import resolve_checkpoint

    return resolve_checkpoint(load)


def model_flags(args) -> list[str]:
    if args.load:  # the checkpoint decides the architecture
        import yaml

        from megatron_mdm.checkpoint import layout

        m = yaml.safe_load(layout.config_file(_checkpoint_dir(args.load)).read_text())["model"]
        keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "rotary_base", "norm_epsilon", "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by")
        return [x for k in keys if m.get(k) is not None for x in ("--" + k.replace("_", "-"), str(m[k]))]
    flags = ["--preset", args.preset]
    for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(args, k) is not None:
            flags += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    return flags


def training_command(args, objective: str, data_dir: Path, tok_dir: Path, save: Path) -> list[str]:
    """The torchrun command line that trains one model with ``megatron_mdm.cli.pretrain --sft-data``."""
    mbs = args.global_batch_size // args.nproc
    if mbs * args.nproc != args.global_batch_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by --nproc {args.nproc}")
    flags = [*model_flags(args), "--objective", objective, "--tokenizer", str(tok_dir),
           "--sft-data", str(data_dir / "*_prompts_train.jsonl"), "--seq-length", str(args.seq_length),
           "--micro-batch-size", str(mbs), "--global-batch-size", str(args.global_batch_size),
           "--train-iters", str(args.steps), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
           "--lr-warmup-iters", str(min(args.warmup, max(args.steps - 1, 0))), "--lr-decay-style", "cosine",
           "--log-interval", str(max(1, min(50, args.steps // 10))), "--seed", str(args.seed),
           "--save", str(save), "--transformer-impl", "local"]
    if getattr(args, "curve_interval", None):  # every checkpoint kept: the learning curves score each
        flags += ["--save-interval", str(args.curve_interval), "--keep-last", "0"]
    if not args.prompt_out_of_loss:
        flags += ["--sft-train-on-prompt"]
    if args.load:
        flags += ["--load", str(args.load), "--finetune"]
    return pretrain_command(flags, args.nproc, torchrun=True)


def start_training(args, objective: str, data_dir: Path, tok_dir: Path, save: Path):
    cmd = training_command(args, objective, data_dir, tok_dir, save)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    log_path = save.parent / f"train_{objective}.log"
    print(f"[reversal_curse] training {objective.upper()}: {' '.join(cmd[2:])}\n  log: {log_path}", flush=True)
    logf = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT), logf, log_path


def wait_training(objective: str, proc, logf, log_path: Path) -> None:
    rc = proc.wait()
    logf.close()
    if rc != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        ours = [x for x in lines if "mdm-pretrain:" in x and "Error" in x]  # the one-line known errors
        tail = "\n".join(ours or lines[-25:])
        raise SystemExit(f"reversal_curse: training the {objective} model failed (exit {rc}); {log_path}:\n{tail}")


def _last_loss(log_path: Path) -> float | None:
    m = re.findall(r"last loss ([0-9.naninf]+)", log_path.read_text(errors="replace"))
    try:
        return float(m[-1]) if m else None
    except ValueError:
        return None


# ---- learning curves ----------------------------------------------------------------------------------

# The two name files: 30 name candidates each, the cheapest to score; one per direction.
CURVE_FILES = ("d2p_prompts_test", "p2d_reverse_prompts_test")


def checkpoint_iterations(run_dir: Path) -> list[int]:
    """Iterations of the complete checkpoints (``iter_*/metadata.json``) in a run directory."""
    return sorted(int(p.name[5:]) for p in Path(run_dir).glob("iter_*")
                  if p.name[5:].isdigit() and (p / "metadata.json").is_file())


def learning_curves(out: Path, models: list[str], tokenizer, data_dir: Path, max_test: int | None,
                    mc_samples: int, seed: int, log=print) -> list[dict]:
    """Score every saved checkpoint of each model on the name files (same and reverse direction)."""
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference

    sets = [load_test_set(data_dir, n, max_test, seed) for n in CURVE_FILES]
    rows = []
    for m in models:
        for it in checkpoint_iterations(out / m):
            logits_fn, _, _ = load_megatron_for_inference(out / m, iteration=it)
            for r in evaluate(logits_fn, m, tokenizer, sets, mc_samples, "mc", seed, log=lambda *a: None):
                r.pop("records")
                rows.append({k: r[k] for k in ("model", "test_file", "direction", "n", "exact_match", "top1",
                                               "mean_rank", "num_candidates")} | {"iteration": it})
            cur = [x for x in rows if x["model"] == m and x["iteration"] == it]
            log(f"[reversal_curse] curve {m.upper()} iter {it}: " + ", ".join(
                f"{x['direction']} top1 {x['top1']:.0f}% rank {x['mean_rank']:.1f}" for x in cur))
    return rows


def plot_learning_curves(rows: list[dict], out: Path, models: list[str], path: Path) -> Path:
    """Training loss and same/reverse-direction scores against steps, MDM and ARM (one PNG)."""
    from megatron_mdm.sweep.curves import _pyplot, read_metrics

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"mdm": "C0", "arm": "C3"}
    for m in models:
        try:
            train, _ = read_metrics(out / m)
        except ValueError:
            train = []
        axes[0].plot([r["iteration"] for r in train], [r["loss"] for r in train], color=colors[m], label=m.upper())
        for direction, style in (("same", "-"), ("reverse", "--")):
            pts = sorted((r["iteration"], r["top1"], r["mean_rank"]) for r in rows
                         if r["model"] == m and r["direction"] == direction)
            if not pts:
                continue
            label = f"{m.upper()} {direction} ({'d2p names' if direction == 'same' else 'p2d names, reversed'})"
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[m], marker="o", label=label)
            axes[2].plot([p[0] for p in pts], [p[2] for p in pts], style, color=colors[m], marker="o", label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (MDM: 1/t-weighted ELBO)")
    axes[1].set_title("top-1 of 30 names by likelihood (%)")
    axes[1].axhline(100 / 30, color="k", linewidth=0.8, linestyle=":", label="chance")
    axes[2].set_title("mean rank of the gold name (of 30)")
    axes[2].axhline(15.5, color="k", linewidth=0.8, linestyle=":", label="chance")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None,
                    help="reversal-curse jsonl files (default ../shared/data/reversal_curse)")
    ap.add_argument("--output", default="runs/reversal_curse", help="output directory")
    ap.add_argument("--models", default="mdm,arm", help="comma list of objectives to run: mdm, arm")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    ap.add_argument("--preset", default="quickstart", help="model size preset (megatron_mdm.presets)")
    for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="overrides the preset")
    ap.add_argument("--load", default=None, help="start both models from this checkpoint's weights (--finetune)")
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory (default: the --load "
                    "checkpoint's, else train one)")
    ap.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size when training one")
    ap.add_argument("--seq-length", type=int, default=None,
                    help="training length (default: the longest train sample + EOS, rounded up to 16)")
    ap.add_argument("--global-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=1, help="torchrun processes (data parallel) per model")
    ap.add_argument("--concurrent", action=argparse.BooleanOptionalAction, default=None,
                    help="train the models side by side (default: when nproc x models <= CPU cores)")
    ap.add_argument("--max-test", type=int, default=None, help="examples per test file (random subsample)")
    ap.add_argument("--mc-samples", type=int, default=8, help="Monte Carlo samples of the MDM likelihood")
    ap.add_argument("--mdm-loglik", choices=("mc", "mc-loop", "chain"), default="mc", help="MDM likelihood estimator")
    ap.add_argument("--cfg-scale", type=float, default=0.8,
                    help="the MDM also generates with unsupervised CFG of this scale w (SMDM's evaluate_reverse.py "
                         "default 0.8); 0: without CFG only")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompt-out-of-loss", action="store_true",
                    help="plain SFT (prompt never masked, out of the loss) instead of whole-sequence training")
    ap.add_argument("--skip-train", action="store_true", help="score existing <output>/<model> checkpoints")
    ap.add_argument("--curve-interval", type=int, default=None,
                    help="keep a checkpoint every N steps and score each on the two name files (same and reverse "
                         "direction): <output>/curves.json and curves.png")
    ap.add_argument("--curve-max-test", type=int, default=15, help="examples per name file for the curves")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("mdm", "arm") for m in models):
        raise SystemExit(f"--models: expected a comma list of mdm, arm; got {args.models!r}")
    t_start = time.time()
    timings: dict[str, float] = {}

    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    elif args.load and (_checkpoint_dir(args.load) / "tokenizer").exists():
        tok_dir = _checkpoint_dir(args.load) / "tokenizer"
    else:
        t0 = time.time()
        tok_dir = train_tokenizer(data_dir, out, args.vocab_size)
        timings["tokenizer_s"] = time.time() - t0
    print(f"[reversal_curse] tokenizer: {tok_dir}", flush=True)
    if args.seq_length is None:
        args.seq_length = train_seq_length(data_dir, tok_dir)


    losses = {}
    if not args.skip_train:
        concurrent = args.concurrent if args.concurrent is not None else \
            args.nproc * len(models) <= (os.cpu_count() or 1)
        t0 = time.time()
        if concurrent:  # one process per model side by side: no idle core, startup overlapped
            jobs = [start_training(args, m, data_dir, tok_dir, out / m) for m in models]
            try:
                for m, job in zip(models, jobs):
                    wait_training(m, *job)
            finally:
                for proc, logf, _ in jobs:  # a failed model stops the other
                    if proc.poll() is None:
                        proc.terminate()
                        proc.wait()
                    logf.close()
        else:
            for m in models:
                wait_training(m, *start_training(args, m, data_dir, tok_dir, out / m))
        timings["train_s"] = time.time() - t0
        losses = {m: _last_loss(out / f"train_{m}.log") for m in models}

    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.tokenization import MDMTokenizer

    tokenizer = MDMTokenizer.load(tok_dir)
    test_sets = [load_test_set(data_dir, n, args.max_test, args.seed) for n in TEST_FILES]
    rows = []
    for m in models:
        t0 = time.time()
        logits_fn, cfg, _ = load_megatron_for_inference(out / m)
        if cfg.objective.objective != m:
            raise SystemExit(f"{out / m} holds a {cfg.objective.objective} model, expected {m}")
        print(f"[reversal_curse] scoring {m.upper()}", flush=True)
        rows += evaluate(logits_fn, m, tokenizer, test_sets, args.mc_samples, args.mdm_loglik, args.seed,
                         cfg_scales=(0.0, args.cfg_scale) if args.cfg_scale else (0.0,))
        timings[f"eval_{m}_s"] = time.time() - t0
    if args.curve_interval:
        t0 = time.time()
        curve_rows = learning_curves(out, models, tokenizer, data_dir, args.curve_max_test, args.mc_samples, args.seed)
        (out / "curves.json").write_text(json.dumps(curve_rows, indent=1))
        try:
            png = plot_learning_curves(curve_rows, out, models, out / "curves.png")
            print(f"[reversal_curse] learning curves: {png}")
        except ValueError as e:  # matplotlib missing: the JSON is still there
            print(f"[reversal_curse] curves.json written; no picture: {e}")
        timings["curves_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    table = format_table(rows)
    size = model_flags(args)
    meta = {"data_dir": str(data_dir), "steps": args.steps, "model": " ".join(size),
            "global_batch_size": args.global_batch_size, "seq_length": args.seq_length, "lr": args.lr,
            "nproc": args.nproc, "load": args.load, "max_test": args.max_test, "mdm_loglik": args.mdm_loglik,
            "mc_samples": args.mc_samples, "cfg_scale": args.cfg_scale, "seed": args.seed,
            "final_train_loss": losses, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "vocab_size": tokenizer.vocab_size}
    with open(out / "per_prompt.jsonl", "w", encoding="utf-8") as f:  # one line per (model, test prompt)
        for r in rows:
            for rec in r.pop("records"):
                f.write(json.dumps({"seed": args.seed, "model": r["model"], **rec}) + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    md = (f"# Reversal curse: {', '.join(x.upper() for x in models)}\n\n"
          f"model: `{' '.join(size)}`, steps {args.steps}, global batch {args.global_batch_size}, seq length "
          f"{args.seq_length}, lr {args.lr}, {args.nproc} process(es), load {args.load or 'none (from scratch)'}, "
          f"MDM likelihood: {args.mdm_loglik} ({args.mc_samples} samples), max test {args.max_test or 'all'}\n\n"
          f"{table}\n\ntimings (s): {json.dumps(meta['timings_s'])}\n")
    (out / "results.md").write_text(md)
    print("\n" + table)
    print(f"\n[reversal_curse] wrote {out / 'results.json'} and {out / 'results.md'} "
          f"(total {timings['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
