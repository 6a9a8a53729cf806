"""Job functions of the checkpoint tests (run in gloo processes by ``dist.run_distributed``).

Failures are injected by monkeypatching inside the job process, as ``jobs.crash_during_save_job``
does: a save that dies half-written, a disk that fills up (``OSError(ENOSPC)`` from the shard writer,
sync and in the forked writer of ``--async-save``), and ``SIGKILL`` at fixed points of a run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Optional

from jobs import make_trainer, tiny_cfg


def _snapshot(run: str) -> dict:
    """Names under the run directory and the marker."""
    root = Path(run)
    marker = root / "latest_checkpointed_iteration.txt"
    return {"dirs": sorted(p.name for p in root.glob("iter_*")),
            "marker": marker.read_text().strip() if marker.exists() else None}


def tiny_run_job(rank: int, world: int, root: str, tok_dir: Optional[str], iterations: list) -> list:
    """Save the weights of one tiny model (no optimizer) as checkpoints of ``iterations`` under ``root``."""
    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing
    from megatron_mdm.models.build import build_model

    cfg = tiny_cfg()
    cfg.model.vocab_size = 100
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(7)
    model = build_model(cfg, 100, causal=False)[0]
    for it in iterations:
        checkpointing.save_checkpoint(root, it, [model], None, None,
                                      {"config": cfg.to_dict(), "consumed_samples": 0},
                                      tokenizer_dir=tok_dir, config_yaml=cfg.to_yaml())
    return _snapshot(root)["dirs"]


def load_errors_job(rank: int, world: int, cases: list) -> list:
    """Try to load each checkpoint directory (weights only) into a tiny model; the errors, or 'ok'. A case is a
    path, or ``[path, True]`` to allow a checkpoint without its manifest (``--allow-unverified-checkpoint``)."""
    from megatron_mdm.checkpoint import checkpointing

    trainer = make_trainer(tiny_cfg())
    out = []
    for case in cases:
        path, allow = (case, False) if isinstance(case, str) else case
        try:
            checkpointing.load_checkpoint(path, trainer.model, finetune=True, allow_unverified=allow)
            out.append("ok")
        except checkpointing.CheckpointError as e:
            out.append(str(e))
    return out


def _dying_save(sd, path, **kwargs):
    (Path(path) / "__0_0.distcp").write_bytes(b"partial")
    raise OSError("simulated node failure during checkpoint save")


def _disk_full_writer(real):
    def write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write"))
        stream.write(b"\0" * 64)  # part of the shard reaches the disk first
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write_item


def failed_saves_job(rank: int, world: int, run: str) -> dict:
    """Saves that fail: each must raise one CheckpointError and leave the previous checkpoint as it was.

    (a) a re-save of the marker's own iteration dies half-written (the save a finished job used to do);
    (b) the disk fills up while the shards are written, synchronous save;
    (c) the same with ``--async-save`` (the error surfaces when the save is finalised);
    then a normal save succeeds and removes leftovers of killed saves.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_mdm.checkpoint import checkpointing, integrity

    cfg = tiny_cfg(train_iters=3, save=run)
    trainer = make_trainer(cfg)
    trainer.train()
    ckpt3 = Path(run) / "iter_0000003"
    before = (ckpt3 / "checksums.json").read_text()
    out: dict = {"initial": _snapshot(run)}

    def attempt(name: str, finalize: bool = False) -> None:
        try:
            trainer.save()
            if finalize:
                trainer.async_queue.maybe_finalize_async_calls(blocking=True)
            out[name] = "no error"
        except checkpointing.CheckpointError as e:
            out[name] = str(e)
        out[name + "_after"] = _snapshot(run)
        integrity.verify_files(ckpt3)  # the marker's checkpoint is intact
        out[name + "_same"] = (ckpt3 / "checksums.json").read_text() == before

    real_save = checkpointing.dist_checkpointing.save
    checkpointing.dist_checkpointing.save = _dying_save
    try:
        attempt("resave_dies")
    finally:
        checkpointing.dist_checkpointing.save = real_save

    trainer._train_iter = iter(trainer.train_loader)
    trainer.train_step()  # iteration 4
    real_write = filesystem_async._write_item
    filesystem_async._write_item = _disk_full_writer(real_write)
    try:
        attempt("disk_full_sync")
        trainer.async_queue = AsyncCallsQueue()
        attempt("disk_full_async", finalize=True)
    finally:
        filesystem_async._write_item = real_write
        trainer.async_queue = None

    (Path(run) / "iter_0000002.tmp-0123abcd").mkdir()  # left by a killed save
    trainer.save()
    out["final"] = _snapshot(run)
    integrity.verify_files(Path(run) / "iter_0000004")
    return out


