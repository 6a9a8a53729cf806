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


# ---- bad inputs: one line naming the flag or file, before the model loads --------------------------

def _errors(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    from megatron_mdm.cli import eval as ev
    from megatron_mdm.cli import generate as gen

    missing = tmp_path / "no_such_model"
    assert gen.main(["--model", str(missing), "--json"]) == 2
    assert _errors(capsys) == [f"mdm-generate: error: --model {missing}: no such directory"]
    assert ev.main(["elbo", "--model", str(missing), "--data", str(tmp_path / "x.txt")]) == 2
    assert _errors(capsys) == [f"mdm-eval: error: --model {missing}: no such directory"]
    (tmp_path / "file").write_text("x")
    assert gen.main(["--model", str(tmp_path / "file")]) == 2
    assert "is a file" in _errors(capsys)[0]


def test_hub_id_is_looked_up_offline_unless_allowed(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from megatron_mdm.cli.generate import main
    from megatron_mdm.evaluation.loading import looks_like_hub_id

    assert looks_like_hub_id("gpt2") and looks_like_hub_id("org/name-1.5b")
    assert not any(looks_like_hub_id(x) for x in ("./m", "/abs/m", "a/b/c", "~/m", "data.jsonl", "a/../b"))
    real, calls = huggingface_hub.snapshot_download, []

    def spy(**kw):  # an empty cache and an endpoint that refuses connections
        calls.append(kw["local_files_only"])
        return real(**kw, cache_dir=str(tmp_path / "cache"), endpoint="http://127.0.0.1:9", etag_timeout=1)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert main(["--model", "megatron-mdm-tests/no-such-model"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "no hub model" in err[0] and "--allow-download" in err[0]
    assert calls == [True]  # the cache only: no network without --allow-download
    assert main(["--model", "megatron-mdm-tests/no-such-model", "--allow-download"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "cannot download it from the Hugging Face hub" in err[0] and calls == [True, False]


def test_bad_model_directory_is_one_line(tmp_path):
    from megatron_mdm.evaluation.loading import EvalInputError, load_logits_fn

    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(EvalInputError, match="no config.json"):
        load_logits_fn(str(d))
    (d / "config.json").write_text('{"model_type": "bert",\n "vocab_size": }')
    with pytest.raises(EvalInputError, match=r"config.json:2: not valid JSON") as e:
        load_logits_fn(str(d))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cmd,content,where", [
    ("mc", '{"context": "a", "choices": ["b"], "gold": 0}\n{"context": "a", "choices": \n', ":2: not valid JSON"),
    ("mc", '\n{"context": "a", "choices": ["b", "c"], "gold": 2}\n', ":2: gold must be the index"),
    ("mc", '{"context": "a", "gold": 0}\n', ":1: expected an object of one of the forms"),
    ("mc", '{"context": "a", "choices": "b", "gold": 0}\n', ":1: context must be a string and choices"),
    ("elbo", '{"text": "the cat"}\n\n{"txt": "the dog"}\n', ":3: expected a JSON object with a string 'text'"),
    ("elbo", '{"text": "a"}\n[1, 2\n', ":2: not valid JSON"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, cmd, content, where):
    from megatron_mdm.cli.eval import main

    data = tmp_path / "data.jsonl"
    data.write_text(content)
    model = tmp_path / "model"
    model.mkdir()  # not a model: never opened, the data is checked first
    assert main([cmd, "--model", str(model), "--data", str(data)]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and err[0].startswith(f"mdm-eval: error: {data}{where}"), err
    assert main([cmd, "--model", str(model), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert _errors(capsys) == [f"mdm-eval: error: --data {tmp_path / 'none.jsonl'}: no such file"]


@pytest.mark.parametrize("cmd,name,content", [
    ("elbo", "data.txt", ""), ("elbo", "data.txt", "\n  \n\n"), ("elbo", "data.jsonl", "\n"), ("mc", "data.jsonl", ""),
])
def test_empty_data_file_is_one_line(tmp_path, capsys, cmd, name, content):
    """Hostile case (issue 21): ``mdm-eval`` on an empty data file loaded the model, then failed in a trace."""
    from megatron_mdm.cli.eval import main

    data = tmp_path / name
    data.write_text(content)
    model = tmp_path / "model"
    model.mkdir()  # not a model: never opened, the data is checked first
    assert main([cmd, "--model", str(model), "--data", str(data)]) == 2
    if cmd == "elbo":
        assert _errors(capsys) == [f"mdm-eval: error: --data {data}: holds no document to evaluate (an empty file, "
                                   "only blank lines, or --limit 0)"]
    else:  # the task file's reader names the file
        assert _errors(capsys) == [f"mdm-eval: error: {data}: holds no example to evaluate (an empty file or only "
                                   "blank lines)"]


def test_gold_written_as_float_or_string_still_reads(tmp_path):
    from megatron_mdm.evaluation.multiple_choice import load_jsonl_examples

    data = tmp_path / "mc.jsonl"
    data.write_text('{"context": "a", "choices": ["b", "c"], "gold": 1.0}\n{"context": "a", "choices": ["b"], '
                    '"gold": "0"}\n')
    assert load_jsonl_examples(str(data)) == [("a", ["b", "c"], 1), ("a", ["b"], 0)]


@pytest.mark.slow
def test_lm_eval_adapter_missing_model(tmp_path):
    pytest.importorskip("lm_eval")
    from megatron_mdm.evaluation.lm_eval_adapter import MDMLM
    from megatron_mdm.evaluation.loading import EvalInputError

    with pytest.raises(EvalInputError, match="no such directory"):
        MDMLM.create_from_arg_string(f"pretrained={tmp_path / 'nope'},trust_remote_code=False")


def test_tokenizer_beside_a_custom_code_config_loads_without_prompt(tmp_path, capsys):
    """An exported MDM has auto_map in config.json; its tokenizer is tokenizer.json only: no prompt, same ids."""
    from transformers import PreTrainedTokenizerFast

    from megatron_mdm.tokenization import MDMTokenizer

    d = make_hf_dir(tmp_path / "m", seed=1)
    (d / "config.json").write_text(json.dumps({"model_type": "not_in_transformers",
                                               "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    capsys.readouterr()
    tok = MDMTokenizer.load(d)
    out = capsys.readouterr()
    assert "[y/N]" not in out.out + out.err
    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert tok.encode("the cat sat on a mat") == ref.encode("the cat sat on a mat", add_special_tokens=False)
    assert tok.mask_id == SPECIALS.index("[MASK]")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoTokenizer": ["x.Tok", None]})))
    with pytest.raises(ValueError, match="asks for its own Python code"):
        MDMTokenizer.load(d)
