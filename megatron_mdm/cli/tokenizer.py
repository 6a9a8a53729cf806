"""``mdm-tokenizer train|inspect|add-mask``: argument parsing around ``megatron_mdm.tokenization``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report

SAMPLE = "Masked diffusion models unmask tokens in any order."


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer with <|mask|>, <|pad|>, <|bos|>, <|eos|>")
    t.add_argument("--input", nargs="+", required=True, help="files, globs or directories (jsonl[.zst], parquet, txt)")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. bytes and special tokens")
    t.add_argument("--output", required=True, help="directory to write (AutoTokenizer-loadable)")
    t.add_argument("--text-key", default="text", help="JSON field / parquet column with the text")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    i = sub.add_parser("inspect", help="vocabulary size, special ids, hash and a round trip")
    i.add_argument("path", help="tokenizer directory or tokenizer.json")
    i.add_argument("--text", default=SAMPLE, help="text for the round trip")
    a = sub.add_parser("add-mask", help="load a tokenizer, add <|mask|> (and pad/eos) when missing, save it")
    a.add_argument("path", help="tokenizer directory or tokenizer.json (e.g. a Llama tokenizer)")
    a.add_argument("--output", required=True, help="directory to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_mdm.data.readers import expand_inputs
    from megatron_mdm.tokenization import MDMTokenizer, train_bpe_tokenizer

    try:
        if args.cmd == "train":
            tok = train_bpe_tokenizer(expand_inputs(args.input), args.vocab_size, args.output, args.text_key,
                                      args.min_frequency, args.max_docs)
        elif args.cmd == "add-mask":
            tok = MDMTokenizer.load(args.path)
            tok.save(args.output)
        else:
            tok = MDMTokenizer.load(args.path)
            ids = tok.encode(args.text)
            info = tok.describe() | {"sample_ids": ids, "round_trip": tok.decode(ids),
                                     "round_trip_ok": tok.decode(ids) == args.text}
            print(json.dumps(info, indent=1, ensure_ascii=False))
            return 0
        print(json.dumps(tok.describe() | {"output": args.output}, indent=1))
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        return report("mdm-tokenizer", f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
