"""Hugging Face Llama <-> Megatron GPTModel: the one parameter map and its tensor transforms.

``PARAM_MAP`` is the single name map (Megatron checkpoint key with a ``{layer}`` placeholder -> HF Llama
name); the HF -> Megatron direction is derived from it, never written twice. Fused Megatron tensors map to
a tuple of HF names and have a named split/merge pair beside the map:

* ``linear_qkv``: rows per query group ``[q heads of the group..., k, v]`` (GQA) <-> ``q_proj, k_proj, v_proj``;
* ``linear_fc1``: ``cat[gate, up]`` <-> ``gate_proj, up_proj``;
* embedding and output head: Megatron's vocabulary padding (to a multiple of lcm(``make_vocab_size_divisible_by``, TP)) is
  trimmed on export and added (zero rows) on import.

Megatron checkpoint keys are TE-style and stacked over layers even for the local spec (the norms live in
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``); ``unstack_layers``/``stack_layers``
convert between ``decoder.layers.X [L, ...]`` and ``decoder.layers.{i}.X``. The stored tensors are
layout-independent, so a checkpoint of any TP/PP layout is read with ``torch.distributed.checkpoint`` in
one process, with no process group (``read_checkpoint_tensors``). Both RoPE implementations are
rotate-half, so no permutation is needed.

Reading checkpoints, export and import (``export_to_hf``, ``import_from_hf``) live in ``hf_io``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch

from megatron_mdm.config import Config

log = logging.getLogger(__name__)

HfNames = str | tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint or HF model cannot be converted; the message says what and why."""


# ---- the one parameter map ---------------------------------------------------------------------

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
HF_TO_MEGATRON: dict[HfNames, str] = {hf: meg for meg, hf in PARAM_MAP.items()}  # the derived inverse
VOCAB_PADDED = ("embedding.word_embeddings.weight", "output_layer.weight")
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


# ---- named tensor transforms -------------------------------------------------------------------

