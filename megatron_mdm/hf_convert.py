"""Compatibility shim: the parameter map moved to the package ``megatron_mdm.hf`` (``hf.base``, ``hf.llama``).

Kept so that existing imports (``from megatron_mdm.hf_convert import PARAM_MAP, ...``) keep working.
The functions here convert the Llama family, as they always did.
"""

from __future__ import annotations

import torch

from megatron_mdm.config import Config
from megatron_mdm.hf import base as _base
from megatron_mdm.hf.base import (  # noqa: F401 - re-exported
    _PER_LAYER,
    _STACKED,
    MODEL_PREFIXES,
    ConversionError,
    HfNames,
    pad_vocab,
    stack_layers,
    trim_vocab,
    unstack_layers,
)
from megatron_mdm.hf.llama import (  # noqa: F401 - re-exported
    FUSED,
    LLAMA,
    LLAMA_LIKE,
    PARAM_MAP,
    VOCAB_PADDED,
    config_from_hf,
    hf_config_dict,
    merge_gate_up,
    merge_qkv,
    split_gate_up,
    split_qkv,
)

HF_TO_MEGATRON = LLAMA.inverse


def megatron_to_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: Config, vocab_size: int) -> dict[str, torch.Tensor]:
    """Megatron checkpoint tensors -> HF Llama state dict (see ``megatron_mdm.hf.base``)."""
    return _base.megatron_to_hf_state_dict(tensors, cfg, vocab_size, LLAMA)


def hf_to_megatron_state_dict(hf_sd: dict[str, torch.Tensor], cfg: Config, padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF Llama state dict -> Megatron checkpoint tensors (see ``megatron_mdm.hf.base``)."""
    return _base.hf_to_megatron_state_dict(hf_sd, cfg, padded_vocab, LLAMA)
