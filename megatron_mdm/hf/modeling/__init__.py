"""Hugging Face modeling code that ``mdm-convert to-hf`` copies into exported MDM directories.

The files here import only ``torch`` and ``transformers`` (never ``megatron_mdm``, except the one guarded
fallback that finds the decoding modules inside this package), so an exported directory loads on its own
with ``trust_remote_code=True``. An export ships them and the package's decoding modules
(:func:`shipped_files`): the exported ``MDMForMaskedLM.generate`` is ``megatron_mdm.decoding``, byte for byte.

The config of an export names a ``model_type`` that transformers knows when it can: a bidirectional Llama
with a plain output head is EuroBERT's architecture (``eurobert``, in transformers since 2026-03), so the
stock ``AutoTokenizer``/``AutoConfig``/``AutoModelForMaskedLM`` load it with no custom code and the same
logits, and ``trust_remote_code=True`` adds ``generate``. Variants that no stock class computes (q/k/v biases
of a Qwen2-adapted model, shifted prediction) keep the type ``mdm_llama`` and need the shipped code.

This package's own tools do not run that shipped copy: :func:`load_model` builds the classes below in this
process, and :func:`register_auto_classes` registers them with transformers' Auto classes for ``mdm_llama``.
Importing this package registers nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_TYPE = "mdm_llama"
STOCK_MODEL_TYPE = "eurobert"  # transformers' bidirectional Llama encoder with a linear MLM head
MODEL_TYPES = (MODEL_TYPE, STOCK_MODEL_TYPE)
ARCHITECTURES = ("MDMForMaskedLM", "MDMModel")
AUTO_MAP = {
    "AutoModel": "modeling_mdm.MDMModel",
    "AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedLM",
}
CONFIG_AUTO_MAP = {"AutoConfig": "configuration_mdm.MDMConfig"}  # only for mdm_llama (no stock config)
DECODING_MODULES = ("hf_generation.py", "loop.py", "settings.py", "logits.py", "cache.py", "unmasking.py")
"""``megatron_mdm/decoding`` modules an export ships beside ``modeling_mdm.py`` (``generate``)."""


def shipped_files() -> dict[str, Path]:
    """File name in an export -> the package file it is a copy of (modeling code, then decoding modules)."""
    here = Path(__file__).resolve().parent
    decoding = here.parent.parent / "decoding"
    files = {name: here / name for name in ("configuration_mdm.py", "modeling_mdm.py")}
    files.update({name: decoding / name for name in DECODING_MODULES})
    return files


def is_own_export(config: dict) -> bool:
    """True when a ``config.json`` dict is one of our exported MDMs (model type, architectures, our classes)."""
    archs = config.get("architectures") or []
    auto = config.get("auto_map") or {}
    return (config.get("model_type") in MODEL_TYPES and bool(archs) and all(a in ARCHITECTURES for a in archs)
            and auto.get("AutoModelForMaskedLM") == AUTO_MAP["AutoModelForMaskedLM"])


def config_from_dict(config: dict):
    """Our ``MDMConfig`` from an export's ``config.json`` dict (of either model type)."""
    from .configuration_mdm import MDMConfig

    drop = ("model_type", "auto_map", "architectures", "transformers_version")
    cfg = MDMConfig(**{k: v for k, v in config.items() if k not in drop})
    cfg.architectures = list(config.get("architectures") or ["MDMForMaskedLM"])
    return cfg


def load_model(path: str | os.PathLike, **kwargs):
    """An exported MDM directory as this package's ``MDMForMaskedLM`` (the shipped copy is not run).

    Args:
        path: the export (``config.json`` and safetensors weights).
        **kwargs: ``from_pretrained`` arguments (``dtype``, ``local_files_only``...).
    """
    from .modeling_mdm import MDMForMaskedLM

    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return MDMForMaskedLM.from_pretrained(str(path), config=config_from_dict(config), **kwargs)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` build ``mdm_llama`` from these classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from .configuration_mdm import MDMConfig
    from .modeling_mdm import MDMForMaskedLM, MDMModel

    AutoConfig.register(MODEL_TYPE, MDMConfig, exist_ok=True)
    AutoModel.register(MDMConfig, MDMModel, exist_ok=True)
    AutoModelForMaskedLM.register(MDMConfig, MDMForMaskedLM, exist_ok=True)
