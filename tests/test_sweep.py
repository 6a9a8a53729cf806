"""mdm-sweep plan / launch / collect: budgets hit, shapes, plan files, the SLURM array, and a real two-run
sweep that launches, resumes after one run and collects."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_mdm.sweep.collect import collect, full_flops, read_csv, write_csv
from megatron_mdm.sweep.launch import DONE, launch_local, train_args, write_slurm
from megatron_mdm.sweep.plan import (
    Plan,
    PlanError,
    make_plan,
    parse_shape,
    preset_shape,
    rule_shape,
    shape_params,
)
from megatron_mdm.tokenization import MDMTokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"


def hf_non_embedding_params(model: dict) -> int:
    """Reference N: parameters of a transformers Llama body of this shape, less the token embedding."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=16, hidden_size=model["hidden_size"], intermediate_size=model["ffn_hidden_size"],
                      num_hidden_layers=model["num_layers"], num_attention_heads=model["num_attention_heads"],
                      num_key_value_heads=model["num_query_groups"] or model["num_attention_heads"])
    with torch.device("meta"):
        m = LlamaModel(cfg)
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("embed_tokens"))


def test_shapes_and_their_sizes_match_a_transformers_llama():
    shapes = [preset_shape("tiny"), preset_shape("quickstart"), preset_shape("smdm-19m"), rule_shape(96),
              parse_shape("1x32", head_dim=16), parse_shape("3x48", head_dim=16)]
    for s in shapes:
        assert shape_params(s) == hf_non_embedding_params(s.model), s.name
    # the rule reproduces the depth and width of the tiny presets
    for name in ("tiny", "quickstart"):
        p, r = preset_shape(name).model, rule_shape(preset_shape(name).model["hidden_size"]).model
        assert (r["num_layers"], r["hidden_size"]) == (p["num_layers"], p["hidden_size"])
    assert parse_shape("3x48", head_dim=16).model["num_layers"] == 3
    with pytest.raises(PlanError, match="LAYERSxHIDDEN"):
        parse_shape("3-48")
    with pytest.raises(PlanError, match="multiple"):
        rule_shape(100, head_dim=32)


def test_planned_runs_hit_each_budget_within_5_percent():
    shapes = [preset_shape("tiny"), preset_shape("quickstart"), rule_shape(96), rule_shape(160),
              parse_shape("1x32", head_dim=16), preset_shape("smdm-19m")]
    budgets = [3e11, 1e12, 3e12, 1e13]
    seq, gbs = 64, 16
    plan = make_plan(budgets, shapes, ["mdm", "arm"], seq, gbs, min_iters=10)
    assert plan.runs
    for r in plan.runs:
        n = hf_non_embedding_params(r.model)
        c = 6 * n * r.iters * gbs * seq
        assert abs(c / r.budget - 1) <= 0.05, r
        assert r.non_embedding_params == n and r.tokens == r.iters * gbs * seq and r.iters >= 10
        assert r.flops == pytest.approx(c)
    # every budget has both objectives over the same shapes, at least 3 of them
    for c in budgets:
        mdm = [r.shape for r in plan.runs if r.budget == c and r.objective == "mdm"]
        arm = [r.shape for r in plan.runs if r.budget == c and r.objective == "arm"]
        assert mdm == arm and len(mdm) >= 3
    # runs that cannot hit a budget (too few steps) are left out with a reason
    assert any("min-iters" in s["reason"] for s in plan.skipped)


