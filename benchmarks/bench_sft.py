"""Instruction-tuning throughput: packed examples vs LLaDA's one example per sequence, side by side.

Builds the instruction mixture of ``examples/instruction_tuning/tasks.py`` (Shakespeare and scikit-learn task
families, real text of varied lengths), trains a BPE tokenizer on the corpus, prepares the mixture twice with
``mdm-data prepare-sft`` (``--layout packed`` and ``--layout padded``), and times the real training step
(``Trainer.train_step`` on the streamed shards: the block-diagonal mask and per-example normalisers for the
packed data) for both layouts in the same process, in interleaved repetitions (the order alternates), so a
shared machine slows both alike.

The figure is **example tokens per second**: the tokens of the examples (prompts and completions, not the
padding) a step consumes, from each dataset's average fill (manifest), over the median step time; and
examples per second likewise. Sequence tokens/s (padding included) is printed too.

    python benchmarks/bench_sft.py --preset tiny-4l --seq-length 256 --micro-batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-4l", help="model preset (megatron_mdm.presets)")
    p.add_argument("--objective", default="mdm", choices=["mdm", "arm"])
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-task", type=int, default=300, help="examples per task family")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--workdir", default=None, help="where the data goes (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def prepare(work: Path, args) -> dict[str, dict]:
    sys.path.insert(0, str(REPO / "examples" / "instruction_tuning"))
    from tasks import CORPUS, build

    from megatron_mdm.data.prepare_sft import prepare_sft
    from megatron_mdm.tokenization import train_bpe_tokenizer

    if not (work / "tok").exists():
        train_bpe_tokenizer([str(CORPUS)], args.vocab_size, work / "tok", max_docs=3000)
    files = list(build(work / "tasks", args.per_task).values())
    return {layout: prepare_sft(files, str(work / "tok"), str(work / layout), args.seq_length, layout=layout)
            for layout in ("packed", "padded")}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29517")):
        os.environ.setdefault(k, v)
    import logging

    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_mdm import runtime
    from megatron_mdm.config import Config, apply_dict
    from megatron_mdm.data.loader import build_pretrain_loader
    from megatron_mdm.presets import get_preset
    from megatron_mdm.tokenization import MDMTokenizer
    from megatron_mdm.training.loop import Trainer

    logging.basicConfig(level=logging.WARNING)
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    manifests = prepare(work, args)
    tok = MDMTokenizer.load(work / "tok")
    cfg = Config()
    apply_dict(cfg, get_preset(args.preset), f"preset {args.preset}")
    cfg.model.transformer_impl = "local"
    cfg.data.seq_length = args.seq_length
    cfg.optim.micro_batch_size = cfg.optim.global_batch_size = args.micro_batch_size
    cfg.optim.train_iters = 10**9
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.lr_warmup_iters = 1e-4, 1e-5, 0
    cfg.objective.objective = args.objective
    cfg.objective.random_length_prob = 0.0
    cfg.validate(world_size=1)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    trainers = {}
    for layout in ("packed", "padded"):
        loader = build_pretrain_loader([(1.0, str(work / layout))], args.seq_length, args.micro_batch_size,
                                       args.micro_batch_size, 0, 1, num_workers=0, seed=0)
        destroy_num_microbatches_calculator()
        t = Trainer(cfg, tok.vocab_size, tok.mask_id, tok.pad_id, loader)
        t._train_iter = iter(loader)
        for m in t.model:
            m.train()
        trainers[layout] = t

    def step(layout: str) -> float:
        t0 = time.perf_counter()
        out = trainers[layout].train_step()
        if not out["loss"] == out["loss"]:
            raise RuntimeError(f"{layout}: non-finite loss")
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for layout in trainers:
            step(layout)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for rep in range(args.steps):
        for layout in (list(trainers) if rep % 2 == 0 else list(reversed(trainers))):
            times[layout].append(step(layout))
    seq_tokens = args.micro_batch_size * args.seq_length
    res = {"preset": args.preset, "objective": args.objective, "seq_length": args.seq_length,
           "micro_batch_size": args.micro_batch_size, "steps": args.steps, "device": f"CPU ({os.cpu_count()} cores)",
           "layouts": {}}
    print(f"\n{args.preset} {args.objective}: seq {args.seq_length}, batch {args.micro_batch_size}, "
          f"{res['device']}, {args.steps} interleaved steps per layout; mixture of "
          f"{manifests['packed']['num_documents']} examples ({args.per_task} per task family)")
    print(f"{'layout':>7} | {'sequences':>9} | {'fill':>5} | {'median step s':>13} | {'seq tok/s':>9} | "
          f"{'example tok/s':>13} | {'examples/s':>10}")
    for layout, ts in times.items():
        m = manifests[layout]
        med = statistics.median(ts)
        fill = m["sft"]["fill"]
        per_seq = m["num_documents"] / m["num_samples"]
        r = {"sequences": m["num_samples"], "fill": fill, "examples_per_sequence": per_seq, "step_s_median": med,
             "step_s_min": min(ts), "step_s_max": max(ts), "sequence_tokens_per_s": seq_tokens / med,
             "example_tokens_per_s": fill * seq_tokens / med, "examples_per_s": per_seq * args.micro_batch_size / med}
        res["layouts"][layout] = r
        print(f"{layout:>7} | {r['sequences']:9d} | {fill:5.1%} | {med:13.4f} | {r['sequence_tokens_per_s']:9,.0f} | "
              f"{r['example_tokens_per_s']:13,.0f} | {r['examples_per_s']:10.1f}")
    gain = res["layouts"]["packed"]["example_tokens_per_s"] / res["layouts"]["padded"]["example_tokens_per_s"]
    res["packed_over_padded_example_tokens_per_s"] = gain
    print(f"packing gain (example tokens/s, packed / padded): {gain:.2f}x; step time packed / padded: "
          f"{res['layouts']['packed']['step_s_median'] / res['layouts']['padded']['step_s_median']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    destroy_num_microbatches_calculator()
    runtime.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
