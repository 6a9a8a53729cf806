#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv, installs the package with its test extras, runs pytest.
# Usage: bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest tests "$@"
