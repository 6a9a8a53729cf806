"""The Hugging Face model behind the decoding interface (``ModelForward``).

``HFForward(model, device)`` wraps a loaded masked LM. Any model returning ``.logits`` works as a
plain ``LogitsFn``; the exported MDM (``hf/modeling/modeling_mdm.py``, which accepts
``past_key_values`` and ``logits_to_keep``) also gets the KV cache and head-only-where-needed. Its K/V
layout is transformers' ``[b, kv_heads, s, head_dim]``. The Megatron model has the same interface in
``megatron_mdm.decoding.backends.megatron.MegatronForward``.
"""

from __future__ import annotations

import inspect

import torch

from megatron_mdm.decoding.cache import KVCache
from megatron_mdm.decoding.logits import ModelForward, Select, apply_select


class HFForward(ModelForward):
    """A Hugging Face masked LM as a ``LogitsFn`` / ``ModelForward``.

    Args:
        model: e.g. ``MDMForMaskedLM`` or any ``AutoModelForMaskedLM``; put in eval mode here.
        device: where the model runs; inputs are moved there, logits come back there as float.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        params = inspect.signature(model.forward).parameters
        self._keeps = "logits_to_keep" in params
        self.supports_cache = "past_key_values" in params and self._keeps
        self.shift = bool(getattr(getattr(model, "config", None), "shift_logits", False))  # re-aligned in the model

    def forward(self, input_ids: torch.Tensor, select: Select = None, start: int = 0, cache=None) -> torch.Tensor:
        kwargs = {}
        if cache is not None or start:
            if not self.supports_cache:
                raise ValueError(f"{type(self.model).__name__} takes no past_key_values: use cache='none'")
            q = input_ids.shape[1]
            kwargs["position_ids"] = torch.arange(start, start + q, device=self.device)[None]
            kwargs["past_key_values"] = cache
        if select is not None and self._keeps:
            kwargs["logits_to_keep"] = select
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), **kwargs).logits.float()
        return logits if self._keeps else apply_select(logits, select)

    def new_cache(self) -> KVCache:
        if not self.supports_cache:
            return super().new_cache()
        return KVCache(seq_dim=2)
