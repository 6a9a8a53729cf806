#!/usr/bin/env bash
# Create or reuse .venv-mcore019: the CI environment that runs the tests against megatron-core 0.19.x,
# the version GPU images ship, on this machine's Python 3.11.
#
# It is a thin venv over .venv (created first by examples/setup_env.sh when missing): its own
# site-packages holds only megatron-core 0.19.x and triton (which megatron-core 0.19 imports at
# `import GPTModel` time; triton's CPU import needs no GPU), and a `.pth` file that appends .venv's
# site-packages *after* them. So torch, transformers, ... are shared (no second copy, ~20 s to build),
# `megatron.core` resolves to 0.19, and `sys.executable` of the new venv (used by tests for their
# subprocesses) keeps that view whatever PYTHONPATH a test sets.
#
# megatron-core 0.17+ declares Requires-Python >= 3.12, but 0.19.2 still publishes a cp311 wheel:
# it is installed with --ignore-requires-python --no-deps (its dependencies torch, numpy, packaging
# come from .venv).
#
# Environment: MDM_MCORE_VERSION (default 0.19.2), MDM_TRITON_VERSION (default 3.9.0),
# MDM_BASE_VENV (default .venv), MDM_MCORE_VENV (default .venv-mcore019).
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE="${MDM_MCORE_VERSION:-0.19.2}"
TRITON="${MDM_TRITON_VERSION:-3.9.0}"
BASE="${MDM_BASE_VENV:-.venv}"
ENV="${MDM_MCORE_VENV:-.venv-mcore019}"

if [ ! -x "$BASE/bin/python" ]; then
  bash examples/setup_env.sh
fi
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$(cd "$base_site" && pwd -P)
stamp="$ENV/.mdm-mcore-$(printf '%s %s %s' "$MCORE" "$TRITON" "$base_site" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "[setup] building $ENV: megatron-core $MCORE + triton $TRITON over $BASE (first run only)"
t0=$(date +%s)
rm -rf "$ENV"
# a venv of the same base interpreter as .venv, without its own pip (.venv's pip installs into it)
"$BASE/bin/python" -m venv --without-pip "$ENV"
site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$BASE/bin/python" -m pip install -q --no-deps --ignore-requires-python --only-binary=:all: \
  --target "$site" "megatron-core==$MCORE" "triton==$TRITON"
# after the venv's own site-packages: .venv's, with its .pth files (editable installs) processed too
printf 'import site; site.addsitedir(%s)\n' "'$base_site'" > "$site/zz-mdm-base-venv.pth"
# the console scripts and launchers of .venv (mdm-*, mpirun, torchrun) with this venv's interpreter
for f in "$BASE"/bin/*; do
  name=$(basename "$f")
  case "$name" in python*|activate*|pip*|Activate*) continue ;; esac
  [ -e "$ENV/bin/$name" ] && continue
  if head -c 64 "$f" 2>/dev/null | head -1 | grep -q '^#!.*python'; then
    { echo "#!$(cd "$ENV/bin" && pwd -P)/python"; tail -n +2 "$f"; } > "$ENV/bin/$name"
    chmod +x "$ENV/bin/$name"
  else
    ln -s "$(cd "$(dirname "$f")" && pwd -P)/$name" "$ENV/bin/$name"
  fi
done
"$ENV/bin/python" - "$MCORE" <<'PY'
import sys
from importlib.metadata import version
import megatron.core
from megatron.core.package_info import __shortversion__ as have
want = sys.argv[1]
assert have == want, f"megatron.core resolves to {have} ({megatron.core.__file__}), not {want}"
assert version("megatron-core") == want, version("megatron-core")
import torch, triton  # noqa: E401,F401 - the shared torch and the local triton import
PY
touch "$stamp"
echo "[setup] $ENV ready in $(( $(date +%s) - t0 )) s ($(du -sh "$ENV" | cut -f1))"
