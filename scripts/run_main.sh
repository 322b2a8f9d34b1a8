#!/usr/bin/env bash
# The main job (set-up included): build the synthetic data (data/synth) and the tiny Gemma-2
# (models/tiny-gemma2) when missing, train the `tiny` RecPO preset on this CPU (a described
# warm start, then RecPO) and print the evaluation table before training, at the end of the
# warm start and after RecPO, beside a popularity baseline. A new run folder
# under runs/ each time. Extra arguments go to `r2ec-fast train` (e.g. --set optim.lr=2e-3).
# The quick kernel benchmarks: .venv/bin/r2ec-fast bench --quick
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
run="runs/tiny-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/r2ec-fast train --preset tiny --out "$run" "$@"
