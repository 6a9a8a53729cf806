"""Llama (and Mistral) <-> Megatron GPTModel: the parameter map, its fused tensors, the config translation.

Fused Megatron tensors map to a tuple of HF names and have a named split/merge pair beside the map:

* ``linear_qkv``: rows per query group ``[q heads of the group..., k, v]`` (GQA) <-> ``q_proj, k_proj, v_proj``;
* ``linear_fc1``: ``cat[gate, up]`` <-> ``gate_proj, up_proj``.

Both RoPE implementations are rotate-half, so no permutation is needed. An exported ARM uses the plain
causal class. An exported MDM is a bidirectional Llama with a linear head: transformers' EuroBERT
(``model_type`` ``eurobert``), which the stock classes load, with our ``MDMForMaskedLM`` (shipped from
``megatron_mdm/hf/modeling``, with ``generate``) under ``auto_map``; with q/k/v biases (from Qwen2) or shifted
prediction no stock class computes it, and it is ``mdm_llama`` (our classes only). Importing a EuroBERT
checkpoint gives an MDM of this family.
"""

from __future__ import annotations

import logging

import torch

from megatron_mdm.config import Config
from megatron_mdm.hf.base import ConversionError, Family, HfNames

log = logging.getLogger(__name__)

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
PARAM_MAP: dict[str, HfNames] = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    _L + "self_attention.linear_qkv.layer_norm_weight": _H + "input_layernorm.weight",
    _L + "self_attention.linear_qkv.weight": (
        _H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
    _L + "self_attention.linear_proj.weight": _H + "self_attn.o_proj.weight",
    _L + "mlp.linear_fc1.layer_norm_weight": _H + "post_attention_layernorm.weight",
    _L + "mlp.linear_fc1.weight": (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
    _L + "mlp.linear_fc2.weight": _H + "mlp.down_proj.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
VOCAB_PADDED = ("embedding.word_embeddings.weight", "output_layer.weight")


# ---- named tensor transforms -------------------------------------------------------------------

def _heads(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    return m.num_attention_heads, groups, m.hidden_size // m.num_attention_heads


def split_qkv(w: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, ...]:
    """linear_qkv [G*(q/G+2)*d, ...] (per group: q heads, k, v) -> q [nq*d, ...], k [G*d, ...], v [G*d, ...].

    Works for the weight [rows, h] and the bias [rows] alike.
    """
    nq, g, d = _heads(cfg)
    if w.shape[0] != (nq + 2 * g) * d:
        raise ConversionError(f"linear_qkv has {w.shape[0]} rows, expected (heads {nq} + 2 x groups {g}) x {d}")
    rest = tuple(w.shape[1:])
    per = w.reshape(g, (nq // g + 2) * d, *rest)
    q, k, v = per.split([nq // g * d, d, d], dim=1)
    return q.reshape(nq * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Inverse of ``split_qkv``: q, k, v -> linear_qkv with rows interleaved per query group."""
    nq, g, d = _heads(cfg)
    if q.shape[0] != nq * d or k.shape[0] != g * d or v.shape[0] != g * d:
        raise ConversionError(f"q/k/v projections {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
                              f"{nq} heads, {g} key/value heads of size {d}")
    rest = tuple(q.shape[1:])
    parts = [q.reshape(g, nq // g * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_gate_up(w: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_fc1 [2F, h] = cat[gate, up] -> gate [F, h], up [F, h]."""
    f = cfg.model.ffn_hidden_size
    if w.shape[0] != 2 * f:
        raise ConversionError(f"linear_fc1 has {w.shape[0]} rows, expected 2 x ffn_hidden_size = {2 * f}")
    gate, up = w.chunk(2, dim=0)
    return gate, up


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Inverse of ``split_gate_up``."""
    return torch.cat([gate, up], dim=0)


FUSED = {
    _L + "self_attention.linear_qkv.weight": (split_qkv, merge_qkv),
    _L + "mlp.linear_fc1.weight": (split_gate_up, merge_gate_up),
}


def present(template: str, cfg: Config) -> bool:
    """The head is absent when it is tied to the embedding."""
    return not (template == "output_layer.weight" and not cfg.model.untie_embeddings_and_output_weights)


def hf_shapes(cfg: Config, vocab_size: int) -> dict[str, tuple]:
    m = cfg.model
    nq, _, d = _heads(cfg)
    _, g, _ = _heads(cfg)
    h, f, layer = m.hidden_size, m.ffn_hidden_size, "model.layers.0."
    return {
        "model.embed_tokens.weight": (vocab_size, h),
        layer + "self_attn.q_proj.weight": (nq * d, h),
        layer + "self_attn.k_proj.weight": (g * d, h),
        layer + "self_attn.v_proj.weight": (g * d, h),
        layer + "self_attn.q_proj.bias": (nq * d,),  # Qwen2 only (checked where present)
        layer + "self_attn.k_proj.bias": (g * d,),
        layer + "self_attn.v_proj.bias": (g * d,),
        layer + "self_attn.o_proj.weight": (h, nq * d),
        layer + "mlp.gate_proj.weight": (f, h),
        layer + "mlp.up_proj.weight": (f, h),
        layer + "mlp.down_proj.weight": (h, f),
        layer + "input_layernorm.weight": (h,),
        layer + "post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab_size, h),
    }


# ---- configs -----------------------------------------------------------------------------------

LLAMA_LIKE = ("llama", "mistral", "mdm_llama", "eurobert")
MDM_TYPES = ("mdm_llama", "eurobert")  # bidirectional: imported as MDMs
ARM_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_parameters(cfg: Config) -> dict:
    m = cfg.model
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
                    high_freq_factor=m.rope_high_freq_factor,
                    original_max_position_embeddings=m.rope_original_max_position_embeddings)
    return rope


def hf_config_dict(cfg: Config, vocab_size: int, dtype: torch.dtype, mdm: bool,
                   special: dict[str, int | None]) -> dict:
    """The ``config.json`` of an export: the causal class of the source family (ARM) or our ``MDMForMaskedLM``.

    An MDM is of type ``eurobert`` (the stock classes compute it) unless it has ``qkv_bias`` (Qwen2's q/k/v
    biases) or ``shift_logits``, which only ``MDMForMaskedLM`` computes (type ``mdm_llama``).
    """
    from megatron_mdm.hf import modeling as hf_modeling

    m = cfg.model
    source = m.hf_model_type if m.hf_model_type in ARM_CLASSES else "llama"
    rope = _rope_parameters(cfg)
    stock = mdm and not m.add_qkv_bias and not cfg.objective.shift_logits
    model_type = (hf_modeling.STOCK_MODEL_TYPE if stock else hf_modeling.MODEL_TYPE) if mdm else source
    d = {
        "architectures": ["MDMForMaskedLM"] if mdm else [ARM_CLASSES[source]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings or cfg.data.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "initializer_range": m.init_method_std,
        "dtype": str(dtype).replace("torch.", ""),
        "use_cache": not mdm,
        **({"is_decoder": False} if mdm else {}),
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }
    if source in ("mistral", "qwen2"):
        d.update(sliding_window=None, use_sliding_window=False)  # Megatron attended to the whole sequence
    if rope["rope_type"] != "default":
        d["rope_scaling"] = rope  # transformers 4's name of the scaling (never null: a warning on load)
    if mdm:
        d["mask_token_id"] = special.get("mask")
        d["qkv_bias"] = m.add_qkv_bias
        d["shift_logits"] = cfg.objective.shift_logits
        d["source_model_type"] = m.hf_model_type
        d["auto_map"] = dict(hf_modeling.AUTO_MAP) if stock else {**hf_modeling.CONFIG_AUTO_MAP, **hf_modeling.AUTO_MAP}
    return d


def decoder_config_from_hf(hf: dict, qkv_bias: bool) -> Config:
    """A Megatron ``Config`` from a Llama/Mistral/Qwen2 (or our MDM) ``config.json``; ConversionError if unfit.

    Args:
        hf: the ``config.json`` dict.
        qkv_bias: the family has biases on q/k/v (Qwen2); other biases are refused.
    """
    mt = hf.get("model_type")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("the Hugging Face model has attention-output/MLP biases; the Megatron model has none")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r} is not SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported (supported: default, llama3)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConversionError(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window:
        log.warning("the model uses a sliding attention window of %s; Megatron attends to the whole sequence", window)
    cfg = Config()
    m = cfg.model
    m.hf_model_type = (hf.get("source_model_type") or ("llama" if mt == "mdm_llama" else mt)) if mt in MDM_TYPES else mt
    m.num_layers = hf["num_hidden_layers"]
    m.hidden_size = hf["hidden_size"]
    m.num_attention_heads = heads
    kv = hf.get("num_key_value_heads") or heads
    m.num_query_groups = None if kv == heads else kv
    m.ffn_hidden_size = hf["intermediate_size"]
    m.vocab_size = hf["vocab_size"]
    m.rotary_base = int(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "llama3":
        m.rope_scaling = "llama3"
        m.rope_scaling_factor = float(rope["factor"])
        m.rope_low_freq_factor = float(rope.get("low_freq_factor", 1.0))
        m.rope_high_freq_factor = float(rope.get("high_freq_factor", 4.0))
        m.rope_original_max_position_embeddings = int(rope.get("original_max_position_embeddings", 8192))
    m.add_qkv_bias = qkv_bias
    m.norm_epsilon = float(hf.get("rms_norm_eps", 1e-5))
    m.init_method_std = float(hf.get("initializer_range", 0.02))
    m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
    m.max_position_embeddings = int(hf.get("max_position_embeddings", cfg.data.seq_length))
    cfg.data.seq_length = m.max_position_embeddings
    cfg.objective.objective = "mdm" if mt in MDM_TYPES else "arm"
    cfg.objective.shift_logits = bool(hf.get("shift_logits", False))
    return cfg


def config_from_hf(hf: dict) -> Config:
    """A Megatron ``Config`` from a Llama or Mistral ``config.json`` (no biases)."""
    if hf.get("model_type") not in LLAMA_LIKE:
        raise ConversionError(f"the Hugging Face model is {hf.get('model_type')!r}, not Llama-shaped "
                              f"(supported: {list(LLAMA_LIKE)})")
    return decoder_config_from_hf(hf, qkv_bias=False)


LLAMA = Family(
    name="Llama",
    model_types=LLAMA_LIKE,
    param_map=PARAM_MAP,
    fused=FUSED,
    vocab_padded=VOCAB_PADDED,
    present=present,
    config_from_hf=config_from_hf,
    hf_config=hf_config_dict,
    hf_shapes=hf_shapes,
    ignore_hf=(r"rotary_emb",),
)
