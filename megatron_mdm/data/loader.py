"""The resumable, blended, data-parallel pretraining loader over prepared shards.

Order (all ranks agree on it without communication):

- Each source (dataset directory) has a global sample stream per epoch: its shards in a permutation
  seeded by ``(seed, source, epoch)``, each shard's samples in order.
- Stream position ``g`` belongs to slot ``g % R`` with ``R = dp_size * W`` (``W = max(1, num_workers)``)
  and slot ``dp_rank * W + worker_id``: ranks and workers never overlap and together cover each epoch.
- A slot's samples are cut into blocks of ``shuffle_buffer`` samples; each block is read into memory and
  permuted with a generator seeded by ``(seed, source, epoch, slot, block)`` (the in-memory shuffle).
- Blending draws the source of each sample with a seeded weighted choice; its state is a draw counter.
- Each worker yields whole micro-batches; epochs continue forever.

The state of a worker is ``{draws, sources: [[epoch, block, offset], ...]}``: a block is re-read on resume,
so a resumed loader yields exactly the batches the uninterrupted one would. torchdata's
``StatefulDataLoader`` keeps one such state per worker. A changed ``dp_size`` or ``num_workers`` changes the
slots, so ``load_state_dict`` refuses it with :class:`DataError`.

Tensor- and pipeline-parallel ranks of one data-parallel replica call the loader with the same
``dp_rank`` and arguments and therefore *read identically*: no broadcast is needed.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from torch.utils.data import IterableDataset, get_worker_info

from megatron_mdm.data import format as fmt
from megatron_mdm.data.format import DataError

__all__ = [
    "DataError",
    "PretrainLoader",
    "Source",
    "ValidLoader",
    "build_pretrain_loader",
    "build_valid_loader",
    "check_manifests",
    "resolve_valid_path",
    "verify_dataset",
]

STATE_VERSION = 1


@dataclass
class Source:
    """One checked dataset directory: absolute shard paths and samples per shard."""

    directory: str
    weight: float
    shards: list[str]
    counts: list[int]
    dtype: str
    mask_id: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def check_manifests(data_path: list[tuple[float, str]], seq_length: int, tokenizer_hash: str | None = None,
                    verify: str = "sha256") -> list[Source]:
    """Read every manifest and check shards before training starts.

    Args:
        data_path: ``[(weight, directory), ...]`` (``config.parse_data_path``).
        seq_length: the run's sequence length; must equal each manifest's.
        tokenizer_hash: the model tokenizer's ``MDMTokenizer.hash``; None skips the check.
        verify: ``"sha256"`` (size and checksum of every shard), ``"size"`` (sizes only) or ``"none"``.

    Raises:
        DataError: a missing manifest or shard, a size or checksum mismatch, another sequence length or
            tokenizer, or an empty dataset; the message names the file.
    """
    if not data_path:
        raise DataError("no data: --data-path is empty")
    if verify not in ("sha256", "size", "none"):
        raise DataError(f"verify must be 'sha256', 'size' or 'none', got {verify!r}")
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
        shards, counts = [], []
        for s in m["shards"]:
            p = Path(d) / s["path"]
            if not p.is_file():
                raise DataError(f"{p}: shard listed in {where} is missing")
            if verify != "none" and p.stat().st_size != s["bytes"]:
                raise DataError(f"{p}: {p.stat().st_size} bytes, manifest says {s['bytes']} (corrupt or partial)")
            if verify == "sha256" and fmt.sha256_file(p) != s["sha256"]:
                raise DataError(f"{p}: sha256 mismatch with {where} (corrupt shard)")
            if s["samples"] > 0:
                shards.append(str(p.resolve()))
                counts.append(int(s["samples"]))
        if not counts:
            raise DataError(f"{where}: the dataset has no samples")
        out.append(Source(str(d), float(weight), shards, counts, m["dtype"], int(m["mask_id"])))
    return out


def resolve_valid_path(data_path_dirs: list) -> list[tuple[float, str]]:
    """The validation splits written by ``mdm-data prepare --val-fraction`` beside training data.

    Args:
        data_path_dirs: ``[(weight, dir), ...]`` or ``[dir, ...]`` of training datasets.

    Returns:
        ``[(weight, dir/valid), ...]`` for the datasets whose manifest names a validation split.

    Raises:
        DataError: when none of them has one.
    """
    out = []
    for item in data_path_dirs:
        w, d = item if isinstance(item, (tuple, list)) else (1.0, item)
        m = fmt.read_manifest(d)
        if m.get("valid"):
            out.append((float(w), str(Path(d) / m["valid"])))
    if not out:
        raise DataError(f"no validation split in {[str(x) for x in data_path_dirs]}: prepare with --val-fraction "
                        "or set --valid-data-path")
    total = sum(w for w, _ in out)
    return [(w / total, d) for w, d in out]


class _ShardReader:
    """Random access to the token members of shards, with a small cache of member offsets."""

    def __init__(self, cache: int = 8) -> None:
        self._index: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()
        self._cache = cache
        self._dctx = zstandard.ZstdDecompressor()

    def index(self, path: str) -> list[tuple[int, int]]:
        if path not in self._index:
            try:
                with tarfile.open(path, "r:") as tar:
                    idx = [(m.offset_data, m.size) for m in tar if m.name.endswith("." + fmt.TOKENS_EXT)]
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"{path}: unreadable shard: {e}") from None
            self._index[path] = idx
            while len(self._index) > self._cache:
                self._index.popitem(last=False)
        self._index.move_to_end(path)
        return self._index[path]

    def read(self, path: str, locals_: list[int], dtype: np.dtype) -> list[np.ndarray]:
        idx = self.index(path)
        out = []
        with open(path, "rb") as f:
            for i in locals_:
                if i >= len(idx):
                    raise DataError(f"{path}: has {len(idx)} samples, manifest says more (sample {i})")
                off, size = idx[i]
                f.seek(off)
                try:
                    out.append(np.frombuffer(self._dctx.decompress(f.read(size)), dtype=dtype))
                except zstandard.ZstdError as e:
                    raise DataError(f"{path}: sample {i} does not decompress: {e}") from None
        return out


class _SourceStream:
    """The samples of one source that belong to one slot, block-shuffled, epoch after epoch."""

    def __init__(self, src: Source, src_idx: int, slot: int, nslots: int, seed: int, block: int,
                 shuffle: bool, seq_length: int, reader: _ShardReader) -> None:
        self.src, self.i, self.slot, self.R = src, src_idx, slot, nslots
        self.seed, self.B, self.shuffle, self.S, self.reader = seed, max(1, block), shuffle, seq_length, reader
        self.dtype = fmt.dtype_from_name(src.dtype)
        self.n_owned = len(range(slot, src.num_samples, nslots))
        if self.n_owned == 0:
            raise DataError(f"{src.directory}: {src.num_samples} samples, fewer than dp_size * num_workers = "
                            f"{nslots}; use fewer workers or more data")
        self.epoch = self.block = self.offset = 0
        self._buf: list[tuple[np.ndarray, str, int]] | None = None

    def get_state(self) -> list[int]:
        return [self.epoch, self.block, self.offset]

    def set_state(self, st: list[int]) -> None:
        self.epoch, self.block, self.offset = (int(x) for x in st)
        self._buf = None

    def _load_block(self) -> None:
        counts = np.asarray(self.src.counts)
        order = (np.random.default_rng([self.seed, self.i, self.epoch]).permutation(len(counts))
                 if self.shuffle else np.arange(len(counts)))
        cum = np.concatenate([[0], np.cumsum(counts[order])])
        k = np.arange(self.block * self.B, min((self.block + 1) * self.B, self.n_owned))
        g = k * self.R + self.slot
        pos = np.searchsorted(cum, g, side="right") - 1
        local = g - cum[pos]
        buf: list = [None] * len(g)
        for p in np.unique(pos):
            sel = np.nonzero(pos == p)[0]
            path = self.src.shards[order[p]]
            for j, arr in zip(sel, self.reader.read(path, [int(x) for x in local[sel]], self.dtype)):
                buf[j] = (arr, path, int(local[j]))
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.i, self.epoch, self.slot, self.block]).permutation(len(buf))
            buf = [buf[j] for j in perm]
        self._buf = buf

    def next(self) -> np.ndarray:
        if self._buf is None:
            self._load_block()
        arr, path, local = self._buf[self.offset]  # type: ignore[index]
        if len(arr) != self.S:
            raise DataError(f"{path}: sample {local} has {len(arr)} tokens, expected {self.S}")
        if (arr == self.src.mask_id).any():
            raise DataError(f"{path}: sample {local} contains the mask id {self.src.mask_id}")
        self.offset += 1
        if self.offset >= len(self._buf):  # type: ignore[arg-type]
            self.offset, self.block, self._buf = 0, self.block + 1, None
            if self.block * self.B >= self.n_owned:
                self.epoch, self.block = self.epoch + 1, 0
        return arr


class TokenShardDataset(IterableDataset):
    """Infinite stream of ``{"tokens": LongTensor[micro_batch_size, seq_length]}`` for one dp rank.

    Implements ``state_dict``/``load_state_dict`` (per worker), which ``StatefulDataLoader`` snapshots.
    """

    _DRAW_CHUNK = 1024

    def __init__(self, sources: list[Source], seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, shuffle: bool = True) -> None:
        super().__init__()
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.sources, self.S, self.mbs = sources, seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.W = dp_rank, dp_size, max(1, num_workers)
        self.seed, self.block, self.shuffle = seed, shuffle_buffer, shuffle
        w = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.p = w / w.sum()
        self._state: dict = {"draws": 0, "sources": [[0, 0, 0] for _ in sources]}
        for s in range(self.W):  # fail here, in the main process, when a slot would be empty
            for src in sources:
                if len(range(dp_rank * self.W + s, src.num_samples, dp_size * self.W)) == 0:
                    raise DataError(f"{src.directory}: {src.num_samples} samples, fewer than dp_size * num_workers"
                                    f" = {dp_size * self.W}; use fewer workers or more data")

    def state_dict(self) -> dict:
        return {"draws": int(self._state["draws"]), "sources": [list(x) for x in self._state["sources"]]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"loader state has {len(state['sources'])} data sources, this run has {len(self.sources)}")
        self._state = {"draws": int(state["draws"]), "sources": [list(x) for x in state["sources"]]}

    def _choices(self, draws: int) -> Iterator[int]:
        while True:
            chunk, start = divmod(draws, self._DRAW_CHUNK)
            rng = np.random.default_rng([self.seed, 0xB1E4D, self.dp_rank, self._wid, chunk])
            picks = rng.choice(len(self.sources), size=self._DRAW_CHUNK, p=self.p)
            for c in picks[start:]:
                yield int(c)
            draws = (chunk + 1) * self._DRAW_CHUNK

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        self._wid = info.id if info is not None else 0
        slot, nslots = self.dp_rank * self.W + self._wid, self.dp_size * self.W
        reader = _ShardReader()
        streams = [_SourceStream(src, i, slot, nslots, self.seed, self.block, self.shuffle, self.S, reader)
                   for i, src in enumerate(self.sources)]
        for st, x in zip(streams, self._state["sources"]):
            st.set_state(x)
        draws = self._state["draws"]
        choices = self._choices(draws) if len(streams) > 1 else iter(lambda: 0, 1)
        while True:
            rows = []
            for _ in range(self.mbs):
                rows.append(streams[next(choices)].next())
                draws += 1
            self._state = {"draws": draws, "sources": [s.get_state() for s in streams]}
            yield {"tokens": torch.from_numpy(np.stack(rows).astype(np.int64))}


class PretrainLoader:
    """Iterable over training batches with ``state_dict``/``load_state_dict`` for checkpoints."""

    def __init__(self, dataset: TokenShardDataset, num_workers: int) -> None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.dataset = dataset
        self.num_workers = num_workers
        self._dl = StatefulDataLoader(dataset, batch_size=None, num_workers=num_workers,
                                      multiprocessing_context=None,
                                      persistent_workers=False)

    def _meta(self) -> dict:
        d = self.dataset
        return {"version": STATE_VERSION, "dp_size": d.dp_size, "dp_rank": d.dp_rank, "num_workers": self.num_workers,
                "seq_length": d.S, "micro_batch_size": d.mbs, "seed": d.seed, "shuffle_buffer": d.block,
                "sources": [s.directory for s in d.sources]}

    def __iter__(self) -> Iterator[dict]:
        return iter(self._dl)

    def state_dict(self) -> dict:
        """Small dict of ints/strs/lists (``torch.load(weights_only=True)``-safe)."""
        return {"meta": self._meta(), "loader": self._dl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume; raises DataError when the data-parallel layout or the data differ."""
        meta, now = state.get("meta", {}), self._meta()
        for k in ("version", "dp_size", "dp_rank", "num_workers", "seq_length", "micro_batch_size", "seed",
                  "shuffle_buffer"):
            if meta.get(k) != now[k]:
                raise DataError(f"cannot resume the data loader: {k} was {meta.get(k)} when saved and is {now[k]} "
                                f"now; exact resume needs the same dp_size, num_workers, micro_batch_size, seed and "
                                f"shuffle_buffer")
        if len(meta.get("sources", [])) != len(now["sources"]):
            raise DataError(f"cannot resume the data loader: it read {len(meta.get('sources', []))} data sources, "
                            f"this run has {len(now['sources'])}")
        self._dl.load_state_dict(state["loader"])


