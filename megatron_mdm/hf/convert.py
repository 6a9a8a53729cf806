"""Hugging Face directories <-> Megatron distributed checkpoints: export and import.

``export_to_hf`` writes a Hugging Face directory (safetensors shards, config, tokenizer, generation
config, model card; an MDM of the Llama family also gets ``megatron_mdm/hf/modeling`` and the decoding
modules copied in for ``trust_remote_code``: ``hf.modeling.shipped_files``) from a checkpoint of any TP/PP
layout, read in one process without a process group. Nothing in it names the exporting machine's paths.
``import_from_hf`` writes a Megatron checkpoint through ``checkpointing.save_checkpoint`` from a
TP1/PP1 model in a one-process gloo world. The family (its map and config translation) comes from the
HF ``model_type`` on import and from the checkpoint's config on export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from megatron_mdm.config import Config, ConfigError
from megatron_mdm.hf import modeling as hf_modeling
from megatron_mdm.hf.base import (
    ConversionError,
    Family,
    check_shapes,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    read_hf_state_dict,
    write_safetensors,
)
from megatron_mdm.hf.bert import BERT, ROBERTA, XLM_ROBERTA
from megatron_mdm.hf.card import model_card
from megatron_mdm.hf.io import read_checkpoint_tensors, save_megatron
from megatron_mdm.hf.llama import LLAMA
from megatron_mdm.hf.qwen2 import QWEN2
from megatron_mdm.models.registry import family as model_family

log = logging.getLogger(__name__)

FAMILIES = (LLAMA, QWEN2, BERT, ROBERTA, XLM_ROBERTA)
EXPORT_MARKER = "mdm_export.json"
"""Written into every export: the run (its name and a fingerprint of its path, never the path) and iteration it
came from (a re-export of the same run may replace that directory)."""


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES for t in f.model_types})


def family_for_hf(hf_cfg: dict) -> Family:
    """The family that converts an HF ``config.json`` (by ``model_type``); ConversionError naming it if none."""
    mt = hf_cfg.get("model_type")
    if mt == hf_modeling.MODEL_TYPE:  # our own export of a Llama-stack MDM that no stock class computes
        return QWEN2 if hf_cfg.get("qkv_bias") else LLAMA
    for family in FAMILIES:
        if mt in family.model_types:
            return family
    arch = ", ".join(hf_cfg.get("architectures") or []) or "no architectures"
    raise ConversionError(f"the Hugging Face model is {mt!r} ({arch}), not a supported family; "
                          f"supported model types: {', '.join(supported_model_types())}")


def family_of(cfg: Config) -> Family:
    """The HF family a checkpoint exports to: the one it was imported from, else its architecture's default."""
    return model_family(cfg).hf_family(cfg)


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

def _run_root(path: Path) -> Path:
    """The run directory of a checkpoint directory (``RUN/iter_*`` -> ``RUN``)."""
    path = path.resolve()
    return path.parent if path.name.startswith("iter_") else path


def _run_id(run: Path) -> str:
    """A fingerprint of the run directory's path: tells exports of two runs apart without writing the path."""
    return hashlib.sha256(str(run).encode("utf-8")).hexdigest()[:16]


