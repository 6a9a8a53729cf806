"""Instruction tuning: prepare-sft (formats, chat templates, bad input), the streamed loader, packing
(per-example loss vs examples one by one in float64, no attention across examples), and exact resume."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from dist import run_distributed

from megatron_mdm.data.chat import COMPLETION, CONTEXT, encode_example
from megatron_mdm.data.readers import InputError

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
S = 64
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from megatron_mdm.tokenization import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe_tokenizer([str(CORPUS)], 400, d, max_docs=300)
    return d


@pytest.fixture(scope="module")
def tok(tokdir):
    from megatron_mdm.tokenization import MDMTokenizer

    return MDMTokenizer.load(tokdir)


def _records(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "king", "queen", "sword", "rose", "of", "and", "is"]
    out = []
    for i in range(n):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        c = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": p},
                                     {"role": "assistant", "content": c}]})
        else:
            out.append({"prompt": p + "?", "completion": " " + c})
    return out


def _write(path, recs, extra_lines=()):
    lines = [json.dumps(r) for r in recs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---- formats and chat templates ----------------------------------------------------------------------


def _segments(ids, mask, value):
    """Runs of consecutive positions where mask == value, as id lists."""
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m == value:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


def test_default_format_masks_exactly_the_assistant_turns(tok):
    rec = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"},
                        {"role": "assistant", "content": "good morrow"}, {"role": "user", "content": "and then"},
                        {"role": "assistant", "content": "farewell"}]}
    ids, mask = encode_example(tok, rec, "default")
    eos = tok.eos_id
    assert _segments(ids, mask, COMPLETION) == [tok.encode("good morrow") + [eos], tok.encode("farewell") + [eos]]
    assert tok.decode(ids) == ("System: sys\nUser: hi there\nAssistant: good morrow" + tok.hf.eos_token +
                               "User: and then\nAssistant: farewell" + tok.hf.eos_token)
    pc_ids, pc_mask = encode_example(tok, {"prompt": "Who art thou?", "completion": " A friend."})
    assert pc_ids.tolist() == tok.encode("Who art thou?") + tok.encode(" A friend.") + [eos]
    assert (pc_mask == CONTEXT).sum() == len(tok.encode("Who art thou?"))


def test_chat_template_masks_exactly_the_assistant_turns(tokdir):
    from megatron_mdm.tokenization import MDMTokenizer

    tok = MDMTokenizer.load(tokdir)
    tok.hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.hf.chat_template = CHATML
    turns = [("user", "hi there"), ("assistant", "good morrow"), ("user", "and then"), ("assistant", "farewell")]
    rec = {"messages": [{"role": r, "content": c} for r, c in turns]}
    ids, mask = encode_example(tok, rec)
    # the whole text is the template's rendering; the loss runs are exactly "content<|im_end|>\n" of each
    # assistant turn (independent reference: the template string itself)
    assert tok.decode(ids) == tok.hf.apply_chat_template(rec["messages"], tokenize=False)
    runs = [tok.decode(s) for s in _segments(ids, mask, COMPLETION)]
    assert runs == ["good morrow<|im_end|>\n", "farewell<|im_end|>\n"]
    end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert sum(int(i == end) for i in ids[mask == COMPLETION]) == 2  # the end-of-turn token is one token
    default_ids, _ = encode_example(tok, rec, "default")
    assert tok.decode(default_ids).startswith("User: hi there\n")


# ---- prepare-sft: bad input, layouts, the loader --------------------------------------------------------


def test_prepare_sft_reports_bad_lines_and_keeps_every_other_example(tok, tokdir, tmp_path):
    from megatron_mdm.data.prepare_sft import prepare_sft

    good = _records(20)
    bad = [json.dumps({"prompt": "x"}), json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
           json.dumps({"prompt": "x", "completion": "  "}), json.dumps({"prompt": "word " * 60, "completion": "y"}),
           "{not json"]
    path = _write(tmp_path / "task.jsonl", good, bad)
    m = prepare_sft([path], str(tokdir), str(tmp_path / "out"), S)
    counts = m["report"]["counts"]
    assert m["sft"]["examples"] == 20 and m["num_documents"] == 20
    assert {k: counts[k] for k in ("missing_keys", "unknown_role", "empty_completion", "too_long",
                                   "malformed_json")} == dict.fromkeys(
        ("missing_keys", "unknown_role", "empty_completion", "too_long", "malformed_json"), 1)
    msgs = " ".join(m["report"]["messages"])
    for line, what in ((21, "missing_keys"), (22, "unknown_role: messages[0] has role 'robot'"),
                       (23, "empty_completion"), (24, "too_long: example of"), (25, "malformed_json")):
        assert f"task.jsonl:{line}: {what}" in msgs, msgs
    with pytest.raises(InputError, match=r"task.jsonl:21: missing_keys"):
        prepare_sft([path], str(tokdir), str(tmp_path / "strict"), S, strict=True)
    t = prepare_sft([path], str(tokdir), str(tmp_path / "trunc"), S, truncate=True, layout="padded")
    assert t["sft"]["examples"] == 21 and t["sft"]["truncated"] == 1 and t["num_samples"] == 21
    capped = prepare_sft([path], str(tokdir), str(tmp_path / "cap"), S, max_examples=7)
    assert capped["sft"]["examples"] == 7


def test_loader_streams_examples_with_their_masks_and_ids(tok, tokdir, tmp_path):
    from megatron_mdm.data.loader import build_pretrain_loader
    from megatron_mdm.data.prepare_sft import mixture_weights, prepare_sft

    recs = _records(40, seed=1)
    path = _write(tmp_path / "a.jsonl", recs)
    expected = {tuple(encode_example(tok, r)[0].tolist()): encode_example(tok, r)[1].tolist() for r in recs}
    for layout in ("packed", "padded"):
        out = tmp_path / layout
        m = prepare_sft([path], str(tokdir), str(out), S, layout=layout, shard_tokens=S * 5)
        assert len(m["shards"]) > 1
        n = m["num_samples"]
        loader = build_pretrain_loader([(1.0, str(out))], S, n, 1, 0, 1, num_workers=0, seed=0, shuffle="none")
        it = iter(loader)
        seen = []
        for _ in range(n):
            b = next(it)
            tokens, lm, ans, docs = (b[k][0] for k in ("tokens", "loss_mask", "answer_mask", "doc_ids"))
            assert torch.equal(lm != 0, ans | ((lm != 0) & ~ans))
            for d in range(int(docs.max()) + 1):
                sel = docs == d
                key = tuple(tokens[sel].tolist())
                if layout == "padded":  # the example, then EOS padding in the loss (not a completion token)
                    end = int(ans[sel].nonzero().max()) + 1
                    assert (tokens[sel][end:] == tok.eos_id).all() and (lm[sel][end:] == 1).all()
                    key = key[:end]
                    assert key in expected
                if key in expected:  # an example: its own tokens and mask, contiguous
                    assert ans[sel][:len(key)].long().tolist() == [int(v == COMPLETION) for v in expected[key]]
                    seen.append(key)
                else:  # EOS padding after the last example
                    assert (tokens[sel] == tok.eos_id).all() and d == int(docs.max())
                    assert bool((lm[sel] != 0).all()) == (layout == "padded")
        assert sorted(seen) == sorted(expected)  # every example exactly once
    w = mixture_weights([str(tmp_path / "packed"), str(tmp_path / "padded")], cap=10)
    # the blend draws sequences: 10 examples from each means weights in the ratio of sequences per example
    npk, npd = (json.loads((tmp_path / d / "manifest.json").read_text())["num_samples"] for d in ("packed", "padded"))
    assert abs(w[0][0] / w[1][0] - (10 * npk / 40) / (10 * npd / 40)) < 1e-9


def test_packing_refuses_what_it_cannot_do(monkeypatch):
    from megatron_mdm.config import Config, ConfigError
    from megatron_mdm.models import build
    from megatron_mdm.training.data import check_packing

    for field, value, msg in (("context_parallel_size", 2, "--context-parallel-size"),
                              ("pipeline_model_parallel_size", 2, "--pipeline-model-parallel-size")):
        cfg = Config()
        setattr(cfg.parallel, field, value)
        with pytest.raises(ConfigError, match=msg):
            check_packing(cfg)
    cfg = Config()
    cfg.model.transformer_impl = "transformer_engine"
    monkeypatch.setattr(build, "te_available", lambda: True)
    with pytest.raises(ConfigError, match="THD"):
        check_packing(cfg)


# ---- packing on the model (one gloo process) -----------------------------------------------------------


def packing_job(rank: int, world: int) -> dict:
    from jobs import MASK_ID, PAD_ID, VOCAB, tiny_cfg

    from megatron_mdm import runtime
    from megatron_mdm.models.build import build_model
    from megatron_mdm.objective import build_objective, document_attention_mask, mask_generator

    cfg = tiny_cfg()
    s = cfg.data.seq_length = 24
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(4)
    g = torch.Generator().manual_seed(7)
    lengths = [7, 9, 6]  # + 2 positions of padding (its own segment, out of the loss)
    docs = torch.tensor(sum(([i] * n for i, n in enumerate(lengths + [2])), []))[None]
    tokens = torch.randint(0, 90, (1, s), generator=g)
    loss_mask = torch.zeros(1, s)
    start = 0
    for n in lengths:  # the last 3..4 tokens of each example are its completion
        loss_mask[0, start + n - 3 - (n % 2):start + n] = 1
        start += n
    out = {}
    for name in ("mdm", "arm"):
        obj = build_objective(type(cfg.objective)(objective=name, random_length_prob=0.0), MASK_ID, PAD_ID)
        model = build_model(cfg, VOCAB, obj.causal)[0].eval()
        batch = obj.prepare(tokens, loss_mask, mask_generator(0, 0, 0), doc_ids=docs, answer_mask=loss_mask.bool())
        attn = document_attention_mask(docs)
        pos = torch.arange(s)[None]
        with torch.no_grad():
            logits = model(batch.inputs, pos, attn)
            ce = model(batch.inputs, pos, attn, labels=batch.labels)
            loss_sum, num = obj.loss(batch, ce)
            # no attention across examples: change example 1, examples 0 and 2 keep their logits exactly
            other = batch.inputs.clone()
            other[0, 7:16] = (other[0, 7:16] + 5) % 90
            changed = model(other, pos, attn)
            keep = docs[0] != 1
            out[f"{name}_others_diff"] = (changed[0, keep] - logits[0, keep]).abs().max().item()
            out[f"{name}_changed_diff"] = (changed[0, ~keep] - logits[0, ~keep]).abs().max().item()
            unmasked = model(other, pos, None)  # without the mask the change leaks (the test can fail)
            out[f"{name}_leak_without_mask"] = (unmasked[0, keep] - model(batch.inputs, pos, None)[0, keep]
                                                ).abs().max().item()
            # reference: each example alone, float64 cross-entropy, its own normaliser
            ref, start = 0.0, 0
            ts = []
            for n in lengths:
                sl = slice(start, start + n)
                x = batch.inputs[:, sl]
                lg = model(x, torch.arange(n)[None], None)[0].double()  # [n, V]
                y = tokens[0, sl]
                lm = loss_mask[0, sl]
                if name == "mdm":
                    t = float(batch.t[0, start])
                    ts.append(t)
                    assert torch.all(batch.t[0, sl] == t)
                    masked = (x[0] == MASK_ID).double()
                    nll = torch.nn.functional.cross_entropy(lg, y, reduction="none")
                    ref += float((nll * masked / t).sum() / lm.sum())
                else:  # next token within the example, target in the completion
                    nll = torch.nn.functional.cross_entropy(lg[:-1], y[1:], reduction="none")
                    w = lm[1:].double()
                    ref += float((nll * w).sum() / w.sum())
                start += n
            out[f"{name}_loss"] = (float(loss_sum), ref)
            out[f"{name}_num"] = int(num)
            out[f"{name}_distinct_t"] = len(set(ts))
    return out


@pytest.mark.dist
def test_packed_loss_is_the_sum_of_the_examples_and_attention_stays_inside():
    out = run_distributed(packing_job, 1)[0]
    for name in ("mdm", "arm"):
        got, ref = out[f"{name}_loss"]
        assert abs(got - ref) <= 1e-5 * abs(ref), (name, got, ref)
        assert out[f"{name}_num"] == 3  # the batch normaliser counts examples
        assert out[f"{name}_others_diff"] < 1e-6 and out[f"{name}_changed_diff"] > 1e-3, out
        assert out[f"{name}_leak_without_mask"] > 1e-4, out
    assert out["mdm_distinct_t"] == 3  # each example draws its own t


# ---- exact resume of an SFT run ------------------------------------------------------------------------


def sft_train_job(rank: int, world: int, data: str, overrides: dict) -> dict:
    from jobs import tiny_cfg

    from megatron_mdm import runtime
    from megatron_mdm.training.data import build_data
    from megatron_mdm.training.loop import Trainer

    cfg = tiny_cfg(tokenizer=f"{data}/tok", data_path=[f"{data}/sft"], num_workers=0, seq_length=S, **overrides)
    cfg.objective.random_length_prob = None  # resolved by build_data: off for instruction data
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    tok, loader, _ = build_data(cfg)
    trainer = Trainer(cfg, tok.vocab_size, tok.mask_id, tok.pad_id, loader)
    trainer.load()
    result = trainer.train()
    return {"losses": result["losses"], "completion": result.get("completion_losses"),
            "random_length_prob": cfg.objective.random_length_prob}


@pytest.mark.dist
@pytest.mark.slow
def test_sft_run_resumes_exactly(tokdir, tmp_path):
    from megatron_mdm.data.prepare_sft import prepare_sft

    (tmp_path / "tok").symlink_to(tokdir)
    prepare_sft([_write(tmp_path / "a.jsonl", _records(60, seed=2))], str(tokdir), str(tmp_path / "sft"), S)
    run = tmp_path / "run"
    full = run_distributed(sft_train_job, 1, str(tmp_path), {"train_iters": 4, "save": str(run), "save_interval": 2})[0]
    assert full["random_length_prob"] == 0.0 and len(full["completion"]) == 4
    assert all(np.isfinite(full["completion"])) and full["completion"] != full["losses"]
    again = run_distributed(sft_train_job, 1, str(tmp_path), {"train_iters": 4, "load": str(run),
                                                             "ckpt_iteration": 2})[0]
    assert again["losses"] == full["losses"][2:] and again["completion"] == full["completion"][2:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("completion_loss" in r for r in records if "loss" in r)


def test_cli_prepare_sft_and_mixture(tokdir, tmp_path, capsys):
    from megatron_mdm.cli.data import main

    path = _write(tmp_path / "t.jsonl", _records(12))
    assert main(["prepare-sft", "--input", path, "--tokenizer", str(tokdir), "--output", str(tmp_path / "o"),
                 "--seq-length", str(S), "--layout", "padded", "--max-examples", "5"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["num_samples"] == 5
    assert main(["mixture", str(tmp_path / "o"), "--cap", "3"]) == 0
    assert capsys.readouterr().out.split() == ["1", str(tmp_path / "o")]
    empty = _write(tmp_path / "e.jsonl", [{"prompt": "x"}])
    assert main(["prepare-sft", "--input", empty, "--tokenizer", str(tokdir), "--output", str(tmp_path / "e"),
                 "--seq-length", str(S)]) == 2  # a user error: exit 2, as every tool
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mdm-data: error: no example in") and "missing_keys" in err[-1]


def test_instruction_tuning_tasks_are_valid_sft_input(tok, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("it_run", REPO / "examples" / "instruction_tuning" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    files = run.build(tmp_path, per_task=15, seed=0)
    assert set(files) == set(run.TRAIN) | set(run.HELD_OUT)
    for task, path in files.items():
        recs = [json.loads(x) for x in Path(path).read_text().splitlines()]
        assert len(recs) == 15
        for r in recs:
            encode_example(tok, r)  # a valid prompt/completion record
            if task in run.HELD_OUT:
                assert r["completion"] in run.choices_of(task, r)
