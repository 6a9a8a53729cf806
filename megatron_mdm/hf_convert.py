"""Hugging Face Llama <-> Megatron GPTModel: the one parameter map, its tensor transforms, export and import.

``PARAM_MAP`` is the single name map (Megatron checkpoint key with a ``{layer}`` placeholder -> HF Llama
name); the HF -> Megatron direction is derived from it, never written twice. Fused Megatron tensors map to
a tuple of HF names and have a named split/merge pair beside the map:

* ``linear_qkv``: rows per query group ``[q heads of the group..., k, v]`` (GQA) <-> ``q_proj, k_proj, v_proj``;
* ``linear_fc1``: ``cat[gate, up]`` <-> ``gate_proj, up_proj``;
* embedding and output head: Megatron's vocabulary padding (``make_vocab_size_divisible_by`` x TP) is
  trimmed on export and added (zero rows) on import.

Megatron checkpoint keys are TE-style and stacked over layers even for the local spec (the norms live in
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``); ``unstack_layers``/``stack_layers``
convert between ``decoder.layers.X [L, ...]`` and ``decoder.layers.{i}.X``. The stored tensors are
layout-independent, so a checkpoint of any TP/PP layout is read with ``torch.distributed.checkpoint`` in
one process, with no process group (``read_checkpoint_tensors``). Both RoPE implementations are
rotate-half, so no permutation is needed.

``export_to_hf`` writes a Hugging Face directory (safetensors shards, config, tokenizer, generation config,
model card; an MDM also gets ``megatron_mdm/hf_modeling`` copied in for ``trust_remote_code``);
``import_from_hf`` writes a Megatron checkpoint through ``checkpointing.save_checkpoint`` from a TP1/PP1
model in a one-process gloo world.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_mdm.config import Config, ConfigError

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



# ---- reading ------------------------------------------------------------------------------------

def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All model tensors of one torch_dist checkpoint directory, full (unsharded), on CPU.

    Reads with ``torch.distributed.checkpoint`` in this process alone (no process group); the stored
    tensors carry global shapes, so the TP/PP layout of the run that saved them does not matter.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    try:
        md = reader.read_metadata()
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: not a torch_dist checkpoint ({e.filename} is missing)") from None
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}
    if not sd:
        raise ConversionError(f"{path}: the checkpoint holds no model tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF model directory (safetensors, sharded or not, or pytorch_model*.bin)."""
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors")) or sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)) if f.suffix == ".safetensors"
                  else torch.load(f, map_location="cpu", weights_only=True))
    if "embed_tokens.weight" in sd:  # saved from a bare LlamaModel
        sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}
    return sd


def _load_tokenizer(path: Path | None):
    if path is None or not path.exists():
        return None
    from megatron_mdm.tokenization import MDMTokenizer

    return MDMTokenizer.load(path)


def _special_ids(tok) -> dict[str, int | None]:
    if tok is None:
        return {}
    return {"mask": tok.mask_id, "eos": tok.eos_id, "pad": tok.pad_id, "bos": tok.bos_id}


# ---- export -------------------------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if m is None:
        raise ConversionError(f"shard size {size!r}: expected e.g. 2GB, 500MB or a number of bytes")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit.rstrip("I") or " "))


def write_safetensors(sd: dict[str, torch.Tensor], out: Path, shard_size: int | str) -> list[str]:
    """Save ``sd`` as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    limit = _parse_size(shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and used + n > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.contiguous().clone()  # no shared storage (safetensors refuses it)
        used += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _model_card(cfg: Config, mdm: bool, special: dict, vocab_size: int, source: str) -> str:
    m = cfg.model
    kind = ("a masked diffusion language model (MDM, bidirectional attention)" if mdm
            else "an autoregressive baseline (causal attention)")
    load = ("AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)" if mdm
            else "AutoModelForCausalLM.from_pretrained(path)")
    sample = (
        "Sample by reverse diffusion from a prompt followed by mask tokens:\n\n"
        "```bash\nmdm-generate --hf PATH --prompt \"Once upon a time\" --gen-length 64 --steps 64\n```\n\n"
        "or in Python with `megatron_mdm.sampling.generate(logits_fn, ...)`, where `logits_fn(input_ids)` returns\n"
        "`model(input_ids).logits`. Plain left-to-right `model.generate()` does not apply to this model."
        if mdm else "Sample with `model.generate(...)` as for any causal language model.")
    return f"""---