def _heads(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    return m.num_attention_heads, groups, m.hidden_size // m.num_attention_heads


def split_qkv(w: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, ...]:
    """linear_qkv [G*(q/G+2)*d, h] (per group: q heads, k, v) -> q [nq*d, h], k [G*d, h], v [G*d, h]."""
    nq, g, d = _heads(cfg)
    if w.shape[0] != (nq + 2 * g) * d:
        raise ConversionError(f"linear_qkv has {w.shape[0]} rows, expected (heads {nq} + 2 x groups {g}) x {d}")
    per = w.reshape(g, (nq // g + 2) * d, -1)
    q, k, v = per.split([nq // g * d, d, d], dim=1)
    return q.reshape(nq * d, -1), k.reshape(g * d, -1), v.reshape(g * d, -1)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Inverse of ``split_qkv``: q, k, v -> linear_qkv with rows interleaved per query group."""
    nq, g, d = _heads(cfg)
    if q.shape[0] != nq * d or k.shape[0] != g * d or v.shape[0] != g * d:
        raise ConversionError(f"q/k/v projections {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
                              f"{nq} heads, {g} key/value heads of size {d}")
    h = q.shape[1]
    return torch.cat([q.reshape(g, nq // g * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1).reshape(-1, h)


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


FUSED: dict[str, tuple[Callable, Callable]] = {
    _L + "self_attention.linear_qkv.weight": (split_qkv, merge_qkv),
    _L + "mlp.linear_fc1.weight": (split_gate_up, merge_gate_up),
}


def trim_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[padded_vocab, h] -> [vocab_size, h] (drop Megatron's padding rows)."""
    if w.shape[0] < vocab_size:
        raise ConversionError(f"embedding has {w.shape[0]} rows, fewer than the vocabulary size {vocab_size}")
    return w[:vocab_size]


def pad_vocab(w: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[vocab, h] -> [padded_vocab, h] with zero rows (never sampled: callers trim logits to the vocab)."""
    if w.shape[0] > padded_vocab:
        raise ConversionError(f"embedding has {w.shape[0]} rows, more than the padded vocabulary {padded_vocab}")
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])]) if w.shape[0] < padded_vocab else w


_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$")
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def unstack_layers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``decoder.layers.X`` [L, ...] -> ``decoder.layers.{i}.X`` [...]; other keys unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = t
        else:
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{m.group(1)}"] = t[i]
    return out


def stack_layers(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of ``unstack_layers``."""
    out: dict[str, torch.Tensor] = {}
    per: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PER_LAYER.match(key)
        if m is None:
            out[key] = t
        else:
            per.setdefault(m.group(2), {})[int(m.group(1))] = t
    for name, layers in per.items():
        if sorted(layers) != list(range(num_layers)):
            raise ConversionError(f"decoder.layers.*.{name}: found layers {sorted(layers)}, expected 0..{num_layers - 1}")
        out[f"decoder.layers.{name}"] = torch.stack([layers[i] for i in range(num_layers)])
    return out


# ---- state-dict conversion ---------------------------------------------------------------------

def _expand(template: str, num_layers: int) -> list[tuple[int | None, str]]:
    return [(i, template) for i in range(num_layers)] if "{layer}" in template else [(None, template)]


def _fmt(names: HfNames, layer: int | None) -> HfNames:
    if isinstance(names, tuple):
        return tuple(n.format(layer=layer) for n in names)
    return names.format(layer=layer)


def megatron_to_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: Config, vocab_size: int) -> dict[str, torch.Tensor]:
    """Megatron checkpoint tensors (global keys, stacked or per layer, TP1 layout) -> HF Llama state dict.

    Args:
        tensors: model tensors as stored in the checkpoint (``read_checkpoint_tensors``).
        cfg: the checkpoint's config (shapes, query groups, tied head).
        vocab_size: the real vocabulary size; padding rows beyond it are dropped.
    Returns:
        ``{hf_name: tensor}`` with HF ``LlamaForCausalLM`` names (no ``lm_head`` when embeddings are tied).
    Raises:
        ConversionError: a tensor is missing, unknown (another architecture) or of the wrong shape.
    """
    src = unstack_layers(tensors)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    tied = not cfg.model.untie_embeddings_and_output_weights
    for meg_t, hf_t in PARAM_MAP.items():
        if tied and meg_t == "output_layer.weight":
            continue
        for layer, _ in _expand(meg_t, cfg.model.num_layers):
            meg, hf = meg_t.format(layer=layer), _fmt(hf_t, layer)
            if meg not in src:
                raise ConversionError(f"the checkpoint has no tensor {meg!r}: not a Llama-style GPT checkpoint "
                                      f"of this config ({cfg.model.num_layers} layers)")
            t = src[meg]
            used.add(meg)
            if meg_t in VOCAB_PADDED:
                t = trim_vocab(t, vocab_size)
            if isinstance(hf, tuple):
                for name, part in zip(hf, FUSED[meg_t][0](t, cfg)):
                    out[name] = part.contiguous()
            else:
                out[hf] = t.contiguous()
    unknown = sorted(set(src) - used)
    if unknown:
        raise ConversionError(f"the checkpoint has tensors of another architecture: {unknown[:5]}")
    _check_shapes(out, cfg, vocab_size)
    return out


def hf_to_megatron_state_dict(hf_sd: dict[str, torch.Tensor], cfg: Config, padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF Llama state dict -> Megatron checkpoint tensors (global keys, layers stacked, vocab padded).

    Args:
        hf_sd: ``{hf_name: tensor}`` of a ``LlamaForCausalLM``-named model (``rotary_emb`` buffers ignored).
        cfg: the Megatron config (from ``config_from_hf``).
        padded_vocab: rows of the Megatron embedding/head (vocab padded for the target TP).
    """
    hf_sd = {k: v for k, v in hf_sd.items() if "rotary_emb" not in k}
    tied = not cfg.model.untie_embeddings_and_output_weights
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for hf_t, meg_t in HF_TO_MEGATRON.items():
        if tied and meg_t == "output_layer.weight":
            continue
        for layer, _ in _expand(meg_t, cfg.model.num_layers):
            hf, meg = _fmt(hf_t, layer), meg_t.format(layer=layer)
            names = hf if isinstance(hf, tuple) else (hf,)
            missing = [n for n in names if n not in hf_sd]
            if missing:
                raise ConversionError(f"the Hugging Face model has no tensor {missing[0]!r}: not Llama-shaped")
            used.update(names)
            parts = [hf_sd[n] for n in names]
            t = FUSED[meg_t][1](*parts, cfg) if isinstance(hf, tuple) else parts[0]
            if meg_t in VOCAB_PADDED:
                t = pad_vocab(t, padded_vocab)
            out[meg] = t.contiguous()
    unknown = sorted(set(hf_sd) - used - ({"lm_head.weight"} if tied else set()))
    if unknown:
        raise ConversionError(f"the Hugging Face model has tensors a Llama model does not have: {unknown[:5]}")
    return stack_layers(out, cfg.model.num_layers)


def _check_shapes(hf_sd: dict[str, torch.Tensor], cfg: Config, vocab_size: int) -> None:
    m = cfg.model
    nq, _, d = _heads(cfg)
    want = {
        "model.embed_tokens.weight": (vocab_size, m.hidden_size),
        "model.layers.0.self_attn.o_proj.weight": (m.hidden_size, nq * d),
        "model.layers.0.mlp.down_proj.weight": (m.hidden_size, m.ffn_hidden_size),
        "model.layers.0.input_layernorm.weight": (m.hidden_size,),
        "model.norm.weight": (m.hidden_size,),
    }
    for name, shape in want.items():
        if name in hf_sd and tuple(hf_sd[name].shape) != shape:
            raise ConversionError(f"{name} has shape {tuple(hf_sd[name].shape)}, the config says {shape}: "
                                  "the tensors are of another architecture than the config")


# ---- configs -----------------------------------------------------------------------------------

LLAMA_LIKE = ("llama", "mistral", "mdm_llama")


def hf_config_dict(cfg: Config, vocab_size: int, dtype: torch.dtype, mdm: bool,
                   special: dict[str, int | None]) -> dict:
    """The ``config.json`` of an exported model (``LlamaForCausalLM`` or our ``MDMForMaskedLM``)."""
    m = cfg.model
    d = {
        "architectures": ["MDMForMaskedLM"] if mdm else ["LlamaForCausalLM"],
        "model_type": "mdm_llama" if mdm else "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.data.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "initializer_range": m.init_method_std,
        "dtype": str(dtype).replace("torch.", ""),
        "use_cache": not mdm,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }
    if mdm:
        d["mask_token_id"] = special.get("mask")
        d["auto_map"] = {
            "AutoConfig": "configuration_mdm.MDMConfig",
            "AutoModel": "modeling_mdm.MDMModel",
            "AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedLM",
        }
    return d


def config_from_hf(hf: dict) -> Config:
    """A Megatron ``Config`` from an HF ``config.json`` dict; ConversionError when it is not Llama-shaped."""
    mt = hf.get("model_type")
    if mt not in LLAMA_LIKE:
        raise ConversionError(f"the Hugging Face model is {mt!r}, not Llama-shaped (supported: {list(LLAMA_LIKE)})")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("the Hugging Face model has attention/MLP biases; the Megatron model has none")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r} is not SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConversionError(f"RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported "
                              "by the Megatron model (plain RoPE only)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConversionError(f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if hf.get("sliding_window"):
        log.warning("the model uses a sliding attention window of %s; Megatron attends to the whole sequence",
                    hf["sliding_window"])
    cfg = Config()
    m = cfg.model
    m.num_layers = hf["num_hidden_layers"]
    m.hidden_size = hf["hidden_size"]
    m.num_attention_heads = heads
    kv = hf.get("num_key_value_heads") or heads
    m.num_query_groups = None if kv == heads else kv
    m.ffn_hidden_size = hf["intermediate_size"]
    m.vocab_size = hf["vocab_size"]
    m.rotary_base = int(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    m.norm_epsilon = float(hf.get("rms_norm_eps", 1e-5))
    m.init_method_std = float(hf.get("initializer_range", 0.02))
    m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
    cfg.data.seq_length = int(hf.get("max_position_embeddings", cfg.data.seq_length))
    cfg.objective.objective = "mdm" if mt == "mdm_llama" else "arm"
    return cfg
