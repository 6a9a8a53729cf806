"""Speed of the lm-eval adapter's batching: requests per CPU-second at batch size 1 and larger.

Requests are multiple-choice-like ``loglikelihood`` pairs made from a text file (context: the first words of
a line, four continuations of 1-4 words: the line's next words and three others from the file) and
``generate_until`` prompts (the contexts). Each is scored by the ``mdm`` adapter (``method=chain``, and
``method=mc`` with ``--num-samples`` draws), rows per forward ``--batch-size``: each request in a call of
its own (a forward holds one request's rows: the adapter before batching), then all requests in one call
(rows of requests of one length share forwards). Values agree between the two by construction
(per-request seeds), which the script checks. CPU time (``time.process_time``, one thread) is reported:
on a shared machine wall time mostly measures the other jobs.

    python benchmarks/bench_lm_eval.py --model outputs/quickstart/latest/hf --text examples/data/tinyshakespeare.txt.zst
"""

from __future__ import annotations

import argparse
import io
import platform
import random
import time

import torch


def _lines(path: str) -> list[str]:
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8").read()
    else:
        text = open(path, encoding="utf-8").read()
    return [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 8]


def _requests(lines: list[str], n: int, seed: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = [w for ln in lines for w in ln.split()]
    ll, gen = [], []
    for q in range(n):
        ln = rng.choice(lines).split()
        cut = rng.randint(3, len(ln) - 4)
        ctx = " ".join(ln[:cut])
        choices = [" ".join(ln[cut : cut + rng.randint(1, 4)])] + [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(3)]
        ll += [Instance("loglikelihood", {}, (ctx, " " + c), len(ll)) for c in choices]
        gen.append(Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 8}), q))
    return ll, gen


def _one_by_one(fn):
    return lambda reqs: [x for q in reqs for x in fn([q], disable_tqdm=True)]


def _timed(fn, reqs):
    t = time.process_time()
    out = fn(reqs)
    return out, time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported MDM directory")
    p.add_argument("--text", required=True, help=".txt or .txt.zst file")
    p.add_argument("--questions", type=int, default=64, help="multiple-choice questions (4 requests each)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    from megatron_mdm.evaluation.lm_eval_adapter import MDMLM

    ll, gen = _requests(_lines(args.text), args.questions, args.seed)
    rows = []
    for label, extra, reqs in [("loglikelihood chain", "method=chain", ll),
                               (f"loglikelihood mc N={args.num_samples}", f"method=mc,num_samples={args.num_samples}",
                                ll),
                               ("generate_until 8 tok, 8 steps", "steps=8,gen_length=8", gen)]:
        kind = reqs[0].request_type
        out, times = [], []
        lm = MDMLM.create_from_arg_string(f"pretrained={args.model},{extra},batch_size={args.batch_size},"
                                          f"seed={args.seed},progress=false")
        fn = getattr(lm, kind)
        for alone in (True, False):  # each request in its own call (the adapter before batching), then all
            o, t = _timed(_one_by_one(fn) if alone else lambda r, fn=fn: fn(r, disable_tqdm=True), reqs)
            out.append(o)
            times.append(t)
        if kind == "loglikelihood":
            same = max(abs(a[0] - b[0]) / max(abs(a[0]), 1e-9) for a, b in zip(*out))
            agree = f"max rel. diff {same:.1e}"
        else:
            agree = f"{sum(a == b for a, b in zip(*out))}/{len(reqs)} texts equal"
        rows.append((label, len(reqs), len(reqs) / times[0], len(reqs) / times[1], times[0] / times[1], agree))
    print(f"machine: {platform.processor() or platform.machine()}, 1 thread; model {args.model}; "
          f"rows per forward {args.batch_size}")
    print("| requests | n | req/CPU-s, one request per call | req/CPU-s, all in one call | gain | batched vs alone |")
    print("|---|---|---|---|---|---|")
    for label, n, a, b, g, agree in rows:
        print(f"| {label} | {n} | {a:.1f} | {b:.1f} | {g:.1f}x | {agree} |")


if __name__ == "__main__":
    main()
