"""MDMTokenizer: training, special tokens, hash stability, adding a mask to a foreign tokenizer, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.tokenization import (
    MDMTokenizer,
    padded_vocab_size,
    train_bpe_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([str(CORPUS)], 400, d, max_docs=800)
    return d


def test_trained_tokenizer_ids_and_round_trip(tok_dir):
    tok = MDMTokenizer.load(tok_dir)
    assert tok.vocab_size == 400
    ids = {tok.mask_id, tok.pad_id, tok.bos_id, tok.eos_id}
    assert len(ids) == 4 and max(ids) < tok.vocab_size
    text = "First Citizen:\nBefore we proceed any further, héar me speak. <|mask|> <|eos|>"
    enc = tok.encode(text)
    assert tok.mask_id not in enc and tok.eos_id not in enc  # special strings are plain text in data
    assert tok.decode(enc) == text
    assert tok.encode_batch([text, "ab"]) == [enc, tok.encode("ab")]


def test_hash_stable_across_save_load_and_autotokenizer(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = MDMTokenizer.load(tok_dir)
    tok.save(tmp_path / "copy")
    assert MDMTokenizer.load(tmp_path / "copy").hash == tok.hash
    assert MDMTokenizer.load(tok_dir / "tokenizer.json").hash == tok.hash
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert hf.mask_token_id == tok.mask_id and len(hf) == tok.vocab_size
    other = tmp_path / "other"
    train_bpe_tokenizer([str(CORPUS)], 380, other, max_docs=800)
    assert MDMTokenizer.load(other).hash != tok.hash


def test_foreign_tokenizer_gets_mask_pad_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["hello world"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    before = t.get_vocab_size()
    tok = MDMTokenizer.load(tmp_path / "tokenizer.json")
    assert tok.vocab_size == before + 3  # mask, pad, eos added
    assert {tok.mask_id, tok.pad_id, tok.eos_id} == {before, before + 1, before + 2}
    tok.save(tmp_path / "out")
    again = MDMTokenizer.load(tmp_path / "out")
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size and again.mask_id == tok.mask_id


@pytest.mark.parametrize("v,div,tp,want", [(400, 128, 1, 512), (512, 128, 1, 512), (513, 128, 2, 640),
                                           (32000, 128, 8, 32000), (100, 6, 4, 108), (1, 1, 1, 1)])
def test_padded_vocab_size(v, div, tp, want):
    # a multiple of lcm(divisible_by, TP): the same size for every TP dividing divisible_by
    assert padded_vocab_size(v, div, tp) == want
    assert want % div == 0 and want % tp == 0 and want - v < div * tp


def test_cli_train_inspect_and_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "t"
    r = subprocess.run(check=False, args=[sys.executable, str(REPO / "tokenizer" / "train_tokenizer.py"), "--input", str(CORPUS),
                        "--vocab-size", "300", "--output", str(out), "--max-docs", "300"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(check=False, args=[sys.executable, "-m", "megatron_mdm.cli.tokenizer", "inspect", str(out)],
                       capture_output=True, text=True, env=env)
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["vocab_size"] == 300 and info["round_trip_ok"]
    r = subprocess.run(check=False, args=[sys.executable, "-m", "megatron_mdm.cli.tokenizer", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
