"""A plain-PyTorch forward of our Llama-shaped GPTModel, from its state dict: the GPU check's reference.

Independent of Megatron-core and of the model code: it reads the local-spec state dict of a TP1/PP1
``GPTModel`` (``embedding.word_embeddings``, ``decoder.layers.N.{input_layernorm, self_attention.
linear_qkv, self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``,
``decoder.final_layernorm``, ``output_layer``) and computes the logits with textbook formulas:
RMSNorm, rotate-half RoPE, grouped-query attention (``linear_qkv`` rows per query group as
[q heads of the group, k, v]), SwiGLU (``linear_fc1`` = [gate; up]). ``causal`` picks the ARM mask;
the MDM attends everywhere. Runs in the dtype of the tensors given (float32 on the CPU in the check).
"""

from __future__ import annotations

import math

import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: [b, heads, s, d] -> rotate-half RoPE at positions 0..s-1."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [s, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def reference_logits(sd: dict, tokens: torch.Tensor, *, num_layers: int, num_heads: int, num_groups: int,
                     eps: float, rotary_base: float, causal: bool) -> torch.Tensor:
    """Logits [b, s, padded vocab] of ``tokens`` [b, s] for the state dict ``sd`` (TP1, PP1, local spec)."""
    emb = sd["embedding.word_embeddings.weight"]
    x = emb[tokens]  # [b, s, h]
    b, s, h = x.shape
    d = h // num_heads
    per_group = num_heads // num_groups
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        y = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = (y @ sd[p + "self_attention.linear_qkv.weight"].T).view(b, s, num_groups, per_group + 2, d)
        q = qkv[:, :, :, :per_group].reshape(b, s, num_heads, d).transpose(1, 2)  # [b, nq, s, d]
        k = qkv[:, :, :, per_group].transpose(1, 2)  # [b, ng, s, d]
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        q, k = _rope(q, rotary_base), _rope(k, rotary_base)
        k = k.repeat_interleave(per_group, dim=1)
        v = v.repeat_interleave(per_group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = x + ctx @ sd[p + "self_attention.linear_proj.weight"].T
        y = _rms_norm(x, sd[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = (y @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = _rms_norm(x, sd["decoder.final_layernorm.weight"], eps)
    head = sd.get("output_layer.weight", emb)  # tied embeddings when there is no output layer
    return x @ head.T
