"""The one conversion mechanism: a family's parameter map applied in both directions, safetensors, shapes.

A :class:`Family` (one per Hugging Face model family, in ``llama.py``, ``qwen2.py``, ``bert.py``) holds only
its data: ``param_map`` (Megatron checkpoint key, with a ``{layer}`` placeholder, -> HF name or tuple of HF
names), the split/merge pair of each fused tensor, and how its ``config.json`` translates to our ``Config``.
The HF -> Megatron direction is the map's derived inverse, never written twice.

Megatron checkpoint keys are TE-style and stacked over layers even for the local spec (``decoder.layers.X``
[L, ...]); ``unstack_layers``/``stack_layers`` convert between that and ``decoder.layers.{i}.X``. Vocabulary
padding (to a multiple of lcm(``make_vocab_size_divisible_by``, TP)) is trimmed on export and added (zero rows)
on import for the tensors the family lists in ``vocab_padded``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_mdm.config import Config
from megatron_mdm.errors import UserError

HfNames = str | tuple[str, ...]
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "lm_head.")


class ConversionError(UserError, ValueError):
    """A checkpoint or HF model cannot be converted; the message says what and why."""


@dataclass(frozen=True)
class Family:
    """One Hugging Face family: its parameter map, fused-tensor functions and config translation.

    Attributes:
        name: the family's name in messages (``Llama``, ``Qwen2``, ``BERT``, ...).
        model_types: the HF ``model_type`` values it converts.
        param_map: Megatron key template -> HF name (or a tuple of HF names for a fused tensor).
        fused: Megatron key template -> (split(t, cfg) -> HF parts, merge(*parts, cfg) -> t).
        vocab_padded: Megatron key templates whose first dimension is the (padded) vocabulary.
        present: ``present(template, cfg)``: whether the config has this tensor (tied head, biases).
        ignore_hf: regexes of HF names that are buffers or tied copies, dropped on import.
        config_from_hf: ``config.json`` dict -> our ``Config`` (architecture fields).
        hf_config: ``(cfg, vocab_size, dtype, mdm, special) -> config.json`` dict of an export.
        hf_shapes: ``(cfg, vocab_size) -> {hf_name: shape}`` checked on export (a config/tensor mismatch).
    """

    name: str
    model_types: tuple[str, ...]
    param_map: Mapping[str, HfNames]
    fused: Mapping[str, tuple[Callable, Callable]]
    vocab_padded: tuple[str, ...]
    present: Callable[[str, Config], bool]
    config_from_hf: Callable[[dict], Config]
    hf_config: Callable[..., dict]
    hf_shapes: Callable[[Config, int], dict] = lambda cfg, vocab: {}
    ignore_hf: tuple[str, ...] = field(default=())

    @property
    def inverse(self) -> dict[HfNames, str]:
        """HF name(s) -> Megatron key template: the map's derived inverse."""
        return {hf: meg for meg, hf in self.param_map.items()}


# ---- layer stacking and vocabulary padding -----------------------------------------------------

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


