"""The lm-eval adapter ``mdm``: batched requests equal one-at-a-time ones, request order, sampler settings from
``--model_args``, and few-shot / chat-template runs through ``lm_eval.simple_evaluate`` on tiny local tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from test_eval import WORDS, make_hf_dir  # noqa: E402

from megatron_mdm.decoding.settings import DecodingConfig  # noqa: E402
from megatron_mdm.evaluation.lm_eval_adapter import MDMLM  # noqa: E402
from megatron_mdm.evaluation.loading import EvalInputError  # noqa: E402
from megatron_mdm.evaluation.multiple_choice import encode_pair  # noqa: E402
from megatron_mdm.likelihood import chain_rule_loglik, mc_conditional_loglik, mc_elbo  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
# a small chat template (its markers are unknown words to the tiny tokenizer: [UNK] tokens)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}BOT: {% else %}USER: {% endif %}"
                 "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}BOT: {% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = make_hf_dir(tmp_path_factory.mktemp("hf"), seed=int(torch.randint(0, 10_000, ())))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _requests(n: int, seed: int) -> list[Instance]:
    """Fresh random (context, continuation) pairs; a few contexts repeat (choices of one question)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ctx = out[-1].args[0] if out and rng.random() < 0.3 else _words(rng, 0, 4)
        out.append(Instance("loglikelihood", {}, (ctx, " " + _words(rng, 1, 3)), i))
    return out


@pytest.mark.parametrize("method,order", [("mc", "left_to_right"), ("chain", "left_to_right"), ("chain", "greedy")])
def test_batched_loglikelihood_equals_one_at_a_time(hf_dir, method, order):
    seed = int(torch.randint(0, 10_000, ()))
    args = f"pretrained={hf_dir},method={method},order={order},num_samples=6,seed={seed},cfg_scale=0.5"
    batched = MDMLM.create_from_arg_string(args + ",batch_size=7")  # forwards shared by several requests
    single = MDMLM.create_from_arg_string(args + ",batch_size=1")
    reqs = _requests(14, seed)
    got = batched.loglikelihood(reqs)
    alone = [single.loglikelihood([r], disable_tqdm=True)[0] for r in reqs]
    shuffled = list(range(len(reqs)))
    random.Random(seed).shuffle(shuffled)
    again = batched.loglikelihood([reqs[i] for i in shuffled], disable_tqdm=True)
    for k, i in enumerate(shuffled):  # results come back in request order, whatever that order is
        assert again[k][0] == pytest.approx(got[i][0], rel=1e-6) and again[k][1] == got[i][1]
    fn, tok = batched.logits_fn, batched.tokenizer
    for r, (ll, greedy), (ll1, greedy1) in zip(reqs, got, alone):
        ctx, cont = encode_pair(tok.encode, *r.args)
        if method == "mc":  # the single-request estimator with the request's own generator
            ref = mc_conditional_loglik(fn, ctx, cont, batched.mask_id, 6, generator=batched.request_generator(
                ctx, len(cont)), vocab_size=batched.vocab_size, cfg_scale=0.5)
        else:
            ref = chain_rule_loglik(fn, ctx, cont, batched.mask_id, order=order, cfg_scale=0.5,
                                    vocab_size=batched.vocab_size)
        assert ll == pytest.approx(ref.loglik, rel=1e-6) and ll1 == pytest.approx(ref.loglik, rel=1e-6)
        assert greedy == greedy1 == ref.is_greedy


def test_batched_rolling_equals_elbo_per_window(hf_dir):
    lm = MDMLM.create_from_arg_string(f"pretrained={hf_dir},num_samples=5,batch_size=4,max_length=4,seed=3")
    rng = random.Random(int(torch.randint(0, 10_000, ())))
    texts = [_words(rng, 1, 9) for _ in range(5)]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for text, value in zip(texts, got):
        ids = lm.tokenizer.encode(text)
        ref = 0.0
        for w, start in enumerate(range(0, len(ids), 4)):
            window = ids[start : start + 4]
            r = mc_elbo(lm.logits_fn, torch.tensor([window]), lm.mask_id, 5, t_sampling="antithetic",
                        generator=lm.request_generator(window, w), vocab_size=lm.vocab_size)
            ref -= float(r.nll_per_token[0]) * len(window)
        assert value == pytest.approx(ref, rel=1e-6)


