r"""Model logits for decoding and scoring: the model interface, vocabulary clipping, the mask token, CFG.

Everything in ``decoding`` and ``likelihood`` is written against one model-agnostic callable::

    LogitsFn = Callable[[LongTensor [b, s]], Tensor [b, s, V_padded]]   # bidirectional for an MDM

so the same code drives a Hugging Face model and a Megatron model. A model may do more than that
by being a :class:`ModelForward` (``decoding.backends.hf.HFForward``, ``decoding.backends.megatron.MegatronForward``):

* **logits only where needed** (``select``): the output head runs on a slice of positions or on the
  positions of a boolean mask only (the head is V x h per position; an MDM needs the masked ones);
* **a window against a KV cache** (``start``, ``cache``): ``input_ids`` are the positions
  ``[start, start + q)`` of a longer sequence whose other positions' keys/values are held by a
  :class:`~megatron_mdm.decoding.cache.KVCache`.

:func:`run_model` calls either kind the same way; a plain callable gets a full forward and the
selection is applied to its output (a cache needs a :class:`ModelForward`).

This module also owns the two steps that turn raw logits into p_theta(x_0[i] | x_t):

* **Vocabulary and mask token.** The model's output may be padded beyond the real vocabulary (for
  tensor parallelism); logits at ids ``>= vocab_size`` are dropped, and the mask token's logit is set
  to -inf because x_0 never contains [MASK].
* **Unsupervised classifier-free guidance** (Nie et al. 2025, SMDM, Sec. 5; the same code in LLaDA's
  ``generate.py``). The unconditional input is the same sequence with the prompt positions replaced
  by [MASK]; conditional and unconditional rows go through ONE forward (concatenated on the batch
  dimension) and the logits are combined as

      l_w = l_uncond + (w + 1) * (l_cond - l_uncond)

  i.e. ``p_w ∝ p_cond^(1+w) / p_uncond^w``. This is the SMDM/LLaDA convention (``cfg_scale = w``):
  w = 0 is plain conditional prediction, exactly (no second forward is made at all). Under a KV cache
  the cache holds both halves (2b rows), so guidance works with every cache mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""input_ids [b, s] (int64) -> logits [b, s, V] (float); bidirectional for an MDM."""

Select = Union[None, slice, torch.Tensor]
"""Which positions get logits: None (all: [b, s, V]), a slice of positions ([b, len, V]) or a
bool mask [b, s] ([n, V], rows in row-major order of the True entries)."""