def build_pretrain_loader(data_path: list[tuple[float, str]], seq_length: int, micro_batch_size: int, dp_rank: int,
                          dp_size: int, num_workers: int, seed: int, shuffle_buffer: int,
                          tokenizer_hash: str | None = None, verify: str = "sha256") -> PretrainLoader:
    """The training loader of one data-parallel rank (every TP/PP rank of the replica reads identically).

    Args:
        data_path: ``[(weight, directory), ...]`` from ``config.parse_data_path``.
        seq_length, micro_batch_size: batch shape ``[micro_batch_size, seq_length]``.
        dp_rank, dp_size: this replica's data-parallel rank and the data-parallel size.
        num_workers: DataLoader worker processes (0: read in this process).
        seed: seeds shard order, the shuffle buffer and blending.
        shuffle_buffer: samples per in-memory shuffle block.
        tokenizer_hash: checked against every manifest (None: not checked).
        verify: shard check at start, ``"sha256"``, ``"size"`` or ``"none"``.

    Returns:
        An iterable whose iterators yield ``{"tokens": LongTensor[micro_batch_size, seq_length]}`` forever.
    """
    sources = check_manifests(data_path, seq_length, tokenizer_hash, verify)
    ds = TokenShardDataset(sources, seq_length, micro_batch_size, dp_rank, dp_size, num_workers, seed,
                           shuffle_buffer, shuffle=True)
    return PretrainLoader(ds, num_workers)


