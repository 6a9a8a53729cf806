"""Streaming readers for jsonl, jsonl.zst, parquet, txt and txt.zst that report bad input.

Every reader yields ``(file, line_no, text)`` (``line_no`` is 1-based: the line of a jsonl record, the
row of a parquet file, the first line of a txt paragraph). Bad input is never dropped silently: each
case goes to an :class:`InputReport` with file, line and kind, and counts; with ``strict`` the first one
raises :class:`InputError`. What happens to the record:

- ``malformed_json``, ``missing_text``: the record is skipped;
- ``non_utf8``: the bytes are decoded with U+FFFD replacement characters and the record is kept;
- ``truncated_zst``: the complete lines before the truncation are kept, the partial last one dropped.

A txt file holds one document per paragraph (documents are separated by blank lines).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zstandard

from megatron_mdm.errors import UserError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.zst", ".json", ".parquet", ".txt", ".txt.zst")
KINDS = ("malformed_json", "missing_text", "non_utf8", "truncated_zst", "mask_token")


class InputError(UserError, ValueError):
    """Bad input in strict mode, or an unreadable input file; the message names file and line."""


class _Truncated(Exception):
    """A .zst file ends inside a frame."""


@dataclass
class InputReport:
    """Counts and messages of bad input. ``max_messages`` caps the messages kept and logged."""

    strict: bool = False
    max_messages: int = 100
    counts: Counter = field(default_factory=Counter)
    messages: list = field(default_factory=list)

    def add(self, kind: str, file: str, line: int, detail: str) -> None:
        msg = f"{file}:{line}: {kind}: {detail}"
        if self.strict:
            raise InputError(msg + " (--strict)")
        self.counts[kind] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(msg)
            log.warning(msg)

    def merge(self, other: dict) -> None:
        self.counts.update(other.get("counts", {}))
        self.messages.extend(other.get("messages", [])[: max(0, self.max_messages - len(self.messages))])

    def to_dict(self) -> dict:
        return {"counts": {k: int(self.counts.get(k, 0)) for k in KINDS} | dict(self.counts),
                "messages": list(self.messages)}


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs (and directories) into a sorted, de-duplicated list of readable input files."""
    files: set[str] = set()
    for pat in patterns:
        if os.path.isdir(pat):
            hits = [os.path.join(r, f) for r, _, fs in os.walk(pat) for f in fs if f.endswith(SUFFIXES)]
        else:
            hits = glob.glob(pat, recursive=True)
        if not hits:
            raise InputError(f"{pat}: no input file matches")
        for h in hits:
            if not h.endswith(SUFFIXES):
                raise InputError(f"{h}: unsupported input type (expected one of {', '.join(SUFFIXES)})")
            files.add(os.path.normpath(h))
    return sorted(files)


def _zst_chunks(path: str, report: InputReport, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) .zst file; reports a truncated last frame."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    started = False
    with open(path, "rb") as f:
        while raw := f.read(1 << 20):
            if progress:
                progress(len(raw))
            while raw:
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as e:
                    raise InputError(f"{path}: corrupt zstd data: {e}") from None
                started = True
                if out:
                    yield out
                raw = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj = dctx.decompressobj()
                    started = False
    if started:
        raise _Truncated


def _raw_lines(path: str, report: InputReport, progress) -> Iterator[tuple[int, bytes]]:
    """``(line_no, bytes)`` for each line of a plain or .zst text file."""
    if not path.endswith(".zst"):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if progress:
                    progress(len(line))
                yield n, line.rstrip(b"\n")
        return
    buf = b""
    n = 0
    chunks = _zst_chunks(path, report, progress)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except _Truncated:
            what = "; partial last line dropped" if buf else ""
            report.add("truncated_zst", path, n + 1, f"file ends inside a zstd frame{what}")
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            n += 1
            yield n, line
    if buf:
        yield n + 1, buf


def _decode(raw: bytes, path: str, line: int, report: InputReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.add("non_utf8", path, line, f"invalid UTF-8 byte at offset {e.start}; replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def read_jsonl(path: str, text_key: str, report: InputReport, progress=None) -> Iterator[tuple[str, int, str]]:
    for n, raw in _raw_lines(path, report, progress):
        if not raw.strip():
            continue
        line = _decode(raw, path, n, report)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            report.add("malformed_json", path, n, f"{e.msg} at column {e.colno}; record skipped")
            continue
        text = rec.get(text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            report.add("missing_text", path, n, f"no string field {text_key!r}; record skipped")
            continue
        yield path, n, text


def read_txt(path: str, report: InputReport, progress=None) -> Iterator[tuple[str, int, str]]:
    para: list[str] = []
    start = 0
    for n, raw in _raw_lines(path, report, progress):
        line = _decode(raw, path, n, report).rstrip("\r")
        if line.strip():
            if not para:
                start = n
            para.append(line)
        elif para:
            yield path, start, "\n".join(para)
            para = []
    if para:
        yield path, start, "\n".join(para)


def read_parquet(path: str, text_key: str, report: InputReport, progress=None) -> Iterator[tuple[str, int, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise InputError(f"{path}: unreadable parquet file: {e}") from None
    if text_key not in pf.schema_arrow.names:
        report.add("missing_text", path, 0, f"no column {text_key!r} (columns: {pf.schema_arrow.names}); "
                   f"{pf.metadata.num_rows} rows skipped")
        return
    row = 0
    size = os.path.getsize(path)
    for rg in range(pf.num_row_groups):
        for text in pf.read_row_group(rg, columns=[text_key]).column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                report.add("missing_text", path, row, f"{text_key!r} is {type(text).__name__}; row skipped")
                continue
            yield path, row, text
        if progress:
            progress(size // max(1, pf.num_row_groups))


def iter_documents(path: str, text_key: str = "text", report: InputReport | None = None,
                   progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, int, str]]:
    """Yield ``(file, line_no, text)`` for every document of one input file.

    Args:
        path: a .jsonl, .jsonl.zst, .json (jsonl), .parquet, .txt or .txt.zst file.
        text_key: the JSON field / parquet column holding the text.
        report: collects bad input (a fresh non-strict one when None).
        progress: called with the number of input bytes consumed, for rate and ETA.
    """
    report = report if report is not None else InputReport()
    if not os.path.isfile(path):
        raise InputError(f"{path}: input file not found")
    if path.endswith(".parquet"):
        yield from read_parquet(path, text_key, report, progress)
    elif path.endswith((".txt", ".txt.zst")):
        yield from read_txt(path, report, progress)
    elif path.endswith((".jsonl", ".jsonl.zst", ".json")):
        yield from read_jsonl(path, text_key, report, progress)
    else:
        raise InputError(f"{path}: unsupported input type (expected one of {', '.join(SUFFIXES)})")