def _check_output(out: Path, ckpt: Path, run: Path, force: bool) -> None:
    """Refuse an output that would replace what is being read or any training run, whatever the flags; refuse
    a non-empty directory that is not an export of the same run unless ``force``."""
    from megatron_mdm.checkpoint import layout

    target, ckpt = out.resolve(), ckpt.resolve()
    if target == ckpt or target in ckpt.parents or ckpt in target.parents:
        where = "is" if target == ckpt else "contains" if target in ckpt.parents else "lies inside"
        raise ConversionError(f"--output: {out} {where} the checkpoint being read ({ckpt}): the export would "
                              f"replace it; choose a directory outside {run}")
    if layout.owned_by_run(run, target) or layout.holds_run(target):
        raise ConversionError(f"--output: {out} is part of a training run (checkpoints, marker, metrics): the "
                              "export would replace it; choose another directory")
    if target.exists() and not target.is_dir():
        raise ConversionError(f"--output: {out} exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()) or force:
        return
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text())
        previous = marker.get("run_id") or marker.get("run")  # "run": the path, in exports of older versions
        name = marker.get("run_name") or marker.get("run")
    except (OSError, ValueError, AttributeError):
        previous = name = None
    if previous not in (_run_id(run), str(run)):
        what = f"an export of {name}" if previous else "not an export of a megatron-mdm run"
        raise ConversionError(f"--output: {out} is not empty and is {what}; choose another directory or pass "
                              f"--force to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the complete directory ``tmp``: ``out`` is the old export or the new one, never a mix."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


class _Stages:
    """Progress of one conversion on stderr: a bar over its stages, naming the current one, with the time."""

    def __init__(self, desc: str, total: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]{postfix}")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and self.started:
            self.bar.update(1)
            self.bar.set_postfix_str("done")
        self.bar.close()


def export_to_hf(load_dir: str | os.PathLike, output_dir: str | os.PathLike, iteration: int | None = None,
                 shard_size: int | str = "2GB", force: bool = False, progress: bool = False) -> Path:
    """Convert one Megatron checkpoint (any TP/PP layout) into a Hugging Face model directory.

    The directory is written beside ``output_dir`` and swapped in when complete, so it never mixes files of
    two exports (a stale ``model.safetensors`` beside new shards would be the one ``transformers`` loads).
    A non-empty ``output_dir`` is replaced only when it is an export of the same run, or with ``force``.

    Args:
        load_dir: run directory (or an ``iter_*`` directory).
        output_dir: directory to write (replaced whole).
        iteration: checkpoint iteration (default: the latest complete one).
        shard_size: largest safetensors shard (``"2GB"``, ``"500MB"`` or bytes).
        force: replace a non-empty ``output_dir`` that is not an export of this run.
        progress: show the stages and the bytes written on stderr (tqdm).
    Returns:
        ``output_dir``.
    """
    from megatron_mdm.checkpoint.checkpointing import (
        CheckpointError,
        load_meta,
        resolve_checkpoint,
    )
    from megatron_mdm.checkpoint.integrity import verify_files

    out = Path(output_dir)
    try:
        path = resolve_checkpoint(load_dir, iteration)
        run = _run_root(path)
        _check_output(out, path, run, force)
        verify_files(path)  # every file against its checksum before any is read (or unpickled)
        meta = load_meta(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if "config" not in meta:
        raise ConversionError(f"{path}: the checkpoint's meta has no config")
    try:
        cfg = Config.from_dict(meta["config"], source=f"{path} meta")
    except ConfigError as e:
        raise ConversionError(f"{path}: not a megatron-mdm checkpoint of this version ({e})") from None
    family = family_of(cfg)
    with _Stages("mdm-convert to-hf", 4, progress) as stage:
        stage("checking and reading the checkpoint")
        return _export(path, meta, cfg, family, out, run, shard_size, stage, progress)


def _export(path: Path, meta: dict, cfg: Config, family: Family, out: Path, run: Path, shard_size: int | str,
            stage: _Stages, progress: bool) -> Path:
    tensors = read_checkpoint_tensors(path, verify=False)  # verified before the meta was read
    tok = _load_tokenizer(path / "tokenizer")
    rows = tensors["embedding.word_embeddings.weight"].shape[0] if "embedding.word_embeddings.weight" in tensors else 0
    vocab_size = cfg.model.vocab_size or (tok.vocab_size if tok is not None else rows)
    if tok is None:
        log.warning("%s has no tokenizer/: exporting without tokenizer files", path)
    stage(f"mapping {len(tensors)} tensors to {family.name}")
    hf_sd = megatron_to_hf_state_dict(tensors, cfg, vocab_size, family)
    mdm = cfg.objective.objective == "mdm"
    special = _special_ids(tok)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        dtype = hf_sd[family.param_map["embedding.word_embeddings.weight"]].dtype
        config = family.hf_config(cfg, vocab_size, dtype, mdm, special)
        config["transformers_version"] = _transformers_version()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        stage("writing safetensors")
        write_safetensors(hf_sd, tmp, shard_size, progress)
        stage("config, tokenizer, model card")
        ships_code = mdm and model_family(cfg).ships_modeling_code
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(special, mdm, config), indent=2)
                                                    + "\n")
        if tok is not None:
            tok.hf.model_max_length = cfg.data.seq_length  # the trained length (not transformers' 1e30)
            tok.save(tmp)
        if ships_code:  # the modeling code and the decoding modules behind its generate, byte for byte
            for name, src in hf_modeling.shipped_files().items():
                shutil.copy2(src, tmp / name)
        (tmp / "README.md").write_text(model_card(cfg, config, mdm, special, vocab_size, run.name, meta.get("iteration"),
                                                  ships_code))
        marker = {"run_name": run.name, "run_id": _run_id(run), "iteration": meta.get("iteration"),
                  "family": family.name}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _swap_in(tmp, out)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only file system: nothing replaced or left
        shutil.rmtree(tmp, ignore_errors=True)
        from megatron_mdm.checkpoint.integrity import save_error_reason

        raise ConversionError(f"--output: could not write {out} ({save_error_reason(e, out.parent)}); "
                              "nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s, vocab %d) to %s", path, family.name, cfg.objective.objective, vocab_size, out)
    return out


