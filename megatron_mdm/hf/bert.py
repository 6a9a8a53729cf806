"""BERT, RoBERTa and XLM-R masked LMs <-> Megatron ``EncoderMLM``: the parameter maps and config translation.

The three share one layout; RoBERTa and XLM-R differ from BERT only in names (``roberta.`` prefix,
``lm_head.*`` instead of ``cls.predictions.*``) and in numbering positions from ``pad_token_id + 1``.
Fused tensors: ``linear_qkv`` (weight and bias) <-> ``query, key, value`` per head (the Llama split with one
query group per head). The decoder weight is tied to the word embeddings and its bias is the head's
``bias`` (``decoder.bias`` is the same tensor in ``transformers``); both get the vocabulary padding.
Exports load with the stock ``AutoModelForMaskedLM`` (no remote code).
"""

from __future__ import annotations

import torch

from megatron_mdm.config import Config
from megatron_mdm.hf.base import ConversionError, Family, HfNames
from megatron_mdm.hf.llama import merge_qkv, split_qkv

_L = "decoder.layers.{layer}."


def _param_map(prefix: str, head: str, transform: str, norm: str) -> dict[str, HfNames]:
    """The map of one naming scheme: ``prefix`` of the encoder, ``head`` of the MLM head (bias, decoder),
    ``transform`` of its dense + norm, and that ``norm``'s name."""
    H = prefix + "encoder.layer.{layer}."
    E = prefix + "embeddings."
    out: dict[str, HfNames] = {
        "embedding.word_embeddings.weight": E + "word_embeddings.weight",
        "embedding.position_embeddings.weight": E + "position_embeddings.weight",
        "embedding.tokentype_embeddings.weight": E + "token_type_embeddings.weight",
    }
    for p in ("weight", "bias"):
        out.update({
            f"embedding.layernorm.{p}": E + f"LayerNorm.{p}",
            _L + f"self_attention.linear_qkv.{p}": tuple(H + f"attention.self.{n}.{p}" for n in ("query", "key", "value")),
            _L + f"self_attention.linear_proj.{p}": H + f"attention.output.dense.{p}",
            _L + f"post_self_attn_layernorm.{p}": H + f"attention.output.LayerNorm.{p}",
            _L + f"mlp.linear_fc1.{p}": H + f"intermediate.dense.{p}",
            _L + f"mlp.linear_fc2.{p}": H + f"output.dense.{p}",
            _L + f"post_mlp_layernorm.{p}": H + f"output.LayerNorm.{p}",
            f"lm_head.dense.{p}": transform + f"dense.{p}",
            f"lm_head.layer_norm.{p}": transform + f"{norm}.{p}",
        })
    out["output_layer.bias"] = head + "bias"
    out["output_layer.weight"] = head + "decoder.weight"
    return out


FUSED = {_L + f"self_attention.linear_qkv.{p}": (split_qkv, merge_qkv) for p in ("weight", "bias")}
VOCAB_PADDED = ("embedding.word_embeddings.weight", "output_layer.bias", "output_layer.weight")
_IGNORE = (r"position_ids$", r"token_type_ids$", r"decoder\.bias$", r"pooler\.", r"seq_relationship")


def present(template: str, cfg: Config) -> bool:
    """The decoder weight is absent when tied; token types only when the table exists."""
    if template == "output_layer.weight":
        return cfg.model.untie_embeddings_and_output_weights
    if template == "embedding.tokentype_embeddings.weight":
        return cfg.model.num_tokentypes > 0
    return True


def _hf_shapes(embed: str, layer0: str):
    def shapes(cfg: Config, vocab_size: int) -> dict[str, tuple]:
        m = cfg.model
        return {
            embed: (vocab_size, m.hidden_size),
            layer0 + "intermediate.dense.weight": (m.ffn_hidden_size, m.hidden_size),
            layer0 + "attention.output.dense.weight": (m.hidden_size, m.hidden_size),
        }
    return shapes


