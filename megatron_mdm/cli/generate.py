"""``mdm-generate``: sample completions from a Hugging Face MDM directory with the diffusion sampler.

A bad input (a missing ``--model`` directory, a model that ships code without ``--trust-remote-code``) is
one line on stderr and exit status 2. With ``--json`` stdout holds only the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_mdm.sampling import REMASKING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm-generate", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face directory (mdm-convert to-hf output)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory that is not our own export to run the Python code it ships "
                        "(auto_map); it runs with your permissions, so only for sources you trust")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch --model from the Hugging Face hub when it is a hub id missing from the local cache")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--gen-length", type=int, default=64, help="generated positions per prompt")
    p.add_argument("--steps", type=int, default=64, help="sampling iterations (a multiple of the blocks)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised CFG scale w (0 = off)")
    p.add_argument("--no-eos-stop", action="store_true", help="do not stop rows at EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_mdm.evaluation.loading import EvalInputError, load_logits_fn
    from megatron_mdm.sampling import generate

    try:
        logits_fn, tok, mask_id, vocab_size = load_logits_fn(
            args.model, args.device, trust_remote_code=args.trust_remote_code, allow_download=args.allow_download)
    except EvalInputError as e:
        print(f"mdm-generate: error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or [""]
    eos_id = None if args.no_eos_stop else getattr(tok, "eos_id", None)
    out = generate(
        logits_fn, [tok.encode(p) for p in prompts], args.gen_length, args.steps, mask_id,
        block_length=args.block_length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        remasking=args.remasking, cfg_scale=args.cfg_scale, eos_id=eos_id,
        generator=torch.Generator().manual_seed(args.seed), vocab_size=vocab_size, device=args.device,
    )
    for prompt, ids in zip(prompts, out.completions()):
        text = tok.decode(ids)
        print(json.dumps({"prompt": prompt, "completion": text, "ids": ids}) if args.json else prompt + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
