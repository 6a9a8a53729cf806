"""Training-step benchmark: tokens/s, TFLOP/s per device and MFU for a preset, MDM vs ARM.

Runs the real training step (``megatron_mdm.training.Trainer.train_step``: Megatron schedules,
DDP, optimizer) on a synthetic in-memory batch stream, so the figure is the step itself without data
loading. Both objectives are built on the same model shape in the same processes and timed in
interleaved repetitions (the order alternates each repetition), and the median step time of each is
reported, so machine noise affects both alike: the MDM's extra work (drawing t and the masks,
the 1/t weights) should cost ~nothing next to the forward/backward.

FLOPs per step are ``model.flops_per_sequence`` x global batch (6·N·S + head + attention; full S²
attention for MDM, half for the causal ARM). MFU needs the device's peak: detected for H100/H200/A100,
else ``--peak-tflops``; on CPU none is printed (and the TFLOP/s of a masked-only-logits variant count
the full head's FLOPs: a like-for-like rate of the same step).

``CPU s`` is the median process CPU time per step (slowest rank): on a shared CPU machine it is far less
inflated by other jobs than wall time (on a GPU it only measures the host).

``--masked-only-logits both`` adds, for each objective, a variant with the output layer and the
cross-entropy on the positions with a nonzero loss weight only (``+masked`` in the table), timed in the
same interleaved repetitions: the MDM's head then works on the masked fraction t ~ U(eps, 1) of the
positions (half on average); the ARM's on all but the last.

    torchrun --nproc-per-node 2 benchmarks/bench_train.py --preset quickstart --seq-length 128 \
        --micro-batch-size 16 --tensor-model-parallel-size 2 --steps 20
    torchrun --nproc-per-node 1 benchmarks/bench_train.py --preset smdm-1.1b --seq-length 2048 \
        --micro-batch-size 8 --global-batch-size 64 --bf16 --vocab-size 32000 --objectives mdm arm
    torchrun --nproc-per-node 1 benchmarks/bench_train.py --preset quickstart --vocab-size 128000 \
        --masked-only-logits both --objectives mdm arm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


class RandomTokens:
    """Endless micro-batches of random tokens from a fixed pool (stateful, as the Trainer expects)."""

    def __init__(self, vocab: int, seq_length: int, micro_batch_size: int, seed: int, pool: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(0, vocab, (pool, micro_batch_size, seq_length), generator=g)
        self.pos = 0

    def __iter__(self):
        while True:
            batch = self.pool[self.pos % len(self.pool)]
            self.pos += 1
            yield {"tokens": batch.clone()}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (megatron_mdm.presets)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    p.add_argument("--steps", type=int, default=10, help="timed steps per objective")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective first")
    p.add_argument("--objectives", nargs="+", default=["mdm", "arm"], choices=["mdm", "arm"])
    p.add_argument("--masked-only-logits", default="off", choices=["off", "on", "both"],
                   help="head and cross-entropy only where the loss weight is nonzero; both = time each way")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (mask and pad at the end)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"])
    p.add_argument("--fp8-format", default=None, choices=["hybrid", "e4m3"])
    p.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "blockwise"])
    p.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: detected)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (rank 0)")
    return p.parse_args(argv)


def build_config(args, world_size: int):
    from megatron_mdm.config import Config, apply_dict
    from megatron_mdm.presets import get_preset

    cfg = Config()
    apply_dict(cfg, get_preset(args.preset), f"preset {args.preset}")
    cfg.model.preset = args.preset
    cfg.model.transformer_impl = args.transformer_impl
    cfg.model.fp8_format = args.fp8_format
    cfg.model.fp8_recipe = args.fp8_recipe
    cfg.model.first_last_layers_bf16 = args.fp8_format is not None and args.fp8_recipe != "delayed"
    cfg.model.recompute_granularity = args.recompute_granularity
    cfg.data.seq_length = args.seq_length
    cfg.parallel.tensor_model_parallel_size = args.tensor_model_parallel_size
    cfg.parallel.pipeline_model_parallel_size = args.pipeline_model_parallel_size
    cfg.parallel.use_distributed_optimizer = args.use_distributed_optimizer
    dp = world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    cfg.optim.micro_batch_size = args.micro_batch_size
    cfg.optim.global_batch_size = args.global_batch_size or args.micro_batch_size * dp
    cfg.optim.train_iters = 10**9
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.lr_warmup_iters = 1e-4, 1e-5, 0
    cfg.optim.bf16 = args.bf16
    cfg.objective.random_length_prob = 0.01
    cfg.logging.peak_tflops = args.peak_tflops
    cfg.validate(world_size=world_size)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_mdm import runtime
    from megatron_mdm.models.flops import flops_per_sequence
    from megatron_mdm.training.loop import Trainer
    from megatron_mdm.training.metrics import peak_tflops

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = build_config(args, world)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    rank = torch.distributed.get_rank()
    vocab, mask_id, pad_id = args.vocab_size, args.vocab_size - 1, args.vocab_size - 2
    dp_rank = ps.get_data_parallel_rank()

    trainers, causal = {}, {}
    masked_modes = {"off": [False], "on": [True], "both": [False, True]}[args.masked_only_logits]
    for obj in args.objectives:
        for masked in masked_modes:
            ocfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, objective=obj),
                                       model=dataclasses.replace(cfg.model, masked_only_logits=masked))
            loader = RandomTokens(vocab - 2, cfg.data.seq_length, cfg.optim.micro_batch_size, seed=100 + dp_rank)
            destroy_num_microbatches_calculator()
            t = Trainer(ocfg, vocab, mask_id, pad_id, loader)
            t._train_iter = iter(loader)
            for m in t.model:
                m.train()
            name = obj + ("+masked" if masked and args.masked_only_logits == "both" else "")
            trainers[name], causal[name] = t, obj == "arm"

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed_step(obj: str) -> float:
        torch.distributed.barrier()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainers[obj].train_step()
        sync()
        dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64,
                          device=runtime.device())
        torch.distributed.all_reduce(dt, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
        if not (out["loss"] == out["loss"]):
            raise RuntimeError(f"{obj}: non-finite loss")
        cpu_times[obj].append(dt[1].item())
        return dt[0].item()

    names = list(trainers)
    cpu_times = {obj: [] for obj in names}  # process CPU time per step (less inflated by a shared machine)
    for _ in range(args.warmup):
        for obj in names:
            timed_step(obj)
    times = {obj: [] for obj in names}
    for rep in range(args.steps):
        order = names if rep % 2 == 0 else list(reversed(names))
        for obj in order:
            times[obj].append(timed_step(obj))

    tokens = cfg.optim.global_batch_size * cfg.data.seq_length
    peak = peak_tflops(args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = {
        "preset": args.preset, "seq_length": cfg.data.seq_length, "micro_batch_size": cfg.optim.micro_batch_size,
        "global_batch_size": cfg.optim.global_batch_size, "world_size": world,
        "tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
        "bf16": args.bf16, "fp8": args.fp8_format, "device": device, "steps": args.steps, "vocab_size": vocab,
        "masked_only_logits": args.masked_only_logits, "objectives": {},
    }
    for obj, ts in times.items():
        med = statistics.median(ts)
        flops = flops_per_sequence(cfg, vocab, causal=causal[obj]) * cfg.optim.global_batch_size
        tflops = flops / med / world / 1e12
        results["objectives"][obj] = {
            "step_time_s_median": med, "step_time_s_min": min(ts), "step_time_s_max": max(ts),
            "cpu_time_s_median": statistics.median(cpu_times[obj][args.warmup:]),
            "tokens_per_sec": tokens / med, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None,
        }
        if torch.cuda.is_available():
            results["objectives"][obj]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        print(f"\n{args.preset}: seq {cfg.data.seq_length}, micro-batch {cfg.optim.micro_batch_size}, global batch "
              f"{cfg.optim.global_batch_size}, world {world} (TP {results['tp']}, PP {results['pp']}), "
              f"{'bf16' if args.bf16 else 'fp32'}{', fp8 ' + args.fp8_format if args.fp8_format else ''}, "
              f"{device}; {args.steps} interleaved steps per objective")
        print(f"vocabulary {vocab}, masked-only logits: {args.masked_only_logits}")
        print(f"{'objective':>10} | {'median step s':>13} | {'min':>7} | {'max':>7} | {'CPU s':>7} | "
              f"{'tokens/s':>10} | {'TFLOP/s/dev':>11} | MFU")
        for obj, r in results["objectives"].items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (peak unknown)"
            print(f"{obj:>10} | {r['step_time_s_median']:13.4f} | {r['step_time_s_min']:7.4f} | "
                  f"{r['step_time_s_max']:7.4f} | {r['cpu_time_s_median']:7.4f} | {r['tokens_per_sec']:10,.0f} | "
                  f"{r['tflops_per_device']:11.4f} | {mfu}")
        objs = results["objectives"]
        for a, b in (("mdm", "arm"), ("mdm+masked", "mdm"), ("mdm+masked", "arm"), ("arm+masked", "arm")):
            if a in objs and b in objs:
                ratio = objs[a]["step_time_s_median"] / objs[b]["step_time_s_median"]
                cpu_ratio = objs[a]["cpu_time_s_median"] / objs[b]["cpu_time_s_median"]
                results[f"{a} / {b} step time"] = ratio
                results[f"{a} / {b} cpu time"] = cpu_ratio
                print(f"{a.upper()} / {b.upper()} median step time: {ratio:.3f} (process CPU time: {cpu_ratio:.3f})")
        if "mdm_over_arm_step_time" not in results and "mdm / arm step time" in results:
            results["mdm_over_arm_step_time"] = results["mdm / arm step time"]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    destroy_num_microbatches_calculator()
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
