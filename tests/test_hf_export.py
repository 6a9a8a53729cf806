"""The export of a real Megatron checkpoint (``mdm-convert to-hf``) loads like a stock transformers model.

Each check runs in a fresh interpreter with stdin closed (a "[y/N]" prompt reads EOF), offline, with a private
modules cache, and without megatron-mdm importable where the check is about transformers alone. References:
the package's own classes (logits), ``DecodingConfig`` (the generation defaults), the checkpoint's config
(the trained length), the run's directory path (which must appear nowhere in the export).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from test_failsafe_remote_code import save_and_export

    base = tmp_path_factory.mktemp("hf_export")
    run_distributed(save_and_export, 1, str(base))
    return base / "hf"


def _python(code: str, tmp: Path, cwd: Path | None = None, package: bool = False) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; megatron-mdm cannot be imported unless ``package``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    if package:
        env["PYTHONPATH"] = str(REPO)
    else:
        code = "import sys; sys.modules['megatron_mdm'] = None\n" + code
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or tmp, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)


def test_tokenizer_loads_with_nothing_printed(export, tmp_path):
    r = _python(f"from transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained({str(export)!r})\n"
                "import json; print(json.dumps([t.model_max_length, t.mask_token_id, t.eos_token_id]))", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1, (r.stdout, r.stderr)  # no prompt, no warning
    assert json.loads(r.stdout) == [16, 0, 2]  # the trained sequence length of the checkpoint (make_cfg)


def test_config_generation_defaults_and_no_machine_paths(export):
    from megatron_mdm.decoding.settings import DecodingConfig
    from megatron_mdm.hf import modeling as hf_modeling

    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "eurobert" and "rope_scaling" not in config
    assert config["auto_map"] == hf_modeling.AUTO_MAP
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["decoding"] == dataclasses.asdict(DecodingConfig()) and gen["mask_token_id"] == 0
    run = export.parent / "ckpt"
    for f in export.iterdir():
        if f.suffix in (".json", ".md", ".py", ".txt"):
            text = f.read_text()
            for path in {str(run), str(run.resolve()), str(export.parent), str(Path.home())}:
                assert path not in text, (f.name, path)
    card = (export / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 1] == \
        "# ckpt: masked diffusion language model (megatron-mdm)"


def test_stock_classes_and_remote_code_load_cleanly(export, tmp_path):
    """Stock EuroBERT (no custom code) and the shipped classes give the package's logits; AutoModel with the
    shipped code reports no unexpected key."""
    from megatron_mdm.evaluation.loading import load_logits_fn

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(int(torch.randint(0, 999, ()))))
    code = f"""
import json, torch
from transformers import AutoModel, AutoModelForMaskedLM
ids = torch.tensor({ids.tolist()})
stock = AutoModelForMaskedLM.from_pretrained({str(export)!r})
remote = AutoModelForMaskedLM.from_pretrained({str(export)!r}, trust_remote_code=True)
base = AutoModel.from_pretrained({str(export)!r}, trust_remote_code=True)
with torch.no_grad():
    out = [stock(input_ids=ids).logits.tolist(), remote(input_ids=ids).logits.tolist()]
print(json.dumps([type(stock).__name__, type(remote).__name__, type(base).__name__, out]))
"""
    r = _python(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UNEXPECTED" not in r.stderr and "MISSING" not in r.stderr and "[y/N]" not in r.stdout + r.stderr
    names = json.loads(r.stdout.splitlines()[-1])
    assert names[:3] == ["EuroBertForMaskedLM", "MDMForMaskedLM", "MDMModel"]
    fn, *_ = load_logits_fn(str(export))
    ref = fn(ids)
    for logits in names[3]:
        torch.testing.assert_close(torch.tensor(logits), ref, atol=1e-5, rtol=1e-5)


def test_model_card_usage_runs(export, tmp_path):
    """The card's Python, as written, from the export's directory: transformers alone samples."""
    blocks = re.findall(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S)
    assert blocks and "generate(" in blocks[0]
    r = _python("\n".join(blocks), tmp_path, cwd=export)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[y/N]" not in r.stdout + r.stderr
    texts = ast.literal_eval(r.stdout.strip().splitlines()[-1])  # print(tokenizer.batch_decode(...)): a list of one text
    assert isinstance(texts, list) and len(texts) == 1
