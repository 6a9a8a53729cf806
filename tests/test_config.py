"""The config schema: precedence, presets, flag spelling, and clear validation errors."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.config import (
    Config,
    ConfigError,
    add_arguments,
    from_args,
    num_train_iters,
    parse_data_path,
)
from megatron_mdm.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(argv))


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  preset: smdm-1.1b\n  num_layers: 4\noptim:\n  lr: 0.001\nseq_length: 256\n")
    cfg = _parse(["--config", str(y), "--lr", "0.002", "--tensor-model-parallel-size", "2"])
    assert cfg.model.hidden_size == 2048 and cfg.model.num_query_groups == 4  # preset
    assert cfg.model.num_layers == 4  # YAML over preset
    assert cfg.optim.lr == 0.002  # flag over YAML
    assert cfg.data.seq_length == 256 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optim.min_lr == Config().optim.min_lr  # default


def test_smdm_1p1b_preset_is_tinyllama_shaped():
    p = PRESETS["smdm-1.1b"]
    assert (p["num_layers"], p["hidden_size"], p["num_attention_heads"], p["num_query_groups"],
            p["ffn_hidden_size"]) == (22, 2048, 32, 4, 5632)


def test_round_trip_yaml(tmp_path):
    cfg = _parse(["--preset", "tiny", "--objective", "arm", "--data-path", "0.3", "a", "0.7", "b"])
    y = tmp_path / "r.yaml"
    y.write_text(cfg.to_yaml())
    again = _parse(["--config", str(y)])
    assert again == cfg


@pytest.mark.parametrize("argv,world,match", [
    (["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "global-batch-size"),
    (["--global-batch-size", "8", "--micro-batch-size", "4"], 4, "divisible by --micro-batch-size x DP"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "not divisible by PP"),
    (["--num-attention-heads", "4", "--tensor-model-parallel-size", "8"], 8, "TP=8"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--eps", "1.5"], None, "--eps"),
    (["--fp8-format", "hybrid", "--transformer-impl", "local"], None, "FP8"),
    (["--train-iters", "5", "--train-tokens", "100"], None, "not both"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], None, "pipeline-model-parallel-size > 1"),
])
def test_inconsistent_options_fail_with_named_field(argv, world, match):
    with pytest.raises(ConfigError, match=match):
        _parse(argv).validate(world_size=world)


@pytest.mark.parametrize("argv,match", [
    (["--objective", "gpt"], "not one of"),
    (["--micro-batch-size", "two"], "expected an integer"),
    (["--preset", "nope"], "unknown preset"),
])
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        _parse(argv)


def test_unknown_yaml_key(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option optim.learning_rate"):
        _parse(["--config", str(y)])


def test_data_path_blend_and_train_tokens():
    assert parse_data_path(["d"]) == [(1.0, "d")]
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == [(0.7, "a"), (0.3, "b")]
    assert parse_data_path(["2", "a", "6", "b"]) == [(0.25, "a"), (0.75, "b")]
    with pytest.raises(ConfigError):
        parse_data_path(["0.5", "a", "0.5"])
    cfg = _parse(["--train-tokens", "1000", "--global-batch-size", "4", "--micro-batch-size", "4",
                  "--seq-length", "100"])
    assert num_train_iters(cfg) == 3


def test_pretrain_script_reports_config_errors_without_traceback():
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_mdm.py"), "--num-layers", "3",
                        "--pipeline-model-parallel-size", "2", "--train-iters", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "--pipeline-model-parallel-size" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_mdm.py"), "--no-such-flag"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_pretrain_help_lists_megatron_flags():
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_mdm.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--tensor-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
                 "--global-batch-size", "--lr-decay-style", "--fp8-format", "--use-distributed-optimizer",
                 "--recompute-granularity", "--tensorboard-dir", "--objective", "--random-length-prob"):
        assert flag in r.stdout