def trim_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[padded_vocab, ...] -> [vocab_size, ...] (drop Megatron's padding rows)."""
    if w.shape[0] < vocab_size:
        raise ConversionError(f"embedding has {w.shape[0]} rows, fewer than the vocabulary size {vocab_size}")
    return w[:vocab_size]


def pad_vocab(w: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[vocab, ...] -> [padded_vocab, ...] with zero rows (never sampled: callers trim logits to the vocab)."""
    if w.shape[0] > padded_vocab:
        raise ConversionError(f"embedding has {w.shape[0]} rows, more than the padded vocabulary {padded_vocab}")
    if w.shape[0] == padded_vocab:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])


# ---- the map, applied in both directions --------------------------------------------------------

def _expand(template: str, num_layers: int) -> list[int | None]:
    return list(range(num_layers)) if "{layer}" in template else [None]


def _fmt(names: HfNames, layer: int | None) -> HfNames:
    if isinstance(names, tuple):
        return tuple(n.format(layer=layer) for n in names)
    return names.format(layer=layer)


def megatron_to_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: Config, vocab_size: int,
                              family: Family) -> dict[str, torch.Tensor]:
    """Megatron checkpoint tensors (global keys, stacked or per layer, TP1 layout) -> HF state dict.

    Args:
        tensors: model tensors as stored in the checkpoint (``read_checkpoint_tensors``).
        cfg: the checkpoint's config (shapes, query groups, tied head, biases).
        vocab_size: the real vocabulary size; padding rows beyond it are dropped.
        family: the HF family to write.
    Returns:
        ``{hf_name: tensor}`` with the family's HF names (no tied head copy).
    Raises:
        ConversionError: a tensor is missing, unknown (another architecture) or of the wrong shape.
    """
    src = unstack_layers(tensors)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for meg_t, hf_t in family.param_map.items():
        if not family.present(meg_t, cfg):
            continue
        for layer in _expand(meg_t, cfg.model.num_layers):
            meg, hf = meg_t.format(layer=layer), _fmt(hf_t, layer)
            if meg not in src:
                raise ConversionError(f"the checkpoint has no tensor {meg!r}: not a {family.name}-style checkpoint "
                                      f"of this config ({cfg.model.num_layers} layers)")
            t = src[meg]
            used.add(meg)
            if meg_t in family.vocab_padded:
                t = trim_vocab(t, vocab_size)
            if isinstance(hf, tuple):
                for name, part in zip(hf, family.fused[meg_t][0](t, cfg)):
                    out[name] = part.contiguous()
            else:
                out[hf] = t.contiguous()
    unknown = sorted(set(src) - used)
    if unknown:
        raise ConversionError(f"the checkpoint has tensors of another architecture: {unknown[:5]}")
    check_shapes(out, family.hf_shapes(cfg, vocab_size))
    return out


def hf_to_megatron_state_dict(hf_sd: dict[str, torch.Tensor], cfg: Config, padded_vocab: int,
                              family: Family) -> dict[str, torch.Tensor]:
    """HF state dict -> Megatron checkpoint tensors (global keys, layers stacked, vocab padded).

    Args:
        hf_sd: ``{hf_name: tensor}`` of a model of ``family`` (buffers and tied copies are ignored).
        cfg: the Megatron config (from ``family.config_from_hf``).
        padded_vocab: rows of the Megatron embedding/head (vocab padded for the target TP).
        family: the HF family of ``hf_sd``.
    """
    ignore = [re.compile(p) for p in family.ignore_hf]
    hf_sd = {k: v for k, v in hf_sd.items() if not any(p.search(k) for p in ignore)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    absent: set[str] = set()  # HF names of tensors this config does not have (a tied head's copy)
    for hf_t, meg_t in family.inverse.items():
        if not family.present(meg_t, cfg):
            for layer in _expand(meg_t, cfg.model.num_layers):
                hf = _fmt(hf_t, layer)
                absent.update(hf if isinstance(hf, tuple) else (hf,))
            continue
        for layer in _expand(meg_t, cfg.model.num_layers):
            hf, meg = _fmt(hf_t, layer), meg_t.format(layer=layer)
            names = hf if isinstance(hf, tuple) else (hf,)
            missing = [n for n in names if n not in hf_sd]
            if missing:
                raise ConversionError(f"the Hugging Face model has no tensor {missing[0]!r}: not {family.name}-shaped")
            used.update(names)
            parts = [hf_sd[n] for n in names]
            _check_import_tensors(names, parts, _fmt(hf_t, 0) if layer is not None else None, hf_sd)
            try:
                t = family.fused[meg_t][1](*parts, cfg) if isinstance(hf, tuple) else parts[0]
            except RuntimeError as e:  # shapes a fused tensor cannot be built from
                shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, parts))
                raise ConversionError(f"{shapes}: do not fit the config ({e})") from None
            if meg_t in family.vocab_padded:
                t = pad_vocab(t, padded_vocab)
            out[meg] = t.contiguous()
    unknown = sorted(set(hf_sd) - used - absent)
    if unknown:
        raise ConversionError(f"the Hugging Face model has tensors a {family.name} model does not have: {unknown[:5]}")
    return stack_layers(out, cfg.model.num_layers)


def _check_import_tensors(names: tuple[str, ...], parts: list[torch.Tensor], layer0: HfNames | None,
                          hf_sd: dict[str, torch.Tensor]) -> None:
    """Every imported weight is floating point (an integer tensor would be cast silently: 68 for 0.068) and has
    the shape of its layer-0 counterpart (which ``check_shapes`` holds to the config)."""
    firsts = layer0 if isinstance(layer0, tuple) else (layer0,) * len(names)
    for name, t, first in zip(names, parts, firsts):
        if not t.is_floating_point():
            raise ConversionError(f"{name} holds {str(t.dtype).replace('torch.', '')} values, not floating point "
                                  "weights: the weight files are damaged or not of this model")
        if first is not None and first in hf_sd and tuple(hf_sd[first].shape) != tuple(t.shape):
            raise ConversionError(f"{name} has shape {tuple(t.shape)}, {first} has {tuple(hf_sd[first].shape)}: "
                                  "every layer has the same shapes")


def check_shapes(hf_sd: dict[str, torch.Tensor], want: dict[str, tuple]) -> None:
    """Each named tensor has the shape the config implies (else the tensors belong to another config)."""
    for name, shape in want.items():
        if name in hf_sd and tuple(hf_sd[name].shape) != tuple(shape):
            raise ConversionError(f"{name} has shape {tuple(hf_sd[name].shape)}, the config says {tuple(shape)}: "
                                  "the tensors are of another architecture than the config")


# ---- safetensors ---------------------------------------------------------------------------------

def byte_bar(total: int, desc: str, progress: bool):
    """A tqdm bar on stderr counting bytes (reading or writing weight files)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False)


def read_hf_state_dict(hf_dir: Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an HF model directory (safetensors, sharded or not, or pytorch_model*.bin)."""
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    sd: dict[str, torch.Tensor] = {}
    with byte_bar(sum(f.stat().st_size for f in files), "reading weights", progress) as bar:
        for f in files:
            sd.update(load_file(str(f)) if f.suffix == ".safetensors"
                      else torch.load(f, map_location="cpu", weights_only=True))
            bar.update(f.stat().st_size)
    if "embed_tokens.weight" in sd:  # saved from a bare LlamaModel
        sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}
    return sd


def parse_size(size: int | str) -> int:
    """``2GB``, ``500MB``, ``1GiB`` or a number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if m is None:
        raise ConversionError(f"shard size {size!r}: expected e.g. 2GB, 500MB or a number of bytes")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit.rstrip("I") or " "))


def write_safetensors(sd: dict[str, torch.Tensor], out: Path, shard_size: int | str,
                      progress: bool = False) -> list[str]:
    """Save ``sd`` as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``
    (``progress``: a bar of bytes written, on stderr)."""
    from safetensors.torch import save_file

    limit = parse_size(shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and used + n > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.contiguous().clone()  # no shared storage (safetensors refuses it)
        used += n
    total = sum(t.numel() * t.element_size() for t in sd.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with byte_bar(total, "writing safetensors", progress) as bar:
        for fname, shard in zip(names, shards):
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
