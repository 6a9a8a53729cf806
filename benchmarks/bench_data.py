"""Data pipeline throughput: prepare tokens/s per worker vs raw ``tokenizers`` encode_batch, and loader tokens/s.

    python benchmarks/bench_data.py [--corpus examples/data/tinyshakespeare.txt.zst] [--seq-length 2048]

Everything runs on the same text in the same process tree, so the ratios are meaningful on any machine.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=str(REPO / "examples" / "data" / "tinyshakespeare.txt.zst"))
    ap.add_argument("--repeat", type=int, default=4, help="copies of the corpus (as separate files)")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=300)
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
    tok = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
    t0 = time.perf_counter()
    n_raw = sum(len(e.ids) for i in range(0, len(texts), 256)
                for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
    raw_rate = n_raw / (time.perf_counter() - t0)
    print(f"raw tokenizers encode_batch (1 thread): {n_raw} tokens, {raw_rate / 1e6:.2f} M tokens/s")

    for workers in (1, 2):
        out = tmp / f"out{workers}"
        t0 = time.perf_counter()
        m = prepare([str(tmp / "in*.txt")], str(tmp / "tok"), str(out), args.seq_length, workers=workers,
                    shard_tokens=1 << 22)
        dt = time.perf_counter() - t0
        rate = m["num_text_tokens"] / dt
        print(f"prepare workers={workers}: {m['num_text_tokens']} tokens in {dt:.2f}s, {rate / 1e6:.2f} M tokens/s, "
              f"{rate / workers / 1e6:.2f} M tokens/s per worker ({rate / workers / raw_rate:.0%} of raw)")

    for workers in (0, 2):
        loader = build_pretrain_loader([(1.0, str(tmp / "out1"))], args.seq_length, 8, 0, 1, workers, 0, 64)
        it = iter(loader)
        next(it)  # start-up (worker processes) not counted
        t0 = time.perf_counter()
        n = sum(next(it)["tokens"].numel() for _ in range(args.batches))
        dt = time.perf_counter() - t0
        print(f"loader num_workers={workers}: {n / dt / 1e6:.2f} M tokens/s ({args.batches} batches of 8x"
              f"{args.seq_length})")


if __name__ == "__main__":
    main()
