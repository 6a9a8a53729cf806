"""The Megatron side of conversion: read a torch_dist checkpoint's tensors, write one from full tensors.

``read_checkpoint_tensors`` reads every model tensor of a checkpoint of any TP/PP layout in this process
alone (the stored tensors carry global shapes). ``save_megatron`` writes a checkpoint through
``checkpointing.save_checkpoint`` from a TP1/PP1 model built in a one-process gloo world, so the result
is an ordinary checkpoint that resumes or finetunes at any layout.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch

from megatron_mdm.config import Config
from megatron_mdm.hf.base import _PER_LAYER, MODEL_PREFIXES, ConversionError


def read_checkpoint_tensors(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """All model tensors of one torch_dist checkpoint directory, full (unsharded), on CPU.

    Reads with ``torch.distributed.checkpoint`` in this process alone (no process group); the stored
    tensors carry global shapes, so the TP/PP layout of the run that saved them does not matter. The files
    are checked against the checkpoint's checksums first, unless ``verify=False`` (the caller did).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_mdm.checkpoint.integrity import verify_files

    if verify:
        verify_files(path)  # checksums and sizes; one-line CheckpointError naming a damaged file
    reader = dcp.FileSystemReader(str(path))
    try:
        md = reader.read_metadata()
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: not a torch_dist checkpoint ({e.filename} is missing)") from None
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}
    if not sd:
        raise ConversionError(f"{path}: the checkpoint holds no model tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def save_megatron(tensors: dict[str, torch.Tensor], cfg: Config, padded: int, out: Path, tok) -> Path:
    """Write ``tensors`` with ``checkpointing.save_checkpoint`` from a TP1/PP1 model (one-process world)."""
    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing
    from megatron_mdm.models.build import build_model

    local = copy.deepcopy(cfg)
    local.parallel.tensor_model_parallel_size = 1
    local.parallel.pipeline_model_parallel_size = 1
    local.parallel.num_layers_per_virtual_pipeline_stage = None
    created = ensure_single_process_world(local)
    try:
        runtime.set_seed(cfg.logging.seed)
        model = build_model(local, padded, causal=cfg.objective.objective == "arm", use_te=False)[0]
        load_into_model(model, tensors)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            checkpointing.save_checkpoint(out, 0, [model], None, None,
                                          meta={"config": cfg.to_dict(), "consumed_samples": 0},
                                          tokenizer_dir=tmp, config_yaml=cfg.to_yaml())
    finally:
        if created:
            runtime.shutdown()
    return checkpointing.iteration_dir(out, 0)


def load_into_model(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full checkpoint tensors (global keys, layers stacked) into a TP1/PP1 model."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    used: set[str] = set()
    with torch.no_grad():
        for name, sh in model.sharded_state_dict().items():
            if isinstance(sh, ShardedObject) or name.endswith("_extra_state"):
                continue
            if sh.key not in tensors:
                raise ConversionError(f"no tensor for the model's {sh.key!r}")
            src = tensors[sh.key]
            layer = _PER_LAYER.match(name)
            if layer is not None and sh.key.startswith("decoder.layers.") and not _PER_LAYER.match(sh.key):
                src = src[int(layer.group(1))]
            if tuple(src.shape) != tuple(sh.data.shape):
                raise ConversionError(f"{sh.key}: shape {tuple(src.shape)} does not fit the model's {tuple(sh.data.shape)}")
            sh.data.copy_(src)
            used.add(sh.key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ConversionError(f"tensors without a place in the model: {unused[:5]}")


def ensure_single_process_world(cfg: Config, force_cpu: bool = True) -> bool:
    """Start a one-process world and ``cfg``'s (TP1/PP1) parallel state when none exists; True if started here.

    ``force_cpu`` keeps conversion on CPU (gloo) even where a GPU is present.
    """
    from megatron_mdm import runtime

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise ConversionError("conversion runs in one process; it was called inside a larger world")
        runtime.init_parallel_state(cfg.parallel, cfg.model.num_layers)
        return False
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        from megatron_mdm.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers, force_cpu=force_cpu)
    return True