library_name: transformers
tags: [megatron-mdm, {'masked-diffusion' if mdm else 'causal-lm'}, llama]
---
# {Path(source).name or 'megatron-mdm model'}

Converted from the Megatron checkpoint `{source}` by `mdm-convert to-hf`.

- **Objective**: `{cfg.objective.objective}`: {kind}
- **Mask token id**: `{special.get('mask')}`; end-of-sequence id `{special.get('eos')}`
- **Architecture**: Llama ({m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads,
  {m.num_query_groups or m.num_attention_heads} key/value heads, SwiGLU {m.ffn_hidden_size}, RMSNorm, RoPE
  base {m.rotary_base}), vocabulary {vocab_size}, trained with sequence length {cfg.data.seq_length}

## Load

```python
from transformers import AutoTokenizer, {'AutoModelForMaskedLM' if mdm else 'AutoModelForCausalLM'}
tokenizer = AutoTokenizer.from_pretrained(path)
model = {load}
logits = model(input_ids).logits  # [batch, seq, vocab]
```

## Sample

{sample}
"""


def export_to_hf(load_dir: str | os.PathLike, output_dir: str | os.PathLike, iteration: int | None = None,
                 shard_size: int | str = "2GB") -> Path:
    """Convert one Megatron checkpoint (any TP/PP layout) into a Hugging Face model directory.

    Args:
        load_dir: run directory (or an ``iter_*`` directory).
        output_dir: directory to write (created; existing files are overwritten).
        iteration: checkpoint iteration (default: the latest complete one).
        shard_size: largest safetensors shard (``"2GB"``, ``"500MB"`` or bytes).
    Returns:
        ``output_dir``.
    """
    from megatron_mdm.checkpointing import (
        CheckpointError,
        load_meta,
        resolve_checkpoint,
    )

    try:
        path = resolve_checkpoint(load_dir, iteration)
        meta = load_meta(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if "config" not in meta:
        raise ConversionError(f"{path}: the checkpoint's meta has no config")
    try:
        cfg = Config.from_dict(meta["config"], source=f"{path} meta")
    except ConfigError as e:
        raise ConversionError(f"{path}: not a megatron-mdm checkpoint of this version ({e})") from None
    tensors = read_checkpoint_tensors(path)
    tok = _load_tokenizer(path / "tokenizer")
    rows = tensors["embedding.word_embeddings.weight"].shape[0] if "embedding.word_embeddings.weight" in tensors else 0
    vocab_size = cfg.model.vocab_size or (tok.vocab_size if tok is not None else rows)
    if tok is None:
        log.warning("%s has no tokenizer/: exporting without tokenizer files", path)
    hf_sd = megatron_to_hf_state_dict(tensors, cfg, vocab_size)
    mdm = cfg.objective.objective == "mdm"
    special = _special_ids(tok)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = hf_sd["model.embed_tokens.weight"].dtype
    config = hf_config_dict(cfg, vocab_size, dtype, mdm, special)
    config["transformers_version"] = _transformers_version()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(hf_sd, out, shard_size)
    gen = {k: v for k, v in (("bos_token_id", special.get("bos")), ("eos_token_id", special.get("eos")),
                             ("pad_token_id", special.get("pad"))) if v is not None}
    if mdm:
        gen["mask_token_id"] = special.get("mask")
    gen["transformers_version"] = config["transformers_version"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tok is not None:
        tok.save(out)
    if mdm:
        src = Path(__file__).parent / "hf_modeling"
        for name in ("configuration_mdm.py", "modeling_mdm.py"):
            shutil.copy2(src / name, out / name)
    (out / "README.md").write_text(_model_card(cfg, mdm, special, vocab_size, str(path)))
    log.info("exported %s (%s, vocab %d) to %s", path, cfg.objective.objective, vocab_size, out)
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ---- import -------------------------------------------------------------------------------------

def _add_token_rows(hf_sd: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Grow the embedding (and untied head) to ``vocab_size`` rows, new rows = the mean row."""
    out = dict(hf_sd)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = out.get(name)
        if w is not None and w.shape[0] < vocab_size:
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab_size - w.shape[0], -1)
            out[name] = torch.cat([w, extra])
    return out


