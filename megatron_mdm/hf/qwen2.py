"""Qwen2 / Qwen2.5 <-> Megatron GPTModel: the Llama map plus the q/k/v biases.

Qwen2 is the Llama stack with biases on the query, key and value projections only (``add_qkv_bias``);
the bias rows are fused per query group like the weight rows (``split_qkv``/``merge_qkv`` work on both).
An ARM exports as ``Qwen2ForCausalLM``; an MDM as our ``MDMForMaskedLM`` with ``qkv_bias``.
"""

from __future__ import annotations

from megatron_mdm.config import Config
from megatron_mdm.hf import llama
from megatron_mdm.hf.base import ConversionError, Family, HfNames

_L, _H = llama._L, llama._H
QKV_BIAS = _L + "self_attention.linear_qkv.bias"
PARAM_MAP: dict[str, HfNames] = {
    **llama.PARAM_MAP,
    QKV_BIAS: (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
}
FUSED = {**llama.FUSED, QKV_BIAS: (llama.split_qkv, llama.merge_qkv)}


def present(template: str, cfg: Config) -> bool:
    return llama.present(template, cfg) and (template != QKV_BIAS or cfg.model.add_qkv_bias)


def config_from_hf(hf: dict) -> Config:
    """A Megatron ``Config`` from a Qwen2 ``config.json`` (or our MDM export of one)."""
    if hf.get("model_type") not in ("qwen2", "mdm_llama"):
        raise ConversionError(f"the Hugging Face model is {hf.get('model_type')!r}, not Qwen2")
    return llama.decoder_config_from_hf(hf, qkv_bias=True)


QWEN2 = Family(
    name="Qwen2",
    model_types=("qwen2",),
    param_map=PARAM_MAP,
    fused=FUSED,
    vocab_padded=llama.VOCAB_PADDED,
    present=present,
    config_from_hf=config_from_hf,
    hf_config=llama.hf_config_dict,
    hf_shapes=llama.hf_shapes,
    ignore_hf=(r"rotary_emb",),
)
