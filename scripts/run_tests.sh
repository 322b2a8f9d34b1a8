#!/usr/bin/env bash
# The whole test suite (set-up included). Triton kernels run through the interpreter when no
# GPU is present; tests marked `gpu` are skipped there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
