"""The pretraining loader: a global order independent of the layout, exact resume on any layout, blends,
the global shuffle, checks at start and when reading. Samples are compared with an independent reader
(tarfile + zstandard on the shards in manifest order)."""

import json
import logging
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from megatron_mdm.data import format as fmt
from megatron_mdm.data.loader import (
    DataError,
    build_pretrain_loader,
    build_valid_loader,
    check_manifests,
    resolve_valid_path,
)
from megatron_mdm.data.prepare import prepare
from megatron_mdm.data.writer import ShardWriter
from megatron_mdm.tokenization import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
S = 32
G = 16  # global batch of the layout tests


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


def _reference_rows(directory):
    """Every sample of a dataset in manifest order, read with tarfile and zstandard only."""
    m = json.loads((Path(directory) / "manifest.json").read_text())
    rows = []
    for s in m["shards"]:
        with tarfile.open(Path(directory) / s["path"]) as tar:
            for mem in tar:
                if mem.name.endswith(".tokens.zst"):
                    raw = zstandard.ZstdDecompressor().decompress(tar.extractfile(mem).read())
                    rows.append(tuple(np.frombuffer(raw, np.uint16).tolist()))
    return rows


def _blend(root):
    return [(0.7, str(root / "A")), (0.3, str(root / "B"))]


def _loader(data_path, dp_rank=0, dp_size=1, mbs=4, workers=0, seed=7, gbs=G, **kw):
    return build_pretrain_loader(data_path, S, gbs, mbs, dp_rank, dp_size, workers, seed, **kw)


