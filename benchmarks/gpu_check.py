"""One-call GPU check: install the carried megatron-core, then measure, each stage time-boxed and isolated.

Run through ``benchmarks/gpu_check.sh`` (which tees the log); on the GPU machine, from the repository root:

    bash benchmarks/gpu_check.sh                 # figures and log under $OUT (or outputs/gpu_check)
    bash benchmarks/gpu_check.sh --dry-run       # every stage on the CPU, tiny preset (CI runs this)

Stages, in order of value (each in its own process, with a time limit inside an overall budget; a failing
or timed-out stage records its error and the next one runs):

1. ``install``: megatron-core (and any other wheel in ``--wheel-dir``, e.g. psutil) installed with
   ``pip --no-index --no-deps --target`` into ``--site`` and put on PYTHONPATH, unless importable already.
2. ``env``: versions, device, SDPA backends, which packages exist, that our modules import.
3. ``correctness``: the 1.1B shape with 2 layers: logits of the run (float32 with TF32 off, and BF16 with
   fused SDPA) vs a float32 plain-PyTorch reference on the CPU (benchmarks/llama_reference.py), MDM and ARM.
4. ``throughput``: the ``smdm-1.1b`` training step at sequence 2048, BF16, local spec + SDPA restricted to
   the flash / memory-efficient kernels (the kernels that ran are recorded): tokens/s, TFLOP/s and MFU
   (full s^2 attention and the output layer counted, ``model.flops_per_sequence``; peak named), peak
   memory; MDM, ARM, and MDM with masked-only logits when the config has that field.
5. ``max_micro_batch``: the largest micro-batch of the MDM step that fits (grown until out of memory).
6. ``checkpoint``: distributed optimizer, 2 steps, save, step 3; a fresh trainer loads and repeats step 3
   (weights bit-equal after load, the step's loss equal within ``--tol-resume``); NCCL on the GPU.
7. ``compile``: forward+backward eager vs ``torch.compile`` (optional, reported only).

Output: ``OUT/gpu_check.json`` (rewritten after every stage), ``OUT/stages/NAME.json`` (written by the
stage as it goes), and the log. Exit status 0 when every stage that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES_SCRIPT = Path(__file__).resolve().parent / "gpu_check_stages.py"
sys.path.insert(0, str(REPO))
from megatron_mdm.launch import free_port  # noqa: E402 - standard library only, runs before any install

# (stage, time limit on the GPU in s, time limit in a dry run in s)
STAGES = [("env", 90, 240), ("correctness", 150, 300), ("throughput", 240, 300),
          ("max_micro_batch", 150, 300), ("checkpoint", 150, 300), ("compile", 150, 300)]
# import names of wheels whose distribution name differs
IMPORT_NAMES = {"megatron_core": "megatron.core", "pyyaml": "yaml"}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run every stage on the CPU on the tiny preset")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu_check"),
                    help="output directory (default: $OUT, else outputs/gpu_check)")
    ap.add_argument("--stages", nargs="+", default=None, choices=[s for s, _, _ in STAGES],
                    help="run only these stages (default: all, in order)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="overall time budget of the stages (default: 420 on the GPU, 900 in a dry run)")
    ap.add_argument("--wheel-dir", default=str(REPO / ".devkit" / "whl"), help="carried wheels to install")
    ap.add_argument("--site", default=None, help="install target (default: /tmp/mdm-site, or under --out in "
                    "a dry run)")
    ap.add_argument("--preset", default=None, help="model preset (default: smdm-1.1b; tiny in a dry run)")
    ap.add_argument("--seq-length", type=int, default=None, help="default: 2048 (64 in a dry run)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: 8 (2 in a dry run)")
    ap.add_argument("--global-batch-size", type=int, default=None, help="default: 2 x micro-batch")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 32000 (512 in a dry run)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 8; 2 dry)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: detected, H200 989)")
    ap.add_argument("--tol-resume", type=float, default=None,
                    help="relative loss difference allowed after resuming (default 1e-3 GPU, 1e-6 CPU)")
    return ap.parse_args(argv)


def stage_params(args) -> dict:
    dry = args.dry_run
    mbs = args.micro_batch_size or (2 if dry else 8)
    return {
        "dry_run": dry,
        "preset": args.preset or ("tiny" if dry else "smdm-1.1b"),
        "seq": args.seq_length or (64 if dry else 2048),
        "mbs": mbs,
        "gbs": args.global_batch_size or 2 * mbs,
        "vocab": args.vocab_size or (512 if dry else 32000),
        "steps": args.steps or (2 if dry else 8),
        "warmup": 1 if dry else 3,
        "peak_tflops": args.peak_tflops,
        "corr_layers": 2,
        "corr_seq": 32 if dry else 256,
        "tol_fp32": 1e-4,
        "tol_bf16": 5e-2,
        "mbs_candidates": [1, 2, 4] if dry else [8, 12, 16, 24, 32, 48, 64, 96, 128],
        "ckpt_preset": "tiny" if dry else "smdm-1.1b",
        "ckpt_layers": None if dry else 4,
        "ckpt_seq": 32 if dry else 512,
        "ckpt_dir": None,  # set per run
        "tol_resume": args.tol_resume if args.tol_resume is not None else (1e-6 if dry else 1e-3),
        "compile_backend": "eager" if dry else "inductor",
        "compile_steps": 1 if dry else 3,
    }


# ---- install -------------------------------------------------------------------------------------

def importable(module: str, env: dict) -> bool:
    """Whether ``module`` imports in a fresh interpreter with ``env`` (as the stages will see it)."""
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode == 0


def install_wheels(wheel_dir: str, site: str, env: dict, required: str = "megatron.core") -> dict:
    """Install the carried wheels whose module is not importable yet; prepend ``site`` to env PYTHONPATH.

    Returns a report; raises RuntimeError when ``required`` is still not importable afterwards.
    """
    wheels = sorted(Path(wheel_dir).glob("*.whl")) if Path(wheel_dir).is_dir() else []
    report: dict = {"wheel_dir": str(wheel_dir), "wheels": [w.name for w in wheels], "already_importable": [],
                    "installed": [], "site": None}
    todo = []
    for whl in wheels:
        dist = whl.name.split("-")[0].lower()
        module = IMPORT_NAMES.get(dist, dist)
        if importable(module, env):
            report["already_importable"].append(module)
        else:
            todo.append(whl)
    if todo:
        Path(site).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--ignore-requires-python",
               "--disable-pip-version-check", "--upgrade", "--target", site] + [str(w) for w in todo]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install failed: {proc.stderr.strip()[-1500:]}")
        report["install_seconds"] = round(time.perf_counter() - t0, 1)
        report["installed"] = [w.name for w in todo]
        report["site"] = site
        env["PYTHONPATH"] = os.pathsep.join([site] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    if not importable(required, env):
        raise RuntimeError(f"{required} is not importable and no wheel for it is in {wheel_dir}: stage one with "
                           "../shared/tools/gpu-devkit.sh (or pip download megatron-core for Python 3.12)")
    code = ("import importlib.metadata as md, importlib.util as u; "  # no torch import: fast
            "print(md.version('megatron-core'), u.find_spec('megatron.core').origin)")
    ver = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    report["megatron_core"] = ver.stdout.strip() or ver.stderr.strip()[-500:]
    return report


# ---- stages ----------------------------------------------------------------------------------------

def run_stage(name: str, params: dict, out: Path, env: dict, limit: float) -> dict:
    """Run one stage in its own process group; kill it at ``limit`` seconds."""
    stage_json = out / "stages" / f"{name}.json"
    stage_json.unlink(missing_ok=True)
    child_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0")
    cmd = [sys.executable, str(STAGES_SCRIPT), name, "--params", json.dumps(params), "--out", str(stage_json)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else "error"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, status = None, "timeout"
    record = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "limit_s": round(limit), "rc": rc}
    try:
        record["result"] = json.loads(stage_json.read_text())
    except (OSError, ValueError):
        record["result"] = {}
    if status != "ok":
        record["error"] = record["result"].pop("error", None) or (
            f"killed at its time limit of {limit:.0f} s" if status == "timeout" else f"exit status {rc}")
    return record


def summary(report: dict) -> list:
    lines = []
    for name, r in report["stages"].items():
        extra = f": {r['error']}" if r.get("error") else ""
        lines.append(f"{name:<16} {r['status']:<8} {r.get('seconds', 0):7.1f} s{extra[:300]}")
    tp = report["stages"].get("throughput", {}).get("result", {}).get("results", {})
    for variant, f in tp.items():
        mfu = f.get("mfu_full_attention")
        lines.append(f"  {variant:<24} {f['tokens_per_sec']:>10,.0f} tok/s  {f['tflops_full_attention']:8.2f} TFLOP/s"
                     + (f"  MFU {mfu:.1%}" if mfu is not None else "")
                     + (f"  peak {f['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in f else ""))
    mb = report["stages"].get("max_micro_batch", {}).get("result", {})
    if mb:
        lines.append(f"  largest micro-batch that fits: {mb.get('largest_fitting')} (limit found: {mb.get('limit_found')})")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    params = stage_params(args)
    budget = args.budget_s or (900.0 if args.dry_run else 420.0)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep)
                                                        if x and x != str(REPO)])
    env.setdefault("NO_VCS_VERSION", "1")  # megatron-core's package_info would run git at import
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("OMP_NUM_THREADS", str(min(8, os.cpu_count() or 1)))
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
              "python": platform.python_version(), "params": params, "budget_s": budget, "stages": {}}
    json_path = out / "gpu_check.json"

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1, default=str))

    t_start = time.perf_counter()
    log(f"{'dry run (CPU, tiny preset)' if args.dry_run else 'GPU check'}: output in {out}, budget {budget:.0f} s")
    t0 = time.perf_counter()
    site = args.site or (str(out / "site") if args.dry_run else "/tmp/mdm-site")
    try:
        report["stages"]["install"] = {"status": "ok", "result": install_wheels(args.wheel_dir, site, env)}
    except Exception as e:  # noqa: BLE001 - recorded; without megatron-core nothing else can run
        report["stages"]["install"] = {"status": "error", "error": f"{type(e).__name__}: {e}", "result": {}}
    report["stages"]["install"]["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"install: {report['stages']['install']['status']} {report['stages']['install'].get('result', {})}"
        f"{report['stages']['install'].get('error', '')}")
    save()
    ok_install = report["stages"]["install"]["status"] == "ok"
    with tempfile.TemporaryDirectory(prefix="mdm-gpu-check-") as tmp:
        params["ckpt_dir"] = str(Path(tmp) / "ckpt")
        for name, gpu_limit, dry_limit in STAGES:
            if args.stages and name not in args.stages:
                continue
            left = budget - (time.perf_counter() - t_start)
            limit = min(dry_limit if args.dry_run else gpu_limit, left - 5)
            if not ok_install or limit < 20:
                why = "megatron-core is not importable" if not ok_install else f"budget spent ({left:.0f} s left)"
                report["stages"][name] = {"status": "skipped", "error": why, "result": {}}
                log(f"{name}: skipped ({why})")
                save()
                continue
            log(f"{name}: starting (limit {limit:.0f} s)")
            report["stages"][name] = run_stage(name, params, out, env, limit)
            r = report["stages"][name]
            log(f"{name}: {r['status']} in {r['seconds']} s{': ' + str(r['error'])[:500] if r.get('error') else ''}")
            save()
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["summary"] = summary(report)
    save()
    log(f"done in {report['total_seconds']} s; {json_path}")
    for line in report["summary"]:
        print("  " + line, flush=True)
    failed = [n for n, r in report["stages"].items() if r["status"] in ("error", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
