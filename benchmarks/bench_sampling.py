"""Diffusion decoding, speed and quality: our KV caches and parallel unmasking vs the peers' own algorithms.

One run, one model, side by side, repeats interleaved (every configuration once per round, so a load change on a
shared machine falls on all of them alike); ratios are taken within a round, the median over rounds reported.

References, written here from the peers' code as those projects write it (float32 model and logits; their
order of operations), each decoding the same prompts with the same model (an ``mdm-convert to-hf`` export):

* ``LLaDA generate`` (ML-GSAI/LLaDA ``generate.py``): per step a full forward with logits for every position;
  ``x0`` = argmax; confidence = softmax of the float32 logits at ``x0``, -inf beyond the block and at
  unmasked positions; the schedule's count per row by ``torch.topk`` in a loop over rows;
* ``Fast-dLLM prefix`` / ``Fast-dLLM dual`` (NVlabs/Fast-dLLM ``llada/generate.py``,
  ``generate_with_prefix_cache`` / ``generate_with_dual_cache``): the first step of each block is a full
  forward whose K/V become the cache (and whose logits, every position, decide that step); then the prefix cache
  runs the block and the suffix (logits for both) against the K/V before the block, concatenated with the
  window's own at every layer and step (``torch.cat``), and the dual cache runs the block alone against the
  whole sequence's K/V, writing the block's K/V into it in place (``replace_position``);
  ``get_transfer_index``: confidence in float64, ``topk`` per row; with a threshold every position of the
  step's ``topk`` after the first is dropped when its confidence is ``< threshold``;
  ``Fast-dLLM none`` (their ``generate``) is the uncached loop with that rule.

Ours: ``none`` / ``prefix`` / ``dual`` are ``megatron_mdm.decoding.decode`` (the code of ``mdm-generate``, the
lm-eval adapter and the exported model's ``generate``), with the schedule (one token per step) or a threshold;
the dual cache re-recorded every r forwards (``--refresh-intervals``) and with the factor rule.

Per configuration: CPU time of this single-threaded process (``time.process_time``; wall time on a shared
machine mostly measures the other jobs), generated tokens per CPU-second, forwards per generated token, the
share of generated positions equal to its reference's (``same tokens``) and to ``none``'s, and two measures of
the samples' quality: the conditional ELBO bound on -log p(sample | prompt) per generated token under the same
model (``likelihood.mc_conditional_loglik``, the same draws for every configuration; lower = more likely) and
distinct-n (distinct n-grams / n-grams of a sample, averaged over the samples; n = 1, 2).

``--generate-model DIR`` also times ``mdm-generate``'s own path (its argument parser, ``load_logits_fn``,
``decode``; start-up excluded) with ``--cache none`` and ``--cache dual`` on 8 text prompts.

    python benchmarks/bench_sampling.py --model outputs/conf/hf --text examples/data/tinyshakespeare.txt.zst

prints markdown tables (and writes them with ``--output``); docs/BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

# ---- the references -----------------------------------------------------------------------------------------


def _schedule(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's get_num_transfer_tokens: [b, steps], the remainder on the first steps (a loop over rows)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


def _canvas(prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int):
    """Both peers' prologue: the prompt then ``gen_length`` masks; (x, number of blocks, steps per block)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    return x, num_blocks, steps // num_blocks


