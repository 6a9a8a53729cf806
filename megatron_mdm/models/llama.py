"""The Llama-style stack: the masked diffusion model and its ARM baseline, one Megatron ``GPTModel``.

RMSNorm, RoPE, GQA, SwiGLU, untied head, no biases (Qwen2's q/k/v biases with ``--add-qkv-bias``; Llama 3's
RoPE scaling with ``--rope-scaling llama3``). The MDM is this stack with **no causal mask**: a spec change,
made for every family in ``build.layer_spec``. On the Transformer Engine spec where TE is present, else on
Megatron's local spec with :class:`~megatron_mdm.models.attention.SDPAttention` as the core attention (memory
linear in sequence length).

Torch and Megatron are imported inside the functions: importing this module registers the record only.
"""

from __future__ import annotations

from megatron_mdm.config import Config, check
from megatron_mdm.models.registry import ModelFamily, register

MEGATRON_LLAMA3 = (1.0, 4.0, 8192)
"""(low_freq_factor, high_freq_factor, original_max_position_embeddings) that Megatron's ``RotaryEmbedding``
fixes when built with ``rope_scaling=True`` (Llama 3.1/3.2/3.3 use exactly these); only the factor is free."""


def transformer_kwargs(cfg: Config) -> dict:
    import torch.nn.functional as F  # noqa: N812, PLC0415

    return dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                add_qkv_bias=cfg.model.add_qkv_bias)


def layer_spec(cfg: Config, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs  # noqa: PLC0415

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_mdm.models.attention import SDPAttention  # noqa: PLC0415

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _rope_kwargs(cfg: Config) -> dict:
    m = cfg.model
    fits = (m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position_embeddings) == MEGATRON_LLAMA3
    return {"rope_scaling": m.rope_scaling == "llama3" and fits, "rope_scaling_factor": m.rope_scaling_factor}


def _rescale_rope(model, cfg: Config) -> None:
    """llama3 scaling with other constants than Megatron's fixed ones: its own rule, all four parameters.

    Megatron's ``RotaryEmbedding._apply_scaling`` is transformers' ``_compute_llama3_parameters`` (the same
    wavelength bands and smooth ramp, float32); its constructor only fixes three of the four parameters.
    """
    m = cfg.model
    rotary = getattr(model, "rotary_pos_emb", None)
    if m.rope_scaling != "llama3" or _rope_kwargs(cfg)["rope_scaling"] or rotary is None:
        return
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
        high_freq_factor=m.rope_high_freq_factor,
        original_max_position_embeddings=m.rope_original_max_position_embeddings)


def construct(cfg: Config, tconf, spec, common: dict):
    from megatron.core.models.gpt import GPTModel  # noqa: PLC0415

    model = GPTModel(transformer_layer_spec=spec, max_sequence_length=cfg.data.seq_length,
                     position_embedding_type="rope", rotary_base=cfg.model.rotary_base, **_rope_kwargs(cfg), **common)
    _rescale_rope(model, cfg)
    return model


def count_parameters(cfg: Config, vocab_size: int) -> dict[str, int]:
    m = cfg.model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    groups = m.num_query_groups or m.num_attention_heads
    qkv = h + 2 * groups * (h // m.num_attention_heads)
    attn = h * qkv + h * h
    per_layer = attn + 3 * h * f + 2 * h + (qkv if m.add_qkv_bias else 0)  # attention, SwiGLU, two norms
    non_embedding = L * per_layer + h  # + final norm
    emb = vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    return {"total": non_embedding + emb, "embedding": emb, "non_embedding": non_embedding}


def validate(cfg: Config) -> None:
    m = cfg.model
    check(m.position_padding_idx is None, "position_padding_idx", "needs --architecture bert")
    check(m.num_tokentypes == 0, "num_tokentypes", "needs --architecture bert")


def hf_family(cfg: Config):
    from megatron_mdm.hf.llama import LLAMA  # noqa: PLC0415
    from megatron_mdm.hf.qwen2 import QWEN2  # noqa: PLC0415

    return QWEN2 if cfg.model.add_qkv_bias else LLAMA


def describe(cfg: Config) -> str:
    m = cfg.model
    rope = f"RoPE base {m.rotary_base}" + (f", llama3 scaling x{m.rope_scaling_factor}" if m.rope_scaling else "")
    return (f"{hf_family(cfg).name} ({m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
            f"{m.num_query_groups or m.num_attention_heads} key/value heads{', q/k/v biases' if m.add_qkv_bias else ''}, "
            f"SwiGLU {m.ffn_hidden_size}, RMSNorm, {rope})")


LLAMA_STACK = register(ModelFamily(
    name="llama", objectives=("mdm", "arm"), supports_te=True, ships_modeling_code=True,
    transformer_kwargs=transformer_kwargs, layer_spec=layer_spec, construct=construct,
    count_parameters=count_parameters, validate=validate, hf_family=hf_family, describe=describe,
))
