"""pyproject.toml: the wheel pip builds holds the package, the exported model's code and every console script."""

from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"mdm-pretrain", "mdm-tokenizer", "mdm-data", "mdm-convert", "mdm-generate", "mdm-eval", "mdm-sweep",
           "mdm-plot"}


def test_wheel_has_every_console_script(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megatron_mdm", src / "megatron_mdm", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("megatron_mdm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ep = configparser.ConfigParser()
        ep.read_string(z.read(entry).decode())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    scripts = dict(ep["console_scripts"])
    assert set(scripts) == SCRIPTS
    for target in scripts.values():  # each names a callable main
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    assert "megatron_mdm/hf/modeling/modeling_mdm.py" in names and "megatron_mdm/cli/pretrain.py" in names
    assert not any(n.startswith(("tests/", "pretrain/", "benchmarks/")) for n in names)
    assert not (REPO / "setup.py").exists()
    extras = {ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Provides-Extra:")}
    assert {"gpu", "mpi", "sweep", "dev", "eval", "wandb"} <= extras