class ValidLoader:
    """Deterministic validation batches: every ``iter()`` starts from the beginning; cycles forever."""

    def __init__(self, dataset: TokenShardDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict]:
        self.dataset.load_state_dict({"draws": 0, "sources": [[0, 0, 0] for _ in self.dataset.sources]})
        return iter(self.dataset)


def build_valid_loader(data_path: list[tuple[float, str]], seq_length: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, tokenizer_hash: str | None = None, verify: str = "size") -> ValidLoader:
    """The validation loader of one data-parallel rank: manifest order, no shuffle, in this process.

    ``data_path`` is validation data (``resolve_valid_path`` finds the split of a prepared directory).
    Blends use a fixed seed, so the batches are the same on every call.
    """
    sources = check_manifests(data_path, seq_length, tokenizer_hash, verify)
    ds = TokenShardDataset(sources, seq_length, micro_batch_size, dp_rank, dp_size, 0, 0, 1, shuffle=False)
    return ValidLoader(ds)




def verify_dataset(directory: str) -> dict:
    """Check a prepared dataset fully: checksums, and every sample decodes to valid ids.

    Returns:
        ``{directory: samples}`` for the dataset and its validation split. Raises DataError on a problem.
    """
    out = {}
    dirs = [directory]
    if fmt.read_manifest(directory).get("valid"):
        dirs.append(str(Path(directory) / fmt.read_manifest(directory)["valid"]))
    for d in dirs:
        m = fmt.read_manifest(d)
        check_manifests([(1.0, d)], m["seq_length"], None, "sha256")
        dtype = fmt.dtype_from_name(m["dtype"])
        dctx = zstandard.ZstdDecompressor()
        for s in m["shards"]:
            p = Path(d) / s["path"]
            n = 0
            with tarfile.open(p, "r:") as tar:
                for mem in tar:
                    if not mem.name.endswith("." + fmt.TOKENS_EXT):
                        continue
                    arr = np.frombuffer(dctx.decompress(tar.extractfile(mem).read()), dtype=dtype)
                    if len(arr) != m["seq_length"] or int(arr.max()) >= m["vocab_size"] or (arr == m["mask_id"]).any():
                        raise DataError(f"{p}: {mem.name}: {len(arr)} tokens, max id {int(arr.max())} "
                                        f"(expected {m['seq_length']} tokens, ids < {m['vocab_size']}, no mask id)")
                    n += 1
            if n != s["samples"]:
                raise DataError(f"{p}: {n} samples, manifest says {s['samples']}")
        out[d] = m["num_samples"]
    return out
