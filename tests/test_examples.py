"""The examples: every YAML recipe loads and validates for its intended world size, the launchers
are valid bash, and a short version of the quickstart pipeline (tokenizer -> shards -> 2-process
pretraining with a checkpoint -> resume) runs end to end as subprocesses."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.config import ConfigError, add_arguments, from_args
from megatron_mdm.launch import pretrain_command

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"

# config file -> (world size it is written for, expected values)
RECIPES = {
    "quickstart.yaml": (2, {"preset": "quickstart", "seq_length": 64, "objective": "mdm"}),
    "smdm_1.1b.yaml": (8, {"preset": "smdm-1.1b", "num_layers": 22, "hidden_size": 2048,
                           "num_query_groups": 4, "ffn_hidden_size": 5632, "seq_length": 2048,
                           "global_batch_size": 256, "lr": 4e-4, "min_lr": 4e-5, "bf16": True,
                           "objective": "mdm"}),
    "smdm_1.1b_arm.yaml": (8, {"preset": "smdm-1.1b", "seq_length": 2048, "global_batch_size": 256,
                               "objective": "arm", "bf16": True}),
    "smdm_1.1b_fp8_h100.yaml": (8, {"fp8_format": "hybrid", "fp8_recipe": "tensorwise",
                                    "first_last_layers_bf16": True,
                                    "transformer_impl": "transformer_engine", "bf16": True}),
    "llama_8b.yaml": (16, {"preset": "llama-8b", "tensor_model_parallel_size": 4,
                           "pipeline_model_parallel_size": 2, "use_distributed_optimizer": True,
                           "recompute_granularity": "full", "num_layers": 32}),
}


def _load(path: Path, *flags: str):
    """Parse as pretrain_mdm.py does; the launchers always add --save (the recipes set --save-interval)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(["--config", str(path), "--save", "runs/x", *flags]))


def _flat(cfg) -> dict:
    return {k: v for sec in cfg.to_dict().values() for k, v in sec.items()}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_validates(name):
    world, expected = RECIPES[name]
    cfg = _load(CONFIGS / name)
    cfg.validate(world_size=world)
    flat = _flat(cfg)
    for key, value in expected.items():
        assert flat[key] == value, f"{name}: {key} = {flat[key]!r}, expected {value!r}"


def test_every_yaml_is_covered():
    """A new recipe must be added to RECIPES (so it is validated), except files owned elsewhere."""
    others = {"sft_reversal.yaml"}
    present = {p.name for p in CONFIGS.glob("*.yaml")} - others
    assert present == set(RECIPES), f"untested configs: {present - set(RECIPES)}"


def test_recipe_rejects_a_bad_layout():
    cfg = _load(CONFIGS / "llama_8b.yaml")
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.validate(world_size=12)  # TP 4 x PP 2 = 8 does not divide 12


def test_flags_override_the_yaml():
    cfg = _load(CONFIGS / "smdm_1.1b.yaml", "--lr", "1e-4", "--tensor-model-parallel-size", "2")
    assert cfg.optim.lr == 1e-4 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optim.min_lr == 4e-5


@pytest.mark.parametrize("script", ["examples/slurm/pretrain_mdm.sbatch", "examples/mpirun/pretrain_mdm.sh",
                                    "examples/quickstart.sh"])
def test_launcher_is_valid_bash(script):
    path = REPO / script
    assert path.is_file(), script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "set -euo pipefail" in path.read_text()


def _run(cmd, cwd, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.dist
def test_short_pipeline_pretrain_and_resume(tmp_path):
    """tokenizer -> shards with a validation split -> TP=2 pretraining, 10 steps, saved -> resume to 15."""
    py = sys.executable
    tok, shards, run = tmp_path / "tok", tmp_path / "shards", tmp_path / "run"
    _run([py, str(REPO / "tokenizer/train_tokenizer.py"), "--input", str(CORPUS), "--vocab-size", "512",
          "--max-docs", "1500", "--output", str(tok)], tmp_path)
    _run([py, str(REPO / "data_prep/prepare_data.py"), "--input", str(CORPUS), "--tokenizer", str(tok),
          "--output", str(shards), "--seq-length", "64", "--val-fraction", "0.05", "--workers", "1"], tmp_path)
    assert (shards / "valid" / "manifest.json").is_file()
    common = ["--config", str(CONFIGS / "quickstart.yaml"),
              "--preset", "tiny", "--tokenizer", str(tok), "--data-path", str(shards), "--seq-length", "64",
              "--micro-batch-size", "4", "--global-batch-size", "8", "--tensor-model-parallel-size", "2",
              "--lr-warmup-iters", "2", "--log-interval", "5", "--eval-interval", "5", "--eval-iters", "2",
              "--save-interval", "10"]
    _run(pretrain_command(common + ["--train-iters", "10", "--save", str(run)], 2), tmp_path)
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (run / "iter_0000010" / "metadata.json").is_file()
    first = _records(run)
    assert [r["iteration"] for r in first if "loss" in r] == [5, 10]
    assert [r["iteration"] for r in first if "val_loss" in r] == [0, 5, 10]  # 0: untrained baseline

    out = _run(pretrain_command(common + ["--train-iters", "15", "--save", str(run), "--load", str(run)], 2), tmp_path)
    assert "iterations 10 -> 15" in out, out[-2000:]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "15"
    records = _records(run)
    resumed = records[len(first):]
    assert [r["iteration"] for r in resumed if "loss" in r] == [15]
    assert resumed[-1]["iteration"] == 15 and "val_loss" in resumed[-1]
    train = [r for r in records if "loss" in r]
    assert train[-1]["consumed_samples"] == 15 * 8
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
            assert r[key] is not None and r[key] == r[key], (key, r)
    _convert_generate_and_evaluate(run, tmp_path)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


LM_EVAL_TASK = (Path(__file__).parent / "assets" / "lm_eval_mc_task.yaml").read_text()


def _convert_generate_and_evaluate(run: Path, tmp_path: Path) -> None:
    """The pretrained checkpoint converts, loads in transformers, generates and is scored by mdm-eval."""
    bindir = Path(sys.executable).parent
    hf = tmp_path / "hf"
    _run([str(bindir / "mdm-convert"), "to-hf", "--load", str(run), "--output", str(hf)], tmp_path)
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    out = _run([str(bindir / "mdm-generate"), "--model", str(hf), "--prompt", "ROMEO:", "--gen-length", "8",
                "--steps", "8", "--seed", "0"], tmp_path)
    assert "ROMEO:" in out
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"context": "ROMEO: I", "choices": [" am", " thee thee"], "gold": 0},
        {"context": "KING HENRY", "choices": [" IV:", " the"], "gold": 0},
        {"context": "To be, or not to", "choices": [" be", " king"], "gold": 0}]) + "\n")
    report = tmp_path / "mc.json"
    _run([str(bindir / "mdm-eval"), "mc", "--model", str(hf), "--data", str(data), "--num-samples", "4",
          "--output", str(report)], tmp_path)
    result = json.loads(report.read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_examples"] == 3, result
    assert len(result["per_example"]) == 3
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mdm_local_mc.yaml").write_text(LM_EVAL_TASK.format(task="mdm_local_mc", data=data))
    lm_report = tmp_path / "lm_eval.json"
    _run([str(bindir / "mdm-eval"), "lm-eval", "--model", str(hf), "--tasks", "mdm_local_mc",
          "--include-path", str(tasks), "--method", "chain", "--output", str(lm_report)], tmp_path, timeout=300)
    assert "acc,none" in json.loads(lm_report.read_text())["results"]["mdm_local_mc"]
