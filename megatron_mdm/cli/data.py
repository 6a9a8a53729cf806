"""``mdm-data prepare|prepare-sft|mixture|inspect|verify|index``: argument parsing around ``megatron_mdm.data``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="tokenize, pack and shard text (run under mpirun for several nodes)")
    q.add_argument("--input", nargs="+", required=True, help="files, globs or directories "
                   "(jsonl, jsonl.zst, parquet, txt, txt.zst)")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    q.add_argument("--output", required=True, help="dataset directory to write")
    q.add_argument("--seq-length", type=int, required=True, help="tokens per packed sequence")
    q.add_argument("--text-key", default="text", help="JSON field / parquet column with the text")
    q.add_argument("--shard-tokens", type=int, default=1 << 26, help="approximate tokens per shard")
    q.add_argument("--workers", type=int, default=1, help="tokenizer processes per rank")
    q.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for OUTPUT/valid")
    q.add_argument("--strict", action="store_true", help="fail on the first bad input record")
    q.add_argument("--doc-boundaries", action="store_true", help="also store document start offsets")
    q.add_argument("--zstd-level", type=int, default=3, help="zstd level of the token members")
    q.add_argument("--allow-empty", action="store_true", help="write an empty dataset (with a warning) instead of "
                   "failing when the input holds no document")
    s = sub.add_parser("prepare-sft", help="instruction jsonl (prompt/completion or messages) -> shards with a "
                       "per-token loss mask (see docs/DATA_FORMAT.md)")
    s.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.zst files, globs or directories")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    s.add_argument("--output", required=True, help="dataset directory to (re)write")
    s.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    s.add_argument("--layout", choices=("packed", "padded"), default="packed", help="several examples per sequence "
                   "(attention kept inside each), or one per sequence padded with EOS in the loss (LLaDA)")
    s.add_argument("--truncate", action="store_true", help="cut an example longer than --seq-length (context from "
                   "the left, then the tail) instead of skipping it")
    s.add_argument("--chat-template", choices=("auto", "default"), default="auto", help="format of 'messages': "
                   "the tokenizer's chat template when it has one (auto), or the documented default")
    s.add_argument("--max-examples", type=int, default=None, help="take at most this many examples (a per-task cap)")
    s.add_argument("--strict", action="store_true", help="fail on the first bad record")
    s.add_argument("--shard-tokens", type=int, default=1 << 26, help="approximate tokens per shard")
    w = sub.add_parser("mixture", help="print --data-path weights for instruction datasets: examples-proportional "
                       "with a per-task cap (Flan)")
    w.add_argument("path", nargs="+", help="dataset directories written by prepare-sft")
    w.add_argument("--cap", type=int, default=None, help="examples cap per task")
    i = sub.add_parser("inspect", help="counts and a decoded sample")
    i.add_argument("path", help="dataset directory")
    i.add_argument("--tokenizer", default=None, help="decode the sample with this tokenizer")
    i.add_argument("--sample", type=int, default=0, help="index of the sample to show")
    v = sub.add_parser("verify", help="checksums and decodability of every shard")
    v.add_argument("path", help="dataset directory")
    x = sub.add_parser("index", help="write the index sidecars of a dataset prepared by an older version")
    x.add_argument("path", help="dataset directory (its validation split too)")
    return p


def _inspect(path: str, tokenizer: str | None, sample: int) -> None:
    from megatron_mdm.data import format as fmt
    from megatron_mdm.data.shards import SampleReader, check_manifests

    m = fmt.read_manifest(path)
    keys = ("split", "seq_length", "dtype", "vocab_size", "tokenizer_hash", "num_samples", "num_tokens",
            "num_documents", "num_text_tokens", "padding_tokens", "valid")
    print(json.dumps({k: m.get(k) for k in keys} | {"shards": len(m["shards"]),
                                                    "bad_input": m["report"]["counts"]}, indent=1))
    (src,) = check_manifests([(1.0, path)], m["seq_length"], verify="none")
    ids = SampleReader(src).read(sample % m["num_samples"]).tolist()
    print(f"sample {sample}: {ids[:64]}{' ...' if len(ids) > 64 else ''}")
    if tokenizer:
        from megatron_mdm.tokenization import MDMTokenizer

        print(repr(MDMTokenizer.load(tokenizer).decode(ids)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.cmd == "prepare":
            from megatron_mdm.data.prepare import prepare

            prepare(args.input, args.tokenizer, args.output, args.seq_length, args.text_key, args.shard_tokens,
                    args.workers, args.val_fraction, args.strict, args.doc_boundaries, args.zstd_level,
                    allow_empty=args.allow_empty)
        elif args.cmd == "prepare-sft":
            from megatron_mdm.data.prepare_sft import prepare_sft

            prepare_sft(args.input, args.tokenizer, args.output, args.seq_length, args.layout, args.truncate,
                        args.chat_template, args.max_examples, args.strict, args.shard_tokens)
        elif args.cmd == "mixture":
            from megatron_mdm.data.prepare_sft import mixture_weights

            print(" ".join(f"{wt:.6g} {d}" for wt, d in mixture_weights(args.path, args.cap)))
        elif args.cmd == "inspect":
            _inspect(args.path, args.tokenizer, args.sample)
        elif args.cmd == "index":
            from megatron_mdm.data.shards import index_dataset

            for d, n in index_dataset(args.path).items():
                print(f"{d}: {n} index sidecars written")
        else:
            from megatron_mdm.data.loader import verify_dataset

            for d, n in verify_dataset(args.path).items():
                print(f"{d}: OK, {n} samples verified")
    except (UserError, FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        return report("mdm-data", f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