def test_plan_leaves_out_coarse_runs_and_refuses_impossible_budgets():
    quick = preset_shape("quickstart")
    n = shape_params(quick)
    tokens = 16 * 64
    # 2.5 steps' worth of the quickstart shape: rounding to 2 misses by 20 %, beyond the 5 % tolerance
    plan_args = dict(objectives=["mdm"], seq_length=64, global_batch_size=16, min_iters=1)
    small = [preset_shape("tiny"), parse_shape("1x32", head_dim=16), parse_shape("1x48", head_dim=16)]
    plan = make_plan([6 * n * tokens * 2.5], [quick, *small], **plan_args)
    assert "quickstart" not in {r.shape for r in plan.runs} and len(plan.runs) == 3
    [why] = [s["reason"] for s in plan.skipped if s["shape"] == "quickstart"]
    assert "-20.0%" in why and "5%" in why
    with pytest.raises(PlanError, match="only 0 shape"):
        make_plan([6 * n * tokens * 2.5], [quick], **plan_args)
    with pytest.raises(PlanError, match="positive"):
        make_plan([-1.0], [quick], **plan_args)
    with pytest.raises(PlanError, match="objectives"):
        make_plan([1e12], [quick], ["diffusion"], 64, 16)


def test_per_budget_window_brackets_the_guess():
    shapes = [parse_shape(s, head_dim=16) for s in ("1x16", "1x32", "1x48", "2x48", "2x64", "3x80", "4x96")]
    plan = make_plan([1e11, 1e12], shapes, ["mdm"], 64, 16, per_budget=3, min_iters=5, ratio=20)
    for c in (1e11, 1e12):
        ns = [r.non_embedding_params for r in plan.runs if r.budget == c]
        assert len(ns) == 3
        guess = math.sqrt(c / 120)
        assert min(ns) <= guess * 2.5 and max(ns) >= guess / 2.5
    assert any("per-budget" in s["reason"] for s in plan.skipped)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_file_round_trip(tmp_path, suffix):
    plan = make_plan([1e12, 3e12, 1e13], [preset_shape("tiny"), rule_shape(96), rule_shape(128)], ["mdm", "arm"],
                     64, 16, 8, config="examples/configs/quickstart.yaml", train_args=["--lr", "1e-3"])
    back = Plan.load(plan.save(tmp_path / f"plan{suffix}"))
    assert back == plan
    (tmp_path / "bad.yaml").write_text("runs: 3\n")
    with pytest.raises(PlanError, match="bad.yaml"):
        Plan.load(tmp_path / "bad.yaml")
    with pytest.raises(PlanError, match="no such plan"):
        Plan.load(tmp_path / "none.yaml")


def test_slurm_array_script(tmp_path):
    plan = make_plan([1e12, 3e12, 1e13], [preset_shape("tiny"), rule_shape(96), rule_shape(128)], ["mdm", "arm"],
                     64, 16, config="examples/configs/quickstart.yaml", train_args=["--data-path", "/d x"])
    script = write_slurm(plan, tmp_path / "sweep", tmp_path / "sweep.sbatch", nproc=2)
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"#SBATCH --array=0-{len(plan.runs) - 1}" in text and "#SBATCH --ntasks-per-node=2" in text
    for i, r in enumerate(plan.runs):
        assert f"  {i}) NAME={r.name};" in text
        assert f"--train-iters {r.iters} " in text
    assert "'/d x'" in text  # quoted for bash
    assert DONE in text and (tmp_path / "sweep" / "plan.yaml").is_file()
    # each array task's arguments parse as pretrain_mdm.py's and carry the run's shape and objective
    import argparse

    from megatron_mdm.config import add_arguments, from_args

    r = plan.runs[-1]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(train_args(plan, r, tmp_path / "sweep")))
    assert cfg.objective.objective == r.objective and cfg.optim.train_iters == r.iters
    assert {k: getattr(cfg.model, k) for k in r.model} == r.model
    assert cfg.logging.eval_interval == r.iters and cfg.checkpoint.save == str(tmp_path / "sweep" / r.name)


