"""Launch a plan's runs: locally one after another (resumable), or as a SLURM job array script.

Each run trains with ``megatron_mdm.cli.pretrain`` (``launch.pretrain_command``) into ``<out>/<run name>``
(the run directory: checkpoints, ``config.yaml``, ``metrics.jsonl``, ``train.log``) with the plan's recipe and
the run's shape, objective and steps. A finished run gets ``<run dir>/sweep_done.json`` and is skipped by
later launches; a run interrupted after a checkpoint is resumed from it (``--load``), otherwise started again.
Unless the recipe sets ``--eval-interval``, the launcher sets it to the run's length, so that every run ends
with a validation loss (and has the untrained one at iteration 0).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from megatron_mdm.checkpoint import layout
from megatron_mdm.errors import UserError
from megatron_mdm.launch import PRETRAIN_MODULE, local_env, pretrain_command
from megatron_mdm.sweep.plan import Plan, Run

DONE = "sweep_done.json"
REPO = Path(__file__).resolve().parents[2]


class LaunchError(UserError, RuntimeError):
    """A run failed; the message names its log file."""


def run_dir(out: str | Path, run: Run) -> Path:
    return Path(out) / run.name


def is_done(out: str | Path, run: Run) -> bool:
    return (run_dir(out, run) / DONE).is_file()


def checkpoint_iteration(directory: Path) -> int | None:
    """The latest checkpointed iteration of a run directory, or None."""
    try:
        return layout.read_latest_iteration(directory)
    except (OSError, layout.CheckpointError):
        return None


def train_args(plan: Plan, run: Run, out: str | Path) -> list[str]:
    """The pretrain_mdm.py arguments of one run (without --load)."""
    args = []
    if plan.config:
        args += ["--config", str(plan.config)]
    args += list(plan.train_args)
    args += list(run.run_args)
    args += model_flags(run)
    args += ["--objective", run.objective, "--seq-length", str(plan.seq_length),
             "--global-batch-size", str(plan.global_batch_size), "--micro-batch-size", str(plan.micro_batch_size),
             "--train-iters", str(run.iters), "--lr-decay-iters", str(run.iters),
             "--save", str(run_dir(out, run))]
    if "--eval-interval" not in plan.train_args:
        args += ["--eval-interval", str(run.iters)]
    return args


def model_flags(run: Run) -> list[str]:
    """The run's ModelConfig fields as pretrain_mdm.py flags."""
    return [x for k, v in run.model.items() if v is not None for x in ("--" + k.replace("_", "-"), str(v))]


def local_command(plan: Plan, run: Run, out: str | Path, nproc: int = 1, python: str | None = None,
                  nice: int | None = None) -> list[str]:
    """The command line that trains one run here: python (one process) or torchrun (``nproc`` > 1)."""
    args = train_args(plan, run, out)
    d = run_dir(out, run)
    if checkpoint_iteration(d) is not None:
        args += ["--load", str(d)]
    cmd = pretrain_command(args, nproc, python=python)
    if nice is not None:
        cmd = ["nice", "-n", str(nice), *cmd]
    return cmd


