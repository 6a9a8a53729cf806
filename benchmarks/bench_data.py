"""Data pipeline throughput: prepare tokens/s per worker vs raw ``tokenizers`` encode_batch, and loader tokens/s.

    python benchmarks/bench_data.py [--corpus examples/data/tinyshakespeare.txt.zst] [--seq-length 2048]
        [--baseline-rev c57ae75]

The loader is measured side by side with the loader of an earlier revision (``--baseline-rev``, read with
``git show`` into a temporary module: the sequential shard streams with a shuffle buffer that the global
order replaced), interleaved in the same process on the same shards, so the ratio is meaningful on any
machine. Everything runs on the same text in the same process tree.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASELINE_REV = "c57ae75"  # the last revision with the shuffle-buffer loader


def _baseline_module(rev: str):
    """The loader module of ``rev`` (None when git or the revision is unavailable)."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:megatron_mdm/data/loader.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"baseline loader of {rev} unavailable ({e}); measuring the current loader only")
        return None
    path = Path(tempfile.mkdtemp(prefix="bench_data_old_")) / "old_loader.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_loader", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_loader"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rate(it, batches: int) -> float:
    next(it)  # start-up (worker processes, first chunk of the order) not counted
    t0 = time.perf_counter()
    n = sum(next(it)["tokens"].numel() for _ in range(batches))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=str(REPO / "examples" / "data" / "tinyshakespeare.txt.zst"))
    ap.add_argument("--repeat", type=int, default=4, help="copies of the corpus (as separate files)")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="old/new alternations per loader setting")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline loader ('' skips)")
    ap.add_argument("--skip-prepare", action="store_true", help="only the loader measurements")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from megatron_mdm.data.loader import build_pretrain_loader
    from megatron_mdm.data.prepare import prepare
    from megatron_mdm.data.readers import iter_documents
    from megatron_mdm.tokenization import train_bpe_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    train_bpe_tokenizer([args.corpus], args.vocab_size, tmp / "tok")
    texts = [t for _, _, t in iter_documents(args.corpus)]
    raw = "\n\n".join(texts)
    for i in range(args.repeat):
        (tmp / f"in{i}.txt").write_text(raw)
    texts = texts * args.repeat

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as one prepare worker has
    if not args.skip_prepare:
        tok = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
        t0 = time.perf_counter()
        n_raw = sum(len(e.ids) for i in range(0, len(texts), 256)
                    for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
        raw_rate = n_raw / (time.perf_counter() - t0)
        print(f"raw tokenizers encode_batch (1 thread): {n_raw} tokens, {raw_rate / 1e6:.2f} M tokens/s")
    for workers in (1,) if args.skip_prepare else (1, 2):
        out = tmp / f"out{workers}"
        t0 = time.perf_counter()
        m = prepare([str(tmp / "in*.txt")], str(tmp / "tok"), str(out), args.seq_length, workers=workers,
                    shard_tokens=1 << 22)
        dt = time.perf_counter() - t0
        rate = m["num_text_tokens"] / dt
        if not args.skip_prepare:
            print(f"prepare workers={workers}: {m['num_text_tokens']} tokens in {dt:.2f}s, {rate / 1e6:.2f} M "
                  f"tokens/s, {rate / workers / 1e6:.2f} M tokens/s per worker ({rate / workers / raw_rate:.0%} of raw)")
    data = [(1.0, str(tmp / "out1"))]
    print(f"loader: {m['num_samples']} samples of {args.seq_length} tokens in {len(m['shards'])} shards, "
          f"{args.batches} batches of 8 x {args.seq_length} per measurement, median of {args.rounds}")

    old = _baseline_module(args.baseline_rev) if args.baseline_rev else None
    for workers in (0, 2):
        new_rates, old_rates = [], []
        for _ in range(args.rounds):  # interleaved, so that machine load hits both alike
            it = iter(build_pretrain_loader(data, args.seq_length, 8, 8, 0, 1, workers, 0))
            new_rates.append(_rate(it, args.batches))
            del it
            if old is not None:
                it = iter(old.build_pretrain_loader(data, args.seq_length, 8, 0, 1, workers, 0, 64))
                old_rates.append(_rate(it, args.batches))
                del it
        new = statistics.median(new_rates)
        line = f"loader num_workers={workers}: global order {new / 1e6:.2f} M tokens/s"
        if old_rates:
            base = statistics.median(old_rates)
            line += f"; {args.baseline_rev} shuffle buffer {base / 1e6:.2f} M tokens/s; new/old {new / base:.2f}"
        print(line)


if __name__ == "__main__":
    main()
