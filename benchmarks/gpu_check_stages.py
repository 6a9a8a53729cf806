"""The stages of ``benchmarks/gpu_check.py``, each run in its own process (failure and time isolation).

    python benchmarks/gpu_check_stages.py STAGE --params JSON --out FILE

A stage writes its figures to FILE as it goes (so a stage killed at its time limit keeps what it had
measured) and exits non-zero on failure, with the error in FILE. Stages: ``env``, ``correctness``,
``throughput``, ``max_micro_batch``, ``checkpoint``, ``compile``; see gpu_check.py for what each
measures. The same code runs on the GPU (NCCL, BF16, the 1.1B shape) and, with ``--dry-run`` there,
on the CPU (gloo, the tiny preset): only sizes differ.

Imports stay inside the stages and within what the GPU machine has (torch, megatron-core, numpy,
pyyaml): no tokenizer, data or evaluation stack.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_train import RandomTokens  # noqa: E402 - after the path set-up above


class Recorder:
    """A dict mirrored to a JSON file after every update."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data: dict = {}

    def set(self, **items) -> None:
        self.data.update(items)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ---- shared helpers ------------------------------------------------------------------------------

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def masked_only_field() -> str | None:
    """The config field of masked-only logits, if this version of the project has one."""
    from megatron_mdm.config import FIELDS

    names = [n for n in FIELDS if "mask" in n and "logit" in n]
    return names[0] if names else None


def make_cfg(p: dict, *, preset: str, seq: int, mbs: int, gbs: int, objective: str, bf16: bool,
             num_layers: int | None = None, overrides: dict | None = None):
    from megatron_mdm.config import Config, apply_dict, set_field
    from megatron_mdm.presets import get_preset

    cfg = Config()
    apply_dict(cfg, get_preset(preset), f"preset {preset}")
    cfg.model.preset = preset
    if num_layers:
        cfg.model.num_layers = num_layers
    cfg.model.transformer_impl = "local"  # megatron-core alone: local spec + SDPA attention
    cfg.data.seq_length = seq
    cfg.optim.micro_batch_size, cfg.optim.global_batch_size = mbs, gbs
    cfg.optim.train_iters = 10**6
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.lr_warmup_iters = 1e-4, 1e-5, 0
    cfg.optim.bf16 = bf16
    cfg.objective.objective = objective
    cfg.objective.random_length_prob = 0.0
    cfg.logging.peak_tflops = p.get("peak_tflops")
    for k, v in (overrides or {}).items():
        set_field(cfg, k, v)
    return cfg.validate(world_size=1)


def init_world(num_layers: int = 2) -> None:
    from megatron_mdm import runtime
    from megatron_mdm.config import ParallelConfig

    runtime.init_distributed(ParallelConfig(), num_layers)


def make_trainer(cfg, vocab: int, seed: int = 100):
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_mdm.training.loop import Trainer

    destroy_num_microbatches_calculator()
    loader = RandomTokens(vocab - 2, cfg.data.seq_length, cfg.optim.micro_batch_size, seed, pool=16)
    trainer = Trainer(cfg, vocab, vocab - 1, vocab - 2, loader)
    trainer._train_iter = iter(loader)
    for m in trainer.model:
        m.train()
    return trainer


