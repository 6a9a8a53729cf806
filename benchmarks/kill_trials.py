"""kill -9 trials: a pretraining job killed at random moments resumes exactly, every time.

    python benchmarks/kill_trials.py --trials 10 [--async-save] [--nproc 1] [--work outputs/kill_trials]

Prepares a tiny tokenizer and shards from the shipped corpus (cached in ``--work``), runs the job once
uninterrupted (the reference), then for each trial launches ``pretrain/pretrain_mdm.py`` and SIGKILLs
its whole process group (the ranks, their DataLoader workers, the asynchronous checkpoint writer) at a
random moment, relaunching with ``--load`` until the job finishes. A trial resumed exactly when every
step recorded in its ``metrics.jsonl`` by any launch has the reference's loss and grad norm, bit for
bit, and the final checkpoint passes its checksums. Kills that left a save's temporary directory
behind are counted as "inside a save". Prints one line per trial and a summary; results go in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
sys.path.insert(0, str(REPO))
from megatron_mdm.checkpoint import integrity, layout  # noqa: E402
from megatron_mdm.launch import free_port, pretrain_command  # noqa: E402


def _port() -> str:
    return str(free_port())


def prepare(work: Path) -> tuple[Path, Path]:
    tok, shards = work / "tok", work / "shards"
    py = sys.executable
    if not (tok / "tokenizer.json").exists():
        subprocess.run([py, str(REPO / "tokenizer/train_tokenizer.py"), "--input", str(CORPUS), "--vocab-size",
                        "400", "--max-docs", "800", "--output", str(tok)], check=True, capture_output=True)
    if not (shards / "manifest.json").exists():
        subprocess.run([py, str(REPO / "data_prep/prepare_data.py"), "--input", str(CORPUS), "--tokenizer",
                        str(tok), "--output", str(shards), "--seq-length", "64"], check=True, capture_output=True)
    return tok, shards


def command(args, tok: Path, shards: Path, run: Path, load: bool) -> list[str]:
    cmd = pretrain_command(["--preset", "tiny", "--tokenizer", str(tok), "--data-path", str(shards), "--seq-length",
                            "64", "--micro-batch-size", "2", "--global-batch-size", str(4 * args.nproc),
                            "--train-iters", str(args.iters), "--save-interval", str(args.save_interval),
                            "--log-interval", "1", "--save", str(run), "--keep-last", "2", "--num-workers", "1"],
                           args.nproc)
    if args.async_save:
        cmd.append("--async-save")
    if load:
        cmd += ["--load", str(run)]
    return cmd


def launch(cmd: list[str], log: Path, kill_after: float | None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group; SIGKILL the group after ``kill_after`` s. (rc or None, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=_port())
    t0 = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def records(run: Path) -> list[dict]:
    out = []
    path = layout.metrics_file(run)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if "loss" in r and "iteration" in r:
            out.append(r)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial; then the job may finish")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per job")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(REPO / "outputs" / "kill_trials"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tok, shards = prepare(work)
    ref_run = work / "reference"
    if ref_run.exists():
        import shutil

        shutil.rmtree(ref_run)
    rc, t_ref = launch(command(args, tok, shards, ref_run, load=False), work / "reference.log", None)
    if rc != 0:
        print(f"reference run failed (rc {rc}); see {work / 'reference.log'}", file=sys.stderr)
        return 1
    ref = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in records(ref_run)}
    print(f"reference: {args.iters} steps, {t_ref:.1f} s; trials kill uniformly in [0, {t_ref:.1f}] s")
    exact = kills = in_save = 0
    for trial in range(args.trials):
        run = work / f"trial-{trial:03d}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        log = work / f"trial-{trial:03d}.log"
        trial_kills = trial_in_save = launches = 0
        seen: set[str] = set()
        while True:
            load = layout.read_latest_iteration(run) is not None if run.exists() else False
            kill_after = rng.uniform(0, t_ref) if trial_kills < args.max_kills else None
            rc, _ = launch(command(args, tok, shards, run, load), log, kill_after)
            launches += 1
            if rc is None:
                trial_kills += 1
                left = {d.name for d in run.glob("iter_*") if layout.TMP_TAG in d.name or layout.OLD_TAG in d.name}
                trial_in_save += bool(left - seen)  # this kill cut a save short
                seen |= left
                continue
            break
        got = records(run)
        bad = [r["iteration"] for r in got if ref.get(r["iteration"]) != (r["loss"], r["grad_norm"])]
        final = layout.read_latest_iteration(run)
        try:
            integrity.verify_files(layout.resolve_checkpoint(run))
            intact = True
        except layout.CheckpointError as e:
            intact, bad = False, bad + [str(e)]
        ok = rc == 0 and final == args.iters and intact and not bad and {r["iteration"] for r in got} == set(ref)
        exact += ok
        kills += trial_kills
        in_save += trial_in_save
        print(f"trial {trial}: {trial_kills} kills ({trial_in_save} inside a save), {launches} launches, "
              f"rc {rc}, final iteration {final}, {len(got)} step records: "
              f"{'resumed exactly' if ok else f'MISMATCH {bad[:5]}'}", flush=True)
    print(f"summary: {exact}/{args.trials} trials resumed exactly; {kills} kills, {in_save} of them inside a "
          f"save{' (--async-save)' if args.async_save else ''}; nproc {args.nproc}")
    return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