def _global_batches(data_path, dp_size, mbs, workers, iters, start=0, state=None, **kw):
    """Per iteration, the sample ids of the global batch: rank 0's micro-batches, then rank 1's, ..."""
    per_rank = []
    for r in range(dp_size):
        loader = _loader(data_path, r, dp_size, mbs, workers, **kw)
        if state is not None:
            loader.load_state_dict(dict(state, consumed_samples=start))
        it = iter(loader)
        per_rank.append([[next(it) for _ in range(G // dp_size // mbs)] for _ in range(iters)])
        del it
    out = []
    for i in range(iters):
        out.append([x for r in range(dp_size) for b in per_rank[r][i] for x in b["sample_ids"].tolist()])
    return out, per_rank


def test_global_batches_identical_for_any_dp_micro_batch_and_workers(data):
    iters = 4
    blend = _blend(data)
    ref, ref_batches = _global_batches(blend, 1, G, 0, iters)
    rows = _reference_rows(data / "A") + _reference_rows(data / "B")  # sample id = offset of its source + number
    for i in range(iters):
        tokens = ref_batches[0][i][0]["tokens"]
        assert [tuple(t) for t in tokens.tolist()] == [rows[j] for j in ref[i]]
    assert len({x for b in ref for x in b}) == iters * G  # no sample twice within the first epoch
    for dp in (1, 2, 4):
        for mbs in (1, 2, 4):
            for workers in (0, 2):
                got, _ = _global_batches(blend, dp, mbs, workers, iters)
                assert got == ref, (dp, mbs, workers)


def test_resume_after_dp_change_continues_without_repeat_or_skip(data):
    blend = _blend(data)
    full, _ = _global_batches(blend, 2, 2, 0, 6)  # the uninterrupted run: DP2
    state = _loader(blend).state_dict()
    for dp, mbs, workers in ((1, 4, 0), (4, 1, 2)):
        rest, _ = _global_batches(blend, dp, mbs, workers, 3, start=3 * G, state=state)
        assert rest == full[3:], (dp, mbs, workers)
    seen = [x for b in full[:3] for x in b] + [x for b in rest for x in b]
    assert seen == [x for b in full for x in b]


def test_micro_batches_of_a_rank_are_its_contiguous_part_in_order(data):
    """DP rank r reads samples [i G + r G/D, i G + (r+1) G/D) of step i, micro-batch by micro-batch."""
    ref, _ = _global_batches([(1.0, str(data / "A"))], 1, G, 0, 2)
    _, per_rank = _global_batches([(1.0, str(data / "A"))], 4, 2, 0, 2)
    for i in range(2):
        for r in range(4):
            ids = [x for b in per_rank[r][i] for x in b["sample_ids"].tolist()]
            assert ids == ref[i][r * G // 4:(r + 1) * G // 4]


def test_global_shuffle_is_a_permutation_of_each_epoch(data):
    rows = _reference_rows(data / "A")
    n = len(rows)
    loader = _loader([(1.0, str(data / "A"))], mbs=1, gbs=1)
    it = iter(loader)
    batches = [next(it) for _ in range(2 * n)]
    e1 = [b["sample_ids"].item() for b in batches[:n]]
    e2 = [b["sample_ids"].item() for b in batches[n:]]
    assert sorted(e1) == sorted(e2) == list(range(n)) and e1 != e2 and e1 != sorted(e1)
    assert sorted(tuple(b["tokens"][0].tolist()) for b in batches[:n]) == sorted(rows)
    other = iter(_loader([(1.0, str(data / "A"))], mbs=1, gbs=1, seed=8))
    assert [next(other)["sample_ids"].item() for _ in range(n)] != e1  # the seed matters
    plain = iter(_loader([(1.0, str(data / "A"))], mbs=1, gbs=1, shuffle="none"))
    assert [tuple(next(plain)["tokens"][0].tolist()) for _ in range(n)] == rows


def test_blend_proportions(data):
    it = iter(_loader(_blend(data), mbs=8, gbs=8))
    n_a = n_b = 0
    n = len(_reference_rows(data / "A"))
    for _ in range(250):
        ids = next(it)["sample_ids"]
        n_a += int((ids < n).sum())
        n_b += int((ids >= n).sum())
    assert n_a + n_b == 2000 and abs(n_a / 2000 - 0.7) <= 3 / 2000  # the blend is exact up to its tree depth


def test_exact_resume_refusal_names_the_option(data, caplog):
    blend = _blend(data)
    state = dict(_loader(blend).state_dict(), consumed_samples=32)
    for change, option in (({"seed": 8}, "--seed"), ({"shuffle": "none"}, "--data-shuffle"),
                           ({"data_path": [(0.5, str(data / "A")), (0.5, str(data / "B"))]}, "--data-path weights"),
                           ({"data_path": [(1.0, str(data / "A"))]}, "--data-path")):
        kw = dict(change)
        with pytest.raises(DataError, match=f"cannot resume the data order exactly: {option}.*--override-data-state"):
            _loader(kw.pop("data_path", blend), **kw).load_state_dict(state)
    with pytest.raises(DataError, match="--seq-length was 64"):
        _loader(blend).load_state_dict(dict(state, seq_length=64))
    moved = data / "A_moved"  # the same data elsewhere is the same order
    shutil.copytree(data / "A", moved, dirs_exist_ok=True)
    _loader([(0.7, str(moved)), (0.3, str(data / "B"))]).load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        loader = _loader(blend, seed=8, override=True)
        loader.load_state_dict(state)
    assert "--override-data-state" in caplog.text and loader.consumed_samples == 32
    _loader(blend).load_state_dict({"consumed_samples": 8})  # a checkpoint from before: a position only


def test_valid_loader_restarts_cycles_and_is_verified(data, tmp_path):
    vp = resolve_valid_path([str(data / "A")])
    assert vp == [(1.0, str(data / "A" / "valid"))]
    rows = _reference_rows(data / "A" / "valid")
    v = build_valid_loader(vp, S, 2, 1, 2)  # rank 1 of 2 reads micro-batches 1, 3, 5, ...
    n = len(rows)
    first = [b["tokens"] for _, b in zip(range(n + 3), iter(v))]  # cycles past the end
    second = [b["tokens"] for _, b in zip(range(n + 3), iter(v))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    expect = [rows[(4 * m + 2 + j) % n] for m in range(3) for j in range(2)]
    assert [tuple(r) for b in first[:3] for r in b.tolist()] == expect
    with pytest.raises(DataError, match="no validation split"):
        resolve_valid_path([str(data / "B")])
    bad = tmp_path / "valid"
    shutil.copytree(data / "A" / "valid", bad)
    m = json.loads((bad / "manifest.json").read_text())
    shard = bad / m["shards"][0]["path"]
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1  # same size: only a checksum finds it
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{shard}: sha256 mismatch"):
        build_valid_loader([(1.0, str(bad))], S, 2, 0, 1)


def test_errors_before_training(data, tmp_path):
    from megatron_mdm.tokenization import MDMTokenizer

    tok = MDMTokenizer.load(data / "tok")
    check_manifests([(1.0, str(data / "A"))], S, tok.hash)
    with pytest.raises(DataError, match="no manifest"):
        _loader([(1.0, str(tmp_path))])
    with pytest.raises(DataError, match="--seq-length is 64"):
        build_pretrain_loader([(1.0, str(data / "A"))], 64, G, 4, 0, 1, 0, 7)
    with pytest.raises(DataError, match="tokenizer"):
        _loader([(1.0, str(data / "A"))], tokenizer_hash="0" * 64)
    _loader([(1.0, str(data / "A"))], tokenizer_hash=tok.hash, vocab_size=tok.vocab_size)
    edited = tmp_path / "vocab"
    shutil.copytree(data / "A", edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["vocab_size"] = 60000  # still uint16: only the model's vocabulary tells
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"{edited / 'manifest.json'}: vocab_size 60000, but the model's tokenizer"):
        build_valid_loader([(1.0, str(edited))], S, 2, 0, 1, tok.hash, vocab_size=tok.vocab_size)
    bad = tmp_path / "A"
    shutil.copytree(data / "A", bad)
    m = json.loads((bad / "manifest.json").read_text())
    shard = bad / m["shards"][0]["path"]
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 mismatch"):
        _loader([(1.0, str(bad))])
    _loader([(1.0, str(bad))], verify="size")  # size still matches
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        _loader([(1.0, str(bad))])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][1].update(samples=m["shards"][1]["samples"] - 1), "num_samples is"),
    (lambda m: (m["shards"][1].update(samples=m["shards"][1]["samples"] - 1), m.update(num_samples=m["num_samples"] - 1,
                num_tokens=(m["num_samples"] - 1) * S)), "19 in the manifest|the manifest says 19"),
    (lambda m: m.pop("dtype"), "dtype is None"),
    (lambda m: m.update(num_samples="many"), "num_samples is 'many'"),
    (lambda m: m["shards"][0].update(path="../elsewhere.tar"), r"shards\[0\].path"),
    (lambda m: m.update(mask_id=10**6), "mask_id"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
])
@pytest.mark.parametrize("indexed", [True, False])
def test_hand_edited_manifest_fails_at_start_naming_the_file(data, tmp_path, edit, message, indexed):
    d = tmp_path / "A"
    shutil.copytree(data / "A", d)
    m = json.loads((d / "manifest.json").read_text())
    if not indexed:  # prepared by an older version: no index sidecars
        for s in m["shards"]:
            (d / s.pop("index")["path"]).unlink()
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"{d / 'manifest.json'}: .*({message})"):
        _loader([(1.0, str(d))], workers=2)


def test_dataset_without_index_sidecars_reads_the_same(data, tmp_path, caplog):
    from megatron_mdm.cli.data import main as mdm_data

    d = tmp_path / "A"
    shutil.copytree(data / "A", d)
    m = json.loads((d / "manifest.json").read_text())
    records = [s.pop("index") for s in m["shards"]]
    for r in records:
        (d / r["path"]).unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.INFO):
        old = iter(_loader([(1.0, str(d))], workers=2))
    assert "no index sidecar" in caplog.text and "mdm-data index" in caplog.text
    new = iter(_loader([(1.0, str(data / "A"))], workers=2))
    for _ in range(6):
        a, b = next(old), next(new)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["sample_ids"], b["sample_ids"])
    assert mdm_data(["index", str(d)]) == 0
    assert [s["index"] for s in json.loads((d / "manifest.json").read_text())["shards"]] == records