def fused_sdpa():
    """SDPA restricted to the flash and memory-efficient kernels: never silently the math one.

    With no fused kernel applicable, SDPA raises instead of falling back. On the CPU (dry run) this is
    the CPU flash kernel, so the same restriction is exercised there.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def sdpa_ops(fn) -> dict:
    """Run ``fn`` under the profiler; count the SDPA implementations that ran (aten op names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict = {}
    for e in prof.events():
        if e.name.startswith("aten::_scaled_dot_product") or e.name.startswith("aten::_flash_attention"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def math_backend_used(ops: dict) -> bool:
    return any("math" in name for name in ops)


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> tuple:
    from megatron_mdm.training.metrics import peak_tflops

    value = peak_tflops(None)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return value, (f"{name}: dense BF16 {value} TFLOP/s" if value else f"{name}: no peak known")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---- stages --------------------------------------------------------------------------------------

def stage_env(p: dict, rec: Recorder) -> None:
    """Versions, the device, SDPA backends, which optional packages exist, and that our modules import."""
    import importlib
    import importlib.util
    import platform

    from megatron_mdm import compat

    gpu = torch.cuda.is_available()
    rec.set(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cuda_available=gpu, megatron_core=compat.mcore_version(),
            device=torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        rec.set(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                cudnn=torch.backends.cudnn.version(),
                sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                              "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                              "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                              "math": torch.backends.cuda.math_sdp_enabled()})
    optional = ["triton", "transformer_engine", "psutil", "yaml", "numpy", "transformers", "tokenizers",
                "safetensors", "tqdm", "zstandard", "webdataset", "torchdata", "pyarrow", "tensorboard",
                "mpi4py", "lm_eval"]
    rec.set(packages={name: importlib.util.find_spec(name) is not None for name in optional})
    ours = {}
    import pkgutil

    import megatron_mdm
    # every module of the package the check's path may touch, walked, so a move can never leave this list
    # behind; the data stack (zstandard, webdataset), the command lines, the evaluation harness (lm_eval) and the
    # Hugging Face remote code (transformers) need packages the GPU machine does not have, and the check does not
    # use them
    off_path = ("megatron_mdm.data", "megatron_mdm.cli", "megatron_mdm.evaluation", "megatron_mdm.hf.modeling")
    names = [m.name for m in pkgutil.walk_packages(megatron_mdm.__path__, "megatron_mdm.",
                                                   onerror=lambda name: None)
             if not m.name.startswith(off_path)]
    for mod in names:
        try:
            importlib.import_module(mod)
            ours[mod] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, and the stage fails below
            ours[mod] = f"{type(e).__name__}: {e}"
    rec.set(megatron_mdm_imports=ours)
    bad = {k: v for k, v in ours.items() if v != "ok"}
    if bad:
        raise RuntimeError(f"megatron_mdm modules do not import: {bad}")


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double(), ref.double()
    return {"rel_rms_err": ((got - ref).norm() / ref.norm()).item(),
            "max_abs_err": (got - ref).abs().max().item(),
            "ref_rms": (ref.norm() / ref.numel() ** 0.5).item(),
            "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).double().mean().item()}


def stage_correctness(p: dict, rec: Recorder) -> None:
    """Logits of the (GPU) model vs a float32 plain-PyTorch reference on the CPU, same weights, MDM and ARM."""
    from llama_reference import reference_logits

    from megatron_mdm import runtime
    from megatron_mdm.models.build import build_model

    init_world(p["corr_layers"])
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 comparison is float32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    dev = runtime.device()
    vocab, seq = p["vocab"], p["corr_seq"]
    results, failures = {}, []
    for i, objective in enumerate(("mdm", "arm")):
        kw = dict(preset=p["preset"], seq=seq, mbs=2, gbs=2, objective=objective, num_layers=p["corr_layers"])
        cfg32 = make_cfg(p, bf16=False, **kw)
        runtime.set_seed(1000 + i)
        model = build_model(cfg32, vocab, causal=objective == "arm")[0].eval()
        m = cfg32.model
        g = torch.Generator().manual_seed(7 + i)
        tokens = torch.randint(0, vocab, (2, seq), generator=g)
        pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
        with torch.no_grad():  # non-trivial norm weights, so that a misplaced norm shows
            for name, prm in model.named_parameters():
                if "layernorm" in name:
                    prm.copy_(1 + 0.1 * torch.randn(prm.shape, generator=g).to(prm.device))
        sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()
              if torch.is_tensor(v) and "_extra_state" not in k}
        t0 = time.perf_counter()
        ref = reference_logits(sd, tokens, num_layers=m.num_layers, num_heads=m.num_attention_heads,
                               num_groups=m.num_query_groups or m.num_attention_heads, eps=m.norm_epsilon,
                               rotary_base=m.rotary_base, causal=objective == "arm")
        ref_s = time.perf_counter() - t0
        with torch.no_grad():
            out32 = model(tokens.to(dev), pos.to(dev), None).float().cpu()
        r = {"fp32": _compare(out32, ref), "reference_seconds": round(ref_s, 2)}
        cfg16 = make_cfg(p, bf16=True, **kw)
        model16 = build_model(cfg16, vocab, causal=objective == "arm")[0].eval()
        model16.load_state_dict(model.state_dict(), strict=True)  # the same weights, rounded to BF16
        del model
        holder = {}

        def forward16(model16=model16, holder=holder, tokens=tokens, pos=pos):
            with torch.no_grad(), fused_sdpa():
                holder["out"] = model16(tokens.to(dev), pos.to(dev), None).float().cpu()

        r["bf16_sdpa_ops"] = sdpa_ops(forward16)
        r["bf16"] = _compare(holder["out"], ref)
        results[objective] = r
        rec.set(shape={"preset": p["preset"], "num_layers": p["corr_layers"], "seq": seq, "batch": 2,
                       "vocab": vocab}, results=results,
                tolerances={"fp32_rel_rms": p["tol_fp32"], "bf16_rel_rms": p["tol_bf16"]})
        if r["fp32"]["rel_rms_err"] > p["tol_fp32"]:
            failures.append(f"{objective} fp32 rel. RMS error {r['fp32']['rel_rms_err']:.2e} > {p['tol_fp32']}")
        if r["bf16"]["rel_rms_err"] > p["tol_bf16"]:
            failures.append(f"{objective} bf16 rel. RMS error {r['bf16']['rel_rms_err']:.2e} > {p['tol_bf16']}")
        if math_backend_used(r["bf16_sdpa_ops"]):
            failures.append(f"{objective}: SDPA used the math kernel: {r['bf16_sdpa_ops']}")
        del model16
        reset_memory()
    if failures:
        raise AssertionError("; ".join(failures))


def _timed_steps(trainer, n: int) -> list:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        out = trainer.train_step()
        sync()
        times.append(time.perf_counter() - t0)
        if out["loss"] != out["loss"]:
            raise RuntimeError("non-finite loss")
    return times


def _variant_figures(cfg, vocab: int, objective: str, times: list, peak_value) -> dict:
    import statistics

    from megatron_mdm.models.flops import flops_per_sequence

    med = statistics.median(times)
    gbs, seq = cfg.optim.global_batch_size, cfg.data.seq_length
    model_flops = flops_per_sequence(cfg, vocab, causal=objective == "arm") * gbs
    full_flops = flops_per_sequence(cfg, vocab, causal=False) * gbs  # full s^2 attention, head counted
    out = {"step_time_s_median": med, "step_time_s_min": min(times), "step_time_s_max": max(times),
           "steps": len(times), "tokens_per_sec": gbs * seq / med,
           "tflops_full_attention": full_flops / med / 1e12, "tflops_model_convention": model_flops / med / 1e12}
    if peak_value:
        out["mfu_full_attention"] = out["tflops_full_attention"] / peak_value
        out["mfu_model_convention"] = out["tflops_model_convention"] / peak_value
    return out


def stage_throughput(p: dict, rec: Recorder) -> None:
    """Training-step speed of the preset at the sequence length in BF16: MDM, ARM (and masked-only logits)."""
    init_world(2)
    peak_value, peak_name = peak()
    vocab = p["vocab"]
    variants = [("mdm", "mdm", {}), ("arm", "arm", {})]
    field = masked_only_field()
    if field:
        variants.append(("mdm_masked_only_logits", "mdm", {field: True}))
    rec.set(setup={"preset": p["preset"], "seq": p["seq"], "micro_batch_size": p["mbs"],
                   "global_batch_size": p["gbs"], "vocab": vocab, "bf16": True, "spec": "local + SDPA",
                   "warmup": p["warmup"], "steps": p["steps"]},
            peak_tflops=peak_value, peak=peak_name, masked_only_logits_field=field,
            note=None if field else "no masked-only-logits config field in this version: variant skipped")
    results = {}
    for name, objective, overrides in variants:
        reset_memory()
        cfg = make_cfg(p, preset=p["preset"], seq=p["seq"], mbs=p["mbs"], gbs=p["gbs"], objective=objective,
                       bf16=True, overrides=overrides)
        trainer = make_trainer(cfg, vocab)
        with fused_sdpa():
            ops = sdpa_ops(lambda trainer=trainer: _timed_steps(trainer, 1))
            _timed_steps(trainer, max(p["warmup"] - 1, 0))
            times = _timed_steps(trainer, p["steps"])
        results[name] = dict(_variant_figures(cfg, vocab, objective, times, peak_value), sdpa_ops=ops, **memory())
        if math_backend_used(ops):
            raise AssertionError(f"{name}: SDPA used the math kernel: {ops}")
        rec.set(results=results)
        del trainer
    if "mdm" in results and "arm" in results:
        rec.set(mdm_over_arm_step_time=results["mdm"]["step_time_s_median"] / results["arm"]["step_time_s_median"])
    reset_memory()


def stage_max_micro_batch(p: dict, rec: Recorder) -> None:
    """The largest micro-batch of the MDM step (BF16, sequence p['seq']) that fits, by growing it until OOM."""
    init_world(2)
    peak_value, _ = peak()
    vocab, sizes = p["vocab"], p["mbs_candidates"]
    cfg = make_cfg(p, preset=p["preset"], seq=p["seq"], mbs=sizes[0], gbs=sizes[0], objective="mdm", bf16=True)
    trainer = make_trainer(cfg, vocab)
    tried, largest = [], None
    with fused_sdpa():
        for m in sizes:
            reset_memory()
            trainer._train_iter = iter(RandomTokens(vocab - 2, p["seq"], m, seed=m, pool=16))
            try:
                times = _timed_steps(trainer, 2)
            except Exception as e:  # noqa: BLE001 - OOM ends the search; anything else is a failure
                if not is_oom(e):
                    raise
                tried.append({"micro_batch_size": m, "fits": False})
                rec.set(tried=tried, largest_fitting=largest, limit_found=True)
                break
            mcfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, micro_batch_size=m,
                                                                      global_batch_size=m))
            row = {"micro_batch_size": m, "fits": True, **memory(),
                   **_variant_figures(mcfg, vocab, "mdm", times[1:], peak_value)}
            tried.append(row)
            largest = m
            rec.set(tried=tried, largest_fitting=largest, limit_found=False)
    del trainer
    reset_memory()