def tokenizer_job(rank: int, world: int, run: str, tok_a: str, tok_b: str) -> dict:
    """Save with tokenizer A; resume / finetune with tokenizer B (same vocabulary size)."""
    from megatron_mdm.checkpoint.checkpointing import CheckpointError
    from megatron_mdm.config import ConfigError

    cfg = tiny_cfg(train_iters=1, save=run)
    trainer = make_trainer(cfg)
    trainer.tokenizer_dir = tok_a
    trainer.train()
    out = {}
    ck = trainer.cfg.checkpoint
    ck.load = run
    for name, tok, finetune, allow in (("resume_b", tok_b, False, False), ("finetune_b", tok_b, True, False),
                                       ("finetune_b_allowed", tok_b, True, True),
                                       ("resume_allow", tok_b, False, True), ("resume_a", tok_a, False, False)):
        trainer.tokenizer_dir, trainer._tokenizer_hash = tok, None
        ck.finetune, ck.allow_tokenizer_change = finetune, allow
        try:
            trainer.load()
            out[name] = "ok"
        except (CheckpointError, ConfigError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def descendants() -> list[int]:
    """The pids of every process this one started (and they started), alive now."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def kill_job(rank: int, world: int, overrides: dict, kill: Optional[dict], log_path: str,
             children_path: Optional[str] = None) -> dict:
    """Train with ``overrides``, appending each step's loss and grad norm to ``log_path``; SIGKILL at ``kill``.

    ``children_path``: where the pids of its live descendants are written just before the kill.
    ``kill``: ``{"after_step": k}`` (between steps), ``{"save_written": k}`` (inside the synchronous save
    of iteration k: every shard written, nothing committed), ``{"async_scheduled": k}`` (the
    asynchronous save of iteration k is writing, not finalised), ``{"swap": k}`` (a re-save of the
    marker's iteration k, between setting the old directory aside and renaming the new one in).
    """
    from megatron_mdm.checkpoint import checkpointing, layout

    kill = kill or {}

    def die():
        if children_path is not None:  # which processes of ours are alive when it dies
            Path(children_path).write_text(json.dumps(descendants()))
        os.kill(os.getpid(), signal.SIGKILL)

    cfg = tiny_cfg(**overrides)
    trainer = make_trainer(cfg)
    trainer.load()
    original_step, original_save = trainer.train_step, trainer.save

    def step():
        out = original_step()
        with open(log_path, "a") as f:
            f.write(json.dumps({"iteration": trainer.state.iteration, **out}) + "\n")
        if kill.get("after_step") == trainer.state.iteration:
            die()
        return out

    def save():
        it = trainer.state.iteration
        if kill.get("save_written") == it:
            real = checkpointing.dist_checkpointing.save

            def save_then_die(*args, **kwargs):
                real(*args, **kwargs)
                die()

            checkpointing.dist_checkpointing.save = save_then_die
        if kill.get("swap") == it:
            real_rename, aside = os.rename, []

            def rename(src, dst):
                if layout.OLD_TAG in Path(dst).name:
                    aside.append(dst)
                elif layout.TMP_TAG in Path(src).name and aside:
                    die()  # the old directory is set aside, the new one not yet in place
                return real_rename(src, dst)

            os.rename = rename
        original_save()
        if kill.get("async_scheduled") == it:
            die()

    trainer.train_step, trainer.save = step, save
    result = trainer.train()
    return {"iteration": result["iteration"], "losses": result["losses"]}



def resume_mistakes_job(rank: int, world: int, base: str) -> dict:
    """Runs saved with and without the distributed optimizer, then resumes that cannot work: each outcome."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_mdm.errors import UserError

    def trainer(**overrides):
        destroy_num_microbatches_calculator()  # one job after another in this process
        return make_trainer(tiny_cfg(**overrides))

    for name, distributed in (("dist", True), ("plain", False)):
        trainer(train_iters=2, save=f"{base}/{name}", use_distributed_optimizer=distributed).train()
    cases = {
        "dist_without_flag": dict(load=f"{base}/dist"),
        "plain_with_flag": dict(load=f"{base}/plain", use_distributed_optimizer=True),
        "dist_with_flag": dict(load=f"{base}/dist", use_distributed_optimizer=True),
        "dist_finetuned_without_flag": dict(load=f"{base}/dist", finetune=True),
        "train_iters_below": dict(load=f"{base}/plain", train_iters=1),
        "train_tokens_below": dict(load=f"{base}/plain", train_iters=None, train_tokens=16 * 8),
    }
    out = {}
    for case, overrides in cases.items():
        try:
            trainer(**overrides).load()
            out[case] = "ok"
        except UserError as e:
            out[case] = f"{type(e).__name__}: {e}"
    return out
