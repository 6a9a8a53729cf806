"""``mdm-convert``: Megatron checkpoints <-> Hugging Face directories.

    mdm-convert to-hf   --load CKPT_DIR [--iteration N] --output HF_DIR [--shard-size 2GB] [--force]
                        [--no-verify-checkpoint] [--allow-unverified-checkpoint] [--no-progress]
    mdm-convert from-hf --hf HF_DIR --output CKPT_DIR [--tensor-model-parallel-size T]
                        [--pipeline-model-parallel-size P] [--tokenizer DIR] [--objective mdm|arm]
                        [--force] [--no-progress]

Progress (the stages, with the elapsed time, and the bytes read or written) goes to stderr when it is a
terminal.

from-hf reads Llama (3.x with llama3 RoPE scaling), Mistral, Qwen2/Qwen2.5, BERT, RoBERTa and XLM-R
(``model_type`` in config.json); to-hf writes the family back, after checking every file of the
checkpoint against its ``checksums.json`` (sizes only with ``--no-verify-checkpoint``). Errors are one
line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="Megatron distributed checkpoint -> Hugging Face directory")
    to.add_argument("--load", required=True, help="run directory or iter_* directory")
    to.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: latest)")
    to.add_argument("--output", required=True, help="Hugging Face directory to write")
    to.add_argument("--shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    to.add_argument("--force", action="store_true",
                    help="replace a non-empty --output that is not an export of the same run")
    to.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                    help="skip the checksums of the checkpoint's files (sizes are still checked)")
    to.add_argument("--allow-unverified-checkpoint", action="store_true",
                    help="export a checkpoint that lost its checksums.json (its files cannot be verified)")
    to.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (shown on stderr when it is a terminal: stages, bytes written)")
    fr = sub.add_parser("from-hf", help="Hugging Face directory (Llama, Mistral, Qwen2, BERT, RoBERTa, XLM-R) "
                                        "-> Megatron checkpoint")
    fr.add_argument("--hf", required=True, help="Hugging Face model directory")
    fr.add_argument("--output", required=True, help="run directory to write (iteration 0)")
    fr.add_argument("--tensor-model-parallel-size", type=int, default=1)
    fr.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    fr.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --hf directory)")
    fr.add_argument("--objective", choices=["mdm", "arm"], default="mdm",
                    help="objective recorded in the checkpoint's config (default mdm: diffusive adaptation)")
    fr.add_argument("--force", action="store_true",
                    help="write into a non-empty --output that is not an earlier import (never a training run)")
    fr.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars (shown on stderr when it is a terminal: stages, bytes read)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.progress = args.progress and sys.stderr.isatty()  # a log file gets the one-line result or error
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("megatron", "torch.distributed"):  # their INFO lines at import are not ours to show
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_mdm.checkpoint.integrity import failure_line, verification
    from megatron_mdm.hf import export_to_hf, import_from_hf

    try:
        if args.command == "to-hf":
            with verification(args.verify_checkpoint, iteration_flag="--iteration",
                              allow_unverified=args.allow_unverified_checkpoint):
                out = export_to_hf(args.load, args.output, iteration=args.iteration,
                                   shard_size=args.shard_size, force=args.force, progress=args.progress)
            print(f"wrote {out}")
        else:
            out = import_from_hf(args.hf, args.output, tokenizer_dir=args.tokenizer,
                                 tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                 objective=args.objective, progress=args.progress, force=args.force)
            print(f"wrote {out}")
    except (UserError, FileNotFoundError) as e:
        return report("mdm-convert", f"error: {e}")
    except CheckpointException as e:  # a BaseException: torch could not read the checkpoint
        return report("mdm-convert", f"error: {args.load}: the checkpoint could not be read ({failure_line(e)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