def config_from_hf(hf: dict) -> Config:
    """A Megatron ``Config`` (``architecture: bert``) from a BERT/RoBERTa/XLM-R ``config.json``."""
    mt = hf.get("model_type")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {hf.get('hidden_act')!r}: only the exact GELU ('gelu') is supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"position_embedding_type {hf['position_embedding_type']!r}: only 'absolute' "
                              "(learned absolute positions) is supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConversionError(f"the {mt} model is configured as a decoder; only the encoder (masked LM) converts")
    cfg = Config()
    m = cfg.model
    m.architecture = "bert"
    m.hf_model_type = mt
    m.num_layers = hf["num_hidden_layers"]
    m.hidden_size = hf["hidden_size"]
    m.num_attention_heads = hf["num_attention_heads"]
    if m.hidden_size % m.num_attention_heads:
        raise ConversionError(f"hidden_size {m.hidden_size} is not divisible by {m.num_attention_heads} heads")
    m.num_query_groups = None
    m.ffn_hidden_size = hf["intermediate_size"]
    m.vocab_size = hf["vocab_size"]
    m.norm_epsilon = float(hf.get("layer_norm_eps", 1e-12))
    m.init_method_std = float(hf.get("initializer_range", 0.02))
    m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", True)
    m.max_position_embeddings = int(hf.get("max_position_embeddings", 512))
    m.num_tokentypes = int(hf.get("type_vocab_size", 2))
    offset = 0
    if mt in ("roberta", "xlm-roberta"):
        m.position_padding_idx = int(hf.get("pad_token_id", 1))
        offset = m.position_padding_idx + 1
    cfg.data.seq_length = min(m.max_position_embeddings - offset, 512)
    cfg.objective.objective = "mdm"
    return cfg


def _hf_config(architecture: str, model_type: str):
    def hf_config(cfg: Config, vocab_size: int, dtype: torch.dtype, mdm: bool, special: dict) -> dict:
        """The ``config.json`` of an export, loadable by the stock ``AutoModelForMaskedLM``."""
        m = cfg.model
        pad = m.position_padding_idx if m.position_padding_idx is not None else special.get("pad")
        return {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": vocab_size,
            "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "intermediate_size": m.ffn_hidden_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": m.max_position_embeddings or cfg.data.seq_length,
            "type_vocab_size": max(m.num_tokentypes, 1),
            "layer_norm_eps": m.norm_epsilon,
            "initializer_range": m.init_method_std,
            "position_embedding_type": "absolute",
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
            "is_decoder": False,
            "use_cache": False,
            "dtype": str(dtype).replace("torch.", ""),
            "pad_token_id": pad,
            "bos_token_id": special.get("bos"),
            "eos_token_id": special.get("eos"),
            "mask_token_id": special.get("mask"),
        }
    return hf_config


def _family(name: str, model_type: str, architecture: str, prefix: str, head: str, transform: str,
            norm: str) -> Family:
    return Family(
        name=name,
        model_types=(model_type,),
        param_map=_param_map(prefix, head, transform, norm),
        fused=FUSED,
        vocab_padded=VOCAB_PADDED,
        present=present,
        config_from_hf=config_from_hf,
        hf_config=_hf_config(architecture, model_type),
        hf_shapes=_hf_shapes(prefix + "embeddings.word_embeddings.weight", prefix + "encoder.layer.0."),
        ignore_hf=_IGNORE,
    )


BERT = _family("BERT", "bert", "BertForMaskedLM", "bert.", "cls.predictions.", "cls.predictions.transform.",
               "LayerNorm")
ROBERTA = _family("RoBERTa", "roberta", "RobertaForMaskedLM", "roberta.", "lm_head.", "lm_head.", "layer_norm")
XLM_ROBERTA = _family("XLM-R", "xlm-roberta", "XLMRobertaForMaskedLM", "roberta.", "lm_head.", "lm_head.",
                      "layer_norm")
