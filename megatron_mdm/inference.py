"""Run a Megatron model in one process (TP1/PP1) as a ``LogitsFn`` for sampling and evaluation.

``megatron_logits_fn(chunks)`` wraps a built model: ``input_ids [b, s] -> logits [b, s, padded_vocab]``
(position ids ``0..s-1``, no attention mask: the layer spec decides causal or bidirectional). The
logits keep Megatron's vocabulary padding; callers slice ``[..., :vocab_size]``.

``load_megatron_for_inference(load_dir)`` starts a world-size-1 gloo group when none exists, builds
the model at TP1/PP1 from the checkpoint's config, loads the weights (from any saved TP/PP layout)
and returns ``(logits_fn, cfg, tokenizer_or_None)``; a model trained with ``--shift-logits`` gets its
logits re-aligned (``objective.aligned_logits_fn``), so entry i always predicts token i.

Security: a Megatron checkpoint is read with torch's distributed-checkpoint reader, which unpickles its
``.metadata`` file; unpickling runs code, so load checkpoints from trusted sources only (an exported
safetensors directory is the safe form to share).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_mdm.config import Config
from megatron_mdm.objective import aligned_logits_fn

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def megatron_logits_fn(model_chunks: list) -> LogitsFn:
    """A ``LogitsFn`` over a single-process (TP1, PP1, no virtual pipeline) model.

    Args:
        model_chunks: ``build_model`` output; exactly one chunk holding every layer.
    Returns:
        ``fn(input_ids [b, s] long) -> logits [b, s, padded_vocab] float`` on the ids' device.
    """
    if len(model_chunks) != 1:
        raise ValueError("megatron_logits_fn needs one model chunk (TP1/PP1, no virtual pipeline)")
    model = model_chunks[0].module if hasattr(model_chunks[0], "module") else model_chunks[0]
    if not (model.pre_process and model.post_process):
        raise ValueError("megatron_logits_fn needs the whole model in one pipeline stage")

    @torch.no_grad()
    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        b, s = ids.shape
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        logits = model(ids, position_ids, None)  # [b, s, padded_vocab]
        model.train(was_training)
        return logits.to(input_ids.device)

    return logits_fn


def load_megatron_for_inference(load_dir: str | os.PathLike, iteration: int | None = None):
    """Load a checkpoint (any saved TP/PP layout) into a TP1/PP1 model in this process.

    Args:
        load_dir: run directory (or an ``iter_*`` directory).
        iteration: checkpoint iteration (default: the latest).
    Returns:
        ``(logits_fn, cfg, tokenizer)``: the ``LogitsFn`` (padded vocab), the checkpoint's ``Config``
        (with the parallel layout set to 1) and its ``MDMTokenizer`` or None when it has none.
    """
    from megatron_mdm import checkpointing, runtime
    from megatron_mdm.hf import ensure_single_process_world
    from megatron_mdm.model import build_model

    path = checkpointing.resolve_checkpoint(load_dir, iteration)
    meta = checkpointing.load_meta(path)
    cfg = Config.from_dict(meta["config"])
    local = copy.deepcopy(cfg)
    local.parallel.tensor_model_parallel_size = 1
    local.parallel.pipeline_model_parallel_size = 1
    local.parallel.num_layers_per_virtual_pipeline_stage = None
    # the checkpoint's padded vocabulary depends on the TP it was saved with: build exactly that size
    padded = _checkpoint_vocab_rows(path)
    ensure_single_process_world(local, force_cpu=False)
    runtime.set_seed(local.logging.seed)
    chunks = build_model(local, padded, causal=cfg.objective.objective == "arm")
    checkpointing.load_checkpoint(path, chunks, finetune=True)
    tokenizer = None
    if (path / "tokenizer").exists():
        from megatron_mdm.tokenization import MDMTokenizer

        tokenizer = MDMTokenizer.load(path / "tokenizer")
    # a shifted model (--shift-logits) predicts token i + 1 at output i: decoders get aligned logits
    return aligned_logits_fn(megatron_logits_fn(chunks), cfg.objective.shift_logits), local, tokenizer


def _checkpoint_vocab_rows(path: Path) -> int:
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path)).read_metadata()
    return int(md.state_dict_metadata["embedding.word_embeddings.weight"].size[0])
