"""The model-family registry: one record per ``--architecture``, and the only place that tells them apart.

A :class:`ModelFamily` holds everything that differs between families: the ``TransformerConfig`` options, the
layer spec (before the objective's attention mask is set), the module that is built, the parameter count, the
family's own config checks, the Hugging Face family an export maps to (``megatron_mdm.hf``) and what an export
ships. Code elsewhere asks ``family(cfg)`` and uses the record; it never compares architecture names.

The records live in ``llama.py`` and ``bert.py`` (torchtitan registers a ``TrainSpec`` per model in the same
way); they import torch, Megatron and the HF maps only inside their functions, so the registry is cheap to
import (config validation runs before any worker starts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # pragma: no cover
    from megatron_mdm.config import Config


@dataclass(frozen=True)
class ModelFamily:
    """One ``--architecture``.

    Attributes:
        name: the ``--architecture`` value.
        objectives: the objectives it trains (a bidirectional encoder adapts as an MDM only).
        supports_te: whether it builds on the Transformer Engine spec when TE is present (else the local spec).
        ships_modeling_code: whether an MDM export carries our modeling code (``trust_remote_code``), because
            ``transformers`` has no bidirectional class for it.
        transformer_kwargs: ``cfg -> dict``: the family's ``TransformerConfig`` fields (norm, MLP, biases).
        layer_spec: ``(cfg, use_te) -> ModuleSpec``: the transformer-layer spec, attention mask not yet set.
        construct: ``(cfg, transformer_config, layer_spec, common) -> module``: one model chunk; ``common``
            holds the ``GPTModel`` arguments every family shares (vocabulary, stages, tied head, ``vp_stage``).
        count_parameters: ``(cfg, vocab_size) -> {"total", "embedding", "non_embedding"}`` (no torch).
        validate: ``cfg -> None``: the family's own option checks; ``ConfigError`` naming the flag.
        hf_family: ``cfg -> megatron_mdm.hf.base.Family``: the Hugging Face map an export uses.
        describe: ``cfg -> str``: the architecture in words, for an export's model card.
    """

    name: str
    objectives: tuple[str, ...]
    supports_te: bool
    ships_modeling_code: bool
    transformer_kwargs: Callable[[Config], dict]
    layer_spec: Callable[[Config, bool], Any]
    construct: Callable[[Config, Any, Any, dict], Any]
    count_parameters: Callable[[Config, int], dict]
    validate: Callable[[Config], None]
    hf_family: Callable[[Config], Any]
    describe: Callable[[Config], str]


_FAMILIES: dict[str, ModelFamily] = {}


def register(record: ModelFamily) -> ModelFamily:
    """Add a family (at import of its module); a second record under one name is a programming error."""
    if record.name in _FAMILIES and _FAMILIES[record.name] is not record:
        raise ValueError(f"model family {record.name!r} is registered twice")
    _FAMILIES[record.name] = record
    return record


def _load() -> None:
    from megatron_mdm.models import bert, llama  # noqa: F401, PLC0415 - each module registers its record


def family(cfg_or_name: Union[Config, str]) -> ModelFamily:
    """The record of a config's ``model.architecture`` (or of an architecture name)."""
    _load()
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.model.architecture
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    """The registered ``--architecture`` values."""
    _load()
    return sorted(_FAMILIES)