@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int):
    """LLaDA's ``generate`` at temperature 0, low-confidence remasking, no CFG. Returns (x, forwards)."""
    x, num_blocks, steps = _canvas(prompt, steps, gen_length, block_length, mask_id)
    forwards = 0
    for num_block in range(num_blocks):
        end = prompt.shape[1] + (num_block + 1) * block_length
        block_mask_index = x[:, end - block_length : end] == mask_id
        num_transfer_tokens = _schedule(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(input_ids=x).logits
            forwards += 1
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x, forwards


def _transfer_index(logits, mask_index, x, num_transfer_tokens, threshold):
    """Fast-dLLM's get_transfer_index at temperature 0 with low-confidence remasking."""
    x0 = torch.argmax(logits, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -float("inf"))
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
        if threshold is not None:
            for k in range(1, int(num_transfer_tokens[j])):
                if confidence[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
    return x0, transfer_index


class _FastDllmCache:
    """Per-layer K/V as Fast-dLLM's LLaDA model keeps them (transformers' ``update`` protocol, [b, h, s, d]).

    ``record``: the full forward's K/V are kept (``use_cache=True``). ``prefix``: truncated to the block start;
    each window forward attends to ``torch.cat((past, new))``. ``dual``: the whole sequence's K/V; each window
    forward writes the block's K/V at the ``replace_position`` indices and attends to the whole.
    """

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mode, self.start, self.replace_position = "record", 0, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def truncate(self, start: int) -> None:
        self.kv = {i: (k[:, :, :start], v[:, :, :start]) for i, (k, v) in self.kv.items()}
        self.mode, self.start = "prefix", start

    def replace(self, replace_position: torch.Tensor, start: int) -> None:
        self.mode, self.start, self.replace_position = "dual", start, replace_position

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.mode == "record":
            self.kv[layer_idx] = (k, v)
            return k, v
        past_key, past_value = self.kv[layer_idx]
        if self.mode == "prefix":
            return torch.cat((past_key, k), dim=-2), torch.cat((past_value, v), dim=-2)
        replace_indices = self.replace_position[:1].nonzero(as_tuple=True)[1]  # theirs runs one row: its indices
        past_key[:, :, replace_indices] = k
        past_value[:, :, replace_indices] = v
        return past_key, past_value


def _window(model, x, start, end, cache):
    positions = torch.arange(start, end)[None]
    return model(input_ids=x[:, start:end], position_ids=positions, past_key_values=cache).logits


@torch.no_grad()
def fastdllm_generate(model, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int,
                      cache: str = "none", threshold: float | None = None):
    """Fast-dLLM's ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` at temperature 0
    (low-confidence remasking), with rows (their code runs one row; every row shares the block, so the dual
    cache's ``replace_position`` indices are the first row's). Returns (x, forwards)."""
    x, num_blocks, steps = _canvas(prompt, steps, gen_length, block_length, mask_id)
    nfe = 0
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = start + block_length
        num_transfer_tokens = _schedule(x[:, start:end] == mask_id, steps)
        i = 0
        if cache != "none":  # the block's first step: a full forward that records the cache
            kv = _FastDllmCache()
            logits = model(input_ids=x, past_key_values=kv).logits
            mask_index = x == mask_id
            mask_index[:, end:] = 0
            x0, transfer_index = _transfer_index(logits, mask_index, x, None if threshold is not None else
                                                 num_transfer_tokens[:, 0], threshold)
            x[transfer_index] = x0[transfer_index]
            nfe += 1
            if cache == "prefix":
                kv.truncate(start)
            else:
                replace_position = torch.zeros_like(x, dtype=torch.bool)
                replace_position[:, start:end] = 1
                kv.replace(replace_position, start)
            i = 1
        while True:  # (after a cached block's first step, at least one more forward, as theirs)
            nfe += 1
            n = None if threshold is not None else num_transfer_tokens[:, i]
            if cache == "none":
                mask_index = x == mask_id
                logits = model(input_ids=x).logits
                mask_index[:, end:] = 0
                x0, transfer_index = _transfer_index(logits, mask_index, x, n, threshold)
                x[transfer_index] = x0[transfer_index]
            elif cache == "prefix":
                mask_index = x[:, start:] == mask_id
                mask_index[:, block_length:] = 0
                logits = _window(model, x, start, x.shape[1], kv)
                x0 = torch.argmax(logits, dim=-1)  # computed and unused in their prefix loop, as written there
                x0, transfer_index = _transfer_index(logits, mask_index, x[:, start:], n, threshold)
                x[:, start:][transfer_index] = x0[transfer_index]
            else:
                mask_index = x[:, start:end] == mask_id
                logits = _window(model, x, start, end, kv)
                x0, transfer_index = _transfer_index(logits, mask_index, x[:, start:end], n, threshold)
                x[:, start:end][transfer_index] = x0[transfer_index]
            i += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, nfe


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
    ap.add_argument("--gen-lengths", default="128,256", help="comma-separated generated lengths (steps = length)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--thresholds", default="0.9", help="comma-separated thresholds: rows of ours and Fast-dLLM's")
    ap.add_argument("--factor", type=float, default=1.0)
    ap.add_argument("--refresh-intervals", default="8", help="comma-separated: dual cache re-recorded every r forwards")
    ap.add_argument("--elbo-samples", type=int, default=16, help="Monte Carlo draws per sample for the likelihood")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every configuration runs once per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-model", default=None,
                    help="also time mdm-generate's path (8 text prompts, --cache none vs dual) on this export")
    ap.add_argument("--generate-length", type=int, default=256)
    ap.add_argument("--output", default=None, help="also write the markdown report here")
    return ap.parse_args(argv)


def configs(thresholds: list[float], refresh: list[int], factor: float) -> list[tuple[str, str | None, dict]]:
    """(name, reference name or None, spec) rows; spec ``ref`` = the peer's function, else our settings."""
    rows: list[tuple[str, str | None, dict]] = [
        ("LLaDA generate", None, {"ref": "llada"}),
        ("Fast-dLLM prefix", None, {"ref": "fastdllm", "cache": "prefix"}),
        ("Fast-dLLM dual", None, {"ref": "fastdllm", "cache": "dual"}),
        ("none", "LLaDA generate", {"cache": "none"}),
        ("prefix", "Fast-dLLM prefix", {"cache": "prefix"}),
        ("dual", "Fast-dLLM dual", {"cache": "dual"}),
    ]
    for t in thresholds:
        for c in ("none", "prefix", "dual"):
            ref = f"Fast-dLLM {c}+threshold {t:g}"
            rows.append((ref, None, {"ref": "fastdllm", "cache": c, "threshold": t}))
            rows.append((f"{c}+threshold {t:g}", ref, {"cache": c, "threshold": t}))
    rows += [(f"dual+refresh {r}", None, {"cache": "dual", "refresh_interval": r}) for r in refresh]
    return rows + [(f"dual+factor {factor:g}", None, {"cache": "dual", "factor": factor})]


def _distinct(rows: list[list[int]], n: int) -> float:
    vals = []
    for r in rows:
        grams = [tuple(r[i : i + n]) for i in range(len(r) - n + 1)]
        vals.append(len(set(grams)) / len(grams) if grams else 0.0)
    return statistics.mean(vals)


def _run_config(spec: dict, model, fn, prompts, gen, blk, mask_id, vocab) -> tuple[torch.Tensor, list[int]]:
    from megatron_mdm.decoding import DecodingConfig, decode

    b = prompts.shape[0]
    if spec.get("ref") == "llada":
        x, forwards = llada_generate(model, prompts, gen, gen, blk, mask_id)
        return x[:, -gen:], [forwards] * b
    if spec.get("ref") == "fastdllm":
        x, forwards = fastdllm_generate(model, prompts, gen, gen, blk, mask_id, spec["cache"], spec.get("threshold"))
        return x[:, -gen:], [forwards] * b
    settings = DecodingConfig(gen_length=gen, steps=gen, block_length=blk, cache=spec["cache"],
                              threshold=spec.get("threshold"), factor=spec.get("factor"),
                              refresh_interval=spec.get("refresh_interval"))
    out = decode(fn, prompts, settings, mask_id, vocab_size=vocab)
    return out.tokens[:, -gen:], out.forwards_per_row


def _timed(call: Callable[[], object]) -> tuple[object, float, float]:
    t0, w0 = time.process_time(), time.perf_counter()
    out = call()
    return out, time.process_time() - t0, time.perf_counter() - w0


def sampling_table(args, fn, tok, mask_id, vocab) -> list[str]:
    from megatron_mdm.likelihood import mc_conditional_loglik

    model = fn.model
    text = _read_text(args.text)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    lengths = [int(n) for n in args.gen_lengths.split(",")]
    prompts_all = _prompts(tok, text, max(batches), args.prompt_length, args.seed)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    refresh = [int(r) for r in args.refresh_intervals.split(",") if r]
    rows_cfg = configs(thresholds, refresh, args.factor)
    blk = args.block_length
    lines = [
        "| batch | gen | decoding | CPU s | wall s | tokens/s | forwards / token | vs LLaDA generate "
        "| vs its reference | same tokens as reference | same tokens as `none` | NLL bound (nats/token) "
        "| distinct-1 | distinct-2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gen in lengths:
        for b in batches:
            prompts = prompts_all[:b]
            _run_config({"cache": "dual"}, model, fn, prompts[:1], blk, blk, mask_id, vocab)  # warm-up
            times: dict[str, list[float]] = {n: [] for n, _, _ in rows_cfg}
            walls: dict[str, list[float]] = {n: [] for n, _, _ in rows_cfg}
            outputs, fpt = {}, {}
            for _ in range(args.repeats):
                for name, _, spec in rows_cfg:
                    (x, per_row), cpu, wall = _timed(lambda spec=spec, prompts=prompts, gen=gen: _run_config(
                        spec, model, fn, prompts, gen, blk, mask_id, vocab))
                    times[name].append(cpu)
                    walls[name].append(wall)
                    outputs[name], fpt[name] = x, statistics.mean(per_row) / gen
                    print(f"gen {gen} batch {b} {name:>28}: {cpu:7.2f} CPU s ({wall:7.2f} s wall)", flush=True)
            for name, ref, _ in rows_cfg:
                med = statistics.median(times[name])
                vs_llada = statistics.median(a / c for a, c in zip(times["LLaDA generate"], times[name]))
                vs_ref = (f"{statistics.median(a / c for a, c in zip(times[ref], times[name])):.2f}x"
                          if ref else "")
                same_ref = f"{float((outputs[name] == outputs[ref]).double().mean()):.4f}" if ref else ""
                same_none = float((outputs[name] == outputs["none"]).double().mean())
                gen_rows = outputs[name].tolist()
                nll = []
                for i in range(b):  # the same draws for every configuration (common random numbers)
                    r = mc_conditional_loglik(fn, prompts[i].tolist(), gen_rows[i], mask_id, args.elbo_samples,
                                              generator=torch.Generator().manual_seed(1000 + i), vocab_size=vocab,
                                              batch_size=args.elbo_samples)
                    nll.append(-r.loglik / gen)
                lines.append(f"| {b} | {gen} | {name} | {med:.2f} | {statistics.median(walls[name]):.2f} | "
                             f"{b * gen / med:.1f} | {fpt[name]:.3f} | {vs_llada:.2f}x | {vs_ref} | {same_ref} | "
                             f"{same_none:.4f} | {statistics.mean(nll):.3f} | {_distinct(gen_rows, 1):.3f} | "
                             f"{_distinct(gen_rows, 2):.3f} |")
                print(lines[-1], flush=True)
    return lines


def generate_table(args) -> list[str]:
    """mdm-generate's own path (flags -> DecodingConfig, load_logits_fn, decode), cache none vs dual."""
    from megatron_mdm.cli.generate import build_parser
    from megatron_mdm.decoding import DecodingConfig, decode
    from megatron_mdm.evaluation.loading import load_logits_fn

    text = _read_text(args.text)
    lines = [ln.strip() for ln in text[int(len(text) * 0.9) :].splitlines() if len(ln.split()) >= 4][:8]
    fn, tok, mask_id, vocab = load_logits_fn(args.generate_model)
    n = args.generate_length
    times: dict[str, list[float]] = {"none": [], "dual": []}
    forwards = {}
    for _ in range(args.repeats):
        for cache in times:
            argv = ["--model", args.generate_model, "--gen-length", str(n), "--steps", str(n), "--block-length",
                    str(args.block_length), "--cache", cache, "--no-eos-stop", "--no-progress"]
            for p in lines:
                argv += ["--prompt", p]
            a = build_parser().parse_args(argv)
            settings = DecodingConfig.from_args(a).validate()
            out, cpu, _ = _timed(lambda a=a, settings=settings: decode(
                fn, [tok.encode(p) for p in a.prompt], settings, mask_id, eos_id=None,
                generator=torch.Generator().manual_seed(a.seed), vocab_size=vocab, device=a.device))
            times[cache].append(cpu)
            forwards[cache] = out.num_forward
            print(f"mdm-generate --cache {cache}: {cpu:.2f} CPU s", flush=True)
    ratio = statistics.median(a / b for a, b in zip(times["none"], times["dual"]))
    n_params = sum(p.numel() for p in fn.model.parameters())
    return [
        f"`mdm-generate` path on `{args.generate_model}` ({n_params / 1e6:.2f}M parameters, vocabulary {vocab}): "
        f"{len(lines)} text prompts ({min(map(len, map(tok.encode, lines)))}-{max(map(len, map(tok.encode, lines)))} "
        f"tokens), `--gen-length {n} --steps {n} --block-length {args.block_length} --no-eos-stop`, start-up "
        f"excluded; median of {args.repeats} interleaved rounds.",
        "",
        "| cache | CPU s | forwards | speed-up of dual |",
        "|---|---|---|---|",
        f"| none | {statistics.median(times['none']):.2f} | {forwards['none']} | |",
        f"| dual | {statistics.median(times['dual']):.2f} | {forwards['dual']} | {ratio:.2f}x |",
    ]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron_mdm.evaluation.loading import load_logits_fn

    fn, tok, mask_id, vocab = load_logits_fn(args.model)
    n_params = sum(p.numel() for p in fn.model.parameters())
    load_before = os.getloadavg()
    table = sampling_table(args, fn, tok, mask_id, vocab)
    extra = generate_table(args) if args.generate_model else []
    load_after = os.getloadavg()
    lines = [
        "`python benchmarks/bench_sampling.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        f"Model: `{args.model}` ({n_params / 1e6:.2f}M parameters, vocabulary {vocab}), float32. Prompts: "
        f"windows of {args.prompt_length} tokens from the last tenth of `{args.text}`; gen lengths "
        f"{args.gen_lengths}, blocks of {args.block_length}, steps = gen length (schedule rows: one token per step), "
        f"greedy; factor {args.factor}.",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, {args.threads} "
        f"intra-op thread(s); median of {args.repeats} interleaved rounds; load average (1, 5, 15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} at start, {'/'.join(f'{x:.1f}' for x in load_after)} at end. "
        "CPU time of this process (`time.process_time`); ratios are per round, their median.",
        "",
        *table,
        *([""] + extra if extra else []),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
