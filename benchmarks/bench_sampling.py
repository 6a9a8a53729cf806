"""Diffusion decoding speed and quality: KV cache (prefix, dual) and parallel unmasking vs LLaDA's algorithm.

One run, one model, side by side (ratios against the reference measured in the same run):

* ``llada-ref``: LLaDA's sampler (Nie et al. 2025, ``generate.py``: semi-autoregressive blocks, linear
  schedule, low-confidence remasking, a full forward of the whole sequence at every step, logits for
  every position), reimplemented below from that description as an independent reference; the only
  deviation: logits beyond the real vocabulary and the mask token are excluded, as the project does;
* ``none`` / ``prefix`` / ``dual``: ``megatron_mdm.decoding.generate`` without cache, with the prefix
  cache, with the dual cache; each with the schedule (one token per step at steps = gen length) and
  with each of ``--thresholds``; the dual cache re-recorded every r forwards of a block
  (``--refresh-intervals``) and with ``--factor``.

Per configuration: generated tokens per CPU-second (``time.process_time`` of this single-threaded
process: on a shared machine wall time mostly measures the other jobs), forwards per generated token
(per sample), agreement with the uncached output (the share of generated positions holding the same
token), and the samples' likelihood under the same model: the conditional ELBO bound on
-log p(sample | prompt) per generated token (``likelihood.mc_conditional_loglik``, the same draws for
every configuration), lower is better.

The model is an exported MDM directory (``mdm-convert to-hf``), run through ``HFForward``; prompts are
``--prompt-length`` token windows of a text file. Greedy decoding (temperature 0).

    python benchmarks/bench_sampling.py --model outputs/qs/hf320 --text examples/data/tinyshakespeare.txt.zst

prints a markdown table (and writes it with ``--output``); docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

# ---- the reference: LLaDA's sampler, from its description --------------------------------------------


@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int,
                   vocab_size: int) -> tuple[torch.Tensor, int]:
    """LLaDA ``generate`` at temperature 0 with low-confidence remasking. prompt: [b, p]. Returns (x, forwards)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    forwards = 0
    for nb in range(num_blocks):
        lo, hi = p + nb * block_length, p + (nb + 1) * block_length
        m = (x[:, lo:hi] == mask_id).sum(dim=1, keepdim=True)  # [b, 1]
        plan = (m // steps_per_block).repeat(1, steps_per_block)  # linear schedule, remainder first
        for i in range(b):
            plan[i, : int(m[i] % steps_per_block)] += 1
        for step in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x)[..., :vocab_size].float()  # full forward, every position
            forwards += 1
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p0 = torch.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p0[:, hi:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, p0, torch.full_like(p0, float("-inf")))
            transfer = torch.zeros_like(mask_index)
            for i in range(b):
                k = int(plan[i, step])
                if k:
                    transfer[i, torch.topk(conf[i], k).indices] = True
            x[transfer] = x0[transfer]
    return x, forwards


# ---- setup ------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _read_text(path: str) -> str:
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as f:
            return zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prompts(tok, text: str, n: int, length: int, seed: int) -> torch.Tensor:
    """n windows of ``length`` tokens from the last tenth of the text (held out from a 90/10 split)."""
    ids = tok.encode(text[int(len(text) * 0.9) :])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n,), generator=g).tolist()
    return torch.tensor([ids[s : s + length] for s in starts], dtype=torch.long)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported MDM directory (mdm-convert to-hf)")
    ap.add_argument("--text", default="examples/data/tinyshakespeare.txt.zst", help="prompt source (.txt/.zst)")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--thresholds", default="0.9,0.7", help="comma-separated thresholds, one set of rows each")
    ap.add_argument("--factor", type=float, default=1.0)
    ap.add_argument("--refresh-intervals", default="8", help="comma-separated: dual cache re-recorded every r forwards")
    ap.add_argument("--elbo-samples", type=int, default=16, help="Monte Carlo draws per sample for the likelihood")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (best is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="also write the markdown report here")
    return ap.parse_args(argv)


