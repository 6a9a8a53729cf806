"""Sampling inside transformers: the exported model's ``generate`` is megatron-mdm's decoding, token for token.

The model directory holds what ``mdm-convert to-hf`` ships (``hf.modeling.shipped_files``). The reference is
``mdm-generate`` (this package's classes, in this process); the other side is a fresh interpreter that knows
nothing of megatron-mdm (it is not on its path) and loads the directory with transformers alone,
``trust_remote_code=True``, so the shipped files run. Settings: every cache mode with the schedule and with the
threshold rule, and sampling with guidance, top-k and random remasking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_decoding import make_mdm_dir

PROMPTS = ["the cat sat", "a dog", "the red mat is", "a big dog ran on"]  # three lengths: rows grouped
CASES = [
    {"cache": "none"}, {"cache": "prefix"}, {"cache": "dual"},
    {"cache": "none", "threshold": 0.6}, {"cache": "prefix", "threshold": 0.6}, {"cache": "dual", "threshold": 0.6},
    {"cache": "dual", "temperature": 0.8, "top_k": 6, "cfg_scale": 0.5, "remasking": "random"},
    {"cache": "prefix", "factor": 1.0, "refresh_interval": 2, "top_p": 0.9, "temperature": 0.5},
]
COMMON = {"gen_length": 12, "steps": 12, "block_length": 4}

SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
path, prompts, cases, common, seed = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__  # the shipped code
inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
out = []
for case in cases:
    res = model.generate(**inputs, **common, **case, seed=seed, return_dict_in_generate=True)
    gen = res.sequences[:, inputs["input_ids"].shape[1]:].tolist()
    out.append({"ids": gen, "forwards": res.forwards_per_row})
print(json.dumps(out))
"""


def _transformers_only(tmp: Path, args: list) -> list:
    """Run SCRIPT in a fresh interpreter where megatron-mdm cannot be imported, stdin closed, offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    code = "import sys; sys.modules['megatron_mdm'] = None  # any import of it fails\n" + SCRIPT
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mdm_generate(model: Path, case: dict, seed: int, capsys) -> list[dict]:
    from megatron_mdm.cli.generate import main

    argv = ["--model", str(model), "--json", "--no-progress", "--seed", str(seed)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    for k, v in {**COMMON, **case}.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()] or pytest.fail(repr(out[-2000:]))


def _cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.mark.slow
def test_hf_generate_equals_mdm_generate(tmp_path, capsys):
    seed = int(torch.randint(0, 10_000, ()))
    model = make_mdm_dir(tmp_path / "mdm", seed)
    hf = _transformers_only(tmp_path, [str(model), PROMPTS, CASES, COMMON, seed])
    fired = False
    for case, got in zip(CASES, hf):
        ref = _mdm_generate(model, case, seed, capsys)
        assert [_cut_at_eos(ids, 2) for ids in got["ids"]] == [r["ids"] for r in ref], case
        assert got["forwards"] == [r["forwards"] for r in ref], case
        fired |= "threshold" in case and min(got["forwards"]) < COMMON["gen_length"]
    assert fired, "the threshold rule never unmasked two tokens in one step: the test would not see it"


def test_shipped_files_are_the_package_files(tmp_path):
    from megatron_mdm.hf import modeling as hf_modeling

    model = make_mdm_dir(tmp_path / "mdm", 0)
    files = hf_modeling.shipped_files()
    assert {"modeling_mdm.py", "hf_generation.py", "loop.py", "cache.py"} <= set(files)
    for name, src in files.items():
        assert (model / name).read_bytes() == src.read_bytes(), name
        if src.parent.name == "decoding":  # shipped flat: imports of one another are relative, nothing else
            for line in src.read_text().splitlines():
                if line.startswith(("from megatron_mdm", "import megatron_mdm")):
                    pytest.fail(f"{name}: {line!r} cannot run inside an export")


def test_generate_settings_and_layout():
    """Defaults from generation_config.decoding, max_new_tokens, padding dropped, unknown settings named."""
    from test_decoding import tiny_mdm

    from megatron_mdm.decoding import decode
    from megatron_mdm.decoding.hf_generation import HFForward
    from megatron_mdm.decoding.settings import DecodingConfig

    model = tiny_mdm(int(torch.randint(0, 10_000, ())), vocab=16, mask_id=15, sharp=3.0)
    model.generation_config.decoding = {"gen_length": 8, "steps": 8, "block_length": 4, "cache": "dual"}
    rows = [[3, 4, 5], [6, 7]]
    ids = torch.tensor([[3, 4, 5], [0, 6, 7]])  # the second row left-padded
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = model.generate(ids, attention_mask=mask, eos_token_id=None)
    ref = decode(HFForward(model), rows, DecodingConfig(gen_length=8, steps=8, block_length=4, cache="dual"), 15,
                 vocab_size=16)
    assert out.shape == (2, 3 + 8) and torch.equal(out[:, :3], ids)
    assert out[:, 3:].tolist() == [row[p : p + 8] for row, p in zip(ref.tokens.tolist(), ref.prompt_lengths)]
    again = model.diffusion_generate(rows, max_new_tokens=8, eos_token_id=None)  # lists: left-padded output
    assert torch.equal(again[:, 3:], out[:, 3:])
    with pytest.raises(ValueError, match="unknown setting.*stepz"):
        model.generate(ids, stepz=3)
    with pytest.raises(ValueError, match="block_length"):
        model.generate(ids, block_length=3)
