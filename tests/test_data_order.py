"""The global order's pure pieces against brute force: the Feistel permutation is a bijection evaluable
pointwise at any size, the blend partitions the stream with the weights and random access equals
sequential evaluation, and the data-parallel split tiles each global batch in order."""

from collections import Counter

import numpy as np
import pytest

from megatron_mdm.data.order import MAX_POSITION, Blend, Permutation, micro_batch_positions


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 256, 257, 1000, 4097, 65537])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, (1234, 0, 3))
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n > 4:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, Permutation(n, (1234, 0, 4))(np.arange(n)))  # another epoch
    sub = np.random.default_rng(n).integers(0, n, 50)
    assert np.array_equal(p(sub), out[sub])  # pointwise evaluation


def test_permutation_scales_to_a_billion_samples_without_o_n_memory():
    n = 10**9
    p = Permutation(n, (7, 1, 0))
    x = np.random.default_rng(0).choice(n, 100_000, replace=False)
    y = p(x)
    assert y.min() >= 0 and y.max() < n and len(np.unique(y)) == len(y)  # injective on the sample
    assert p(np.array([n - 1, 0])).tolist() == [p(np.array([n - 1]))[0], p(np.array([0]))[0]]


def test_permutation_spreads_every_element_over_the_domain():
    """Over many keys, where element 0 lands is close to uniform (a weak test of the round function)."""
    n, keys = 16, 1000
    hits = Counter(int(Permutation(n, (k,))(np.array([0]))[0]) for k in range(keys))
    assert len(hits) == n and max(abs(c / keys - 1 / n) for c in hits.values()) < 0.04


@pytest.mark.parametrize("weights", [[1.0], [0.7, 0.3], [0.5, 0.5], [0.2, 0.0, 0.8], [3, 1, 1, 2, 0.5, 0.001],
                                     [0.9995, 0.0005]])
def test_blend_partitions_the_stream_with_the_weights(weights):
    b = Blend(weights)
    n = 20_000
    src, k = b.assign(np.arange(n))
    w = np.asarray(weights, float) / sum(weights)
    for d in range(len(weights)):
        mine = k[src == d]
        assert np.array_equal(mine, np.arange(len(mine)))  # each sample of a source once, in order
        counts = np.cumsum(src == d)  # after every prefix, the count is w * prefix up to the tree depth
        assert np.abs(counts - w[d] * np.arange(1, n + 1)).max() <= b.depth + 1e-6
        if w[d] == 0:
            assert len(mine) == 0
    pos = np.random.default_rng(0).integers(0, n, 300)
    s2, k2 = b.assign(pos)  # random access = sequential evaluation
    assert np.array_equal(s2, src[pos]) and np.array_equal(k2, k[pos])


def test_blend_far_into_the_stream():
    b = Blend([0.6, 0.3, 0.1])
    start = MAX_POSITION - 10_000
    src, k = b.assign(np.arange(start, start + 10_000))
    for d in range(3):
        mine = k[src == d]
        assert np.array_equal(mine, mine[0] + np.arange(len(mine)))  # consecutive, nothing skipped
        # shares are kept to 2**-24 per tree level: far out, that (not the interleave) bounds the error
        assert abs(mine[0] - [0.6, 0.3, 0.1][d] * start) <= b.depth + 1 + b.depth * start * 2**-24
    with pytest.raises(ValueError, match="2\\*\\*40"):
        b.assign(np.array([MAX_POSITION]))
    for bad in ([], [float("nan"), 1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="blend weights"):
            Blend(bad)


@pytest.mark.parametrize("dp, mbs", [(1, 16), (2, 4), (4, 1), (8, 2)])
def test_micro_batches_tile_each_global_batch_in_order(dp, mbs):
    G, start = 16, 48
    per_step = G // (dp * mbs)
    for step in range(3):
        got = [x for r in range(dp) for m in range(step * per_step, (step + 1) * per_step)
               for x in micro_batch_positions(start, m, G, mbs, r, dp).tolist()]
        assert got == list(range(start + step * G, start + (step + 1) * G))
    with pytest.raises(ValueError, match="not divisible"):
        micro_batch_positions(0, 0, 12, 4, 0, 2)


def test_loader_chunks_agree_with_the_position_formula():
    from megatron_mdm.data.loader import DataOrder, MicroBatches

    order = DataOrder([37, 11], [0.6, 0.4], seed=3)
    ds = MicroBatches([], order, start=80, global_batch=24, micro_batch=3, dp_rank=2, dp_size=4)
    ds.chunk = 5  # cross chunk boundaries
    for m in range(23):
        src, sample = ds.ids(m)
        s2, j2 = order.samples(micro_batch_positions(80, m, 24, 3, 2, 4))
        assert np.array_equal(src, s2) and np.array_equal(sample, j2)
