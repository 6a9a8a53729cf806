"""The pretraining and validation loaders: a map-style view of the global data order.

The order is ``megatron_mdm.data.order``: stream position ``p`` -> (source, sample) through the blend, the
per-epoch permutation and the data-parallel split, a function of (seed, consumed samples) alone. Reading is
``megatron_mdm.data.shards`` (random access through each shard's member index).

A data-parallel rank's loader yields, from its start position (the trainer's ``consumed_samples``), the
micro-batches of its contiguous part of each global batch, in order. Item ``m`` of the map-style
:class:`MicroBatches` is the rank's ``m``-th micro-batch; DataLoader workers only prefetch items (the
sampler hands them out in order and the DataLoader returns them in order), so the number of workers
changes nothing. Tensor- and pipeline-parallel ranks of one replica build the same loader and read
identically, without a broadcast.

State: :meth:`PretrainLoader.state_dict` describes the order (``seed``, ``seq_length``, the sources by
fingerprint, their weights, the shuffle mode), identical on every rank; the trainer adds
``consumed_samples`` and stores the dict once in the checkpoint. :meth:`PretrainLoader.load_state_dict`
resumes at ``consumed_samples`` on any layout and refuses a state whose order differs (naming the option)
unless it was built with ``override=True`` (``--override-data-state``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_mdm.data import format as fmt
from megatron_mdm.data.format import DataError
from megatron_mdm.data.order import Blend, Permutation, micro_batch_positions
from megatron_mdm.data.shards import SampleReader, Source, check_manifests, scan_shard_index

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DataOrder",
    "MicroBatches",
    "PretrainLoader",
    "Source",
    "ValidLoader",
    "build_pretrain_loader",
    "build_valid_loader",
    "check_manifests",
    "resolve_valid_path",
    "verify_dataset",
]

STATE_VERSION = 2
SHUFFLE_MODES = ("global", "none")
_CHUNK_POSITIONS = 2048  # the order is computed for this many positions at once (numpy overhead)


class DataOrder:
    """Stream positions -> (source, sample number within the source), for checked sources.

    Args:
        counts: samples per source.
        weights: blend weights (normalised or not).
        seed: seeds the per-epoch permutations.
        shuffle: ``"global"`` (a permutation of each source's epoch) or ``"none"`` (manifest order).
    """

    def __init__(self, counts: list[int], weights: list[float], seed: int, shuffle: str = "global") -> None:
        if shuffle not in SHUFFLE_MODES:
            raise DataError(f"--data-shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        if seed < 0:
            raise DataError(f"--seed must be >= 0 for the data order, got {seed}")
        self.counts = [int(n) for n in counts]
        self.blend = Blend(weights)
        self.seed, self.shuffle = int(seed), shuffle
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # global sample ids
        self._perms: dict[tuple[int, int], Permutation] = {}

    def _perm(self, src: int, epoch: int) -> Permutation:
        key = (src, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = Permutation(self.counts[src], (self.seed, src, epoch))
        return self._perms[key]

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, sample)`` int64 arrays shaped like ``positions``."""
        shape = np.shape(positions)
        src, k = self.blend.assign(np.asarray(positions).reshape(-1))
        sample = np.empty_like(k)
        for d in np.unique(src):
            sel = src == d
            epoch, j = np.divmod(k[sel], self.counts[d])
            if self.shuffle == "global":
                for e in np.unique(epoch):
                    at = epoch == e
                    j[at] = self._perm(int(d), int(e))(j[at])
            sample[sel] = j
        return src.reshape(shape), sample.reshape(shape)


class MicroBatches(Dataset):
    """Map-style: item ``m`` is the ``m``-th micro-batch a data-parallel rank reads from ``start``.

    Items are ``{"tokens": LongTensor[micro_batch, seq_length], "sample_ids": LongTensor[micro_batch]}``
    (``sample_ids``: the source's offset in the concatenation of all sources + the sample number), or
    ``{"error": message}`` when a sample is bad (so that a worker's DataError reaches the trainer as one line).
    Instruction data (``mdm-data prepare-sft``) adds ``loss_mask`` (FloatTensor, 1 where the loss is),
    ``answer_mask`` (BoolTensor, the completion tokens) and ``doc_ids`` (LongTensor, the example of each
    position, counted from 0 in each sequence), all ``[micro_batch, seq_length]``.
    """

    def __init__(self, sources: list[Source], order: DataOrder, start: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int) -> None:
        micro_batch_positions(start, 0, global_batch, micro_batch, dp_rank, dp_size)  # checks divisibility
        self.sources, self.order, self.start = sources, order, int(start)
        self.G, self.mbs, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.readers = [SampleReader(s) for s in sources]
        self.chunk = max(1, _CHUNK_POSITIONS // micro_batch)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def positions(self, m: int) -> np.ndarray:
        return micro_batch_positions(self.start, m, self.G, self.mbs, self.dp_rank, self.dp_size)

    def ids(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source [micro_batch], sample [micro_batch])`` of item ``m``."""
        c, i = divmod(m, self.chunk)
        if self._cached is None or self._cached[0] != c:
            step, mb = np.divmod(np.arange(c * self.chunk, (c + 1) * self.chunk), self.per_rank // self.mbs)
            first = self.start + step * self.G + self.dp_rank * self.per_rank + mb * self.mbs  # as positions()
            self._cached = (c, *self.order.samples(first[:, None] + np.arange(self.mbs)))
        return self._cached[1][i], self._cached[2][i]

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs the sampler's indices
        raise TypeError("MicroBatches is infinite")

    def __getitem__(self, m: int) -> dict:
        src, sample = self.ids(m)
        sft = self.sources[0].sft is not None
        try:
            if sft:
                rows = [self.readers[int(s)].read_sft(int(j)) for s, j in zip(src, sample)]
            else:
                rows = [self.readers[int(s)].read(int(j)) for s, j in zip(src, sample)]
        except DataError as e:
            return {"error": str(e)}
        out = {"sample_ids": torch.from_numpy(self.order.offsets[src] + sample)}
        if not sft:
            return dict(out, tokens=torch.from_numpy(np.stack(rows).astype(np.int64)))
        seq = np.arange(len(rows[0][0]))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64))
        docs = np.stack([np.searchsorted(r[2], seq, side="right") - 1 for r in rows])
        return dict(out, tokens=torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64)),
                    loss_mask=(mask != 0).float(), answer_mask=mask == 1, doc_ids=torch.from_numpy(docs))


class _Forever(Sampler):
    def __iter__(self) -> Iterator[int]:
        return count()


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, n))
"""What makes the trainer finish its step, save and exit (``training.loop``): a DataLoader worker ignores them."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a stop signal to the whole process group (a scheduler's SIGTERM/SIGUSR1,
    torchrun forwarding Ctrl-C as SIGINT, SIGHUP, SIGQUIT) must not kill the workers (the trainer, which gets
    it too, finishes the step, saves and exits; the workers end with it).

    A worker ignores these signals from anyone but its parent: a SIGTERM from the training process (the
    DataLoader's own ``terminate()`` at shutdown or at exit) still ends it. On Linux a thread waits for the
    blocked signals with ``sigwaitinfo`` to see the sender. Elsewhere (macOS) they are ignored, and a worker
    ends through the DataLoader's own shutdown only.
    """
    stop = set(STOP_SIGNALS)
    if not hasattr(signal, "sigwaitinfo"):
        for sig in stop:
            signal.signal(sig, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # threads started later inherit the mask

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo(stop)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(128 + signal.SIGTERM)  # what the default action would do (no handler may run here)

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()


class _Batches:
    """Iterator over micro-batches that turns an ``{"error": ...}`` item into a DataError: one line, also when
    the sample was read by a worker."""

    def __init__(self, items: Iterator[dict]) -> None:
        self._items = items

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict:
        b = next(self._items)
        if "error" in b:
            raise DataError(b["error"])
        return b


class PretrainLoader:
    """Training micro-batches of one data-parallel rank, from the position set by ``load_state_dict``.

    Args:
        sources: checked sources (``check_manifests``).
        seq_length, global_batch, micro_batch: the run's shapes; ``global_batch`` sets the rank's part of
            each step.
        dp_rank, dp_size: this replica's data-parallel rank and the data-parallel size.
        num_workers: DataLoader worker processes that prefetch (0: read in this process).
        seed: seeds the permutations.
        shuffle: ``"global"`` or ``"none"``.
        override: accept a saved state whose order differs (``--override-data-state``).
    """

    def __init__(self, sources: list[Source], seq_length: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, num_workers: int, seed: int, shuffle: str = "global", override: bool = False) -> None:
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if num_workers < 0:
            raise DataError(f"--num-workers must be >= 0, got {num_workers}")
        check_same_kind(sources)
        self.sources, self.seq_length = sources, seq_length
        self.order = DataOrder([s.num_samples for s in sources], [s.weight for s in sources], seed, shuffle)
        self.G, self.mbs, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size
        self.num_workers, self.override = num_workers, override
        self.consumed_samples = 0
        micro_batch_positions(0, 0, global_batch, micro_batch, dp_rank, dp_size)

    def dataset(self) -> MicroBatches:
        return MicroBatches(self.sources, self.order, self.consumed_samples, self.G, self.mbs, self.dp_rank,
                            self.dp_size)

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset()
        if self.num_workers == 0:
            return _Batches(ds[m] for m in count())
        dl = DataLoader(ds, batch_size=None, sampler=_Forever(), num_workers=self.num_workers,
                        worker_init_fn=ignore_stop_signals, persistent_workers=False)
        return _Batches(iter(dl))

    def state_dict(self) -> dict:
        """The order's description (without the position: the trainer adds ``consumed_samples``)."""
        return {"version": STATE_VERSION, "seed": self.order.seed, "seq_length": self.seq_length,
                "sources": [{"path": s.directory, "samples": s.num_samples, "fingerprint": s.fingerprint}
                            for s in self.sources],
                "weights": [float(s.weight) for s in self.sources], "shuffle": self.order.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Start at ``state["consumed_samples"]``; DataError when the saved order differs (unless override).

        A state holding only ``consumed_samples`` (a checkpoint from before the global order) is a position.
        """
        if "consumed_samples" not in state:
            raise DataError("loader state has no consumed_samples (the trainer adds it when saving)")
        c = int(state["consumed_samples"])
        problem = _order_difference(state, self.state_dict())
        if problem:
            if not self.override:
                raise DataError(f"cannot resume the data order exactly: {problem}; pass --override-data-state to "
                                f"continue from consumed sample {c} with this run's order")
            log.warning("--override-data-state: %s; continuing from consumed sample %d with this run's order",
                        problem, c)
        self.consumed_samples = c


def _order_difference(old: dict, now: dict) -> str | None:
    """The first difference between a saved state and this run's that changes the order, or None."""
    for key, flag in (("seed", "--seed"), ("seq_length", "--seq-length"), ("shuffle", "--data-shuffle")):
        if key in old and old[key] != now[key]:
            return f"{flag} was {old[key]} when saved and is {now[key]} now"
    if "sources" in old:
        before = [(s.get("samples"), s.get("fingerprint")) for s in old["sources"]]
        after = [(s["samples"], s["fingerprint"]) for s in now["sources"]]
        if before != after:
            return (f"--data-path read {[s.get('path') for s in old['sources']]} when saved and reads other data "
                    f"now ({[s['path'] for s in now['sources']]}: other shards, sample counts or order)")
        if "weights" in old and not np.allclose(old["weights"], now["weights"], rtol=0, atol=1e-9):
            return f"--data-path weights were {old['weights']} when saved and are {now['weights']} now"
    return None


def build_pretrain_loader(data_path: list[tuple[float, str]], seq_length: int, global_batch: int, micro_batch: int,
                          dp_rank: int, dp_size: int, num_workers: int, seed: int, shuffle: str = "global",
                          tokenizer_hash: str | None = None, verify: str = "sha256",
                          override: bool = False, vocab_size: int | None = None) -> PretrainLoader:
    """The training loader of one data-parallel rank, after checking every manifest, shard and index.

    Args:
        data_path: ``[(weight, directory), ...]`` from ``config.parse_data_path``.
        seq_length, global_batch, micro_batch: batch shapes (``global_batch`` divisible by dp x micro).
        dp_rank, dp_size: this replica's data-parallel rank and the data-parallel size.
        num_workers: DataLoader worker processes (0: read in this process).
        seed: seeds the permutations.
        shuffle: ``"global"`` (default) or ``"none"``.
        tokenizer_hash: checked against every manifest (None: not checked).
        verify: shard check at start, ``"sha256"``, ``"size"`` or ``"none"``.
        override: resume even when the saved order differs.
        vocab_size: the model tokenizer's vocabulary size, checked against every manifest (None: not checked).

    Returns:
        A :class:`PretrainLoader`; its iterators yield ``{"tokens": LongTensor[micro_batch, seq_length],
        "sample_ids": LongTensor[micro_batch]}`` forever.
    """
    sources = check_manifests(data_path, seq_length, tokenizer_hash, verify, vocab_size)
    return PretrainLoader(sources, seq_length, global_batch, micro_batch, dp_rank, dp_size, num_workers, seed,
                          shuffle, override)


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


def check_same_kind(sources: list[Source]) -> None:
    """Instruction datasets (prepare-sft) and pretraining datasets cannot be blended (no loss mask in one)."""
    kinds = {s.sft is not None for s in sources}
    if len(kinds) > 1:
        sft = [s.directory for s in sources if s.sft][:2]
        plain = [s.directory for s in sources if not s.sft][:2]
        raise DataError(f"--data-path blends instruction datasets ({', '.join(sft)}) with pretraining datasets "
                        f"({', '.join(plain)}): prepare all of them with mdm-data prepare-sft (or none)")


def is_sft(loader) -> str | None:
    """The instruction layout a loader reads (``"packed"``/``"padded"``), or None (pretraining data)."""
    sources = getattr(loader, "sources", None) or []
    layouts = {s.sft for s in sources}
    return "packed" if "packed" in layouts else next(iter(layouts), None)


class ValidLoader:
    """Deterministic validation micro-batches: manifest order, every ``iter()`` starts at the beginning.

    Data-parallel rank ``r`` reads micro-batch ``r`` of each group of ``dp_size`` (the same global split as
    training, with one micro-batch per rank per step), cycling over the data forever.
    """

    def __init__(self, sources: list[Source], micro_batch: int, dp_rank: int, dp_size: int) -> None:
        check_same_kind(sources)
        self.sources, self.mbs, self.dp_rank, self.dp_size = sources, micro_batch, dp_rank, dp_size
        order = DataOrder([s.num_samples for s in sources], [s.weight for s in sources], 0, "none")
        self.dataset = MicroBatches(sources, order, 0, micro_batch * dp_size, micro_batch, dp_rank, dp_size)

    def __iter__(self) -> Iterator[dict]:
        return _Batches(self.dataset[m] for m in count())


def build_valid_loader(data_path: list[tuple[float, str]], seq_length: int, micro_batch: int, dp_rank: int,
                       dp_size: int, tokenizer_hash: str | None = None, verify: str = "sha256",
                       vocab_size: int | None = None) -> ValidLoader:
    """The validation loader of one data-parallel rank, checked like training data (``verify``).

    ``data_path`` is validation data (``resolve_valid_path`` finds the split of a prepared directory).
    """
    sources = check_manifests(data_path, seq_length, tokenizer_hash, verify, vocab_size)
    return ValidLoader(sources, micro_batch, dp_rank, dp_size)


def verify_dataset(directory: str) -> dict:
    """Check a prepared dataset fully: checksums, indexes against the shards, every sample's ids.

    Returns:
        ``{directory: samples}`` for the dataset and its validation split. Raises DataError on a problem.
    """
    out = {}
    dirs = [directory]
    if fmt.read_manifest(directory).get("valid"):
        dirs.append(str(Path(directory) / fmt.read_manifest(directory)["valid"]))
    for d in dirs:
        m = fmt.read_manifest(d)
        (src,) = check_manifests([(1.0, d)], m["seq_length"], None, "sha256")
        for shard, ip in zip(src.shards, src.index_paths):
            if ip is not None and not np.array_equal(np.load(ip, allow_pickle=False), scan_shard_index(shard)):
                raise DataError(f"{ip}: index sidecar does not match the members of {shard}")
        reader = SampleReader(src)
        for j in range(src.num_samples):
            reader.read_sft(j) if src.sft else reader.read(j)
        reader.close()
        out[d] = m["num_samples"]
    return out