def _generation_config(special: dict, mdm: bool, config: dict) -> dict:
    """``generation_config.json``: the special ids and, for an MDM, the sampler's defaults (``decoding``: the
    fields of ``DecodingConfig``, which the exported ``generate`` and ``mdm-generate`` share)."""
    import dataclasses

    from megatron_mdm.decoding.settings import DecodingConfig

    gen = {k: v for k, v in (("bos_token_id", special.get("bos")), ("eos_token_id", special.get("eos")),
                             ("pad_token_id", special.get("pad"))) if v is not None}
    if mdm:
        gen["mask_token_id"] = special.get("mask")
        gen["decoding"] = dataclasses.asdict(DecodingConfig())
    gen["transformers_version"] = config["transformers_version"]
    return gen


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ---- import -------------------------------------------------------------------------------------

def _vocab_names(family: Family) -> list[str]:
    """HF names of the tensors whose first dimension is the vocabulary (embedding first)."""
    return [family.param_map[t] for t in family.vocab_padded]


def _add_token_rows(hf_sd: dict[str, torch.Tensor], vocab_size: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Grow the embedding (and untied head) to ``vocab_size`` rows, new rows = the mean row."""
    out = dict(hf_sd)
    for name in names:
        w = out.get(name)
        if w is not None and w.shape[0] < vocab_size:
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab_size - w.shape[0], *w.shape[1:])
            out[name] = torch.cat([w, extra])
    return out


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"--hf: {hf_dir} has no config.json")
    try:
        hf_cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConversionError(f"--hf: {path} is not valid JSON{where}") from None
    if not isinstance(hf_cfg, dict):
        raise ConversionError(f"--hf: {path} holds {type(hf_cfg).__name__}, not a JSON object")
    return hf_cfg


def _earlier_import(out: Path) -> bool:
    """Whether ``out`` holds only what an import writes (its record, iteration 0, the marker at 0)."""
    from megatron_mdm.checkpoint import layout

    if (out / layout.IMPORT_FILE).is_file():
        return True
    zero = layout.iteration_dir(out, 0).name
    names = {p.name for p in out.iterdir()}
    return (layout.read_latest_iteration(out) == 0
            and all(n.startswith(zero) or n in (layout.TRACKER, layout.LOCK_FILE) for n in names))


def _check_import_output(out: Path, force: bool) -> None:
    """Refuse to write into a training run (its marker would move back to 0, whatever the flags), and into a
    non-empty directory that is not an earlier import unless ``force``."""
    from megatron_mdm.checkpoint import layout

    if out.exists() and not out.is_dir():
        raise ConversionError(f"--output: {out} exists and is not a directory")
    if not out.is_dir() or not any(p.name != layout.LOCK_FILE for p in out.iterdir()):  # empty, or a lock left
        return
    try:
        latest = layout.read_latest_iteration(out)
    except layout.CheckpointError:
        latest = -1  # a damaged marker: not an import's
    if latest is not None and latest != 0:
        raise ConversionError(f"--output: {out} holds a training run (its marker names iteration {latest}): an "
                              "import would move the marker back to 0 and later saves would replace its "
                              "checkpoints; choose another directory")
    if not force and not _earlier_import(out):
        raise ConversionError(f"--output: {out} is not empty and is not an earlier import; choose another "
                              "directory or pass --force to write the import into it")


def import_from_hf(hf_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None, tp: int = 1, pp: int = 1,
                   objective: str = "mdm", progress: bool = False, force: bool = False) -> Path:
    """Convert an HF model of a supported family into a Megatron checkpoint (iteration 0, model only).

    The family comes from ``config.json``'s ``model_type`` (Llama, Mistral, Qwen2, BERT, RoBERTa, XLM-R,
    and our own MDM exports); the checkpoint's saved config describes the whole architecture, so
    ``pretrain --load OUT --finetune`` and every tool that loads it need no model flag.

    The tokenizer (``tokenizer_dir``, default ``hf_dir``) keeps its own mask token; it gets one (and
    pad/eos) when it lacks them, and new ids get embedding/head rows initialised to the mean row. The
    vocabulary is padded for ``tp``; the checkpoint itself is layout-independent.

    Args:
        hf_dir: HF model directory (config.json + weights).
        output_dir: run directory to write (``iter_0000000/`` and the tracker).
        tokenizer_dir: tokenizer directory when it is not in ``hf_dir``.
        tp, pp: the tensor/pipeline-parallel sizes the checkpoint is meant for (recorded in its config).
        objective: ``mdm`` (diffusive adaptation, the default) or ``arm``.
        progress: show the stages and the bytes read on stderr (tqdm).
        force: write into a non-empty ``output_dir`` that is not an earlier import (never into a training
            run: a marker past iteration 0 is refused whatever the flags).
    Returns:
        The checkpoint's ``iter_*`` directory.
    """
    hf_dir = Path(hf_dir)
    hf_cfg = _read_hf_config(hf_dir)
    _check_import_output(Path(output_dir), force)
    family = family_for_hf(hf_cfg)
    cfg = family.config_from_hf(hf_cfg)
    if objective not in model_family(cfg).objectives:
        raise ConversionError(f"--objective {objective}: a {family.name} masked LM is bidirectional and adapts "
                              "as an MDM only (--objective mdm)")
    cfg.objective.objective = objective
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    with _Stages("mdm-convert from-hf", 3, progress) as stage:
        stage("reading the Hugging Face weights")
        hf_sd = read_hf_state_dict(hf_dir, progress)
        return _import(hf_sd, hf_dir, hf_cfg, cfg, family, Path(output_dir), tokenizer_dir, tp, stage)


def _import(hf_sd: dict[str, torch.Tensor], hf_dir: Path, hf_cfg: dict, cfg: Config, family: Family, out: Path,
            tokenizer_dir: str | os.PathLike | None, tp: int, stage: _Stages) -> Path:
    from megatron_mdm.models.build import padded_vocab_size

    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else hf_dir
    try:
        tok = _load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer: cannot load a tokenizer from {tok_dir} ({e})") from None
    if tok is None:
        raise ConversionError(f"no tokenizer in {tok_dir}; pass --tokenizer DIR")
    emb = _vocab_names(family)[0]
    rows = hf_sd[emb].shape[0] if emb in hf_sd else 0
    stated = hf_cfg.get("vocab_size")
    if rows and stated is not None and stated != rows:
        raise ConversionError(f"--hf: {hf_dir / 'config.json'} says vocab_size {stated} but {emb} has {rows} rows: "
                              "the config and the weights are of different models")
    check_shapes(hf_sd, family.hf_shapes(cfg, rows))
    cfg.model.vocab_size = max(tok.vocab_size, rows, stated or 0)
    hf_sd = _add_token_rows(hf_sd, cfg.model.vocab_size, _vocab_names(family))
    cfg.optim.bf16 = hf_sd[emb].dtype == torch.bfloat16 if rows else False
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"the converted config is invalid: {e}") from None
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    stage(f"mapping {len(hf_sd)} tensors")
    tensors = hf_to_megatron_state_dict(hf_sd, cfg, padded, family)
    stage("writing the Megatron checkpoint")
    from megatron_mdm.checkpoint import layout, lock

    with lock.holding(out, "--output"):  # no training job writes it meanwhile
        _check_import_output(out, force=True)  # (again, under the lock) never a training run
        record = {"hf": str(hf_dir.resolve()), "family": family.name, "objective": cfg.objective.objective}
        (out / layout.IMPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return save_megatron(tensors, cfg, padded, out, tok)
