"""Packing documents into fixed-length sequences, and writing shards atomically.

:class:`Packer` appends EOS after each document and cuts the stream into ``seq_length`` sequences
(documents may span sequences); it refuses a document containing the mask id. :class:`ShardWriter`
writes webdataset tar shards of ``samples_per_shard`` sequences (members per ``format``) to a temporary
name and renames each one when complete, so a shard is visible only when whole; then it writes the shard's
index sidecar (``shards.write_shard_index``) the same way. Tar headers carry no time or owner, so the same
sequences give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import zstandard

from megatron_mdm.data import format as fmt
from megatron_mdm.data.shards import write_shard_index


class Packer:
    """Concatenate documents with EOS after each and cut into sequences of ``seq_length`` tokens.

    Args:
        seq_length: tokens per sequence.
        eos_id: appended after every document.
        mask_id: a document containing it is refused (``add`` returns False).
    """

    def __init__(self, seq_length: int, eos_id: int, mask_id: int) -> None:
        self.seq_length = seq_length
        self.eos = np.array([eos_id], dtype=np.int64)
        self.mask_id = mask_id
        self._parts: list[np.ndarray] = []
        self._n = 0
        self._starts: list[int] = []  # document starts, relative to the pending stream
        self.ready: list[tuple[np.ndarray, np.ndarray]] = []  # (tokens [s], doc starts [k])
        self.documents = 0
        self.text_tokens = 0

    def add(self, ids: np.ndarray) -> bool:
        """Append one document; full sequences go to ``self.ready``. False if it holds the mask id."""
        ids = np.asarray(ids, dtype=np.int64)
        if (ids == self.mask_id).any():
            return False
        self._starts.append(self._n)
        self._parts += [ids, self.eos]
        self._n += len(ids) + 1
        self.documents += 1
        self.text_tokens += len(ids)
        if self._n >= self.seq_length:
            self._cut()
        return True

    def _cut(self) -> None:
        s = self.seq_length
        stream = np.concatenate(self._parts)
        starts = np.asarray(self._starts, dtype=np.int64)
        full = len(stream) // s
        for k in range(full):
            sel = starts[(starts >= k * s) & (starts < (k + 1) * s)] - k * s
            self.ready.append((stream[k * s:(k + 1) * s], sel))
        rest = stream[full * s:]
        self._parts = [rest] if len(rest) else []
        self._n = len(rest)
        self._starts = [int(x) - full * s for x in starts if x >= full * s]

    def take(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out, self.ready = self.ready, []
        return out

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """The leftover (< seq_length tokens) and its document starts."""
        stream = np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64)
        return stream, np.asarray(self._starts, dtype=np.int64)


def pack_tails(tails: list[tuple[np.ndarray, np.ndarray]], seq_length: int, eos_id: int
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Concatenate leftovers in order and cut them; the last sequence is padded with EOS.

    Returns:
        (sequences, number of EOS padding tokens added).
    """
    if not tails:
        return [], 0
    stream = np.concatenate([t for t, _ in tails] + [np.zeros(0, np.int64)]).astype(np.int64)
    offs = np.cumsum([0] + [len(t) for t, _ in tails])
    starts = np.concatenate([s + o for (_, s), o in zip(tails, offs)] + [np.zeros(0, np.int64)])
    pad = (-len(stream)) % seq_length
    stream = np.concatenate([stream, np.full(pad, eos_id, np.int64)])
    out = []
    for k in range(len(stream) // seq_length):
        sel = starts[(starts >= k * seq_length) & (starts < (k + 1) * seq_length)] - k * seq_length
        out.append((stream[k * seq_length:(k + 1) * seq_length], sel.astype(np.int64)))
    return out, pad


class ShardWriter:
    """Write sequences into ``{directory}/{prefix}-{part:05d}.tar`` shards, atomically.

    Args:
        directory: output directory (shard paths in records are relative to it).
        prefix: shard name prefix (no dots).
        samples_per_shard: sequences per shard.
        dtype: token dtype on disk (``format.token_dtype``).
        doc_boundaries: also write ``{key}.docs.zst``.
        level: zstd level.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, samples_per_shard: int, dtype: np.dtype,
                 doc_boundaries: bool = False, level: int = fmt.ZSTD_LEVEL) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = max(1, samples_per_shard)
        self.dtype = np.dtype(dtype)
        self.doc_boundaries = doc_boundaries
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._part = 0
        self.records: list[dict] = []

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def write(self, tokens: np.ndarray, starts: np.ndarray | None = None, loss_mask: np.ndarray | None = None
              ) -> None:
        """Append one sequence ``tokens [seq_length]`` (and its document starts ``[k]``, its uint8 loss mask
        ``[seq_length]`` for instruction data: written right after the tokens)."""
        if self._tar is None:
            name = f"{self.prefix}-{self._part:05d}.tar"
            self._tmp = self.directory / f".{name}.tmp{os.getpid()}"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in _finish
        key = fmt.sample_key(self._count)
        self._add(f"{key}.{fmt.TOKENS_EXT}", self._cctx.compress(tokens.astype(self.dtype).tobytes()))
        if loss_mask is not None:
            self._add(f"{key}.{fmt.LMASK_EXT}", self._cctx.compress(np.asarray(loss_mask, np.uint8).tobytes()))
        if self.doc_boundaries:
            st = np.zeros(0) if starts is None else starts
            self._add(f"{key}.{fmt.DOCS_EXT}", self._cctx.compress(st.astype(fmt.DOCS_DTYPE).tobytes()))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{self.prefix}-{self._part:05d}.tar"
        final = self.directory / name
        os.replace(self._tmp, final)  # type: ignore[arg-type]
        self.records.append({"path": name, "samples": self._count, "bytes": final.stat().st_size,
                             "sha256": fmt.sha256_file(final), "index": write_shard_index(final)})
        self._tar, self._tmp, self._count = None, None, 0
        self._part += 1

    def close(self) -> list[dict]:
        """Finish the open shard; returns the shard records ``{path, samples, bytes, sha256, index}``."""
        self._finish()
        return self.records