class ModelForward:
    """A ``LogitsFn`` that can also select positions for the head and decode a window with a KV cache.

    Subclasses implement :meth:`forward`; calling the object is the plain ``LogitsFn``.
    """

    supports_cache: bool = False
    supports_padding: bool = False
    """True when :meth:`forward` takes ``pad`` (left padding left out of attention, positions per row)."""
    shift: bool = False
    """True for a ``--shift-logits`` model: entry i is computed from position i - 1 (decoders widen
    their windows by one position on the left)."""

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids)

    def forward(self, input_ids: torch.Tensor, select: Select = None, start: int = 0, cache=None,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``input_ids`` [b, q], the positions ``[start, start + q)`` of the sequence.

        Args:
            input_ids: [b, q] int64.
            select: positions that get logits (see :data:`Select`), relative to ``input_ids``.
            start: position of ``input_ids[:, 0]`` in the whole sequence (RoPE positions).
            cache: a ``KVCache`` (recording a full forward, or serving a window), or None.
            pad: [b] left-padding positions of each row of the whole sequence (``supports_padding``): no query
                attends to them, and row i's position j is ``j - pad[i]``.

        Returns:
            float logits [b, q, V], [b, len, V] or [n, V] (see :data:`Select`).
        """
        raise NotImplementedError

    def new_cache(self):
        """An empty ``KVCache`` in this model's K/V layout."""
        raise ValueError(f"{type(self).__name__} has no KV cache support; use cache='none'")


def apply_select(x: torch.Tensor, select: Select) -> torch.Tensor:
    """Apply a :data:`Select` to a per-position tensor x [b, s, ...]."""
    if select is None:
        return x
    if isinstance(select, slice):
        return x[:, select]
    if select.dtype == torch.bool:
        return x[select.to(x.device)]
    raise TypeError(f"select: expected None, a slice or a bool mask, got {select.dtype}")


def run_model(fn: LogitsFn, input_ids: torch.Tensor, select: Select = None, start: int = 0, cache=None,
              pad: torch.Tensor | None = None):
    """Logits of ``fn`` on ``input_ids`` at the selected positions (see :meth:`ModelForward.forward`)."""
    if isinstance(fn, ModelForward):
        if pad is not None:
            return fn.forward(input_ids, select=select, start=start, cache=cache, pad=pad)
        return fn.forward(input_ids, select=select, start=start, cache=cache)
    if pad is not None:
        raise ValueError("this model function takes no padding; decode rows of one prompt length together")
    if cache is not None or start != 0:
        raise ValueError("this model function has no KV cache support; use cache='none'")
    return apply_select(fn(input_ids), select)


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance: ``uncond + (w + 1) * (cond - uncond)``.

    Args:
        cond: logits of the conditional input, [..., V].
        uncond: logits of the input with the prompt masked, same shape.
        cfg_scale: the guidance scale w (SMDM/LLaDA convention; 0 returns ``cond``).

    Returns:
        Guided logits, same shape as ``cond``.
    """
    if cfg_scale == 0.0:
        return cond
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def clip_logits(logits: torch.Tensor, mask_id: int, vocab_size: int | None, owned: bool = False) -> torch.Tensor:
    """Drop padded-vocabulary logits and forbid the mask token.

    Args:
        logits: [..., V_padded] model output.
        mask_id: id of the mask token (its logit becomes -inf).
        vocab_size: real vocabulary size (mask token included); None keeps all of V_padded.
        owned: ``logits`` is a fresh tensor nobody else holds: float32/64 logits are changed in place
            instead of copied.

    Returns:
        float32 (or float64, if given) logits [..., V].
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    elif not owned:
        logits = logits.clone()
    if 0 <= mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")
    return logits


def model_logits(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int | None = None,
    cfg_scale: float = 0.0,
    prompt_mask: torch.Tensor | None = None,
    select: Select = None,
    start: int = 0,
    cache=None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of p_theta(x_0 | input_ids), with optional unsupervised CFG, in one forward.

    Args:
        logits_fn: the model (a ``LogitsFn`` or a :class:`ModelForward`).
        input_ids: [b, s] int64 (mask tokens where x_0 is to be predicted).
        mask_id: id of the mask token.
        vocab_size: real vocabulary size; logits beyond it are ignored.
        cfg_scale: guidance scale w; 0 disables CFG (a single plain forward).
        prompt_mask: [b, s] bool, True at prompt positions; required when ``cfg_scale != 0``.
            The unconditional row is ``input_ids`` with these positions set to ``mask_id``.
        select: positions that get logits (:data:`Select`); the same positions in both CFG halves.
        start, cache: a window of a longer sequence against a KV cache (:meth:`ModelForward.forward`);
            under CFG the cache holds the conditional rows then the unconditional ones.
        pad: [b] left padding per row (:meth:`ModelForward.forward`); None: none.

    Returns:
        float logits [b, s, V] (or as selected) with the mask token at -inf.
    """
    owned = isinstance(logits_fn, ModelForward)  # its forward returns a fresh tensor
    if cfg_scale == 0.0:
        return clip_logits(run_model(logits_fn, input_ids, select, start, cache, pad), mask_id, vocab_size, owned)
    if prompt_mask is None:
        raise ValueError("cfg_scale != 0 needs prompt_mask (the positions masked in the unconditional input)")
    uncond_ids = input_ids.masked_fill(prompt_mask.to(input_ids.device), mask_id)  # [b, s]
    if isinstance(select, torch.Tensor):
        select = torch.cat([select, select], dim=0)  # [2b, s]
    both = run_model(logits_fn, torch.cat([input_ids, uncond_ids], dim=0), select, start, cache,
                     None if pad is None else torch.cat([pad, pad]))
    both = clip_logits(both, mask_id, vocab_size, owned)  # [2b, s, V] or [2n, V]
    cond, uncond = both.chunk(2, dim=0)
    guided = apply_cfg(cond, uncond, cfg_scale)
    if 0 <= mask_id < guided.shape[-1]:
        guided[..., mask_id] = float("-inf")  # -inf - (-inf) is nan: restore it
    return guided
