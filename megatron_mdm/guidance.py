r"""Model logits for sampling and scoring: vocabulary clipping, the mask token, unsupervised CFG.

Everything in ``sampling`` and ``likelihood`` is written against one model-agnostic callable::

    LogitsFn = Callable[[LongTensor [b, s]], Tensor [b, s, V_padded]]   # bidirectional for an MDM

so the same code drives a Hugging Face model and a Megatron model. This module owns the two steps
that turn raw logits into the distribution p_theta(x_0[i] | x_t) that both consumers use:

* **Vocabulary and mask token.** The model's output may be padded beyond the real vocabulary (for
  tensor parallelism); logits at ids ``>= vocab_size`` are dropped, and the mask token's logit is set
  to -inf because x_0 never contains [MASK].
* **Unsupervised classifier-free guidance** (Nie et al. 2025, SMDM, Sec. 5; the same code in LLaDA's
  ``generate.py``). The unconditional input is the same sequence with the prompt positions replaced
  by [MASK]; conditional and unconditional rows go through ONE forward (concatenated on the batch
  dimension) and the logits are combined as

      l_w = l_uncond + (w + 1) * (l_cond - l_uncond)

  i.e. ``p_w ∝ p_cond^(1+w) / p_uncond^w``. This is the SMDM/LLaDA convention (``cfg_scale = w``):
  w = 0 is plain conditional prediction, exactly (no second forward is made at all).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""input_ids [b, s] (int64) -> logits [b, s, V] (float); bidirectional for an MDM."""


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


def clip_logits(logits: torch.Tensor, mask_id: int, vocab_size: int | None) -> torch.Tensor:
    """Drop padded-vocabulary logits and forbid the mask token.

    Args:
        logits: [b, s, V_padded] model output.
        mask_id: id of the mask token (its logit becomes -inf).
        vocab_size: real vocabulary size (mask token included); None keeps all of V_padded.

    Returns:
        float32 (or float64, if given) logits [b, s, V].
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    else:
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
) -> torch.Tensor:
    """Logits of p_theta(x_0 | input_ids), with optional unsupervised CFG, in one forward.

    Args:
        logits_fn: the model, input_ids [b, s] -> logits [b, s, V_padded].
        input_ids: [b, s] int64 (mask tokens where x_0 is to be predicted).
        mask_id: id of the mask token.
        vocab_size: real vocabulary size; logits beyond it are ignored.
        cfg_scale: guidance scale w; 0 disables CFG (a single plain forward).
        prompt_mask: [b, s] bool, True at prompt positions; required when ``cfg_scale != 0``.
            The unconditional row is ``input_ids`` with these positions set to ``mask_id``.

    Returns:
        float logits [b, s, V] with the mask token at -inf.
    """
    if cfg_scale == 0.0:
        return clip_logits(logits_fn(input_ids), mask_id, vocab_size)
    if prompt_mask is None:
        raise ValueError("cfg_scale != 0 needs prompt_mask (the positions masked in the unconditional input)")
    uncond_ids = input_ids.masked_fill(prompt_mask.to(input_ids.device), mask_id)  # [b, s]
    both = logits_fn(torch.cat([input_ids, uncond_ids], dim=0))  # [2b, s, V_padded]
    both = clip_logits(both, mask_id, vocab_size)
    cond, uncond = both.chunk(2, dim=0)
    guided = apply_cfg(cond, uncond, cfg_scale)
    if 0 <= mask_id < guided.shape[-1]:
        guided[..., mask_id] = float("-inf")  # -inf - (-inf) is nan: restore it
    return guided
