"""Hugging Face directories <-> Megatron distributed checkpoints: reading, export and import.

Built on the one parameter map and its tensor transforms in ``megatron_mdm.hf_convert``.

``export_to_hf`` writes a Hugging Face directory (safetensors shards, config, tokenizer, generation
config, model card; an MDM also gets ``megatron_mdm/hf_modeling`` copied in for ``trust_remote_code``)
from a checkpoint of any TP/PP layout, read in one process without a process group.
``import_from_hf`` writes a Megatron checkpoint through ``checkpointing.save_checkpoint`` from a
TP1/PP1 model in a one-process gloo world.
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
from pathlib import Path

import torch

from megatron_mdm.config import Config, ConfigError
from megatron_mdm.hf_convert import (
    _PER_LAYER,
    MODEL_PREFIXES,
    ConversionError,
    config_from_hf,
    hf_config_dict,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
)

log = logging.getLogger(__name__)


# ---- reading ------------------------------------------------------------------------------------

def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All model tensors of one torch_dist checkpoint directory, full (unsharded), on CPU.

    Reads with ``torch.distributed.checkpoint`` in this process alone (no process group); the stored
    tensors carry global shapes, so the TP/PP layout of the run that saved them does not matter.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_mdm.ckpt_integrity import verify_files

    verify_files(path)  # checksums and sizes; one-line CheckpointError naming a damaged file
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