def _bad_dataset(data, tmp_path, token, position=2):
    """A copy of A's manifest over 4 hand-written samples; sample ``position`` holds ``token``."""
    m = json.loads((data / "A" / "manifest.json").read_text())
    w = ShardWriter(tmp_path, "x", 10, np.uint16)
    for i in range(4):
        w.write(np.full(S, token if i == position else 7, np.int64))
    m["shards"] = w.close()
    m["valid"], m["num_samples"], m["num_tokens"] = None, 4, 4 * S
    fmt.write_json_atomic(tmp_path / "manifest.json", m)
    return m


def test_mask_id_never_yielded(data, tmp_path):
    m = _bad_dataset(data, tmp_path, json.loads((data / "A" / "manifest.json").read_text())["mask_id"])
    it = iter(build_valid_loader([(1.0, str(tmp_path))], S, 1, 0, 1))
    next(it), next(it)
    with pytest.raises(DataError, match=f"{tmp_path / m['shards'][0]['path']}: sample 2 contains the mask id"):
        next(it)


@pytest.mark.parametrize("workers", [0, 2])
def test_out_of_vocabulary_id_is_a_one_line_error_naming_shard_and_sample(data, tmp_path, workers):
    m = _bad_dataset(data, tmp_path, 400)  # the tokenizer has 400 ids: 0 .. 399
    it = iter(_loader([(1.0, str(tmp_path))], mbs=1, gbs=1, workers=workers, shuffle="none"))
    next(it), next(it)
    with pytest.raises(DataError) as e:
        next(it)
    assert str(e.value) == (f"{tmp_path / m['shards'][0]['path']}: sample 2 holds token id 400, outside the "
                            "vocabulary of 400 (corrupt shard)")
    _bad_dataset(data, tmp_path, 400, position=0)
    with pytest.raises(DataError, match="sample 0 holds token id 400"):  # the first sample is read at start
        check_manifests([(1.0, str(tmp_path))], S)