def test_plan_groups_append_tags_and_partition(tmp_path):
    """Groups of runs in one plan: the ARM at other budgets, a tagged variant with its own flags (which win
    over the plan's and parse as pretrain_mdm.py's), refused duplicates and mixed recipes, and a split into
    parts that covers every run once with about equal estimated time."""
    import argparse

    from megatron_mdm.config import add_arguments, from_args

    shapes = [parse_shape(s, head_dim=8) for s in ("1x8", "1x16", "1x24", "1x32")]
    common = dict(seq_length=64, global_batch_size=8, train_args=["--lr", "3e-3"])
    plan = make_plan([1e10, 2e10], shapes, ["mdm"], **common)
    plan.save(tmp_path / "plan.yaml")
    plan = Plan.load(tmp_path / "plan.yaml").extend(make_plan([1e9], shapes, ["arm"], **common))
    seeds = make_plan([1e10], shapes, ["mdm"], **common, tag="seed2", run_args=["--seed", "2", "--lr", "1e-2"])
    plan.extend(seeds)
    assert plan.budgets == [1e9, 1e10, 2e10] and plan.objectives == ["mdm", "arm"]
    assert len(plan.runs) == 4 * 4 and len({r.name for r in plan.runs}) == 16
    plan.check_curves()
    variant = [r for r in plan.runs if r.tag == "seed2"]
    assert [r.name for r in variant] == [f"mdm-C1e10-{s.name}-seed2" for s in shapes]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(train_args(plan, variant[0], tmp_path)))
    assert cfg.logging.seed == 2 and cfg.optim.lr == 1e-2
    main = from_args(parser.parse_args(train_args(plan, plan.runs[0], tmp_path)))
    assert main.logging.seed == 1234 and main.optim.lr == 3e-3
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(PlanError, match="already has"):
        plan.extend(make_plan([1e10], shapes, ["mdm"], **common))
    with pytest.raises(PlanError, match="seq_length"):
        plan.extend(make_plan([1e10], shapes, ["mdm"], 32, 8, train_args=["--lr", "3e-3"], tag="x"))
    with pytest.raises(PlanError, match="--tag"):
        make_plan([1e10], shapes, ["mdm"], **common, tag="a/b")
    # a group may add a shape to other groups' budgets; the whole plan must still have 3 shapes per curve
    with pytest.raises(PlanError, match="only 1 shape"):
        make_plan([1e10], shapes[:1], ["arm"], **common)
    plan.extend(make_plan([1e9], [parse_shape("1x4", head_dim=4)], ["arm"], **common, min_shapes=1))
    plan.check_curves()
    assert [r.shape for r in plan.runs if r.objective == "arm"] == ["1x8", "1x16", "1x24", "1x32", "1x4"]
    thin = Plan.from_dict(plan.to_dict())
    thin.runs = [r for r in thin.runs if r.shape in ("1x8", "1x4") or r.objective == "mdm"]
    with pytest.raises(PlanError, match="arm at 1e.09: 2"):
        thin.check_curves()
    parts = plan.partition(3)
    assert sorted(n for part in parts for n in part) == sorted(r.name for r in plan.runs)
    assert len(plan.runs) == 17
    cost = {r.name: r.cost for r in plan.runs}
    loads = [sum(cost[n] for n in part) for part in parts]
    assert max(loads) - min(loads) <= max(cost.values())  # greedy: within one run of each other


