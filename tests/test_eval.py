"""Tests of evaluation: HF loading, multiple-choice scoring, the CLIs and the lm-eval adapter (offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mdm.evaluation.multiple_choice import encode_pair, score_multiple_choice
from megatron_mdm.likelihood import chain_rule_loglik

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "a", "is", "red", "blue", "big"]
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[MASK]"]
REPO = Path(__file__).resolve().parents[1]


def make_hf_dir(path: Path, seed: int) -> Path:
    """A tiny random bidirectional BERT masked LM with a word-level tokenizer, saved as a HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab) + 4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    model = BertForMaskedLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf"), seed=int(torch.randint(0, 10_000, ())))


def test_load_logits_fn(hf_dir):
    from transformers import BertForMaskedLM

    from megatron_mdm.evaluation.loading import load_logits_fn

    fn, tok, mask_id, vocab_size = load_logits_fn(str(hf_dir))
    assert mask_id == SPECIALS.index("[MASK]") and vocab_size == len(SPECIALS) + len(WORDS)
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    assert ids[0].tolist() == [4 + WORDS.index(w) for w in ["the", "cat", "sat", "on", "the", "mat"]]
    ref = BertForMaskedLM.from_pretrained(hf_dir).eval()(input_ids=ids).logits
    assert torch.allclose(fn(ids), ref, atol=1e-6)
    assert tok.decode(ids[0].tolist()) == "the cat sat on the mat"


def test_score_multiple_choice_matches_manual(hf_dir):
    from megatron_mdm.evaluation.loading import load_logits_fn

    fn, tok, mask_id, vocab_size = load_logits_fn(str(hf_dir))
    examples = [("the cat sat on the", ["mat", "big red dog", "a"], 0), ("a dog", ["ran", "is blue"], 1),
                ("the", ["cat is red", "dog"], 1)]
    for norm in ("none", "token", "char"):
        r = score_multiple_choice(fn, tok.encode, examples, mask_id, method="chain", normalization=norm,
                                  vocab_size=vocab_size)
        correct = 0
        for (ctx, choices, gold), rec in zip(examples, r.per_example):
            manual = []
            for ch in choices:
                c_ids, x_ids = tok.encode(ctx), tok.encode(ch)
                ll = chain_rule_loglik(fn, c_ids, x_ids, mask_id, order="left_to_right", vocab_size=vocab_size).loglik
                manual.append(ll / {"none": 1, "token": len(x_ids), "char": len(ch)}[norm])
            assert rec["scores"] == pytest.approx(manual, rel=1e-9)
            correct += int(max(range(len(manual)), key=manual.__getitem__) == gold)
        acc = correct / 3
        assert r.accuracy == pytest.approx(acc)
        assert r.stderr == pytest.approx(math.sqrt(acc * (1 - acc) / 2))


def test_encode_pair_moves_trailing_space():
    enc = list  # characters as tokens
    assert encode_pair(enc, "ab ", "c") == (["a", "b"], [" ", "c"])


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_cli_eval_mc_elbo_and_generate(hf_dir, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"context": c, "choices": ch, "gold": g}) for c, ch, g in [
        ("the cat sat on the", ["mat", "dog"], 0), ("a red", ["cat", "blue dog"], 0)]) + "\n")
    out = tmp_path / "mc.json"
    stdout = _run(["megatron_mdm.cli.eval", "mc", "--model", str(hf_dir), "--data", str(data), "--num-samples",
                   "16", "--output", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert "accuracy" in stdout
    assert report["num_examples"] == 2 and 0.0 <= report["accuracy"] <= 1.0 and len(report["per_example"]) == 2

    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on the mat\na big dog ran\n")
    out = tmp_path / "elbo.json"
    _run(["megatron_mdm.cli.eval", "elbo", "--model", str(hf_dir), "--data", str(text), "--num-samples", "32",
          "--seq-length", "4", "--output", str(out)], tmp_path)
    r = json.loads(out.read_text())
    assert r["num_tokens"] == 10 and r["num_blocks"] == 3
    assert r["nll_per_token"] > 0 and math.isclose(r["perplexity_bound"], math.exp(r["nll_per_token"]))

    lines = _run(["megatron_mdm.cli.generate", "--model", str(hf_dir), "--prompt", "the cat", "--prompt", "a",
                  "--gen-length", "6", "--steps", "3", "--json", "--no-eos-stop"], tmp_path).splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["prompt"] for r in rows] == ["the cat", "a"]
    assert all(len(r["ids"]) == 6 and 3 not in r["ids"] and max(r["ids"]) < 16 for r in rows)


TASK_YAML = (Path(__file__).parent / "assets" / "lm_eval_mc_task.yaml").read_text()


@pytest.mark.slow
def test_lm_eval_adapter_offline(hf_dir, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps({"context": c, "choices": ch, "gold": g}) for c, ch, g in [
        ("the cat sat on the", ["mat", "dog"], 0), ("a red", ["cat", "blue dog"], 1),
        ("the dog", ["ran", "is big"], 0)]) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mdm_tiny_mc.yaml").write_text(TASK_YAML.format(task="mdm_tiny_mc", data=data))
    out = tmp_path / "lm_eval.json"
    stdout = _run(["megatron_mdm.cli.eval", "lm-eval", "--model", str(hf_dir), "--tasks", "mdm_tiny_mc",
                   "--include-path", str(tasks), "--method", "chain", "--output", str(out)], tmp_path)
    res = json.loads(out.read_text())["results"]["mdm_tiny_mc"]
    assert "mdm_tiny_mc" in stdout

    # the same accuracy from our own scorer (chain rule, no normalisation): the adapter adds nothing
    from megatron_mdm.evaluation.loading import load_logits_fn

    fn, tok, mask_id, vocab_size = load_logits_fn(str(hf_dir))
    examples = [(json.loads(x)["context"], json.loads(x)["choices"], json.loads(x)["gold"])
                for x in data.read_text().splitlines()]
    ours = score_multiple_choice(fn, tok.encode, [(c + " ", ch, g) for c, ch, g in examples], mask_id,
                                 method="chain", vocab_size=vocab_size)
    assert res["acc,none"] == pytest.approx(ours.accuracy)


@pytest.mark.slow
def test_lm_eval_adapter_rolling_and_generate(hf_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from megatron_mdm.evaluation.lm_eval_adapter import MDMLM

    assert get_model("mdm") is MDMLM  # importing the adapter registers the name
    lm = MDMLM.create_from_arg_string(f"pretrained={hf_dir},num_samples=8,steps=4,gen_length=4,seed=0")
    assert (lm.num_samples, lm.steps, lm.method) == (8, 4, "mc")
    req = Instance("loglikelihood_rolling", {}, ("the cat sat",), 0)
    a, b = lm.loglikelihood_rolling([req]), lm.loglikelihood_rolling([req])
    assert a == b and a[0] < 0
    gen = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["mat"], "max_gen_toks": 4}), 0)])
    assert isinstance(gen[0], str) and "mat" not in gen[0] and "[MASK]" not in gen[0]
