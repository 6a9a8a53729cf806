"""The shard schema, in one place: member names, dtypes, compression, manifest fields and version.

A prepared dataset directory holds ``manifest.json`` and uncompressed webdataset ``.tar`` shards. Each
sample of a shard is one packed sequence of exactly ``seq_length`` tokens, stored as the member
``{key}.tokens.zst``: the zstd-compressed little-endian token array (``uint16`` when the vocabulary fits,
else ``uint32``). With ``--doc-boundaries`` a sample also holds ``{key}.docs.zst``: the zstd-compressed
``uint32`` offsets (within the sequence) where a document starts. The validation split, when written, is
a second dataset directory ``valid/`` (own manifest) named by the field ``valid`` of the training
manifest. ``docs/DATA_FORMAT.md`` documents the same schema for other tools.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "megatron-mdm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALID_DIR = "valid"
TOKENS_EXT = "tokens.zst"
DOCS_EXT = "docs.zst"
ZSTD_LEVEL = 3
DOCS_DTYPE = np.dtype("<u4")


class DataError(ValueError):
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
    return m