def test_full_flops_match_a_flop_counter_on_a_llama():
    """collect's full count against torch's FlopCounterMode on a forward and backward of a transformers Llama
    of the same shape with its output layer, eager attention (the scores of all s x s pairs are computed
    whatever the mask): matrices, attention scores and output layer; the counter leaves out norms and
    rotary, which the count has only as 2·N's norm weights (< 1 %)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    for text, seq, vocab in (("2x64", 64, 512), ("1x32", 128, 256)):
        shape = parse_shape(text, head_dim=16)
        m = shape.model
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
                          num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
                          num_key_value_heads=m["num_query_groups"], attn_implementation="eager")
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, vocab, (2, seq))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids).logits.sum().backward()
        n = hf_non_embedding_params(m)
        expect = full_flops(n, m["num_layers"], m["hidden_size"], seq, vocab, tokens=2 * seq)
        assert counter.get_total_flops() == pytest.approx(expect, rel=0.01)


# ---- a real sweep: two tiny runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data")
    py = sys.executable
    subprocess.run([py, str(REPO / "tokenizer/train_tokenizer.py"), "--input", str(CORPUS), "--vocab-size", "300",
                    "--max-docs", "800", "--output", str(root / "tok")], check=True, capture_output=True)
    subprocess.run([py, str(REPO / "data_prep/prepare_data.py"), "--input", str(CORPUS), "--tokenizer",
                    str(root / "tok"), "--output", str(root / "shards"), "--seq-length", "32", "--val-fraction",
                    "0.05", "--workers", "1"], check=True, capture_output=True)
    return root


@pytest.mark.slow
def test_two_run_sweep_launches_resumes_and_collects(shards, tmp_path):
    shapes = [parse_shape("1x16", head_dim=16), parse_shape("1x32", head_dim=16), parse_shape("2x32", head_dim=16)]
    n = [shape_params(s) for s in shapes]
    budget = 6 * n[1] * 4 * 8 * 32  # 4 steps of the middle shape
    plan = make_plan([budget], shapes, ["mdm"], 32, 8, min_iters=1, tolerance=0.5,
                     train_args=["--tokenizer", str(shards / "tok"), "--data-path", str(shards / "shards"),
                                 "--eval-iters", "2", "--log-interval", "1", "--lr-warmup-iters", "1",
                                 "--transformer-impl", "local"])
    plan.runs = [r for r in plan.runs if r.shape in ("1x32", "2x32")]  # the two-run plan
    assert len(plan.runs) == 2 and all(r.iters <= 6 for r in plan.runs)
    out = tmp_path / "sweep"
    logs: list[str] = []
    first = launch_local(plan, out, max_runs=1, log=logs.append)
    assert first == {"trained": [plan.runs[0].name], "skipped": [], "failed": []}
    run0, run1 = (out / r.name for r in plan.runs)
    assert (run0 / DONE).is_file() and not (run1 / DONE).exists()
    metrics0 = (run0 / "metrics.jsonl").read_bytes()
    partial = collect(plan, out)
    assert [r["status"] for r in partial] == ["done", "missing"]

    second = launch_local(plan, out, log=logs.append)  # resumes: run 0 is skipped, run 1 trains
    assert second == {"trained": [plan.runs[1].name], "skipped": [plan.runs[0].name], "failed": []}
    assert (run0 / "metrics.jsonl").read_bytes() == metrics0
    assert any("finished earlier, skipped" in x for x in logs)

    rows = collect(plan, out)
    path = write_csv(rows, out / "results.csv")
    back = read_csv(path)
    for run, row, d in zip(plan.runs, back, (run0, run1)):
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        vals = [r for r in recs if "val_loss" in r]
        assert vals[0]["iteration"] == 0 and vals[-1]["iteration"] == run.iters
        assert row["status"] == "done" and row["val_iteration"] == run.iters
        assert row["val_loss"] == pytest.approx(vals[-1]["val_loss"], rel=1e-12)
        assert row["non_embedding_params"] == run.non_embedding_params and row["tokens"] == run.iters * 8 * 32
        assert row["budget"] == pytest.approx(budget)
        # from the run's config.yaml and its data: lr, seed, padded vocabulary, full FLOPs, epochs
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        div = cfg["model"]["make_vocab_size_divisible_by"]
        vocab = -(-MDMTokenizer.load(shards / "tok").vocab_size // div) * div
        assert row["lr"] == cfg["optim"]["lr"] and row["seed"] == 1234 and row["vocab_size"] == vocab
        assert row["flops_full"] == pytest.approx(full_flops(run.non_embedding_params, run.model["num_layers"],
                                                             run.model["hidden_size"], 32, vocab, row["tokens"]))
        train_tokens = json.loads((shards / "shards" / "manifest.json").read_text())["num_tokens"]
        assert row["epochs"] == pytest.approx(row["tokens"] / train_tokens) and row["tag"] is None
