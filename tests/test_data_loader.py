"""The pretraining loader: exact resume (with workers), epoch coverage over dp ranks, blending, errors."""

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mdm.data.loader import (
    DataError,
    build_pretrain_loader,
    build_valid_loader,
    check_manifests,
    resolve_valid_path,
)
from megatron_mdm.data.prepare import prepare
from megatron_mdm.tokenization import MDMTokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
S = 32


def _write(path, words, n, seed):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))}) + "\n"
                            for _ in range(n)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two datasets with disjoint vocabularies (to tell samples apart) and a tokenizer."""
    root = tmp_path_factory.mktemp("loader")
    train_bpe_tokenizer([str(CORPUS)], 400, root / "tok", max_docs=800)
    _write(root / "a.jsonl", ["apple", "banana", "cherry", "date", "elder", "fig", "grape"], 300, 1)
    _write(root / "b.jsonl", ["ZULU", "YANKEE", "XRAY", "WHISKEY", "VICTOR"], 300, 2)
    prepare([str(root / "a.jsonl")], str(root / "tok"), str(root / "A"), S, shard_tokens=S * 20, val_fraction=0.1)
    prepare([str(root / "b.jsonl")], str(root / "tok"), str(root / "B"), S, shard_tokens=S * 20)
    return root


def _args(root, **kw):
    a = {"data_path": [(1.0, str(root / "A"))], "seq_length": S, "micro_batch_size": 4, "dp_rank": 0,
         "dp_size": 1, "num_workers": 0, "seed": 7, "shuffle_buffer": 16}
    a.update(kw)
    return a


def _dataset_rows(directory):
    """Every sample of a dataset, in manifest order, via the non-shuffled validation loader."""
    m = json.loads((Path(directory) / "manifest.json").read_text())
    it = iter(build_valid_loader([(1.0, str(directory))], S, 1, 0, 1))
    return [tuple(next(it)["tokens"][0].tolist()) for _ in range(m["num_samples"])]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_exact(data, workers):
    args = _args(data, num_workers=workers)
    loader = build_pretrain_loader(**args)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = _roundtrip(loader.state_dict())
    rest = [next(it)["tokens"] for _ in range(40)]  # crosses blocks and an epoch
    fresh = build_pretrain_loader(**args)
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    again = [next(it2)["tokens"] for _ in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again))
    assert rest[0].shape == (4, S) and rest[0].dtype == torch.long


def test_epoch_covered_once_over_dp_ranks(data):
    rows = _dataset_rows(data / "A")
    n = len(rows)
    seen = []
    for r in range(3):
        it = iter(build_pretrain_loader(**_args(data, micro_batch_size=1, dp_rank=r, dp_size=3)))
        seen += [tuple(next(it)["tokens"][0].tolist()) for _ in range(len(range(r, n, 3)))]
    assert sorted(seen) == sorted(rows)  # each sample once, none skipped
    it = iter(build_pretrain_loader(**_args(data, micro_batch_size=1)))
    e1 = [tuple(next(it)["tokens"][0].tolist()) for _ in range(n)]
    e2 = [tuple(next(it)["tokens"][0].tolist()) for _ in range(n)]
    assert sorted(e1) == sorted(e2) == sorted(rows) and e1 != e2 and e1 != rows  # new order per epoch


def test_workers_and_ranks_do_not_overlap(data):
    rows = set(_dataset_rows(data / "A"))
    n = len(rows)
    seen = []
    for r in range(2):
        it = iter(build_pretrain_loader(**_args(data, micro_batch_size=1, dp_rank=r, dp_size=2, num_workers=2)))
        seen += [tuple(next(it)["tokens"][0].tolist()) for _ in range(2 * (n // 4))]
    assert len(set(seen)) == len(seen) and set(seen) <= rows


def test_same_dp_rank_reads_identically(data):
    a, b = iter(build_pretrain_loader(**_args(data))), iter(build_pretrain_loader(**_args(data)))
    assert all(torch.equal(next(a)["tokens"], next(b)["tokens"]) for _ in range(5))


def test_blend_ratio(data):
    tok = MDMTokenizer.load(data / "tok")
    args = _args(data, data_path=[(0.75, str(data / "A")), (0.25, str(data / "B"))], micro_batch_size=8)
    it = iter(build_pretrain_loader(**args))
    n_a = n_b = 0
    for _ in range(100):
        for row in next(it)["tokens"].tolist():
            text = tok.decode(row, skip_special_tokens=True)
            low, up = any(c.islower() for c in text), any(c.isupper() for c in text)
            n_a += low and not up
            n_b += up and not low
    assert n_a + n_b > 780 and abs(n_a / (n_a + n_b) - 0.75) < 0.05


def test_valid_loader_restarts_and_cycles(data):
    vp = resolve_valid_path([str(data / "A")])
    assert vp == [(1.0, str(data / "A" / "valid"))]
    v = build_valid_loader(vp, S, 2, 0, 1)
    n = json.loads((data / "A" / "valid" / "manifest.json").read_text())["num_samples"]
    first = [b["tokens"] for _, b in zip(range(n + 3), iter(v))]  # cycles past the end
    second = [b["tokens"] for _, b in zip(range(n + 3), iter(v))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(DataError, match="no validation split"):
        resolve_valid_path([str(data / "B")])


def test_errors_before_training(data, tmp_path):
    tok = MDMTokenizer.load(data / "tok")
    check_manifests([(1.0, str(data / "A"))], S, tok.hash)
    with pytest.raises(DataError, match="no manifest"):
        build_pretrain_loader(**_args(data, data_path=[(1.0, str(tmp_path))]))
    with pytest.raises(DataError, match="--seq-length is 64"):
        build_pretrain_loader(**_args(data, seq_length=64))
    with pytest.raises(DataError, match="tokenizer"):
        build_pretrain_loader(**_args(data), tokenizer_hash="0" * 64)
    bad = tmp_path / "A"
    shutil.copytree(data / "A", bad)
    m = json.loads((bad / "manifest.json").read_text())
    shard = bad / m["shards"][0]["path"]
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 mismatch"):
        build_pretrain_loader(**_args(data, data_path=[(1.0, str(bad))]))
    build_pretrain_loader(**_args(data, data_path=[(1.0, str(bad))]), verify="size")  # size still matches
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        build_pretrain_loader(**_args(data, data_path=[(1.0, str(bad))]))


def test_resume_with_other_layout_refused(data):
    loader = build_pretrain_loader(**_args(data, num_workers=0))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    for change in ({"num_workers": 2}, {"dp_size": 2}):
        other = build_pretrain_loader(**_args(data, **change))
        with pytest.raises(DataError, match=next(iter(change))):
            other.load_state_dict(state)


def test_mask_id_never_yielded(data, tmp_path):
    from megatron_mdm.data import format as fmt
    from megatron_mdm.data.writer import ShardWriter

    m = json.loads((data / "A" / "manifest.json").read_text())
    w = ShardWriter(tmp_path, "x", 10, np.uint16)
    for i in range(4):
        w.write(np.full(S, m["mask_id"] if i == 2 else 7, np.int64))
    m["shards"] = w.close()
    m["valid"] = None
    fmt.write_json_atomic(tmp_path / "manifest.json", m)
    it = iter(build_valid_loader([(1.0, str(tmp_path))], S, 1, 0, 1))
    next(it), next(it)
    with pytest.raises(DataError, match="mask id"):
        next(it)
