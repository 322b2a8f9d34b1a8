#!/usr/bin/env bash
# The whole test suite (set-up included). Triton kernels run through the interpreter when no
# GPU is present; tests marked `gpu` are skipped there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# PYTHONSAFEPATH and the console script: the repository root must not be on sys.path, where
# its kernels/ folder (installed as r2ec_fast.kernels) would shadow the `kernels` package of
# the Hub that transformers >= 5.25 imports ("cannot import name 'CUDAProperties'")
export PYTHONSAFEPATH=1
exec .venv/bin/pytest -q "$@"
