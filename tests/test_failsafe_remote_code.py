"""Remote code: our exports load without running their shipped code and without a prompt; others need the flag.

The export comes from a real Megatron checkpoint through ``mdm-convert to-hf``. The reference is
independent of the loader: the shipped ``modeling_mdm.py`` (and the decoding modules it imports) imported
from an unmodified copy. (The model card's own code runs in tests/test_hf_export.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROMPT = "[y/N]"  # transformers' "Do you wish to run the custom code? [y/N]"


def save_and_export(rank: int, world_size: int, base: str) -> None:
    """A tiny MDM checkpoint with a word-level tokenizer, exported by the ``mdm-convert`` CLI."""
    from test_hf_convert import VOCAB, make_cfg, make_tokenizer

    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing
    from megatron_mdm.cli.convert import main as convert
    from megatron_mdm.models.build import build_model

    root = Path(base)
    make_tokenizer(root / "tok")
    cfg = make_cfg("mdm")
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(7)
    model = build_model(cfg, VOCAB, causal=False)[0]
    checkpointing.save_checkpoint(root / "ckpt", 1, [model], None, None,
                                  {"config": cfg.to_dict(), "consumed_samples": 0},
                                  tokenizer_dir=str(root / "tok"), config_yaml=cfg.to_yaml())
    assert convert(["to-hf", "--load", str(root / "ckpt"), "--output", str(root / "hf")]) == 0


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("remote_code")
    run_distributed(save_and_export, 1, str(base))
    return base / "hf"


def _env(tmp: Path) -> dict:
    # offline, and a private modules cache so that nothing from another run is reused
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """Run a module with stdin closed (a prompt would read EOF and print itself on stdout)."""
    return subprocess.run([sys.executable, *argv], cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)


def _poisoned_copy(export: Path, dst: Path) -> Path:
    """The export, with shipped code that fails if anything imports it."""
    shutil.copytree(export, dst)
    for name in [f.name for f in dst.glob("*.py")]:
        with open(dst / name, "a") as f:
            f.write('\nraise RuntimeError("the shipped code was run")\n')
    return dst


def test_generate_json_on_an_export_runs_no_shipped_code_and_no_prompt(export, tmp_path):
    model = _poisoned_copy(export, tmp_path / "hf")
    r = _run(["-m", "megatron_mdm.cli.generate", "--model", str(model), "--prompt", "w1 w2", "--prompt", "w3",
              "--gen-length", "4", "--steps", "2", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert PROMPT not in r.stdout and PROMPT not in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]  # stdout is JSON lines and nothing else
    assert [row["prompt"] for row in rows] == ["w1 w2", "w3"] and all(len(row["ids"]) == 4 for row in rows)


def test_in_process_classes_match_the_shipped_code(export, tmp_path):
    """The package's classes (no remote code) give the logits of the files shipped in the export."""
    import importlib

    from megatron_mdm.evaluation.loading import load_logits_fn

    fn, tok, mask_id, vocab = load_logits_fn(str(_poisoned_copy(export, tmp_path / "hf")))
    pkg = tmp_path / "pkgs" / "shipped_mdm"  # the export's own .py files, imported as a package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for f in export.glob("*.py"):
        shutil.copy2(f, pkg / f.name)
    sys.path.insert(0, str(pkg.parent))
    try:
        shipped = importlib.import_module("shipped_mdm.modeling_mdm")
    finally:
        sys.path.remove(str(pkg.parent))
    ref = shipped.MDMForMaskedLM.from_pretrained(str(export)).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(int(torch.randint(0, 999, ()))))
    with torch.no_grad():
        torch.testing.assert_close(fn(ids), ref(input_ids=ids).logits.float(), atol=1e-6, rtol=1e-6)
    assert mask_id == 0 and tok.mask_id == 0 and vocab == 100


def _custom_code_dir(tmp_path: Path) -> Path:
    """A BERT masked LM whose config asks for code shipped beside it; the code leaves a marker if run."""
    from test_eval import make_hf_dir

    d = make_hf_dir(tmp_path / "custom", seed=3)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="custom_bert", architectures=["CustomForMaskedLM"],
               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                         "AutoModelForMaskedLM": "modeling_custom.CustomForMaskedLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "code_was_run"
    (d / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom_bert'\n")
    (d / "modeling_custom.py").write_text(
        "from transformers import BertForMaskedLM\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForMaskedLM(BertForMaskedLM):\n    config_class = CustomConfig\n")
    return d


def test_custom_code_needs_the_flag(tmp_path, capsys):
    from megatron_mdm.cli.generate import main

    d = _custom_code_dir(tmp_path)
    marker = tmp_path / "code_was_run"
    capsys.readouterr()  # the progress bars of building the directory
    argv = ["--model", str(d), "--prompt", "the cat", "--gen-length", "2", "--steps", "1", "--json"]
    assert main(argv) == 2 and not marker.exists()  # refused before transformers sees the directory
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdm-generate: error: --model ") and "--trust-remote-code" in err[0]
    assert out.out == ""
    r = _run(["-m", "megatron_mdm.cli.generate", *argv, "--trust-remote-code"], tmp_path)  # a fresh process
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists() and json.loads(r.stdout.splitlines()[0])["prompt"] == "the cat"
