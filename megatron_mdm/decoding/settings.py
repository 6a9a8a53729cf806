"""How to decode: one settings dataclass for every caller of the decoding loop.

``mdm-generate`` builds its flags from it (:func:`add_arguments`, :meth:`DecodingConfig.from_args`), the lm-eval
adapter reads its ``--model_args`` into it (:meth:`DecodingConfig.from_strings`), and the benchmarks and the
library call ``decoding.loop.decode(model, prompts, settings, ...)`` with it. Each default is written once,
here; :meth:`DecodingConfig.validate` names the inconsistent setting.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

MODES = ("none", "prefix", "dual")
"""KV cache modes of block decoding (``decoding.cache``)."""
REMASKING = ("low_confidence", "random", "margin", "entropy")
"""Scores that choose which masked positions to fill (``decoding.unmasking``)."""
PROBABILITY_SCORES = ("low_confidence", "margin")
"""The scores that are probabilities (what --threshold and --factor compare)."""


@dataclass(frozen=True)
class DecodingConfig:
    """The sampler's settings (LLaDA's ``generate`` and Fast-dLLM's options, as ``decoding.loop`` runs them)."""

    gen_length: int = field(default=64, metadata={"help": "generated positions per prompt"})
    steps: int = field(default=64, metadata={"help": "sampling iterations of the schedule rule, a multiple of the "
                                                     "number of blocks (unused by --threshold and --factor)"})
    block_length: Optional[int] = field(default=None, metadata={
        "help": "semi-autoregressive block size dividing --gen-length (default: one block)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy and deterministic; > 0 samples "
                                                               "softmax(logits / T)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "sample among the k most likely ids only"})
    top_p: Optional[float] = field(default=None, metadata={"help": "nucleus sampling mass"})
    remasking: str = field(default="low_confidence", metadata={
        "help": "which masked positions to fill at each step", "choices": REMASKING})
    cfg_scale: float = field(default=0.0, metadata={"help": "unsupervised classifier-free guidance scale w "
                                                             "(0 = off)"})
    cache: str = field(default="none", metadata={
        "help": "KV cache of block decoding: prefix (prompt and finished blocks) or dual (also the masked suffix); "
                "recorded at each block start (needs --block-length for a gain)", "choices": MODES})
    threshold: Optional[float] = field(default=None, metadata={
        "help": "parallel unmasking: fill every position whose confidence exceeds this (at least one per step)"})
    factor: Optional[float] = field(default=None, metadata={
        "help": "parallel unmasking by Fast-dLLM's factor rule (instead of --threshold)"})
    refresh_interval: Optional[int] = field(default=None, metadata={
        "help": "with --cache, also re-record the cache every this many forwards of a block"})

    @property
    def block(self) -> int:
        """The block size (the whole generation when ``block_length`` is None)."""
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block

    def replace(self, **changes: Any) -> DecodingConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> DecodingConfig:
        """Raise ValueError naming the setting when the settings are inconsistent; return self."""
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking: unknown strategy {self.remasking!r}; expected one of {REMASKING}")
        if self.gen_length <= 0 or self.steps <= 0:
            raise ValueError(f"gen_length ({self.gen_length}) and steps ({self.steps}) must be positive")
        if self.block <= 0 or self.gen_length % self.block:
            raise ValueError(f"block_length ({self.block}) must divide gen_length ({self.gen_length})")
        if self.steps % self.num_blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the number of blocks ({self.num_blocks})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cache not in MODES:
            raise ValueError(f"cache: expected one of {MODES}, got {self.cache!r}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are two unmasking rules: give one of them")
        if (self.threshold is not None or self.factor is not None) and self.remasking not in PROBABILITY_SCORES:
            raise ValueError(f"threshold/factor need a confidence in [0, 1]: remasking must be one of "
                             f"{PROBABILITY_SCORES}, not {self.remasking!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.refresh_interval is not None and self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {self.refresh_interval}")
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DecodingConfig:
        """The settings of a command line built with :func:`add_arguments`."""
        return cls(**{n: getattr(args, n) for n in cls.names()})

    @classmethod
    def from_strings(cls, values: dict[str, Any], base: DecodingConfig | None = None) -> DecodingConfig:
        """``base`` (default: the defaults) with ``values`` given as strings or values (lm-eval ``--model_args``);
        ``None``, ``''`` and ``'None'`` unset an optional setting."""
        changes = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            kind = _kind(f)
            changes[f.name] = None if v in (None, "", "None") and _optional(f) else kind(v)
        return (base or cls()).replace(**changes)


def _optional(f: dataclasses.Field) -> bool:
    return str(f.type).startswith("Optional")


def _kind(f: dataclasses.Field) -> type:
    name = str(f.type).removeprefix("Optional[").removesuffix("]")
    return {"int": int, "float": float, "str": str}[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--gen-length``, ``--cache``, ...), with the dataclass's default and help."""
    for f in dataclasses.fields(DecodingConfig):
        kw: dict[str, Any] = {"type": _kind(f), "default": f.default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
