"""Sampling throughput (generated tokens/s) vs number of diffusion steps, on CPU with a small model.

The model is a randomly initialised bidirectional transformer encoder (``torch.nn.TransformerEncoder``,
Llama-like width) behind the same ``LogitsFn`` interface as the HF and Megatron models; throughput
is dominated by the forward passes: one per step (two rows per sequence under CFG, batched).

Usage: python benchmarks/bench_sampling.py [--output FILE.md] [--threads 2]  (prints a markdown table;
with --output also writes it; docs/BENCHMARKS.md records the figures)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from megatron_mdm.sampling import generate


class Encoder(torch.nn.Module):
    """Embedding + bidirectional TransformerEncoder + output projection."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, max_len: int = 1024):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.pos = torch.nn.Embedding(max_len, hidden)
        layer = torch.nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))  # [b, s, h]
        return self.head(self.body(h))  # [b, s, V]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default=None, help="also write the markdown table to this file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--steps", default="8,16,32,64")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=5, help="report the best of this many runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab, hidden, layers, heads = 8192, 256, 4, 4
    torch.manual_seed(0)
    model = Encoder(vocab, hidden, layers, heads).eval()
    n_params = sum(p.numel() for p in model.parameters())
    mask_id = vocab - 1

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids)

    rows = []
    load_before = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    for b in map(int, args.batch_sizes.split(",")):
        prompts = torch.randint(0, mask_id, (b, args.prompt_length), generator=g)
        generate(logits_fn, prompts, 8, 2, mask_id)  # warm-up
        for steps in map(int, args.steps.split(",")):
            for cfg in (0.0, 1.0) if steps == 32 else (0.0,):
                times = []
                for _ in range(args.repeats):  # best of N: the machine may be shared
                    t0 = time.perf_counter()
                    out = generate(logits_fn, prompts, args.gen_length, steps, mask_id, block_length=32,
                                   temperature=1.0, cfg_scale=cfg, generator=torch.Generator().manual_seed(1))
                    times.append(time.perf_counter() - t0)
                dt = min(times)
                rows.append((b, steps, cfg, out.num_forward, dt, b * args.gen_length / dt))
                print(f"batch {b} steps {steps} cfg {cfg}: {dt:.2f} s, {rows[-1][-1]:.1f} tokens/s", flush=True)
    lines = [
        "# Sampling throughput (CPU)",
        "",
        "`python benchmarks/bench_sampling.py` (megatron_mdm.sampling.generate, low-confidence remasking,",
        "temperature 1, semi-autoregressive blocks of 32). Model: random bidirectional transformer encoder,",
        f"{layers} layers, hidden {hidden}, {heads} heads, vocabulary {vocab} ({n_params / 1e6:.1f}M parameters), float32.",
        f"Prompt {args.prompt_length} tokens, {args.gen_length} generated tokens per sequence.",
        "",
        (f"Machine: {_cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
        f"{args.threads} intra-op threads."),
        "",
        (f"Best of {args.repeats} runs per row. The machine was shared with other jobs (1-min load average "
        f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end), so absolute figures are pessimistic "
        "and noisy."),
        "",
        "| batch | steps | CFG w | forwards | time (s) | generated tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {s} | {c:g} | {f} | {dt:.2f} | {tps:.1f} |" for b, s, c, f, dt, tps in rows]
    lines += [
        "",
        "Time grows linearly with the number of steps (one forward of the full sequence per step); CFG",
        "doubles the rows of each forward. Tokens/s = batch x generated length / wall time.",
        "",
    ]
    print("\n".join(lines))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
