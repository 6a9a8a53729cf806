#!/usr/bin/env bash
# Create or reuse .venv with megatron-mdm (editable) and what the examples and tests need.
#
#   bash examples/setup_env.sh          # called by examples/quickstart.sh and tests/run_tests.sh
#
# Three cases, decided when the environment is first made:
# - the interpreter ($PYTHON, default python3) already imports torch, megatron.core and this checkout's
#   megatron_mdm (the Dockerfile's image, or an environment you set up yourself): .venv becomes a thin venv
#   over that environment (a .pth file adds its site-packages) and nothing is installed, so the image's torch,
#   Transformer Engine and Apex are the ones used;
# - it imports torch but not this package: a thin venv over it, and pip installs the rest with torch (and the
#   other packages built with it) pinned to the installed versions;
# - otherwise a new venv: torch first (the CPU build from PyTorch's CPU index when no NVIDIA driver is present,
#   falling back to the default index when that index cannot be reached: on machines with a local wheel cache,
#   pip's find-links, torch==2.13.0 comes from there), then the package with its extras.
# Progress: one line per stage with the elapsed time, pip's Collecting/Installing lines, and a line every 30 s
# while pip is quiet; pip's whole output goes to .venv/setup.log.
#
# Environment: PYTHON (base interpreter), MDM_VENV (default .venv), MDM_TORCH_VERSION (CPU pin, default
# 2.13.0), MDM_TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd -P)"
PY="${PYTHON:-python3}"
case "$PY" in
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;    # checked from / below: make it absolute
  *) PY="$(command -v "$PY")" || { echo "[setup] $PYTHON: not found" >&2; exit 2; } ;;
esac
VENV="${MDM_VENV:-.venv}"
EXTRAS=".[dev,mpi,eval]"
stamp="$VENV/.mdm-installed-$(sha256sum pyproject.toml | cut -c1-16)"
[ -f "$stamp" ] && exit 0

