"""The shard schema, in one place: member names, dtypes, compression, manifest fields and version.

A prepared dataset directory holds ``manifest.json`` and uncompressed webdataset ``.tar`` shards. Each
sample of a shard is one packed sequence of exactly ``seq_length`` tokens, stored as the member
``{key}.tokens.zst``: the zstd-compressed little-endian token array (``uint16`` when the vocabulary fits,
else ``uint32``). With ``--doc-boundaries`` a sample also holds ``{key}.docs.zst``: the zstd-compressed
``uint32`` offsets (within the sequence) where a document starts. An instruction-tuning dataset
(``mdm-data prepare-sft``, manifest field ``sft``) holds per sample ``{key}.tokens.zst``, then
``{key}.lmask.zst`` (the zstd-compressed ``uint8`` loss mask, one value per token: 0 context, 1 completion,
2 padding in the loss) and ``{key}.docs.zst`` (the example starts), in this order in the tar.
Beside each shard ``NAME.tar`` the sidecar ``NAME.idx.npy`` (a NumPy ``.npy`` array ``uint64 [samples, 2]``:
byte offset and size of each sample's ``.tokens.zst`` member) gives random access; the manifest's shard record names it
(``index``).
The validation split, when written, is a second dataset directory ``valid/`` (own manifest) named by the
field ``valid`` of the training manifest. ``docs/DATA_FORMAT.md`` documents the same schema for other tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from megatron_mdm.errors import UserError

FORMAT_NAME = "megatron-mdm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALID_DIR = "valid"
TOKENS_EXT = "tokens.zst"
DOCS_EXT = "docs.zst"
LMASK_EXT = "lmask.zst"
SFT_LAYOUTS = ("packed", "padded")
INDEX_SUFFIX = ".idx.npy"
ZSTD_LEVEL = 3
DOCS_DTYPE = np.dtype("<u4")


class DataError(UserError, ValueError):
    """Prepared data is missing, corrupt or inconsistent with the run; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {np.dtype("<u2"): "uint16", np.dtype("<u4"): "uint32"}[np.dtype(dtype)]


def dtype_from_name(name: str) -> np.dtype:
    try:
        return {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[name]
    except KeyError:
        raise DataError(f"unknown token dtype {name!r} (expected uint16 or uint32)") from None


def sample_key(index: int) -> str:
    """The webdataset key (``__key__``) of the ``index``-th sample of a shard: no dots."""
    return f"{index:08d}"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> dict:
    """Load and check ``directory/manifest.json``; raises DataError naming the file."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (not a directory written by mdm-data prepare?)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None
    if m.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a {FORMAT_NAME} manifest")
    if m.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {m.get('version')}, this code reads {FORMAT_VERSION}")
    check_manifest(m, path)
    return m


def index_name(shard: str) -> str:
    """The index sidecar of a shard: ``NAME.tar`` -> ``NAME.idx.npy`` (same directory)."""
    return (shard[:-4] if shard.endswith(".tar") else shard) + INDEX_SUFFIX


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_file_record(rec: Any, where: str, suffix: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where} is not an object")
    p = rec.get("path")
    if not isinstance(p, str) or not p.endswith(suffix) or Path(p).is_absolute() or ".." in Path(p).parts:
        raise DataError(f"{where}.path is {p!r}: expected a relative '*{suffix}' path inside the directory")
    if not _is_count(rec.get("bytes")):
        raise DataError(f"{where}.bytes is {rec.get('bytes')!r}, expected a non-negative integer")
    if not isinstance(rec.get("sha256"), str) or not _HEX64.match(rec["sha256"]):
        raise DataError(f"{where}.sha256 is {rec.get('sha256')!r}, expected 64 hex digits")


def check_manifest(m: Any, path: str | os.PathLike) -> None:
    """Check the fields the loader relies on, so that a damaged or hand-edited manifest fails here, at
    start, naming the file and the field (not later, inside a DataLoader worker).

    Raises:
        DataError: ``"{path}: hand-edited or damaged manifest: {field} ..."``.
    """
    def bad(msg: str) -> DataError:
        return DataError(f"{path}: hand-edited or damaged manifest: {msg}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    for key in ("seq_length", "vocab_size"):
        if not _is_count(m.get(key)) or m[key] < 1:
            raise bad(f"{key} is {m.get(key)!r}, expected a positive integer")
    for key in ("num_samples", "num_tokens"):
        if not _is_count(m.get(key)):
            raise bad(f"{key} is {m.get(key)!r}, expected a non-negative integer")
    if m.get("dtype") not in ("uint16", "uint32"):
        raise bad(f"dtype is {m.get('dtype')!r}, expected 'uint16' or 'uint32'")
    if m["dtype"] != dtype_name(token_dtype(m["vocab_size"])):
        raise bad(f"dtype {m['dtype']} does not match vocab_size {m['vocab_size']}")
    for key in ("eos_id", "mask_id"):
        if not _is_count(m.get(key)) or m[key] >= m["vocab_size"]:
            raise bad(f"{key} is {m.get(key)!r}, expected an id below vocab_size {m['vocab_size']}")
    if not isinstance(m.get("tokenizer_hash"), str):
        raise bad(f"tokenizer_hash is {m.get('tokenizer_hash')!r}, expected a string")
    if m.get("valid") is not None and (not isinstance(m["valid"], str) or Path(m["valid"]).is_absolute()
                                       or ".." in Path(m["valid"]).parts):
        raise bad(f"valid is {m['valid']!r}, expected null or a relative directory")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad(f"shards is {type(shards).__name__}, expected a list")
    seen = set()
    for i, s in enumerate(shards):
        try:
            _check_file_record(s, f"shards[{i}]", ".tar")
            if not _is_count(s.get("samples")):
                raise DataError(f"shards[{i}].samples is {s.get('samples')!r}, expected a non-negative integer")
            if "index" in s:
                _check_file_record(s["index"], f"shards[{i}].index", INDEX_SUFFIX)
        except DataError as e:
            raise bad(str(e)) from None
        if s["path"] in seen:
            raise bad(f"shards[{i}].path {s['path']} is listed twice")
        seen.add(s["path"])
    sft = m.get("sft")
    if sft is not None:
        if not isinstance(sft, dict) or sft.get("layout") not in SFT_LAYOUTS:
            raise bad(f"sft is {sft!r}, expected an object with layout in {SFT_LAYOUTS}")
        if m.get("doc_boundaries") is not True:
            raise bad("an sft dataset must have doc_boundaries true")
    total = sum(s["samples"] for s in shards)
    if total != m["num_samples"]:
        raise bad(f"num_samples is {m['num_samples']} but the shards hold {total} samples")
    if m["num_tokens"] != m["num_samples"] * m["seq_length"]:
        raise bad(f"num_tokens is {m['num_tokens']}, expected num_samples x seq_length = "
                  f"{m['num_samples'] * m['seq_length']}")
