"""The config schema: precedence, presets, flag spelling, and clear validation errors."""

import argparse
import functools
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.config import (
    FIELDS,
    RANGES,
    Config,
    ConfigError,
    add_arguments,
    from_args,
    num_train_iters,
    parse_data_path,
    set_field,
)
from megatron_mdm.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def _parse(argv):
    return from_args(_parser().parse_args(argv))


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


def _numeric_fields() -> dict[str, type]:
    """Every int / float / Optional[int | float] field of the schema, with its number type."""
    import typing

    from megatron_mdm.config import _resolved_type

    out = {}
    for name, (sec, f) in FIELDS.items():
        tp = _resolved_type(sec, f)
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp in (int, float):
            out[name] = tp
    return out


def test_every_numeric_field_has_a_range():
    """A new int/float field must get its allowed range in config.RANGES (checked by validate)."""
    missing = sorted(set(_numeric_fields()) - set(RANGES))
    assert not missing, f"numeric config fields without a range in config.RANGES: {missing}"
    assert set(RANGES) <= set(FIELDS)


@pytest.mark.parametrize("name", sorted(_numeric_fields()))
def test_no_numeric_field_accepts_minus_one_or_nan(name):
    """No count, size, rate or seed of the schema is meaningful at -1 (floats: nor nan or inf)."""
    flag = "--" + name.replace("_", "-")
    bad = [-1] + ([float("nan"), float("inf")] if _numeric_fields()[name] is float else [])
    for value in bad:
        cfg = Config()
        set_field(cfg, name, value)
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert str(e.value).startswith(flag + ":"), (value, str(e.value))


@pytest.mark.parametrize("flag,value,match", [
    ("--train-iters", "-5", "must be >= 1"),
    ("--train-iters", "0", "must be >= 1"),
    ("--train-tokens", "0", "must be >= 1"),
    ("--micro-batch-size", "0", "must be >= 1"),
    ("--global-batch-size", "0", "must be >= 1"),
    ("--seq-length", "1", "must be >= 2"),
    ("--num-workers", "-1", "must be >= 0"),
    ("--lr", "0", "must be > 0"),
    ("--lr", "nan", "finite"),
    ("--min-lr", "0.1", "larger than --lr"),
    ("--adam-beta2", "1", r"in \[0, 1\)"),
    ("--eps", "0", r"in \(0, 1\)"),
    ("--random-length-prob", "1.5", r"in \[0, 1\]"),
    ("--clip-grad", "nan", "finite"),
    ("--save-interval", "0", "must be >= 1"),
    ("--log-interval", "0", "must be >= 1"),
    ("--eval-interval", "0", "must be >= 1"),
    ("--seed", "-3", "must be in"),
    ("--distributed-timeout-minutes", "0", "must be > 0"),
    ("--max-consecutive-nan-steps", "0", "must be >= 1"),
    ("--keep-last", "-1", "must be >= 0"),
    ("--ckpt-iteration", "-1", "must be >= 0"),
    ("--tensor-model-parallel-size", "0", "must be >= 1"),
])
def test_out_of_range_flag_is_named(flag, value, match):
    argv = [flag, value] + (["--save", "x"] if flag == "--save-interval" else [])
    with pytest.raises(ConfigError, match=match) as e:
        _parse(argv).validate()
    assert str(e.value).startswith(flag + ":")


@pytest.mark.parametrize("argv", [
    ["--num-workers", "0"], ["--keep-last", "0"], ["--min-lr", "0"], ["--weight-decay", "0"],
    ["--clip-grad", "0"], ["--adam-beta1", "0"], ["--lr-warmup-iters", "0"], ["--random-length-prob", "1"],
    ["--eval-iters", "0"], ["--seed", "0"], ["--ckpt-iteration", "0"],
])
def test_boundary_values_are_allowed(argv):
    _parse(argv).validate(world_size=1)


def test_eval_iters_zero_with_eval_interval():
    with pytest.raises(ConfigError, match="^--eval-iters: is 0 with --eval-interval 5"):
        _parse(["--eval-iters", "0", "--eval-interval", "5"]).validate()
    _parse(["--eval-iters", "0"]).validate()  # no validation asked: eval-iters unused


@pytest.mark.parametrize("argv,world,match", [
    (["--tensor-model-parallel-size", "4"], 2, "^--tensor-model-parallel-size: TP=4 is larger than the world size 2"),
    (["--pipeline-model-parallel-size", "2"], 1, "^--pipeline-model-parallel-size: PP=2 is larger than the world"),
    (["--context-parallel-size", "2"], 1, "^--context-parallel-size: CP=2 is larger than the world size 1"),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     r"^--tensor-model-parallel-size: world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4"),
    (["--pipeline-model-parallel-size", "2"], 3, "^--pipeline-model-parallel-size: world size 3 is not divisible"),
])
def test_parallel_layout_against_world_size(argv, world, match):
    with pytest.raises(ConfigError, match=match):
        _parse(argv).validate(world_size=world)


