"""The global data order: position ``p`` of the training stream -> (source, sample), evaluable anywhere.

A run reads one infinite stream of samples. Position ``p`` (0-based, counted in samples over the whole
run, so ``consumed_samples`` is the position of the next step) maps to a sample by three pure functions,
each evaluated at any position without replaying the stream from 0 and without O(N) arrays:

1. **Blend** (:class:`Blend`): which source position ``p`` reads, and how many earlier positions read the
   same source (``k``, the within-source index). Sources sit at the leaves of a balanced binary tree;
   each inner node splits the positions it receives between its left and right subtree with a Sturmian
   (Bresenham) sequence: the ``q``-th position of the node goes left iff
   ``floor((q + 1) a + 1/2) > floor(q a + 1/2)`` where ``a`` is the left subtree's share of the node's
   weight (a fixed-point fraction ``A / 2**24``), and it is then the ``floor(q a + 1/2)``-th position of the
   left child (else the ``q - floor(q a + 1/2)``-th of the right child). So after ``P`` positions each source
   has read within ``depth`` samples of ``w' * P``, ``w'`` the weight with its shares rounded to ``2**-24``
   (Megatron's ``BlendedDataset`` keeps within one sample with an error-minimising greedy that must be
   replayed from 0; this one is closed-form).
2. **Epochs and shuffle** (:class:`Permutation`): within-source index ``k`` is sample ``k mod N`` of epoch
   ``k // N``; with the global shuffle, sample ``j`` of an epoch is ``perm(j)`` with a seeded bijection of
   ``[0, N)`` drawn per ``(seed, source, epoch)``: a 6-round balanced Feistel network on ``2h`` bits
   (``4**h >= N``) with cycle-walking (values ``>= N`` are encrypted again until they fall in range).
3. **Data-parallel split** (:func:`micro_batch_positions`): the step that starts at position ``c`` (the
   consumed samples) covers ``[c, c + G)`` (``G`` the global batch); data-parallel rank ``r`` of ``D`` reads
   ``[c + r G / D, c + (r + 1) G / D)`` in order, cut into micro-batches in order.

The global batch of every step is therefore a function of (seed, consumed samples) alone: the same samples
in the same order for any data-parallel size, micro-batch size and number of loader workers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Blend", "Permutation", "micro_batch_positions"]

_FRAC_BITS = 24  # blend shares are fixed-point A / 2**24; positions must stay below 2**40
MAX_POSITION = 1 << 40
_HALF = np.uint64(1 << (_FRAC_BITS - 1))
_SHIFT = np.uint64(_FRAC_BITS)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 values (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of ``[0, n)``, evaluated pointwise in O(1) memory.

    Args:
        n: domain size (>= 1).
        key: integers seeding the round keys (e.g. ``(seed, source, epoch)``).
        rounds: Feistel rounds.
    """

    def __init__(self, n: int, key: tuple[int, ...], rounds: int = 6) -> None:
        if n < 1:
            raise ValueError(f"permutation of an empty domain (n={n})")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.h = (bits + 1) // 2  # half width: the Feistel domain is 4**h >= n
        self._h = np.uint64(self.h)
        self._mask = np.uint64((1 << self.h) - 1)
        self._keys = np.random.SeedSequence([int(k) for k in key]).generate_state(rounds, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._h, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._h) | right

    def __call__(self, j: np.ndarray) -> np.ndarray:
        """``perm(j)`` for an int array ``j`` with values in ``[0, n)``; returns int64."""
        x = self._encrypt(np.asarray(j, dtype=np.uint64).reshape(-1))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: at most a few rounds, the domain is < 4n
            x[out] = self._encrypt(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64).reshape(np.shape(j))


class Blend:
    """Deterministic weighted interleave of sources (see the module docstring).

    Args:
        weights: one non-negative weight per source, positive sum; a zero weight is never read.
    """

    def __init__(self, weights: list[float]) -> None:
        w = [float(x) for x in weights]
        if not w or any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"blend weights must be finite, non-negative, with a positive sum: {w}")
        self.num_sources = len(w)
        active = [i for i, x in enumerate(w) if x > 0]
        self._tree = self._build(active, w)

    def _build(self, ids: list[int], w: list[float]):
        if len(ids) == 1:
            return ids[0]
        mid = len(ids) // 2
        left, right = ids[:mid], ids[mid:]
        wl, wr = sum(w[i] for i in left), sum(w[i] for i in right)
        share = int(round(wl / (wl + wr) * (1 << _FRAC_BITS)))
        share = min(max(share, 1), (1 << _FRAC_BITS) - 1)  # both subtrees keep a (tiny) share
        return (np.uint64(share), self._build(left, w), self._build(right, w))

    @property
    def depth(self) -> int:
        def d(node) -> int:
            return 0 if isinstance(node, int) else 1 + max(d(node[1]), d(node[2]))

        return d(self._tree)

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source and within-source index of each position.

        Args:
            positions: int array of stream positions in ``[0, 2**40)``.

        Returns:
            ``(source [n] int64, k [n] int64)``: position ``p`` reads the ``k``-th sample of ``source``.
        """
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if p.size and (p.min() < 0 or p.max() >= MAX_POSITION):
            raise ValueError(f"stream positions must be in [0, 2**40), got [{p.min()}, {p.max()}]")
        src = np.zeros(p.size, np.int64)
        k = np.zeros(p.size, np.int64)
        self._descend(self._tree, p.astype(np.uint64), np.arange(p.size), src, k)
        return src, k

    def _descend(self, node, q: np.ndarray, where: np.ndarray, src: np.ndarray, k: np.ndarray) -> None:
        if isinstance(node, int):
            src[where] = node
            k[where] = q.astype(np.int64)
            return
        share, left, right = node
        before = (q * share + _HALF) >> _SHIFT  # positions of this node before q that went left
        goes_left = ((q + np.uint64(1)) * share + _HALF) >> _SHIFT > before
        self._descend(left, before[goes_left], where[goes_left], src, k)
        self._descend(right, (q - before)[~goes_left], where[~goes_left], src, k)


def micro_batch_positions(start: int, m: int, global_batch: int, micro_batch: int, dp_rank: int,
                          dp_size: int) -> np.ndarray:
    """Stream positions of the ``m``-th micro-batch a data-parallel rank reads from position ``start``.

    Args:
        start: the position where the rank starts reading (the consumed samples of a step boundary).
        m: micro-batch index since ``start`` (0, 1, ...; ``G / (D * micro_batch)`` of them per step).
        global_batch, micro_batch: ``G`` and the micro-batch size.
        dp_rank, dp_size: ``r`` and ``D``; ``G`` must be divisible by ``D * micro_batch``.

    Returns:
        int64 ``[micro_batch]``: ``start + step G + r G / D + mb * micro_batch + [0, micro_batch)`` with
        ``step, mb = divmod(m, G / (D * micro_batch))``.
    """
    per_rank = global_batch // dp_size
    if per_rank * dp_size != global_batch or per_rank % micro_batch:
        raise ValueError(f"global batch {global_batch} is not divisible by dp_size {dp_size} x micro batch "
                         f"{micro_batch}")
    step, mb = divmod(m, per_rank // micro_batch)
    first = start + step * global_batch + dp_rank * per_rank + mb * micro_batch
    return np.arange(first, first + micro_batch, dtype=np.int64)
