"""Run a Megatron model in one process (TP1/PP1) for sampling and evaluation: ``MegatronForward``.

``MegatronForward(chunks)`` wraps a built model as the decoding interface
(``decoding.logits.ModelForward``): called as a ``LogitsFn`` it maps ``input_ids [b, s] -> logits
[b, s, padded_vocab]`` (position ids ``0..s-1``, no attention mask: the layer spec decides causal or
bidirectional); the logits keep Megatron's vocabulary padding (callers slice ``[..., :vocab_size]``).
Its ``forward`` also takes

* ``select``: the output layer runs on a slice of positions or a bool mask's positions only
  (``output_head.select_output``, the hook that also serves masked-only logits in training);
* ``start`` and ``cache``: a window of a longer sequence against a ``decoding.KVCache``. Three hooks,
  installed for the call and removed after, do it without touching Megatron's code: a pre-hook on
  ``model.rotary_pos_emb`` passes ``offset=start`` (RoPE of positions ``start..start+q-1``), and a
  pre-hook on each layer's ``self_attention.core_attention`` hands the layer's fresh K/V
  (``[s, b, kv_heads, d]``, after RoPE) to ``cache.update`` and attends to what it returns.

A model trained with ``--shift-logits`` (output i predicts token i + 1) is wrapped with ``shift=True``:
its outputs are re-aligned so that entry i predicts token i (the hidden states are shifted before the
head, ``objective.shift_logits``' convention; decoders then widen their windows by one position).

``megatron_logits_fn(chunks)`` is the same object (historical name). ``load_megatron_for_inference(
load_dir)`` starts a world-size-1 gloo group when none exists, builds the model at TP1/PP1 from the
checkpoint's config, loads the weights (from any saved TP/PP layout) and returns ``(logits_fn, cfg,
tokenizer_or_None)``.

Security: a Megatron checkpoint is read with torch's distributed-checkpoint reader, which unpickles its
``.metadata`` file; unpickling runs code, so load checkpoints from trusted sources only (an exported
safetensors directory is the safe form to share).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron_mdm.config import Config
from megatron_mdm.decoding.cache import KVCache
from megatron_mdm.decoding.logits import ModelForward, Select
from megatron_mdm.models.output_head import Positions, select_output, unwrap

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def _rope_offset(model, start: int):
    """RoPE of positions ``start..`` instead of ``0..`` (``RotaryEmbedding.forward(..., offset=)``)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if not start:
        yield
        return
    if rope is None or "offset" not in inspect.signature(rope.forward).parameters:
        raise ValueError("this model's position embedding takes no offset: windows need RoPE (rotary_pos_emb)")

    def hook(module, args, kwargs):
        return args, dict(kwargs, offset=start)

    handle = rope.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _kv_hooks(model, cache: KVCache | None):
    """Route each layer's fresh K/V through ``cache.update`` before its core attention."""
    if cache is None:
        yield
        return
    handles = []

    def make(layer_idx: int):
        def hook(module, args, kwargs):
            args, kwargs = list(args), dict(kwargs)
            for name, at in (("key", 1), ("value", 2)):
                if name in kwargs:  # keyword call: move to positions
                    args.insert(at, kwargs.pop(name))
            args[1], args[2] = cache.update(args[1], args[2], layer_idx)
            return tuple(args), kwargs

        return hook

    try:
        for i, layer in enumerate(model.decoder.layers):
            core = layer.self_attention.core_attention
            handles.append(core.register_forward_pre_hook(make(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class MegatronForward(ModelForward):
    """A single-process (TP1, PP1, no virtual pipeline) Megatron model as ``ModelForward``.

    Args:
        model_chunks: ``build_model`` output; exactly one chunk holding every layer.
        shift: the model predicts token i + 1 at output i (``--shift-logits``): re-align its outputs.
    """

    supports_cache = True

    def __init__(self, model_chunks: list, shift: bool = False):
        self.shift = shift
        if len(model_chunks) != 1:
            raise ValueError("megatron_logits_fn needs one model chunk (TP1/PP1, no virtual pipeline)")
        self.model = unwrap(model_chunks[0])
        if not (self.model.pre_process and self.model.post_process):
            raise ValueError("megatron_logits_fn needs the whole model in one pipeline stage")

    def new_cache(self) -> KVCache:
        return KVCache(seq_dim=0)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, select: Select = None, start: int = 0, cache=None) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        b, s = ids.shape
        position_ids = torch.arange(start, start + s, device=device).unsqueeze(0).expand(b, s)
        positions = Positions.from_mask(select) if isinstance(select, torch.Tensor) else select
        try:
            with _rope_offset(model, start), _kv_hooks(model, cache), select_output(model, positions, self.shift):
                logits = model(ids, position_ids, None)  # [b, s', padded_vocab] or [1, n, padded_vocab]
        finally:
            model.train(was_training)
        if isinstance(positions, Positions):
            logits = logits[0][positions.valid.to(logits.device)]  # [n, padded_vocab]
        return logits.to(input_ids.device)


def megatron_logits_fn(model_chunks: list) -> MegatronForward:
    """A ``LogitsFn`` (a :class:`MegatronForward`) over a single-process model.

    Args:
        model_chunks: ``build_model`` output; exactly one chunk holding every layer.
    Returns:
        ``fn(input_ids [b, s] long) -> logits [b, s, padded_vocab] float`` on the ids' device.
    """
    return MegatronForward(model_chunks)


def load_megatron_for_inference(load_dir: str | os.PathLike, iteration: int | None = None):
    """Load a checkpoint (any saved TP/PP layout) into a TP1/PP1 model in this process.

    Args:
        load_dir: run directory (or an ``iter_*`` directory).
        iteration: checkpoint iteration (default: the latest).
    Returns:
        ``(logits_fn, cfg, tokenizer)``: the ``LogitsFn`` (padded vocab), the checkpoint's ``Config``
        (with the parallel layout set to 1) and its ``MDMTokenizer`` or None when it has none.
    """
    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing, integrity
    from megatron_mdm.hf import ensure_single_process_world
    from megatron_mdm.models.build import build_model

    path = checkpointing.resolve_checkpoint(load_dir, iteration)
    integrity.verify_files(path)  # every file against its checksum before any is read
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
    checkpointing.load_checkpoint(path, chunks, finetune=True, verify=False)  # hashed above; sizes again
    tokenizer = None
    if (path / "tokenizer").exists():
        from megatron_mdm.tokenization import MDMTokenizer

        tokenizer = MDMTokenizer.load(path / "tokenizer")
    # a shifted model (--shift-logits) predicts token i + 1 at output i: decoders get aligned logits
    return MegatronForward(chunks, shift=cfg.objective.shift_logits), local, tokenizer


def _checkpoint_vocab_rows(path: Path) -> int:
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path)).read_metadata()
    return int(md.state_dict_metadata["embedding.word_embeddings.weight"].size[0])