def test_batched_generate_until_equals_unbatched(hf_dir):
    from megatron_mdm.decoding import generate

    rng = random.Random(int(torch.randint(0, 10_000, ())))
    reqs = [Instance("generate_until", {}, (_words(rng, 1, 4), {"until": ["mat"] if i % 2 else ["."],
                                                                 "max_gen_toks": 4 + 4 * (i % 2)}), i)
            for i in range(7)]
    args = f"pretrained={hf_dir},steps=4,block_length=4,seed=0"
    batched = MDMLM.create_from_arg_string(args + ",batch_size=3")
    got = batched.generate_until(reqs)
    single = MDMLM.create_from_arg_string(args + ",batch_size=1")
    assert got == [single.generate_until([r], disable_tqdm=True)[0] for r in reqs]
    tok = batched.tokenizer
    for r, text in zip(reqs, got):  # the sampler on that prompt alone, cut at the stop string
        n = r.args[1]["max_gen_toks"]
        ids = generate(batched.logits_fn, [tok.encode(r.args[0])], n, 4, batched.mask_id, block_length=4,
                       eos_id=tok.eos_id, vocab_size=batched.vocab_size).completions()[0]
        ref = tok.decode(ids)
        stop = r.args[1]["until"][0]
        assert text == (ref[: ref.index(stop)] if stop in ref else ref)


def test_model_args_reach_the_sampler(hf_dir, monkeypatch):
    from megatron_mdm.cli.eval import model_args
    from megatron_mdm.decoding import GenerationOutput
    from megatron_mdm.evaluation import lm_eval_adapter

    seen = []

    def spy(*a, **kw):  # records the settings, returns "the" at every position
        seen.append((a, kw))
        prompts, n = a[1], a[2].gen_length
        return GenerationOutput(torch.full((len(prompts), max(map(len, prompts)) + n), 4), [len(p) for p in prompts], n)

    monkeypatch.setattr(lm_eval_adapter, "decode", spy)
    lm = MDMLM.create_from_arg_string(
        f"pretrained={hf_dir},steps=8,gen_length=8,block_length=4,cfg_scale=0.5,temperature=0.7,remasking=margin,"
        "cache=dual,threshold=0.9,refresh_interval=2,seed=5,top_k=3")
    out = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["."]}), 0)], disable_tqdm=True)
    assert out == [" ".join(["the"] * 8)]
    (a, kw), = seen
    assert a[3] == lm.mask_id and a[2] == DecodingConfig(
        gen_length=8, steps=8, block_length=4, cfg_scale=0.5, temperature=0.7, remasking="margin", cache="dual",
        threshold=0.9, refresh_interval=2, top_k=3)
    seen.clear()
    lm = MDMLM.create_from_arg_string(f"pretrained={hf_dir},steps=4,gen_length=8,factor=1.5,block_length=2")
    lm.generate_until([Instance("generate_until", {}, ("a", {"max_gen_toks": 4, "do_sample": False}), 0)],
                      disable_tqdm=True)
    (a, kw), = seen
    d = a[2]
    assert (d.gen_length, d.steps) == (4, 4) and (d.factor, d.threshold, d.block_length, d.temperature) == (
        1.5, None, 2, 0.0)
    # a task's (or --gen_kwargs') generation kwargs override the model args per request
    seen.clear()
    lm.generate_until([Instance("generate_until", {}, ("a", {"max_gen_toks": 8, "steps": "8", "cache": "prefix",
                                                            "block_length": 4, "factor": None}), 0)],
                      disable_tqdm=True)
    (a, kw), = seen
    assert a[2] == DecodingConfig(gen_length=8, steps=8, block_length=4, cache="prefix")
    # likelihood settings: MC draws per request
    assert MDMLM.create_from_arg_string(f"pretrained={hf_dir},num_samples=3,eps=0.01").num_samples == 3
    # bad settings: one line naming the setting, before the model loads
    with pytest.raises(EvalInputError, match="block_length"):
        MDMLM.create_from_arg_string("pretrained=/nonexistent,gen_length=8,block_length=3")
    with pytest.raises(EvalInputError, match="stepz"):
        model_args("steps=4,stepz=8", MDMLM)
    assert model_args("steps=4,cache=prefix", MDMLM) == {"steps": 4, "cache": "prefix"}


