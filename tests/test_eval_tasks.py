"""The task files people have: lm-eval's own command line with every flag, and Mosaic's ICL JSONL forms.

* ``mdm-eval harness`` is lm-eval's command line with the model ``mdm`` registered: a local task with
  ``--log_samples``, ``--output_path``, ``--num_fewshot``, ``--gen_kwargs``, ``--seed`` writes lm-eval's
  results and samples; the logged values are the chain rule computed here on the prompts lm-eval built.
* ``mdm-eval mc`` reads Mosaic's ``{query, choices, gold}`` and scores it as the native
  ``{context, choices, gold}``; Mosaic's ``{context, continuation}`` scores as lm-eval scores the same file as
  a ``loglikelihood`` task through the adapter (acc = greedy, perplexity).
* ``--no-progress`` leaves no progress bar on stderr (ours, lm-eval's, transformers', datasets').
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from test_eval import WORDS, make_hf_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf"), seed=int(torch.randint(0, 10_000, ())))


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _local_task(tmp: Path, kind: str, rows: list[dict]) -> Path:
    data = tmp / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"tiny_{kind}.yaml").write_text(
        (ASSETS / f"lm_eval_{kind}_task.yaml").read_text().format(task=f"tiny_{kind}", data=data))
    return tasks


def _mc_rows(seed: int, n: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{"context": _words(rng, 1, 3), "choices": [_words(rng, 1, 2) for _ in range(3)],
             "gold": rng.randint(0, 2)} for _ in range(n)]


@pytest.mark.slow
def test_harness_runs_a_local_task_with_log_samples(hf_dir, tmp_path, monkeypatch):
    from megatron_mdm.cli.eval import main
    from megatron_mdm.evaluation.loading import load_logits_fn
    from megatron_mdm.evaluation.multiple_choice import encode_pair
    from megatron_mdm.likelihood import chain_rule_loglik

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tasks = _local_task(tmp_path, "mc", _mc_rows(int(torch.randint(0, 10_000, ()))))
    out = tmp_path / "results"
    rc = main(["harness", "run", "--model", "mdm", "--model_args", f"pretrained={hf_dir},method=chain",
               "--tasks", "tiny_mc", "--include_path", str(tasks), "--device", "cpu", "--num_fewshot", "1",
               "--gen_kwargs", "steps=4", "--seed", "3", "--log_samples", "--output_path", str(out)])
    assert rc == 0
    samples = list(out.rglob("samples_tiny_mc_*.jsonl"))
    results = list(out.rglob("results_*.json"))
    assert len(samples) == 1 and len(results) == 1
    assert json.loads(results[0].read_text())["n-shot"] == {"tiny_mc": 1}
    logged = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(logged) == 5
    fn, tok, mask_id, vocab = load_logits_fn(str(hf_dir))
    for s in logged:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]  # lm-eval's log: the prompts it built
        assert len(pairs) == 3 and all("\n\n" in ctx for ctx, _ in pairs)  # one shot, then the question
        for (ctx, cont), resp in zip(pairs, s["resps"]):
            c_ids, x_ids = encode_pair(tok.encode, ctx, cont)
            ref = chain_rule_loglik(fn, c_ids, x_ids, mask_id, order="left_to_right", vocab_size=vocab)  # the adapter's default
            assert float(resp[0][0]) == pytest.approx(ref.loglik, rel=1e-5)
    assert main(["harness", "run", "--model", "mdm", "--model_args", f"pretrained={tmp_path / 'none'}",
                 "--tasks", "tiny_mc", "--include_path", str(tasks), "--device", "cpu"]) == 2


def _mc_cli(hf_dir: Path, data: Path, out: Path, method: str) -> dict:
    from megatron_mdm.cli.eval import main

    assert main(["mc", "--model", str(hf_dir), "--data", str(data), "--method", method, "--num-samples", "4",
                 "--seed", "7", "--no-progress", "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["mc", "chain"])
def test_mosaic_multiple_choice_scores_as_the_native_form(hf_dir, tmp_path, method):
    rows = _mc_rows(int(torch.randint(0, 10_000, ())))
    native, mosaic = tmp_path / "native.jsonl", tmp_path / "mosaic.jsonl"
    native.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mosaic.write_text("".join(json.dumps({"query": r["context"], "choices": r["choices"], "gold": r["gold"]}) + "\n"
                              for r in rows))
    a = _mc_cli(hf_dir, native, tmp_path / "a.json", method)
    b = _mc_cli(hf_dir, mosaic, tmp_path / "b.json", method)
    assert (a["form"], b["form"]) == ("mc", "mosaic_mc")
    assert a["per_example"] == b["per_example"] and a["accuracy"] == b["accuracy"]


@pytest.mark.slow
def test_mosaic_language_modeling_scores_as_lm_eval_does(hf_dir, tmp_path):
    """{context, continuation}: acc and perplexity of mdm-eval mc = lm-eval's on the same file (the adapter)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_mdm.evaluation.lm_eval_adapter import MDMLM

    rng = random.Random(int(torch.randint(0, 10_000, ())))
    rows = [{"context": _words(rng, 1, 4), "continuation": " " + _words(rng, 1, 2)} for _ in range(6)]
    rows.append({"context": "the cat sat on the", "continuation": " mat"})
    tasks = _local_task(tmp_path, "lm", rows)
    ours = _mc_cli(hf_dir, tmp_path / "lm.jsonl", tmp_path / "lm.json", "chain")
    assert ours["form"] == "mosaic_lm" and ours["num_examples"] == 7
    lm = MDMLM.create_from_arg_string(f"pretrained={hf_dir},method=chain,progress=false")
    res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_lm"], task_manager=TaskManager(include_path=str(tasks)),
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    theirs = res["results"]["tiny_lm"]
    assert ours["accuracy"] == theirs["acc,none"]
    assert math.isclose(ours["perplexity"], theirs["perplexity,none"], rel_tol=1e-5)


@pytest.mark.slow
def test_no_progress_hides_every_bar(hf_dir, tmp_path):
    tasks = _local_task(tmp_path, "mc", _mc_rows(1))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **OFFLINE)
    argv = [sys.executable, "-m", "megatron_mdm.cli.eval", "lm-eval", "--model", str(hf_dir), "--tasks", "tiny_mc",
            "--include-path", str(tasks), "--num-samples", "2"]
    shown = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    hidden = subprocess.run([*argv, "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert shown.returncode == 0 and hidden.returncode == 0, hidden.stderr[-3000:]
    assert "it/s]" in shown.stderr  # the bars exist (stderr is not a terminal, tqdm still draws)
    assert "it/s]" not in hidden.stderr and "%|" not in hidden.stderr and "\r" not in hidden.stderr, hidden.stderr
    assert hidden.stdout == shown.stdout
