"""``mdm-generate``: sample completions from a Hugging Face MDM directory with the diffusion sampler.

Fast decoding: ``--cache prefix|dual`` (Fast-dLLM's block KV caches) and ``--threshold`` / ``--factor``
(parallel unmasking) cut the forwards; ``--json`` reports each sample's forward count. A progress bar
(unmasked tokens) goes to stderr when it is a terminal.

A bad input (a missing ``--model`` directory, a model that ships code without ``--trust-remote-code``,
inconsistent decoding flags) is one line on stderr and exit status 2. With ``--json`` stdout holds only
the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.decoding.settings import DecodingConfig
from megatron_mdm.decoding.settings import add_arguments as add_decoding_arguments
from megatron_mdm.errors import UserError, report


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-generate", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face directory (mdm-convert to-hf output)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory that is not our own export to run the Python code it ships "
                        "(auto_map); it runs with your permissions, so only for sources you trust")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch --model from the Hugging Face hub when it is a hub id missing from the local cache")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop rows at EOS")
    add_decoding_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (none at all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_progress:
        from megatron_mdm.cli import hide_progress_bars

        hide_progress_bars()  # transformers' "Loading weights" too
    import torch

    from megatron_mdm.decoding.loop import decode
    from megatron_mdm.evaluation.loading import load_logits_fn

    try:  # inconsistent decoding flags: before the model loads
        settings = DecodingConfig.from_args(args).validate()
    except ValueError as e:
        return report("mdm-generate", f"error: {e}")

    try:
        logits_fn, tok, mask_id, vocab_size = load_logits_fn(
            args.model, args.device, trust_remote_code=args.trust_remote_code, allow_download=args.allow_download)
    except UserError as e:
        return report("mdm-generate", f"error: {e}")
    prompts = args.prompt or [""]
    eos_id = None if args.no_eos_stop else getattr(tok, "eos_id", None)
    ids = [tok.encode(p) for p in prompts]
    try:
        _beyond_trained_length(logits_fn, ids, settings.gen_length)
    except UserError as e:
        return report("mdm-generate", f"error: {e}")
    try:
        out = decode(logits_fn, ids, settings, mask_id, eos_id=eos_id,
                     generator=torch.Generator().manual_seed(args.seed), vocab_size=vocab_size, device=args.device,
                     progress=not args.no_progress)
    except ValueError as e:  # e.g. --cache on a model without KV cache support
        return report("mdm-generate", f"error: {e}")
    for prompt, ids, n in zip(prompts, out.completions(), out.forwards_per_row):
        text = tok.decode(ids)
        print(json.dumps({"prompt": prompt, "completion": text, "ids": ids, "forwards": n}) if args.json
              else prompt + text)
    return 0


def _beyond_trained_length(logits_fn, ids: list[list[int]], gen_length: int) -> None:
    """A prompt and its completion longer than the model's positions (``max_position_embeddings`` of its
    config.json, the length it was trained on): a warning with both numbers for rotary positions (they run, but
    were never trained there); a one-line EvalInputError for learned absolute positions (BERT: they do not exist)."""
    from megatron_mdm.evaluation.loading import EvalInputError

    config = getattr(getattr(logits_fn, "model", None), "config", None)
    trained = getattr(config, "max_position_embeddings", None)
    if not isinstance(trained, int):
        return
    learned = ("bert", "roberta", "xlm-roberta")  # learned absolute positions (the BERT families we convert)
    absolute = getattr(config, "model_type", None) in learned or \
        getattr(config, "position_embedding_type", None) == "absolute"
    if getattr(config, "model_type", None) in learned[1:]:  # RoBERTa's positions start after the padding id
        trained -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    for k, prompt in enumerate(ids, 1):
        need = len(prompt) + gen_length
        if need <= trained:
            continue
        what = (f"prompt {k} is {len(prompt)} tokens, with --gen-length {gen_length} {need} positions, more than "
                f"the {trained}")
        if absolute:
            raise EvalInputError(f"--prompt: {what} the model has (max_position_embeddings): shorten the prompt "
                                 "or --gen-length")
        print(f"mdm-generate: warning: {what} the model was trained on (max_position_embeddings): expect "
              "degraded samples", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
