"""Distributed checkpoints: save/load with Megatron ``dist_checkpointing`` (torch_dist format).

Layout of a run directory (``--save``), the same names as Megatron-LM where one exists::

    RUN/latest_checkpointed_iteration.txt   the newest *complete* checkpoint (written last, atomically)
    RUN/iter_0000100/                       one torch_dist checkpoint
        config.yaml                         the resolved run config (also in the common state)
        tokenizer/                          a copy of the tokenizer (when known)
        ...                                 dist_checkpointing files

A checkpoint holds: ``model`` (or ``model0``, ``model1``, ... for virtual pipeline stages) as
Megatron sharded tensors with layout-independent global keys (so a checkpoint loads on another
TP/PP layout), the ``optimizer`` (fully reshardable), the LR scheduler, per-rank RNG states, and the
common ``meta`` (iteration, consumed samples, layout, config, and ``data_state``: the loader's global
state, the same on every rank, so it resumes on any layout). A crash during a save leaves the previous
checkpoint in force, because the marker moves only after every rank has finished writing.
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

from megatron_mdm import compat

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | os.PathLike) -> Optional[int]:
    """The iteration recorded in the marker file, or None when there is no complete checkpoint."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint(root: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """The directory of the requested (or latest) checkpoint under ``root``; CheckpointError if none.

    ``root`` may also be an ``iter_*`` directory itself.
    """
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"--load: {root} does not exist")
    if (root / "metadata.json").is_file() and iteration is None:
        return root
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load: {root} has no complete checkpoint ({TRACKER} is missing)")
    path = iteration_dir(root, iteration)
    if not (path / "metadata.json").is_file():
        available = sorted(p.name for p in root.glob("iter_*") if (p / "metadata.json").is_file())
        raise CheckpointError(f"--load: no checkpoint for iteration {iteration} in {root}; found {available}")
    return path


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
        model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
        model_sd = model_sd[_model_key(0, 1)] if n == 1 else _merge(model_sd)
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=_sharding_metadata())
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        sd.update(_per_rank_objects(rng))
    if meta is not None:
        sd["meta"] = meta
    return sd


def _merge(model_sds: dict) -> dict:
    merged: dict = {}
    for v in model_sds.values():
        merged.update(v)
    return merged


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
    """Save one checkpoint on every rank; the marker moves when all ranks are done.

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
        async_queue: a ``dist_checkpointing`` ``AsyncCallsQueue`` for asynchronous saving, or None.
    """
    root = Path(root)
    path = iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if path.exists():  # an interrupted earlier save of the same iteration
            shutil.rmtree(path)
        path.mkdir(parents=True)
    torch.distributed.barrier()
    meta = dict(meta, iteration=iteration, layout=_layout(),
                megatron_core_version=compat.mcore_version())
    if data_state is not None:
        meta["data_state"] = data_state
    sd = build_state_dict(model_chunks, optimizer, scheduler, _rng_state(), meta)

    def finalize() -> None:
        torch.distributed.barrier()
        if rank == 0:
            if config_yaml is not None:
                (path / "config.yaml").write_text(config_yaml)
            if tokenizer_dir is not None and Path(tokenizer_dir).exists():
                src = Path(tokenizer_dir)
                if src.is_dir():
                    shutil.copytree(src, path / "tokenizer")
                else:
                    (path / "tokenizer").mkdir()
                    shutil.copy2(src, path / "tokenizer" / src.name)
            _write_tracker(root, iteration)
            if keep_last > 0:
                _prune(root, keep_last)
        torch.distributed.barrier()

    if async_queue is not None:
        request = dist_checkpointing.save(sd, str(path), async_sharded_save=True, **_save_kwargs())
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    else:
        dist_checkpointing.save(sd, str(path), **_save_kwargs())
        finalize()
    log.info("saved checkpoint iteration %d to %s", iteration, path)


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER)  # atomic: readers see the old or the new marker


def _prune(root: Path, keep_last: int) -> None:
    latest = read_latest_iteration(root)
    done = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    done = [it for it in done if latest is None or it <= latest]
    for it in done[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def load_meta(path: str | os.PathLike) -> dict:
    """The common ``meta`` of a checkpoint directory (iteration, config, layout, ...)."""
    common = compat.load_common_state(path)  # + the megatron-core version check (0.16 vs 0.19)
    if "meta" not in common:
        raise CheckpointError(f"{path}: not a megatron-mdm checkpoint (no 'meta' in its common state)")
    return common["meta"]


def load_checkpoint(
    root: str | os.PathLike,
    model_chunks,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
    finetune: bool = False,
) -> dict:
    """Load model (and unless ``finetune``, optimizer, scheduler, RNG and loader position).

    Works across TP/PP layouts (the sharded tensors are resharded on load). The RNG states are
    restored only on the same layout; the loader state (global, in ``meta``) on any layout.

    Returns:
        ``meta`` of the checkpoint, with ``data_state`` (the loader's global state; None with ``finetune``
        or for a checkpoint saved before the global data order, whose per-DP-rank state is not read).
    """
    path = resolve_checkpoint(root, iteration)
    meta = load_meta(path)
    same_layout = meta.get("layout") == _layout()
    want_state = not finetune
    template = build_state_dict(model_chunks, optimizer if want_state else None, is_loading=True)
    if want_state and same_layout:
        template["rng_state"] = _per_rank_objects(None)["rng_state"]
    _check_shapes(path, template)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the likely cause
        raise CheckpointError(
            f"{path}: could not load into this model ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "is it a checkpoint of the same architecture?"
        ) from e
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=True)
    if want_state:
        if optimizer is not None and "optimizer" in loaded:
            optimizer.load_state_dict(loaded["optimizer"])
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