def stage_checkpoint(p: dict, rec: Recorder) -> None:
    """Train 2 steps with the distributed optimizer, save, train step 3; a fresh trainer loads and repeats it."""
    from megatron_mdm import runtime

    init_world(2)
    root = Path(p["ckpt_dir"])
    vocab = p["vocab"]
    cfg = make_cfg(p, preset=p["ckpt_preset"], seq=p["ckpt_seq"], mbs=2, gbs=4, objective="mdm",
                   bf16=torch.cuda.is_available(), num_layers=p.get("ckpt_layers"),
                   overrides={"use_distributed_optimizer": True, "save": str(root), "load": str(root)})
    backend = torch.distributed.get_backend()
    rec.set(setup={"preset": p["ckpt_preset"], "num_layers": cfg.model.num_layers, "seq": cfg.data.seq_length,
                   "distributed_optimizer": True, "backend": backend, "bf16": cfg.optim.bf16, "dir": str(root)})
    runtime.set_seed(5)
    first = make_trainer(cfg, vocab, seed=3)
    with fused_sdpa():
        losses = [first.train_step()["loss"] for _ in range(2)]
        sync()
        t0 = time.perf_counter()
        first.save()
        sync()
        save_s = time.perf_counter() - t0
        saved = {k: v.detach().float().cpu().clone() for k, v in first.model[0].module.state_dict().items()
                 if torch.is_tensor(v) and "_extra_state" not in k}
        losses.append(first.train_step()["loss"])
    files = [f for f in root.rglob("*") if f.is_file()]
    rec.set(losses=losses, save_seconds=save_s, checkpoint_bytes=sum(f.stat().st_size for f in files),
            checkpoint_files=len(files))
    del first
    reset_memory()
    second = make_trainer(cfg, vocab, seed=3)
    t0 = time.perf_counter()
    second.load()
    sync()
    load_s = time.perf_counter() - t0
    loaded = second.model[0].module.state_dict()
    mismatched = [k for k, v in saved.items() if not torch.equal(loaded[k].detach().float().cpu(), v)]
    with fused_sdpa():
        resumed = second.train_step()["loss"]
    rel = abs(resumed - losses[2]) / max(abs(losses[2]), 1e-12)
    rec.set(load_seconds=load_s, resumed_iteration=second.state.iteration, resumed_loss=resumed,
            step3_rel_diff=rel, weights_equal_after_load=not mismatched, mismatched_tensors=mismatched[:5])
    if mismatched:
        raise AssertionError(f"weights differ after load: {mismatched[:5]}")
    if rel > p["tol_resume"]:
        raise AssertionError(f"resumed step loss {resumed} vs uninterrupted {losses[2]} (rel. {rel:.2e})")


