"""SFT data: prompt/completion encoding and loss mask, length errors, dp split, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from megatron_mdm.data.format import DataError
from megatron_mdm.data.sft import build_sft_loader, encode_prompt_completion
from megatron_mdm.tokenization import MDMTokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
S = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([str(REPO / "examples" / "data" / "tinyshakespeare.txt.zst")], 400, d, max_docs=800)
    return MDMTokenizer.load(d)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                     "completion": f" It is {2 * i}."}) + "\n" for i in range(37)))
    return str(p)


def test_encode_prompt_completion(tok):
    tokens, mask = encode_prompt_completion(tok, "Who art thou?", " A friend.", S)
    p, c = tok.encode("Who art thou?"), tok.encode(" A friend.")
    assert tokens.shape == mask.shape == (S,) and tokens.dtype == torch.long and mask.dtype == torch.float32
    assert tokens[: len(p) + len(c)].tolist() == p + c
    assert (tokens[len(p) + len(c):] == tok.eos_id).all()  # EOS, then EOS padding
    assert mask[: len(p)].sum() == 0 and (mask[len(p):] == 1).all()
    with pytest.raises(DataError, match="longer than seq_length"):
        encode_prompt_completion(tok, "x " * 40, "y " * 40, S)
    with pytest.raises(DataError, match="empty 'completion'"):
        encode_prompt_completion(tok, "x", " ", S)


def test_loader_split_and_resume(tok, sft_file):
    n = 37
    seen = []
    for r in range(2):
        it = iter(build_sft_loader([sft_file], tok, S, 1, r, 2, seed=3))
        seen += [tuple(next(it)["tokens"][0].tolist()) for _ in range(n // 2)]
    assert len(set(seen)) == len(seen) == 2 * (n // 2)  # ranks disjoint within an epoch
    loader = build_sft_loader([sft_file], tok, S, 4, 0, 1, seed=3)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = dict(loader.state_dict(), consumed_samples=3 * 4)  # the trainer adds its consumed samples
    rest = [next(it) for _ in range(15)]  # crosses epochs
    fresh = build_sft_loader([sft_file], tok, S, 2, 0, 1, seed=3)  # another micro-batch size: same samples
    fresh.load_state_dict(state)
    it2 = iter(fresh)
    for a in rest:
        x, y = next(it2), next(it2)
        for k in ("tokens", "loss_mask"):
            assert torch.equal(a[k], torch.cat([x[k], y[k]]))
    with pytest.raises(DataError, match="dp_size was 1 when saved and is 2 now.*--override-data-state"):
        build_sft_loader([sft_file], tok, S, 4, 0, 2, seed=3).load_state_dict(state)
    build_sft_loader([sft_file], tok, S, 4, 0, 2, seed=3, override=True).load_state_dict(state)
    assert rest[0]["tokens"].shape == (4, S) and rest[0]["loss_mask"].dtype == torch.float32


def test_errors_name_file_and_line(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" +
                 json.dumps({"prompt": "word " * 60, "completion": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: example of \d+ tokens"):
        build_sft_loader([str(p)], tok, S, 1, 0, 1, seed=0)
    p.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected string fields"):
        build_sft_loader([str(p)], tok, S, 1, 0, 1, seed=0)
