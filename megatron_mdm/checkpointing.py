"""Distributed checkpoints: save/load with Megatron ``dist_checkpointing`` (torch_dist format).

Layout of a run directory (``--save``), the same names as Megatron-LM where one exists::

    RUN/latest_checkpointed_iteration.txt   the newest *complete* checkpoint (written last, atomically)
    RUN/iter_0000100/                       one torch_dist checkpoint
        config.yaml                         the resolved run config (also in the common state)
        tokenizer/                          a copy of the tokenizer (when known)
        checksums.json                      size and sha256 of every other file (``ckpt_integrity``)
        ...                                 dist_checkpointing files
    RUN/iter_0000200.tmp-<nonce>/           a save in progress (renamed to iter_0000200 when complete)

A checkpoint holds: ``model`` (or ``model0``, ``model1``, ... for virtual pipeline stages) as
Megatron sharded tensors with layout-independent global keys (so a checkpoint loads on another
TP/PP layout), the ``optimizer`` (fully reshardable, also the distributed optimizer: see
``ckpt_optimizer``), the LR scheduler, per-rank RNG states, and the common ``meta`` (iteration, consumed
samples, layout, config, tokenizer hash, and ``data_state``: the loader's global state, the same on every
rank, so it resumes on any layout).

What a save promises (``ckpt_files``): it writes into a temporary directory and renames it into place
only after every rank has written and the checksums are on disk, then moves the marker, then prunes;
the checkpoint the marker names is never removed or overwritten first, and a crash, kill or full
disk at any point leaves the previous checkpoint in force. What a load checks: every file against
the checksums (spread over the ranks), the tokenizer hash, the tensor shapes; a damaged checkpoint is
one line naming the file and the previous complete iteration.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mdm import child_processes, ckpt_files, ckpt_integrity, ckpt_optimizer, compat
from megatron_mdm.ckpt_files import (  # noqa: F401 - re-exported: the public names of checkpoints
    TRACKER,
    CheckpointError,
    iteration_dir,
    read_latest_iteration,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "TRACKER", "build_state_dict", "iteration_dir",
           "load_checkpoint", "load_meta", "read_latest_iteration", "resolve_checkpoint", "save_checkpoint"]


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }


def _per_rank_objects(rng: Any) -> dict:
    """Objects kept per rank (RNG: per TP/PP rank of every DP x CP rank). The loader's state is global
    (a function of the seed and the consumed samples) and lives in the common ``meta``."""
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    tps, pps = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    # the RNG grid's last axis is the DP x CP rank (equal to the DP rank at CP=1, as before)
    dpcp, dpcps = (ps.get_data_parallel_rank(with_context_parallel=True),
                   ps.get_data_parallel_world_size(with_context_parallel=True))
    return {"rng_state": ShardedObject("rng_state", rng, (pps, tps, dpcps), (pp, tp, dpcp), replica_id=0)}


def _save_kwargs() -> dict:
    return compat.dist_save_kwargs()  # megatron-core >= 0.17 defaults to nvrx (nvidia-resiliency-ext)


def _sharding_metadata() -> dict:
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def build_state_dict(model_chunks, optimizer=None, scheduler=None, rng=None,
                     meta: Optional[dict] = None, is_loading: bool = False) -> dict:
    """The sharded state dict of a checkpoint (what is saved, or the template of what is loaded)."""
    n = len(model_chunks)
    sd: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        sd[_model_key(i, n)] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        ckpt_optimizer.init_optimizer_state(optimizer)
        # nested {model0: ..., model1: ...} under VPP, as Megatron-LM passes it: every chunk numbers its
        # layers from 0, so a flat merge of the chunks' dicts would drop the first chunks' parameters
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        model_sd = model_sd[_model_key(0, 1)] if n == 1 else model_sd
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=_sharding_metadata())
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        sd.update(_per_rank_objects(rng))
    if meta is not None:
        sd["meta"] = meta
    return sd


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model_chunks,
    optimizer,
    scheduler,
    meta: dict,
    data_state: Optional[dict] = None,
    tokenizer_dir: Optional[str] = None,
    config_yaml: Optional[str] = None,
    keep_last: int = 0,
    async_queue=None,
) -> None:
    """Save one checkpoint on every rank; it appears (and the marker moves) when all ranks are done.

    Every rank writes into ``iter_N.tmp-<nonce>``; once all have written, each hashes its own files,
    rank 0 adds config, tokenizer and ``checksums.json``, renames the directory to ``iter_N``, moves
    the marker and prunes (``ckpt_files.commit``). A failure (disk full, ...) removes the temporary
    directory and raises one-line CheckpointError; the previous checkpoint stays in force.

    Args:
        root: run directory (``--save``).
        iteration: completed optimizer steps.
        model_chunks: this rank's model chunks (DDP-wrapped or not).
        optimizer, scheduler: Megatron optimizer and ``OptimizerParamScheduler``.
        meta: JSON-like common state (iteration, consumed_samples, config, ...).
        data_state: the loader's global state (with ``consumed_samples``), stored once in ``meta``.
        tokenizer_dir: copied into the checkpoint so that it is self-contained.
        config_yaml: the resolved config, written as ``config.yaml`` beside the shards.
        keep_last: delete older checkpoints beyond the last K (0 keeps all).
        async_queue: a ``dist_checkpointing`` ``AsyncCallsQueue`` for asynchronous saving, or None
            (then the checkpoint is committed by the queue's finalisation, on all ranks).
    """
    root = Path(root)
    rank = torch.distributed.get_rank()
    names = [None]
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            ckpt_files.clean_leftovers(root)
            tmp = ckpt_files.temp_dir(root, iteration, ckpt_files.new_nonce())
            tmp.mkdir()
            names = [tmp.name]
        except OSError as e:
            names = [e]
    torch.distributed.broadcast_object_list(names, src=0)
    if isinstance(names[0], BaseException):
        raise CheckpointError(f"--save: cannot create a checkpoint directory in {root}: "
                              f"{ckpt_integrity.save_error_reason(names[0])}")
    tmp = root / names[0]
    meta = dict(meta, iteration=iteration, layout=_layout(),
                megatron_core_version=compat.mcore_version())
    if data_state is not None:
        meta["data_state"] = data_state
    sd = build_state_dict(model_chunks, optimizer, scheduler, _rng_state(), meta)

    def finalize() -> None:
        torch.distributed.barrier()  # every rank has written its files
        _commit_collective(root, tmp, iteration, keep_last, config_yaml, tokenizer_dir)
        log.info("saved checkpoint iteration %d to %s", iteration, ckpt_files.iteration_dir(root, iteration))

    def failed(e: BaseException) -> CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = ckpt_files.read_latest_iteration(root)
        kept = (f"the previous checkpoint (iteration {latest}) stays in force" if latest is not None
                else "no checkpoint was written")
        return CheckpointError(f"--save: checkpoint iteration {iteration} could not be written to {root} "
                               f"({ckpt_integrity.save_error_reason(e, root)}); {kept}")

    child_processes.writer_queue_dies_with_parent()  # not an orphan holding the job's output after a kill -9
    try:
        if async_queue is None:
            dist_checkpointing.save(sd, str(tmp), **_save_kwargs())
            finalize()
            return
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True, **_save_kwargs())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise failed(e) from None
    steps = list(request.finalize_fns)

    def finalize_all() -> None:
        try:
            for fn in steps:  # dist_checkpointing's own: gather write results, metadata.json
                fn()
            finalize()
        except (Exception, CheckpointException) as e:
            raise failed(e) from None

    request.finalize_fns[:] = [finalize_all]
    async_queue.schedule_async_request(request)


def _commit_collective(root: Path, tmp: Path, iteration: int, keep_last: int, config_yaml: Optional[str],
                       tokenizer_dir: Optional[str]) -> None:
    """All ranks: hash the files each wrote; rank 0 adds config, tokenizer and the manifest, renames the
    directory into place, moves the marker, prunes. An error on any rank is raised on every rank (no
    rank is left waiting in a collective)."""
    rank = torch.distributed.get_rank()
    try:
        if rank == 0:
            _write_extras(tmp, config_yaml, tokenizer_dir)
        own: Any = ckpt_integrity.hash_files(tmp, ckpt_integrity.rank_files(tmp, rank))
    except OSError as e:
        own = e
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, own)
    status = [next((g for g in gathered if isinstance(g, BaseException)), None)]
    if rank == 0 and status[0] is None:
        try:
            ckpt_integrity.write_manifest_from(tmp, gathered)
            ckpt_files.commit(root, tmp, iteration, keep_last)
        except OSError as e:
            status = [e]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise status[0]


def _write_extras(path: Path, config_yaml: Optional[str], tokenizer_dir: Optional[str]) -> None:
    if config_yaml is not None:
        (path / "config.yaml").write_text(config_yaml)
    if tokenizer_dir is not None and Path(tokenizer_dir).exists():
        src = Path(tokenizer_dir)
        if src.is_dir():
            shutil.copytree(src, path / "tokenizer")
        else:
            (path / "tokenizer").mkdir()
            shutil.copy2(src, path / "tokenizer" / src.name)


def load_meta(path: str | os.PathLike) -> dict:
    """The common ``meta`` of a checkpoint directory (iteration, config, layout, ...)."""
    path = Path(path)
    try:
        common = compat.load_common_state(path)  # + the megatron-core version check (0.16 vs 0.19)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # torch.load of a damaged file raises anything
        found = ckpt_integrity.check_structure(path)  # megatron-core >= 0.17 reads it from the shards
        if found is None:
            name = ".metadata" if (path / ".metadata").exists() and not (path / "common.pt").exists() \
                else "common.pt"
            found = (name, f"common state unreadable ({type(e).__name__}: {ckpt_integrity.failure_line(e)})")
        raise CheckpointError(ckpt_integrity.damaged_message(path, *found)) from None
    if "meta" not in common:
        raise CheckpointError(f"{path}: not a megatron-mdm checkpoint (no 'meta' in its common state)")
    return common["meta"]


def check_tokenizer(path: Path, meta: dict, tokenizer: Optional[tuple[str, str]], finetune: bool,
                    allow_change: bool) -> None:
    """Refuse to resume or finetune with another tokenizer than the checkpoint's.

    ``tokenizer`` is (hash, directory) of this run's tokenizer. The checkpoint's hash is its
    ``meta["tokenizer"]`` or, for checkpoints saved before it was recorded, that of its ``tokenizer/``
    copy. A change is allowed only with ``--finetune --allow-tokenizer-change``.
    """
    if tokenizer is None:
        return
    have_hash, have_dir = tokenizer
    rec = meta.get("tokenizer") or {}
    want_hash, want_dir = rec.get("hash"), rec.get("path")
    if want_hash is None and (path / "tokenizer").is_dir():
        from megatron_mdm.tokenization import MDMTokenizer

        want_hash, want_dir = MDMTokenizer.load(path / "tokenizer").hash, str(path / "tokenizer")
    if want_hash is None or want_hash == have_hash:
        return
    what = (f"--tokenizer {have_dir} (sha256 {have_hash[:12]}) is not the tokenizer checkpoint {path} "
            f"was trained with ({want_dir}, sha256 {want_hash[:12]})")
    if finetune and allow_change:
        log.warning("%s: continuing (--allow-tokenizer-change)", what)
        return
    fix = "pass --allow-tokenizer-change" if finetune else "pass --finetune --allow-tokenizer-change"
    raise CheckpointError(f"{what}; token ids would change meaning: use the checkpoint's tokenizer, "
                          f"or {fix} to finetune with a new one")


def load_checkpoint(
    root: str | os.PathLike,
    model_chunks,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
    finetune: bool = False,
    verify: bool = True,
    tokenizer: Optional[tuple[str, str]] = None,
    allow_tokenizer_change: bool = False,
) -> dict:
    """Load model (and unless ``finetune``, optimizer, scheduler, RNG and loader position).

    Works across TP/PP layouts (the sharded tensors are resharded on load). The RNG states are
    restored only on the same layout; the loader state (global, in ``meta``) on any layout.
    First the files are checked against the checkpoint's checksums (spread over the ranks; only
    sizes with ``verify=False``) and ``tokenizer`` (hash, directory) against the checkpoint's.

    Returns:
        ``meta`` of the checkpoint, with ``data_state`` (the loader's global state; None with ``finetune``
        or for a checkpoint saved before the global data order, whose per-DP-rank state is not read).
    """
    path = resolve_checkpoint(root, iteration)
    ckpt_integrity.verify_collective(path, verify_hash=verify)
    meta = load_meta(path)
    check_tokenizer(path, meta, tokenizer, finetune, allow_tokenizer_change)
    same_layout = meta.get("layout") == _layout()
    want_state = not finetune
    template = build_state_dict(model_chunks, optimizer if want_state else None, is_loading=True)
    if want_state and same_layout:
        template["rng_state"] = _per_rank_objects(None)["rng_state"]
    _check_shapes(path, template)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"{path}: could not load into this model ({type(e).__name__}: {ckpt_integrity.failure_line(e)}); "
            "is it a checkpoint of the same architecture?"
        ) from None
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
    if want_state:
        if optimizer is not None and "optimizer" in loaded:
            ckpt_optimizer.keep_adam_step_on_load(optimizer)
            optimizer.load_state_dict(loaded["optimizer"])
            ckpt_optimizer.unshare_adam_steps(optimizer)
        if scheduler is not None:
            common = dist_checkpointing.load_common_state_dict(str(path))
            if "opt_param_scheduler" in common:
                scheduler.load_state_dict(common["opt_param_scheduler"])
        if "rng_state" in loaded:
            _set_rng_state(loaded["rng_state"])
        else:
            log.warning("checkpoint layout %s differs from this run's %s: RNG states not restored",
                        meta.get("layout"), _layout())
    out = dict(meta)
    out["data_state"] = meta.get("data_state") if want_state else None
    out["path"] = str(path)
    log.info("loaded checkpoint %s (iteration %s)", path, meta.get("iteration"))
    return out


def _check_shapes(path: Path, template: dict) -> None:
    """Refuse a checkpoint whose tensors have other global shapes (dist_checkpointing may not)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    for key, sd in template.items():
        if not key.startswith("model"):
            continue
        for sh in nested_values(sd):
            if not isinstance(sh, ShardedTensor) or sh.key not in stored:
                continue
            want, have = tuple(sh.global_shape), tuple(stored[sh.key].global_shape)
            if want != have:
                raise CheckpointError(
                    f"{path}: tensor {sh.key} has shape {have} in the checkpoint but {want} in this "
                    "model (another architecture, or another padded vocabulary: check "
                    "--make-vocab-size-divisible-by and the tokenizer)")
