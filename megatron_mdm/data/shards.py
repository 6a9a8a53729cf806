"""Random access to prepared datasets: checked sources, shard member indexes, and sample reads.

A :class:`Source` is one dataset directory whose manifest, shards and index sidecars were checked at start
(:func:`check_manifests`). A :class:`SampleReader` reads sample ``j`` of a source (manifest order: shard by
shard, member by member) with one ``pread`` of its ``.tokens.zst`` member, located through the shard's
index sidecar (``format.index_name``). Datasets prepared before the sidecars existed get their indexes
built in memory at start (one scan of the tar headers, logged); ``mdm-data index DIR`` writes them once.
Every sample read is checked: length, ids below the vocabulary size, no mask id; a failure is a
:class:`DataError` naming the shard and the sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from megatron_mdm.data import format as fmt
from megatron_mdm.data.format import DataError

log = logging.getLogger(__name__)

__all__ = ["SampleReader", "Source", "check_manifests", "index_dataset", "scan_shard_index", "write_shard_index"]

VERIFY = ("sha256", "size", "none")


def scan_shard_index(path: str | os.PathLike) -> np.ndarray:
    """``uint64 [samples, 2]``: (byte offset, size) of each ``.tokens.zst`` member of a shard, in order."""
    rows = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.name.endswith("." + fmt.TOKENS_EXT):
                    rows.append((m.offset_data, m.size))
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: unreadable shard: {e}") from None
    return np.asarray(rows, dtype=np.uint64).reshape(-1, 2)


def write_shard_index(shard: str | os.PathLike) -> dict:
    """Scan a shard and write its index sidecar atomically; returns the record ``{path, bytes, sha256}``."""
    shard = Path(shard)
    final = shard.with_name(fmt.index_name(shard.name))
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, scan_shard_index(shard), allow_pickle=False)
    os.replace(tmp, final)
    return {"path": final.name, "bytes": final.stat().st_size, "sha256": fmt.sha256_file(final)}


@dataclass
class Source:
    """One checked dataset directory: absolute shard paths, samples per shard, the decoding facts."""

    directory: str
    weight: float
    shards: list[str]
    counts: list[int]
    dtype: str
    mask_id: int
    vocab_size: int = 0
    seq_length: int = 0
    fingerprint: str = ""  # sha256 over the shards' sample counts and checksums, in order
    index_paths: list[str | None] = field(default_factory=list)  # None: built in memory (``memory_index``)
    memory_index: dict[int, np.ndarray] = field(default_factory=dict)
    sft: str | None = None  # instruction data: the layout ("packed" or "padded"), None for pretraining data

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _check_file(p: Path, size: int, sha: str, verify: str, where: Path, what: str) -> None:
    if not p.is_file():
        raise DataError(f"{p}: {what} listed in {where} is missing")
    if verify != "none" and p.stat().st_size != size:
        raise DataError(f"{p}: {p.stat().st_size} bytes, manifest says {size} (corrupt or partial {what})")
    if verify == "sha256" and fmt.sha256_file(p) != sha:
        raise DataError(f"{p}: sha256 mismatch with {where} (corrupt {what})")


def _index_length(p: Path) -> int:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable index sidecar: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype != np.uint64:
        raise DataError(f"{p}: index sidecar has shape {arr.shape} {arr.dtype}, expected [samples, 2] uint64")
    return arr.shape[0]


def check_manifests(data_path: list[tuple[float, str]], seq_length: int, tokenizer_hash: str | None = None,
                    verify: str = "sha256", vocab_size: int | None = None) -> list[Source]:
    """Read every manifest and check shards and indexes before training starts.

    Args:
        data_path: ``[(weight, directory), ...]`` (``config.parse_data_path``).
        seq_length: the run's sequence length; must equal each manifest's.
        tokenizer_hash: the model tokenizer's ``MDMTokenizer.hash``; None skips the check.
        verify: ``"sha256"`` (size and checksum of every shard and index), ``"size"`` or ``"none"``.
        vocab_size: the model tokenizer's vocabulary size; None skips the check (samples are always checked
            against the manifest's ``vocab_size``, which must then equal it).

    Raises:
        DataError: a missing or edited manifest, a missing shard, a size or checksum mismatch, an index
            that disagrees with the manifest, another sequence length or tokenizer, an empty dataset, or a
            first sample that does not decode; the message names the file.
    """
    if not data_path:
        raise DataError("no data: --data-path is empty")
    if verify not in VERIFY:
        raise DataError(f"--verify-data must be one of {VERIFY}, got {verify!r}")
    out = []
    for weight, d in data_path:
        m = fmt.read_manifest(d)
        where = Path(d) / fmt.MANIFEST
        if m["seq_length"] != seq_length:
            raise DataError(f"{where}: sequences of {m['seq_length']} tokens, but --seq-length is {seq_length}; "
                            "prepare the data again with the run's sequence length")
        if tokenizer_hash is not None and m["tokenizer_hash"] != tokenizer_hash:
            raise DataError(f"{where}: tokenized with tokenizer {m['tokenizer_hash'][:12]}..., but the model's "
                            f"tokenizer is {tokenizer_hash[:12]}...; prepare the data with the model's tokenizer")
        listing = "\n".join(f"{s['samples']} {s['sha256']}" for s in m["shards"] if s["samples"])
        if vocab_size is not None and m["vocab_size"] != vocab_size:
            raise DataError(f"{where}: vocab_size {m['vocab_size']}, but the model's tokenizer has {vocab_size} "
                            "(edited manifest?)")
        src = Source(str(d), float(weight), [], [], m["dtype"], int(m["mask_id"]), int(m["vocab_size"]),
                     int(m["seq_length"]), hashlib.sha256(listing.encode()).hexdigest(),
                     sft=(m.get("sft") or {}).get("layout"))
        legacy = []
        for s in m["shards"]:
            p = Path(d) / s["path"]
            _check_file(p, s["bytes"], s["sha256"], verify, where, "shard")
            if s["samples"] == 0:
                continue
            if "index" in s:
                ip = Path(d) / s["index"]["path"]
                _check_file(ip, s["index"]["bytes"], s["index"]["sha256"], verify, where, "index sidecar")
                if _index_length(ip) != s["samples"]:
                    raise DataError(f"{where}: {s['path']} has {_index_length(ip)} samples in its index {ip.name}, "
                                    f"the manifest says {s['samples']} (edited manifest?)")
                src.index_paths.append(str(ip.resolve()))
            else:
                src.index_paths.append(None)
                legacy.append((len(src.shards), p, s["samples"]))
            src.shards.append(str(p.resolve()))
            src.counts.append(int(s["samples"]))
        if not src.counts:
            raise DataError(f"{where}: the dataset has no samples")
        if legacy:
            log.info("%s: %d shards have no index sidecar (prepared by an older version): indexing them in memory "
                     "now; `mdm-data index %s` writes the sidecars once", d, len(legacy), d)
            for i, p, n in legacy:
                idx = scan_shard_index(p)
                if len(idx) != n:
                    raise DataError(f"{where}: {p.name} holds {len(idx)} samples, the manifest says {n} "
                                    "(edited manifest?)")
                src.memory_index[i] = idx
        reader = SampleReader(src)
        reader.read_sft(0) if src.sft else reader.read(0)  # the first sample decodes, or fail now
        reader.close()
        out.append(src)
    return out


class SampleReader:
    """Reads samples of one :class:`Source` by number (``0 .. num_samples - 1``, manifest order).

    Keeps up to ``max_open`` shard files and index maps open (LRU); safe across ``fork`` (a child process
    opens its own files). Reads use ``os.pread``, so no file position is shared.
    """

    def __init__(self, source: Source, max_open: int = 64) -> None:
        self.src = source
        self.cum = np.concatenate([[0], np.cumsum(source.counts)]).astype(np.int64)
        self.dtype = fmt.dtype_from_name(source.dtype)
        self.max_open = max_open
        self._pid = -1
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._dctx = zstandard.ZstdDecompressor()

    def __getstate__(self) -> dict:  # picklable for spawned workers: open files stay behind
        return dict(self.__dict__, _fds=OrderedDict(), _maps=OrderedDict(), _pid=-1, _dctx=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._dctx = zstandard.ZstdDecompressor()

    def _fresh_process(self) -> None:
        if self._pid != os.getpid():  # after fork: the parent's descriptors are not ours to manage
            self._pid, self._fds, self._maps = os.getpid(), OrderedDict(), OrderedDict()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.src.shards[shard], os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.src.shards[shard]}: cannot open shard: {e}") from None
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds.move_to_end(shard)
        return fd

    def _row(self, shard: int, local: int) -> tuple[int, int]:
        idx = self.src.memory_index.get(shard)
        if idx is None:
            idx = self._maps.get(shard)
            if idx is None:
                idx = np.load(self.src.index_paths[shard], mmap_mode="r", allow_pickle=False)
                self._maps[shard] = idx
                if len(self._maps) > self.max_open:
                    self._maps.popitem(last=False)
            self._maps.move_to_end(shard)
        off, size = idx[local]
        return int(off), int(size)

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard number, sample number within the shard) of a sample."""
        shard = int(np.searchsorted(self.cum, sample, side="right")) - 1
        return shard, int(sample - self.cum[shard])

    def read(self, sample: int) -> np.ndarray:
        """Tokens ``[seq_length]`` of sample ``sample``; DataError naming shard and sample when bad."""
        self._fresh_process()
        if not 0 <= sample < self.cum[-1]:
            raise IndexError(f"sample {sample} outside [0, {self.cum[-1]}) of {self.src.directory}")
        shard, local = self.locate(sample)
        off, size = self._row(shard, local)
        path = self.src.shards[shard]
        raw = os.pread(self._fd(shard), size, off)
        try:
            arr = np.frombuffer(self._dctx.decompress(raw), dtype=self.dtype)
        except zstandard.ZstdError as e:
            raise DataError(f"{path}: sample {local} does not decompress: {e}") from None
        if len(arr) != self.src.seq_length:
            raise DataError(f"{path}: sample {local} has {len(arr)} tokens, expected {self.src.seq_length}")
        top = int(arr.max())
        if top >= self.src.vocab_size:
            raise DataError(f"{path}: sample {local} holds token id {top}, outside the vocabulary of "
                            f"{self.src.vocab_size} (corrupt shard)")
        if (arr == self.src.mask_id).any():
            raise DataError(f"{path}: sample {local} contains the mask id {self.src.mask_id}")
        return arr

    def _next_member(self, fd: int, off: int, size: int, ext: str, path: str, local: int) -> tuple[int, int]:
        """(offset, size) of the data of the tar member after the one at ``off``; it must end in ``ext``."""
        header = off + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        try:
            info = tarfile.TarInfo.frombuf(os.pread(fd, tarfile.BLOCKSIZE, header), "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            raise DataError(f"{path}: sample {local}: no .{ext} member after its tokens ({e})") from None
        if not info.name.endswith("." + ext):
            raise DataError(f"{path}: sample {local}: member {info.name} where .{ext} was expected")
        return header + tarfile.BLOCKSIZE, info.size

    def read_sft(self, sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens ``[seq_length]``, loss mask ``uint8 [seq_length]`` and example starts ``int64 [k]`` of an
        instruction sample (``mdm-data prepare-sft``); DataError naming shard and sample when bad."""
        tokens = self.read(sample)
        shard, local = self.locate(sample)
        off, size = self._row(shard, local)
        path, fd = self.src.shards[shard], self._fd(shard)
        out = []
        for ext, dtype in ((fmt.LMASK_EXT, np.uint8), (fmt.DOCS_EXT, fmt.DOCS_DTYPE)):
            off, size = self._next_member(fd, off, size, ext, path, local)
            try:
                out.append(np.frombuffer(self._dctx.decompress(os.pread(fd, size, off)), dtype=dtype))
            except zstandard.ZstdError as e:
                raise DataError(f"{path}: sample {local}: .{ext} does not decompress: {e}") from None
        mask, starts = out
        if len(mask) != len(tokens) or int(mask.max()) > 2:
            raise DataError(f"{path}: sample {local}: loss mask of {len(mask)} values (max {int(mask.max())}), "
                            f"expected {len(tokens)} values in 0..2")
        if len(starts) == 0 or starts[0] != 0 or (np.diff(starts.astype(np.int64)) <= 0).any() or \
                int(starts[-1]) >= len(tokens):
            raise DataError(f"{path}: sample {local}: example starts {starts.tolist()[:8]} are not increasing from 0")
        return tokens, mask, starts.astype(np.int64)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds, self._maps = OrderedDict(), OrderedDict()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # interpreter shutdown or a half-built reader
            pass


def index_dataset(directory: str) -> dict:
    """Write the index sidecars of a dataset (and its validation split) prepared without them.

    Shards are checked against the manifest (size and sha256) first; the manifest is rewritten atomically
    with an ``index`` record per shard. Returns ``{directory: sidecars written}``.
    """
    out = {}
    dirs = [Path(directory)]
    if fmt.read_manifest(directory).get("valid"):
        dirs.append(Path(directory) / fmt.read_manifest(directory)["valid"])
    for d in dirs:
        m = fmt.read_manifest(d)
        n = 0
        for s in m["shards"]:
            if "index" in s:
                continue
            _check_file(d / s["path"], s["bytes"], s["sha256"], "sha256", d / fmt.MANIFEST, "shard")
            s["index"] = write_shard_index(d / s["path"])
            if _index_length(d / s["index"]["path"]) != s["samples"]:
                raise DataError(f"{d / s['path']}: holds {_index_length(d / s['index']['path'])} samples, "
                                f"{d / fmt.MANIFEST} says {s['samples']}")
            n += 1
        fmt.write_json_atomic(d / fmt.MANIFEST, m)
        out[str(d)] = n
    return out