def stage_compile(p: dict, rec: Recorder) -> None:
    """Forward+backward of the MDM model, eager vs ``torch.compile`` (optional: reported, never required)."""
    from megatron_mdm import runtime
    from megatron_mdm.models.build import build_model

    init_world(2)
    dev = runtime.device()
    cfg = make_cfg(p, preset=p["preset"], seq=p["seq"], mbs=p["mbs"], gbs=p["mbs"], objective="mdm",
                   bf16=torch.cuda.is_available())
    model = build_model(cfg, p["vocab"], causal=False)[0].train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, p["vocab"] - 2, (p["mbs"], p["seq"]), generator=g).to(dev)
    pos = torch.arange(p["seq"], device=dev).unsqueeze(0).expand(p["mbs"], -1)

    def step(fn):
        sync()
        t0 = time.perf_counter()
        fn(tokens, pos, None, labels=tokens).float().mean().backward()
        sync()
        return time.perf_counter() - t0

    backend = p["compile_backend"]
    rec.set(setup={"preset": p["preset"], "seq": p["seq"], "micro_batch_size": p["mbs"], "backend": backend})
    with fused_sdpa():
        eager = [step(model) for _ in range(p["compile_steps"] + 1)][1:]
        rec.set(eager_step_s=min(eager))
        compiled = torch.compile(model, backend=backend)
        t0 = time.perf_counter()
        step(compiled)
        rec.set(compile_seconds=time.perf_counter() - t0)
        comp = [step(compiled) for _ in range(p["compile_steps"])]
    rec.set(compiled_step_s=min(comp), speedup=min(eager) / min(comp))


STAGES = {"env": stage_env, "correctness": stage_correctness, "throughput": stage_throughput,
          "max_micro_batch": stage_max_micro_batch, "checkpoint": stage_checkpoint, "compile": stage_compile}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--params", required=True, help="JSON of the stage parameters (from gpu_check.py)")
    ap.add_argument("--out", required=True, help="JSON file of the stage's figures")
    args = ap.parse_args(argv)
    rec = Recorder(args.out)
    params = json.loads(args.params)
    status = 0
    try:
        STAGES[args.stage](params, rec)
    except BaseException as e:  # noqa: BLE001 - recorded for the report, exit status says it failed
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        rec.set(error=f"{type(e).__name__}: {str(e)[:2000]}", traceback=tb[-4000:])
        status = 1
    finally:
        with contextlib.suppress(Exception):
            from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

            from megatron_mdm import runtime

            destroy_num_microbatches_calculator()
            runtime.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