def configs(thresholds: list[float], refresh: list[int]) -> list[tuple[str, dict | None]]:
    """(name, settings) rows: the reference, each cache mode, each with each threshold, the dual cache
    re-recorded every r forwards of a block, dual + factor."""
    rows = [("llada-ref", None)] + [(c, {"cache": c}) for c in ("none", "prefix", "dual")]
    for t in thresholds:
        rows += [(f"{c}+threshold {t:g}", {"cache": c, "threshold": t}) for c in ("none", "prefix", "dual")]
    rows += [(f"dual+refresh {r}", {"cache": "dual", "refresh_interval": r}) for r in refresh]
    return rows + [("dual+factor", {"cache": "dual", "factor": True})]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron_mdm.decoding import DecodingConfig, decode, generate
    from megatron_mdm.evaluation.loading import load_logits_fn
    from megatron_mdm.likelihood import mc_conditional_loglik

    fn, tok, mask_id, vocab = load_logits_fn(args.model)
    n_params = sum(p.numel() for p in fn.model.parameters())
    text = _read_text(args.text)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts_all = _prompts(tok, text, max(batches), args.prompt_length, args.seed)
    gen, blk, steps = args.gen_length, args.block_length, args.steps
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    refresh = [int(r) for r in args.refresh_intervals.split(",") if r]
    load_before = os.getloadavg()[0]
    rows = []
    for b in batches:
        prompts = prompts_all[:b]
        outputs, times, walls, fpt = {}, {}, {}, {}
        generate(fn, prompts[:1], 8, 8, mask_id, vocab_size=vocab)  # warm-up
        for name, kw in configs(thresholds, refresh):
            best, best_wall = float("inf"), float("inf")
            for _ in range(args.repeats):
                t0, w0 = time.process_time(), time.perf_counter()
                if kw is None:
                    x, forwards = llada_generate(fn, prompts, steps, gen, blk, mask_id, vocab)
                    per_row = [forwards] * b
                else:
                    settings = DecodingConfig(gen_length=gen, steps=steps, block_length=blk, cache=kw["cache"],
                                              threshold=kw.get("threshold"),
                                              factor=args.factor if kw.get("factor") else None,
                                              refresh_interval=kw.get("refresh_interval"))
                    out = decode(fn, prompts, settings, mask_id, vocab_size=vocab)
                    x, per_row = out.tokens, out.forwards_per_row
                best, best_wall = min(best, time.process_time() - t0), min(best_wall, time.perf_counter() - w0)
            outputs[name], times[name], walls[name] = x[:, -gen:], best, best_wall
            fpt[name] = statistics.mean(per_row) / gen
            print(f"batch {b} {name:>22}: {best:7.2f} CPU s ({best_wall:7.2f} s wall), {b * gen / best:7.1f} tok/s, "
                  f"{fpt[name]:.3f} forwards/token", flush=True)
        base = outputs["none"]
        for name, _ in configs(thresholds, refresh):
            agree = float((outputs[name] == base).double().mean())
            nll = []
            for i in range(b):  # the same draws for every configuration (common random numbers)
                r = mc_conditional_loglik(fn, prompts[i].tolist(), outputs[name][i].tolist(), mask_id,
                                          args.elbo_samples, generator=torch.Generator().manual_seed(1000 + i),
                                          vocab_size=vocab, batch_size=args.elbo_samples)
                nll.append(-r.loglik / gen)
            rows.append((b, name, times[name], walls[name], b * gen / times[name], fpt[name],
                         times["llada-ref"] / times[name], agree, statistics.mean(nll)))
            print(f"batch {b} {name:>22}: agreement {agree:.4f}, NLL bound {rows[-1][-1]:.3f} nats/token", flush=True)
    lines = [
        "`python benchmarks/bench_sampling.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        f"Model: `{args.model}` ({n_params / 1e6:.2f}M parameters, vocabulary {vocab}), float32, HFForward. "
        f"Prompts: {len(prompts_all)} windows of {args.prompt_length} tokens from the last tenth of `{args.text}`; "
        f"gen length {gen}, blocks of {blk}, steps {steps} (schedule rows: one token per step), greedy; "
        f"factor {args.factor}.",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {args.threads} "
        f"intra-op thread(s); best of {args.repeats}; 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end. Time is the process's CPU time (`time.process_time`), which a "
        "shared machine inflates far less than wall time (also shown); tokens/s and speed-ups use CPU time.",
        "",
        "| batch | decoding | CPU time (s) | wall (s) | tokens/s | forwards / token | speed-up vs llada-ref "
        "| agreement with `none` | NLL bound of samples (nats/token) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {n} | {t:.2f} | {w:.2f} | {tps:.1f} | {f:.3f} | {s:.2f}x | {a:.4f} | {nll:.3f} |"
              for b, n, t, w, tps, f, s, a, nll in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