def _task(tmp_path: Path, kind: str) -> Path:
    """A local task folder: ``mc`` (multiple choice) or ``gen`` (generate_until), on fresh random data."""
    rng = random.Random(int(torch.randint(0, 10_000, ())))
    if kind == "mc":
        rows = [{"context": _words(rng, 1, 3), "choices": [_words(rng, 1, 2), _words(rng, 1, 2)],
                 "gold": rng.randint(0, 1)} for _ in range(4)]
    else:
        rows = [{"question": _words(rng, 1, 3), "answer": _words(rng, 1, 2)} for _ in range(4)]
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    yaml = (ASSETS / f"lm_eval_{kind}_task.yaml").read_text().format(task=f"tiny_{kind}", data=data)
    (tasks / f"tiny_{kind}.yaml").write_text(yaml)
    return tasks


@pytest.mark.slow
def test_fewshot_and_chat_template_through_simple_evaluate(hf_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = _task(tmp_path, "mc")
    _task(tmp_path, "gen")
    lm = MDMLM.create_from_arg_string(f"pretrained={hf_dir},method=chain,steps=4,gen_length=4,batch_size=8,"
                                      "progress=false")
    tm = TaskManager(include_path=str(tasks))
    for chat in (False, True):
        res = lm_eval.simple_evaluate(
            model=lm, tasks=["tiny_mc", "tiny_gen"], task_manager=tm, num_fewshot=2, apply_chat_template=chat,
            fewshot_as_multiturn=chat, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0)
        assert res["n-shot"] == {"tiny_mc": 2, "tiny_gen": 2}
        for s in res["samples"]["tiny_mc"]:
            ctx = s["arguments"][0][0]
            if chat:  # two shots as user/assistant turns, then the question and the generation prompt
                assert (ctx.count("USER: "), ctx.count("BOT: ")) == (3, 3) and ctx.endswith("BOT: ")
            else:  # two shots, then the question
                assert ctx.count("\n\n") == 2 and "USER" not in ctx
            for k, resp in enumerate(s["resps"]):  # the chain rule on the prompt lm-eval built
                cont = s["arguments"][k][1]
                c_ids, x_ids = encode_pair(lm.tokenizer.encode, ctx, cont)
                ref = chain_rule_loglik(lm.logits_fn, c_ids, x_ids, lm.mask_id, order="left_to_right",
                                        vocab_size=lm.vocab_size)
                ll, greedy = resp[0]
                assert float(ll) == pytest.approx(ref.loglik, rel=1e-6) and greedy in (ref.is_greedy, str(ref.is_greedy))
        for s in res["samples"]["tiny_gen"]:
            prompt = s["arguments"][0][0]
            assert prompt.count(" :") == 3 if not chat else prompt.count("USER: ") == 3 and prompt.endswith("BOT: ")
            assert isinstance(s["resps"][0][0], str)


@pytest.mark.slow
def test_cli_fewshot_flags(hf_dir, tmp_path, capsys):
    from megatron_mdm.cli import eval as ev

    tasks = _task(tmp_path, "mc")
    out = tmp_path / "r.json"
    rc = ev.main(["lm-eval", "--model", str(hf_dir), "--tasks", "tiny_mc", "--include-path", str(tasks),
                  "--num_fewshot", "1", "--apply_chat_template", "--method", "chain", "--no-progress",
                  "--model_args", "batch_size=4,num_samples=2", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n-shot"] == {"tiny_mc": 1} and 0.0 <= report["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert ev.main(["lm-eval", "--model", str(hf_dir), "--tasks", "tiny_mc", "--include-path", str(tasks),
                    "--fewshot_as_multiturn"]) == 2
    assert ev.main(["lm-eval", "--model", str(hf_dir), "--tasks", "tiny_mc", "--model_args", "steps"]) == 2
    plain = make_hf_dir(tmp_path / "plain", seed=0)  # no chat template
    assert ev.main(["lm-eval", "--model", str(plain), "--tasks", "tiny_mc", "--include-path", str(tasks),
                    "--apply-chat-template"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mdm-eval:")]
    assert err == ["mdm-eval: error: --fewshot-as-multiturn needs --apply-chat-template",
                        "mdm-eval: error: --model-args: 'steps' is not key=value",
                        f"mdm-eval: error: --apply-chat-template: the tokenizer of {plain} has no chat template "
                        "(chat_template in tokenizer_config.json or chat_template.jinja)"]