def launch_local(plan: Plan, out: str | Path, nproc: int = 1, python: str | None = None,
                 repo: str | Path | None = None, nice: int | None = None, max_runs: int | None = None,
                 keep_going: bool = False, only: list[str] | None = None, log=print) -> dict:
    """Train the plan's unfinished runs one after another.

    Args:
        plan, out: the plan and the sweep directory (one run directory per run inside it).
        nproc: processes per run (torchrun when > 1).
        nice: run the training under ``nice -n`` (shared machines).
        max_runs: stop after training this many runs (the rest stay for a later launch).
        keep_going: go on after a failed run (default: stop with LaunchError).
        only: train only these run names.

    Returns:
        ``{"trained": [...], "skipped": [...], "failed": [...]}`` (run names).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "plan.yaml").exists():
        plan.save(out / "plan.yaml")
    todo = [r for r in plan.runs if only is None or r.name in only]
    result: dict[str, list[str]] = {"trained": [], "skipped": [], "failed": []}
    t_start = time.time()
    flops_done = 0.0
    flops_todo = sum(r.flops for r in todo if not is_done(out, r))
    for k, run in enumerate(todo, 1):
        if is_done(out, run):
            result["skipped"].append(run.name)
            log(f"[{k}/{len(todo)}] {run.name}: finished earlier, skipped")
            continue
        if max_runs is not None and len(result["trained"]) >= max_runs:
            log(f"[{k}/{len(todo)}] {run.name}: left for a later launch (--max-runs {max_runs})")
            continue
        d = run_dir(out, run)
        d.mkdir(parents=True, exist_ok=True)
        cmd = local_command(plan, run, out, nproc, python, nice)
        resumed = checkpoint_iteration(d)
        log(f"[{k}/{len(todo)}] {run.name}: N={run.non_embedding_params:,}, {run.iters} steps"
            + (f", resuming from iteration {resumed}" if resumed is not None else ""))
        env = local_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(repo or REPO)), env.get("PYTHONPATH")]))
        t0 = time.time()
        with open(d / "train.log", "a", encoding="utf-8") as logf:
            logf.write(f"# {shlex.join(cmd)}\n")
            logf.flush()
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.time() - t0
        final = checkpoint_iteration(d)
        if rc != 0 or final != run.iters:
            result["failed"].append(run.name)
            msg = (f"{run.name} failed (exit {rc}, checkpoint at iteration {final} of {run.iters}); "
                   f"see {d / 'train.log'}")
            if not keep_going:
                raise LaunchError(msg)
            log("  " + msg)
            continue
        (d / DONE).write_text(json.dumps({"run": run.name, "iters": run.iters, "seconds": round(seconds, 1),
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        result["trained"].append(run.name)
        flops_done += run.flops
        elapsed = time.time() - t_start
        eta = elapsed / flops_done * max(flops_todo - flops_done, 0.0) if flops_done else float("nan")
        log(f"  done in {seconds:.0f} s; sweep: {elapsed / 60:.1f} min so far, ETA {eta / 60:.1f} min (by FLOPs)")
    return result


SLURM_TEMPLATE = """#!/usr/bin/env bash
# IsoFLOP sweep as a SLURM job array: one run of {plan} per array task (written by `mdm-sweep launch --slurm`).
#
#   sbatch {script}                      # all {n} runs
#   sbatch --array=3,7 {script}          # some of them
#
# A finished run has <run dir>/{done} and exits at once; a run with a checkpoint resumes from it, so the
# same script can be resubmitted after preemption or a time limit. Edit the #SBATCH lines for your cluster.
#SBATCH --job-name=mdm-sweep
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={nproc}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task=8
#SBATCH --time={time}
#SBATCH --signal=B:USR1@300
#SBATCH --output={out}/slurm-%A_%a.out
set -euo pipefail

cd {repo}
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-8}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
# the master port of each array task: distinct per task on shared nodes
export MASTER_PORT="${{MASTER_PORT:-$((20000 + (SLURM_ARRAY_JOB_ID + SLURM_ARRAY_TASK_ID) % 10000))}}"

case "$SLURM_ARRAY_TASK_ID" in
{cases}
  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;
esac

if [ -f "$RUN_DIR/{done}" ]; then
  echo "$NAME: finished earlier, nothing to do"; exit 0
fi
mkdir -p "$RUN_DIR"
LOAD=()
if [ -f "$RUN_DIR/{tracker}" ]; then
  LOAD=(--load "$RUN_DIR")
fi
echo "$NAME: ${{#ARGS[@]}} arguments, steps $ITERS"
srun --kill-on-bad-exit=1 --cpu-bind=none {python} -m {module} "${{ARGS[@]}}" "${{LOAD[@]}}" &
SRUN_PID=$!
trap 'kill -USR1 "$SRUN_PID" 2>/dev/null || true' USR1
trap 'kill -TERM "$SRUN_PID" 2>/dev/null || true' TERM
status=0
while true; do
  wait "$SRUN_PID" && {{ status=0; break; }} || status=$?
  if kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done
if [ "$status" -eq 0 ] && [ "$(cat "$RUN_DIR/{tracker}" 2>/dev/null)" = "$ITERS" ]; then
  printf '{{"run": "%s", "iters": %s, "finished": "%s"}}\\n' "$NAME" "$ITERS" "$(date '+%F %T')" > "$RUN_DIR/{done}"
fi
exit "$status"
"""


def write_slurm(plan: Plan, out: str | Path, script: str | Path, nproc: int = 1, gpus: int | None = None,
                time_limit: str = "04:00:00", python: str = "python", repo: str | Path | None = None) -> Path:
    """Write a SLURM job-array script with one task per run of the plan (see SLURM_TEMPLATE)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.yaml"
    if not plan_path.exists():
        plan.save(plan_path)
    cases = []
    for i, run in enumerate(plan.runs):
        args = " ".join(shlex.quote(a) for a in train_args(plan, run, out))
        cases.append(f"  {i}) NAME={shlex.quote(run.name)}; RUN_DIR={shlex.quote(str(run_dir(out, run)))}; "
                     f"ITERS={run.iters}\n     ARGS=({args}) ;;")
    text = SLURM_TEMPLATE.format(plan=plan_path, script=script, n=len(plan.runs), done=DONE, tracker=layout.TRACKER,
                                 module=PRETRAIN_MODULE,
                                 last=len(plan.runs) - 1, nproc=nproc, gpus=nproc if gpus is None else gpus,
                                 time=time_limit, out=out, repo=shlex.quote(str(Path(repo or REPO).resolve())),
                                 cases="\n".join(cases), python=python)
    script = Path(script)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text, encoding="utf-8")
    script.chmod(0o755)
    return script