@pytest.mark.slow
def test_pretrain_checks_the_layout_before_megatron():
    """``training.pretrain`` itself (not only the script) names our flag, before any process group."""
    import torch

    from megatron_mdm.training.loop import pretrain

    cfg = _parse(["--tensor-model-parallel-size", "2", "--train-iters", "1"])
    with pytest.raises(ConfigError, match="^--tensor-model-parallel-size: TP=2 is larger than the world size 1"):
        pretrain(cfg)
    assert not torch.distributed.is_initialized()


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


# ---- the flags built from the schema: switches, choices, defaults, Megatron-LM's names ---------------------


def test_booleans_are_switches_with_a_no_form():
    """``--bf16`` / ``--no-bf16`` (no ``--bf16 [BF16]`` taking a value); unset leaves YAML and defaults alone."""
    help_text = _parser().format_help()
    bools = [n for n, (sec, f) in FIELDS.items() if f.type in (bool, "bool")]
    assert {"bf16", "verify_checkpoint", "load_optim", "mock_data"} <= set(bools)
    for name in bools:
        flag = "--" + name.replace("_", "-")
        assert f"{flag}, --no-{flag[2:]}" in help_text, flag
        assert f"{flag} [" not in help_text
        assert getattr(_section(_parse([flag]), name), name) is True
        assert getattr(_section(_parse([f"--no-{flag[2:]}"]), name), name) is False
    with pytest.raises(SystemExit):
        _parser().parse_args(["--bf16", "true"])  # a switch takes no value
    assert _parse([]).optim.bf16 is False and _parse([]).checkpoint.verify_checkpoint is True


def _section(cfg, name):
    return getattr(cfg, FIELDS[name][0])


def test_choices_are_listed_and_each_default_appears_once():
    help_text = " ".join(_parser().format_help().split())
    assert "--objective {mdm,arm}" in help_text and "--lr-decay-style {constant,linear,cosine," in help_text
    assert "--fp8-format {hybrid,e4m3}" in help_text
    assert help_text.count("(default: None)") == 0
    # a doc that says its default gets no second one
    assert "Steps over which the learning rate decays (default: --train-iters)." in help_text
    assert "(default: --train-iters). (default:" not in help_text
    assert "Peak learning rate. (default: 0.0003)" in help_text
    assert "--shuffle-buffer" not in help_text and "``" not in help_text


def test_removed_flag_is_gone_but_old_saved_configs_still_read():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--shuffle-buffer", "256"])
    assert Config.from_dict({"data": {"shuffle_buffer": None}}) == Config()  # a config.yaml saved before
    with pytest.raises(ConfigError, match="^--shuffle-buffer: was removed"):
        Config.from_dict({"data": {"shuffle_buffer": 256}})


def test_megatron_names():
    cfg = _parse(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok", "--mock-data",
                  "--no-load-optim", "--no-load-rng"])
    assert cfg.data.tokenizer == "tok" and cfg.data.mock_data
    assert not cfg.checkpoint.load_optim and not cfg.checkpoint.load_rng
    with pytest.raises(ConfigError, match="^--tokenizer-type: 'GPT2BPETokenizer' is not one of"):
        _parse(["--tokenizer-type", "GPT2BPETokenizer"])
    # --train-samples: iterations = ceil(samples / global batch)
    assert num_train_iters(_parse(["--train-samples", "100", "--global-batch-size", "8"])) == 13
    with pytest.raises(ConfigError, match="^--train-samples: give one of"):
        _parse(["--train-iters", "5", "--train-samples", "100"]).validate()
    # --lr-warmup-fraction: a fraction of the decay steps (Megatron-LM), not with --lr-warmup-iters
    from megatron_mdm.config import lr_warmup_iters

    assert lr_warmup_iters(_parse(["--lr-warmup-fraction", "0.1", "--lr-decay-iters", "250"]), 1000) == 25
    assert lr_warmup_iters(_parse(["--lr-warmup-fraction", "0.1"]), 1000) == 100
    with pytest.raises(ConfigError, match="^--lr-warmup-fraction: give"):
        _parse(["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"]).validate()
    with pytest.raises(ConfigError, match="^--mock-data: trains on random tokens"):
        _parse(["--mock-data", "--data-path", "d"]).validate()
