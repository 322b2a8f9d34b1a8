#!/usr/bin/env bash
# The main job (set-up included). Until the trainer lands: the quick kernel benchmarks, which
# print the comparison table and write JSON under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/r2ec-fast bench --quick "$@"