def import_from_hf(hf_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None, tp: int = 1, pp: int = 1,
                   objective: str = "mdm") -> Path:
    """Convert a Llama-architecture HF model into a Megatron checkpoint (iteration 0, model only).

    The tokenizer (``tokenizer_dir``, default ``hf_dir``) gets the mask token (and pad/eos) when it lacks
    them; new ids get embedding/head rows initialised to the mean row. The vocabulary is padded for
    ``tp``; the checkpoint itself is layout-independent and loads with ``--load OUT --finetune``.

    Args:
        hf_dir: HF model directory (config.json + weights).
        output_dir: run directory to write (``iter_0000000/`` and the tracker).
        tokenizer_dir: tokenizer directory when it is not in ``hf_dir``.
        tp, pp: the tensor/pipeline-parallel sizes the checkpoint is meant for (recorded in its config).
        objective: ``mdm`` (diffusive adaptation, the default) or ``arm``.
    Returns:
        The checkpoint's ``iter_*`` directory.
    """
    from megatron_mdm.model import padded_vocab_size

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"--hf: {hf_dir} has no config.json")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = config_from_hf(hf_cfg)
    cfg.objective.objective = objective
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    hf_sd = read_hf_state_dict(hf_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else hf_dir
    try:
        tok = _load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer: cannot load a tokenizer from {tok_dir} ({e})") from None
    if tok is None:
        raise ConversionError(f"no tokenizer in {tok_dir}; pass --tokenizer DIR")
    rows = hf_sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in hf_sd else 0
    cfg.model.vocab_size = max(tok.vocab_size, rows, hf_cfg.get("vocab_size", 0))
    hf_sd = _add_token_rows(hf_sd, cfg.model.vocab_size)
    cfg.optim.bf16 = hf_sd["model.embed_tokens.weight"].dtype == torch.bfloat16 if rows else False
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"the converted config is invalid: {e}") from None
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    tensors = hf_to_megatron_state_dict(hf_sd, cfg, padded)
    return _save_megatron(tensors, cfg, padded, Path(output_dir), tok)


def _save_megatron(tensors: dict[str, torch.Tensor], cfg: Config, padded: int, out: Path, tok) -> Path:
    """Write ``tensors`` with ``checkpointing.save_checkpoint`` from a TP1/PP1 model (one-process world)."""
    from megatron_mdm import checkpointing, runtime
    from megatron_mdm.model import build_model

    local = copy.deepcopy(cfg)
    local.parallel.tensor_model_parallel_size = 1
    local.parallel.pipeline_model_parallel_size = 1
    local.parallel.num_layers_per_virtual_pipeline_stage = None
    created = ensure_single_process_world(local)
    try:
        runtime.set_seed(cfg.logging.seed)
        model = build_model(local, padded, causal=cfg.objective.objective == "arm", use_te=False)[0]
        load_into_model(model, tensors)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            checkpointing.save_checkpoint(out, 0, [model], None, None,
                                          meta={"config": cfg.to_dict(), "consumed_samples": 0},
                                          tokenizer_dir=tmp, config_yaml=cfg.to_yaml())
    finally:
        if created:
            runtime.shutdown()
    return checkpointing.iteration_dir(out, 0)


def load_into_model(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full checkpoint tensors (global keys, layers stacked) into a TP1/PP1 ``GPTModel``."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    used: set[str] = set()
    with torch.no_grad():
        for name, sh in model.sharded_state_dict().items():
            if isinstance(sh, ShardedObject) or name.endswith("_extra_state"):
                continue
            if sh.key not in tensors:
                raise ConversionError(f"no tensor for the model's {sh.key!r}")
            src = tensors[sh.key]
            layer = _PER_LAYER.match(name)
            if layer is not None and sh.key.startswith("decoder.layers.") and not _PER_LAYER.match(sh.key):
                src = src[int(layer.group(1))]
            if tuple(src.shape) != tuple(sh.data.shape):
                raise ConversionError(f"{sh.key}: shape {tuple(src.shape)} does not fit the model's {tuple(sh.data.shape)}")
            sh.data.copy_(src)
            used.add(sh.key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ConversionError(f"tensors without a place in the model: {unused[:5]}")


def ensure_single_process_world(cfg: Config, force_cpu: bool = True) -> bool:
    """Start a one-process world and ``cfg``'s (TP1/PP1) parallel state when none exists; True if started here.

    ``force_cpu`` keeps conversion on CPU (gloo) even where a GPU is present.
    """
    from megatron_mdm import runtime

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise ConversionError("conversion runs in one process; it was called inside a larger world")
        runtime.init_parallel_state(cfg.parallel, cfg.model.num_layers)
        return False
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers, force_cpu=force_cpu)
    return True