T0=$(date +%s)
say() { printf '[setup] %4ds  %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# ---- what the base interpreter already has (asked from /, so that ./megatron_mdm does not count) ----
imports() { (cd / && "$PY" -c "$1" "$REPO") >/dev/null 2>&1; }
HAS_PACKAGE=0
HAS_TORCH=0
if imports "import os, sys, torch, megatron.core, megatron_mdm
assert os.path.realpath(megatron_mdm.__file__).startswith(sys.argv[1] + os.sep)"; then
  HAS_PACKAGE=1
elif imports "import torch"; then
  HAS_TORCH=1
fi

# A venv of the base interpreter whose .pth adds the base's site directories after its own (thin: no copies).
thin_venv() {
  "$PY" -m venv "$@" "$VENV"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  (cd / && "$PY" - "$site/zz-mdm-base-env.pth" <<'PY'
import sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
with open(sys.argv[1], "w") as f:  # one line: .pth files run lines that start with "import"
    f.write(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
PY
  )
  echo "$PY" > "$VENV/.mdm-base-env"
}

# Console scripts (mdm-*, torchrun) of packages that live in the base environment, run by the venv's python.
link_scripts() {
  "$VENV/bin/python" - "$VENV/bin" <<'PY'
import os, sys
from importlib.metadata import distributions
bindir = sys.argv[1]
for dist in distributions():
    if (dist.metadata["Name"] or "").lower() not in ("megatron-mdm", "megatron_mdm", "torch"):
        continue
    for ep in dist.entry_points:
        path = os.path.join(bindir, ep.name)
        if ep.group != "console_scripts" or os.path.exists(path):
            continue
        module, _, attr = ep.value.partition(":")
        with open(path, "w") as f:
            f.write(f"#!{os.path.join(os.path.abspath(bindir), 'python')}\nimport sys\nfrom {module} import {attr}\n"
                    f"sys.exit({attr}())\n")
        os.chmod(path, 0o755)
PY
}

LOG="$VENV/setup.log"
# pip install with progress: stage line, pip's Collecting/Installing lines, a tick every 30 s; the rest to $LOG
show_pip() {
  local line
  while IFS= read -r line; do
    case "$line" in
      Collecting*|"Installing collected"*|"Successfully installed"*|ERROR*) printf '[setup]          %.150s\n' "$line" ;;
    esac
  done
}
pip_step() {
  local what="$1"; shift
  say "$what"
  ( n=0; while sleep 1 </dev/null >/dev/null 2>&1; do  # (no sleep left holding our output when killed)
      n=$((n + 1)); if [ $((n % 30)) = 0 ]; then say "  ... still at: $what"; fi; done ) &
  local ticker=$! rc=0
  set +e
  "$VENV/bin/python" -m pip install --progress-bar off "$@" 2>&1 | tee -a "$LOG" | show_pip
  rc=${PIPESTATUS[0]}
  set -e
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}

fail() {
  say "failed: $*; the last lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2 || true
  exit 1
}

reachable() {  # an index URL answers within 10 s
  "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" \
    "$1" >/dev/null 2>&1
}

# ---- 1. the environment ------------------------------------------------------------------------------------
if [ -f "$VENV/.mdm-base-env" ] && [ "$HAS_PACKAGE" = 1 ]; then
  MODE=reuse
elif [ -f "$VENV/.mdm-base-env" ] && [ ! -x "$VENV/bin/pip" ]; then
  echo "[setup] $VENV was made over $(cat "$VENV/.mdm-base-env"), which no longer imports this checkout's" \
       "megatron_mdm: remove $VENV and run again" >&2
  exit 2
elif [ -x "$VENV/bin/python" ]; then
  MODE=install                               # a venv of an earlier, unfinished run: go on installing
elif [ "$HAS_PACKAGE" = 1 ]; then
  say "$PY already imports torch, megatron.core and this checkout's megatron_mdm: $VENV uses that environment"
  thin_venv --without-pip
  MODE=reuse
elif [ "$HAS_TORCH" = 1 ]; then
  say "$PY already imports torch: $VENV is a thin venv over its environment (torch and what came with it stay)"
  thin_venv
  MODE=overlay
else
  say "creating $VENV ($("$PY" -c 'import sys; print(sys.version.split()[0])') from $PY)"
  "$PY" -m venv "$VENV"
  MODE=install
fi
mkdir -p "$VENV"
: >> "$LOG"

# ---- 2. packages -------------------------------------------------------------------------------------------
if [ "$MODE" = reuse ]; then
  link_scripts
else
  say "upgrading pip"
  "$VENV/bin/python" -m pip install -q --upgrade pip >> "$LOG" 2>&1 || say "  (pip could not be upgraded: going on)"
  CONSTRAINTS=()
  if [ "$MODE" = overlay ]; then
    # pin what the base environment built together, so that no dependency of ours replaces it
    (cd / && "$PY" - > "$VENV/base-constraints.txt") <<'PY'
from importlib.metadata import distributions
keep = {"torch", "torchvision", "torchaudio", "triton", "transformer-engine", "transformer-engine-torch",
        "transformer-engine-cu12", "apex", "flash-attn", "numpy", "nvidia-cudnn-frontend"}
for d in distributions():
    name = (d.metadata["Name"] or "").lower().replace("_", "-")
    if name in keep:
        print(f"{name}=={d.version}")
PY
    CONSTRAINTS=(-c "$VENV/base-constraints.txt")
  elif ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      pip_step "torch (an NVIDIA driver is present: the default index's CUDA build)" "torch>=2.6,<2.14" \
        || fail "torch could not be installed"
    else
      want="torch==${MDM_TORCH_VERSION:-2.13.0}"
      index="${MDM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
      if reachable "$index" && pip_step "$want, the CPU build (no NVIDIA driver), from $index" "$want" --index-url "$index"; then
        :
      else
        pip_step "$want from the default index ($index cannot be reached)" "$want" || fail "torch could not be installed"
      fi
    fi
  fi
  pip_step "megatron-mdm (editable) and its dependencies: $EXTRAS" -e "$EXTRAS" ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} \
    || fail "megatron-mdm could not be installed"
fi
versions=$("$VENV/bin/python" -W ignore -c "import torch, megatron.core, megatron_mdm, os
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| megatron_mdm from',
      os.path.dirname(os.path.dirname(megatron_mdm.__file__)))") || fail "$VENV cannot import the package"
touch "$stamp"
say "ready: $versions"
