"""Hugging Face modeling code that ``mdm-convert to-hf`` copies into exported MDM directories.

The files here import only ``torch`` and ``transformers`` (never ``megatron_mdm``), so an exported
directory loads on its own with ``trust_remote_code=True``.

This package's own tools do not run that shipped copy: :func:`register_auto_classes` registers the
classes below with transformers' Auto classes in this process, so an exported MDM (recognised by
:func:`is_own_export` from its ``config.json``) loads with ``trust_remote_code=False``. Importing this
package registers nothing.
"""

from __future__ import annotations

MODEL_TYPE = "mdm_llama"
ARCHITECTURES = ("MDMForMaskedLM", "MDMModel")


def is_own_export(config: dict) -> bool:
    """True when a ``config.json`` dict is one of our exported MDMs (model_type and architectures)."""
    archs = config.get("architectures") or []
    return config.get("model_type") == MODEL_TYPE and all(a in ARCHITECTURES for a in archs)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` build ``mdm_llama`` from these classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from .configuration_mdm import MDMConfig
    from .modeling_mdm import MDMForMaskedLM, MDMModel

    AutoConfig.register(MODEL_TYPE, MDMConfig, exist_ok=True)
    AutoModel.register(MDMConfig, MDMModel, exist_ok=True)
    AutoModelForMaskedLM.register(MDMConfig, MDMForMaskedLM, exist_ok=True)
