"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix (memory
quadratic in sequence length). This drop-in keeps its constructor/forward contract (same in
megatron-core 0.16 and 0.19) and calls SDPA, which picks a flash / memory-efficient kernel on GPU
and stays linear in memory. It is used for the local spec on CPU and on GPUs without Transformer
Engine; the TE spec keeps ``TEDotProductAttention``.

The attention mask type comes from the layer spec: ``no_mask`` (MDM, bidirectional) or ``causal``
(ARM baseline). Padding and ``arbitrary`` masks (the causal-to-bidirectional annealing of an adapted AR
model) are honoured when given as Megatron's boolean mask (True = masked out); ``arbitrary`` without a mask
is bidirectional.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Attention core: q/k/v [s, b, heads, d] -> context [s, b, heads * d] (tensor-parallel local)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine spec (TEDotProductAttention)")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences need the Transformer Engine spec")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, nq, d = query.shape
        nkv = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, nq, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, nkv, sk, d]
        v = value.permute(1, 2, 0, 3)
        if nkv != nq:  # GQA: repeat kv heads (explicit, works with every SDPA backend)
            k = k.repeat_interleave(nq // nkv, dim=1)
            v = v.repeat_interleave(nq // nkv, dim=1)
        mask = None
        if mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary) and attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
        if attention_bias is not None:
            mask = attention_bias if mask is None else attention_bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask_type == AttnMaskType.causal and mask is None,
            scale=self.softmax_scale,
        )  # [b, nq, sq, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * d)
