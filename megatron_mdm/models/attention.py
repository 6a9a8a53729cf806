"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix (memory
quadratic in sequence length) and refuses context parallelism. This drop-in keeps its
constructor/forward contract (same in megatron-core 0.16 and 0.19) and calls SDPA, which picks a
flash / memory-efficient kernel on GPU and stays linear in memory. It is used for the local spec on
CPU and on GPUs without Transformer Engine; the TE spec keeps ``TEDotProductAttention``.

The attention mask type comes from the layer spec: ``no_mask`` (MDM, bidirectional) or ``causal``
(ARM baseline). Padding and ``arbitrary`` masks (the causal-to-bidirectional annealing of an adapted AR
model) are honoured when given as Megatron's boolean mask (True = masked out); ``arbitrary`` without a mask
is bidirectional. A mask given with ``no_mask`` or ``causal`` (packed instruction examples: a block-diagonal
mask from the example ids) is honoured too, combined with the causal mask for the baseline.

Context parallelism (CP > 1). The batch is split as Transformer Engine's CP splits it
(``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence is cut into 2·CP chunks and CP rank
r holds chunks r and 2·CP-1-r, so one checkpoint and one loss serve both specs. Each rank all-gathers
K and V of the whole sequence over the CP group (Megatron's ``gather_from_sequence_parallel_region``:
all-gather on the sequence dimension, reduce-scatter of the K/V gradients in backward) and attends
with its own queries. Bidirectional attention (MDM) needs no mask at all, since the order of keys
does not matter; every rank does the same work. The causal baseline masks with the *global*
positions of the local query chunks against the gathered keys (``cp_positions``). RoPE needs no
help here: Megatron's ``RotaryEmbedding`` already selects the same two chunks of the position table
on each CP rank (``get_pos_emb_on_this_cp_rank``). Memory: the gathered K/V of one layer hold
2·b·s·n_kv·d elements per rank (s = the full sequence): see README, "Parallelism".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def cp_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions [local_len] of the tokens CP rank ``cp_rank`` holds (chunks r and 2CP-1-r)."""
    if local_len % 2:
        raise ValueError(f"a context-parallel slice has an even length (2 chunks), got {local_len}")
    c = local_len // 2
    first = torch.arange(c, device=device) + cp_rank * c
    second = torch.arange(c, device=device) + (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([first, second])


def cp_causal_mask(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """SDPA boolean mask [local_len, cp_size·local_len] (True = attend): local queries vs the keys
    all-gathered over the CP group (rank 0's slice first), by global position."""
    q_pos = cp_positions(local_len, cp_size, cp_rank, device)
    k_pos = torch.cat([cp_positions(local_len, cp_size, r, device) for r in range(cp_size)])
    return k_pos[None, :] <= q_pos[:, None]


def gather_kv(key: torch.Tensor, value: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather K and V [s_local, b, n_kv, d] over the CP group in one collective (sequence dim);
    the backward reduce-scatters their gradients. Returns [cp·s_local, b, n_kv, d] each."""
    dk = key.shape[-1]
    kv = torch.cat([key, value], dim=-1)
    kv = gather_from_sequence_parallel_region(kv, tensor_parallel_output_grad=True, group=group)
    return kv[..., :dk], kv[..., dk:]


class SDPAttention(MegatronModule):
    """Attention core: q/k/v [s, b, heads, d] -> context [s, b, heads * d] (tensor-parallel local).

    With CP > 1, ``s`` is this rank's slice of the sequence (2 chunks); K/V are gathered over CP.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,  # TE's option; the local spec always all-gathers K/V
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = ps.get_context_parallel_group()
        self.cp_group = cp_group if config.context_parallel_size > 1 else None

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
        cp = self.cp_group.size() if self.cp_group is not None else 1
        mask = None
        if cp > 1:
            if attention_bias is not None or attention_mask is not None:
                raise ValueError("context parallelism on the local spec supports no_mask and causal "
                                 "attention only (no padding, packed-example mask or attention bias)")
            key, value = gather_kv(key, value, self.cp_group)  # [cp * sq, b, nkv, d]
            if mask_type == AttnMaskType.causal:
                mask = cp_causal_mask(sq, cp, self.cp_group.rank(), query.device)  # [sq, cp * sq]
        q = query.permute(1, 2, 0, 3)  # [b, nq, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, nkv, sk, d]
        v = value.permute(1, 2, 0, 3)
        if nkv != nq:  # GQA: repeat kv heads (explicit, works with every SDPA backend)
            k = k.repeat_interleave(nq // nkv, dim=1)
            v = v.repeat_interleave(nq // nkv, dim=1)
        if cp == 1:
            if attention_mask is not None:  # padding, annealing (arbitrary), or packed examples (any type)
                mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
                if mask_type == AttnMaskType.causal:
                    mask = mask & torch.ones(sq, k.shape[2], dtype=torch.bool, device=mask.device).tril()
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
