"""mdm-plot and the curve reader: metrics.jsonl parsing, x axes, the unigram reference level, and a PNG of a
real run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_mdm.config import Config
from megatron_mdm.launch import free_port, pretrain_command
from megatron_mdm.sweep.curves import RunError, load_run, read_metrics, unigram_entropy

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
S = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> None:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_read_metrics_keeps_the_last_record_of_each_iteration(tmp_path):
    recs = [{"iteration": 0, "val_loss": 7.5}, {"iteration": 10, "loss": 6.0, "lr": 1e-3},
            {"iteration": 10, "val_loss": 6.2}, {"iteration": 20, "loss": 5.0, "lr": 9e-4},
            # a restart from the checkpoint at 10 replays 20: the second attempt wins
            {"iteration": 20, "loss": 4.9, "lr": 9e-4}, {"iteration": 20, "val_loss": 5.5},
            {"iteration": 15, "loss": 5.5, "lr": 1e-3}]
    _write_metrics(tmp_path, recs, ('{"iteration": 30, "loss": 4.', "", "[1, 2]"))  # torn last write, junk
    train, val = read_metrics(tmp_path)
    assert [(r["iteration"], r["loss"]) for r in train] == [(10, 6.0), (15, 5.5), (20, 4.9)]
    assert [(r["iteration"], r["val_loss"]) for r in val] == [(0, 7.5), (10, 6.2), (20, 5.5)]
    with pytest.raises(RunError, match="metrics.jsonl"):
        read_metrics(tmp_path / "nope")


def test_x_axes_tokens_and_flops(tmp_path):
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 3, 48, 4
    cfg.model.num_query_groups, cfg.model.ffn_hidden_size = 2, 128
    cfg.data.seq_length, cfg.optim.global_batch_size, cfg.objective.objective = 96, 6, "arm"
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    _write_metrics(tmp_path, [{"iteration": 5, "loss": 3.0, "consumed_samples": 30},
                              {"iteration": 9, "loss": 2.0, "consumed_samples": 54},
                              {"iteration": 9, "val_loss": 2.5}])  # no consumed_samples: iteration x gbs
    run = load_run(tmp_path)
    # hand count: per layer q (48x48) + k, v (48 x 2 groups x 12 dims each) + o (48x48) + SwiGLU 3x48x128 + 2 norms
    per_layer = 48 * 48 + 2 * 48 * 2 * 12 + 48 * 48 + 3 * 48 * 128 + 2 * 48
    n = 3 * per_layer + 48
    assert run.objective == "arm" and run.non_embedding_params == n
    assert run.x(run.train, "iterations").tolist() == [5, 9]
    assert run.x(run.train, "tokens").tolist() == [30 * 96, 54 * 96]
    assert run.x(run.val, "tokens").tolist() == [9 * 6 * 96]
    assert run.x(run.train, "flops").tolist() == pytest.approx([6 * n * 30 * 96, 6 * n * 54 * 96])
    assert run.final_val_loss() == 2.5
    with pytest.raises(ValueError, match="x axis"):
        run.x(run.train, "epochs")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megatron_mdm.data.prepare import prepare
    from megatron_mdm.tokenization import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("plot_data")
    train_bpe_tokenizer([str(CORPUS)], 300, root / "tok", max_docs=800)
    prepare([str(CORPUS)], str(root / "tok"), str(root / "shards"), S, val_fraction=0.05)
    return root


def test_unigram_entropy_of_known_tokens(dataset, tmp_path):
    """Shards written by hand from Zipf-distributed ids: the entropy of their empirical unigram."""
    from megatron_mdm.data import format as fmt
    from megatron_mdm.data.writer import ShardWriter

    m = fmt.read_manifest(dataset / "shards")
    rng = np.random.default_rng()
    rows = np.minimum(rng.zipf(1.3, size=(37, S)), 250) + 4  # ids 5..254, skewed, no special ids
    split = tmp_path / "ds" / "valid"
    split.mkdir(parents=True)
    w = ShardWriter(split, "x", 10, np.uint16)
    for r in rows:
        w.write(r.astype(np.int64))
    sm = dict(m, shards=w.close(), valid=None, num_samples=len(rows), num_tokens=rows.size)
    fmt.write_json_atomic(split / "manifest.json", sm)
    fmt.write_json_atomic(tmp_path / "ds" / "manifest.json", dict(m, valid="valid"))
    counts = Counter(rows.ravel().tolist())
    total = sum(counts.values())
    ref = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy(tmp_path / "ds") == pytest.approx(ref, rel=1e-12)  # follows the valid split
    assert unigram_entropy(split) == pytest.approx(ref, rel=1e-12)


@pytest.mark.slow
def test_mdm_plot_writes_a_png_for_a_real_run(dataset, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = pretrain_command(["--preset", "tiny", "--tokenizer",
           str(dataset / "tok"), "--data-path", str(dataset / "shards"), "--seq-length", str(S),
           "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "6", "--log-interval", "2",
           "--eval-interval", "3", "--eval-iters", "2", "--save", str(run), "--transformer-impl", "local"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from megatron_mdm.cli.plot import main

    assert main([str(run), "--unigram", str(dataset / "shards")]) == 0
    assert main([str(run), str(run), "--label", "a, lr 1", "--label", "b", "--x", "flops", "--log-x", "-o",
                 str(tmp_path / "c.png")]) == 0
    for png in (run / "curves.png", tmp_path / "c.png"):
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        from PIL import Image

        with Image.open(png) as im:
            assert im.size[0] > 500 and im.size[1] > 400
    r = load_run(run)
    assert [x["iteration"] for x in r.val] == [0, 3, 6] and [x["iteration"] for x in r.train] == [2, 4, 6]
    assert main([str(tmp_path / "missing")]) == 2  # one-line error, no traceback
    assert main([str(run), "--label", "a", "--label", "b"]) == 2




def _arm_then_mdm(tmp_path: Path) -> Path:
    """An ARM run of 4 steps, an MDM finetuned from it for 6 steps and resumed at 4 (start records as the trainer
    writes them)."""
    arm, mdm = tmp_path / "arm", tmp_path / "mdm"
    for d, objective in ((arm, "arm"), (mdm, "mdm")):
        cfg = Config()
        cfg.data.seq_length, cfg.optim.global_batch_size, cfg.objective.objective = 16, 2, objective
        d.mkdir()
        (d / "config.yaml").write_text(cfg.to_yaml())
    _write_metrics(arm, [{"event": "start", "iteration": 0, "tokens": 0}]
                   + [{"iteration": i, "val_loss": 6.0 - i / 4, "consumed_samples": 2 * i} for i in (0, 2, 4)]
                   + [{"iteration": i, "loss": 6.5 - i / 4, "lr": 1e-3, "tokens_per_sec": 900.0 + i,
                       "consumed_samples": 2 * i} for i in (2, 4)])
    _write_metrics(mdm, [{"event": "start", "iteration": 0, "tokens": 0, "loaded_from": str(arm),
                          "loaded_iteration": 4, "finetune": True}]
                   + [{"iteration": i, "val_loss": 9.0 - i / 2, "consumed_samples": 2 * i} for i in (0, 2, 4)]
                   + [{"event": "start", "iteration": 4, "tokens": 4 * 2 * 16, "loaded_from": str(mdm),
                       "loaded_iteration": 4, "finetune": False}]
                   + [{"iteration": i, "loss": 8.0 - i / 2, "lr": 1e-3, "tokens_per_sec": 1000.0 + i,
                       "consumed_samples": 2 * i} for i in (2, 4, 6)]
                   + [{"iteration": 6, "val_loss": 6.0, "consumed_samples": 12}])
    return mdm


def test_a_continued_run_is_drawn_after_the_run_it_continues(tmp_path):
    run = load_run(_arm_then_mdm(tmp_path))
    assert run.previous is not None and run.previous.path == tmp_path / "arm" and run.previous.objective == "arm"
    assert run.resumes() == [4] and run.previous.resumes() == []
    assert run.offset("iterations") == 4 and run.offset("tokens") == 4 * 2 * 16
    assert load_run(tmp_path / "mdm", previous=False).previous is None


def test_curves_figure_marks_resumes_and_keeps_every_line(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_mdm.sweep.curves import figure

    run = load_run(_arm_then_mdm(tmp_path))
    fig = figure([run], x="iterations", reference=5.5, title="quickstart")
    assert fig._suptitle.get_text() == "quickstart"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mdm (mdm)" in legend and "arm (arm), continued by mdm" in legend
    assert "mdm resumed at its iteration 4" in legend and "unigram entropy 5.500" in legend
    loss, val, _lr, tps = fig.axes[:4]
    dashed = [ln for ax in fig.axes[:4] for ln in ax.get_lines() if ln.get_linestyle() in ("--", ":")]
    assert all(ln.get_label() in legend for ln in dashed)  # every dashed or dotted line is explained
    arm_val, mdm_val = [ln for ln in val.get_lines() if ln.get_label() in ("arm (arm), continued by mdm", "mdm (mdm)")]
    assert list(arm_val.get_xdata()) == [0, 2, 4] and list(mdm_val.get_xdata()) == [4, 6, 8, 10]  # after the ARM
    assert [ln.get_xdata()[0] for ln in val.get_lines() if ln.get_label() == "mdm resumed at its iteration 4"] == [8]
    lo, hi = val.get_ylim()
    assert lo <= 5.0 and hi >= 9.0  # the untrained first point is not clipped
    assert tps.get_ylim()[0] == 0
    fig_tokens = figure([run], x="tokens")
    assert fig_tokens.axes[0].xaxis.get_major_formatter().__class__.__name__ == "EngFormatter"
