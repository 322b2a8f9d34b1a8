#!/usr/bin/env bash
# Every GPU test and benchmark in one command, in under 14 minutes (stage limits), with all logs and JSON
# reports left in one folder (DESIGN §7). For a CUDA machine without internet:
#
#   bash benchmarks/gpu_suite.sh [OUTDIR]     # default: benchmarks/results/gpu-<date>
#
# On a copy of the tree, set R2EC_GIT_COMMIT=<commit> so that the reports name the right one.
#
# Stages run in order, each under `timeout`; a failed stage is reported and the next one still
# runs (a failing test must not hide the benchmark numbers). Exit status 1 if any stage failed.
# Stage limits: install 15 s, import 15 s, pytest 150 s, catalog bench 60 s, token_logp bench
# (quick shapes + the Gemma-2-2B T = 8192 acceptance case) 50 s, rms_norm bench (decode-step
# rows at d 2304) 30 s, step bench (quick: one catalog of 1e5 items) 180 s, rollout bench (quick: the Gemma-2-2B shape, B 16 x G 4, 1,024-token
# prompts, 128 new tokens; its compile_decode row compiles first) 240 s; with 10 s of kill
# grace each, at most 820 s, plus whatever the CUDA sampler's build (limit 240 s, measured
# 46-53 s) has left when pytest ends. Measured on an H200 (2026-11-26, commit e1a8b77): install 4 s,
# import 6 s, pytest over 130 s (it timed out; the CUDA sampler's first build, about a minute,
# runs beside it and the rollout tests wait for it), catalog bench 45 s, token_logp bench
# 26 s, rollout bench 50 s. pytest prints each test's name and its 15 slowest, and a test
# still running after 100 s dumps every thread's stack into the log.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu-$(date +%Y-%m-%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUITE_START=$(date +%s)
FAILED=()

# stage NAME LIMIT_S CMD...: stdout to OUT/NAME.log, stderr to OUT/NAME.err
stage() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>"$OUT/$name.err"
    rc=$?
    # pytest exits 5 when nothing is marked gpu yet: not a failure of the suite
    if [ "$rc" -eq 5 ] && [ "$name" = pytest-gpu ]; then rc=0; fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "   TIMED OUT after ${limit}s"; fi
    echo "   rc=$rc in $(( $(date +%s) - start ))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    return "$rc"
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "${R2EC_GIT_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo no git checkout)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
} >"$OUT/environment.txt" 2>&1

stage install 15 python3 -m pip install -q --no-deps --no-build-isolation -e .
if ! stage import 15 python3 -c "import torch, r2ec_fast.kernels; assert torch.cuda.is_available(), 'no CUDA device'"; then
    echo "r2ec_fast.kernels does not import or no CUDA device: see $OUT/import.err"
    exit 1
fi
# the CUDA sampler (csrc/sampling.cu) is JIT-built on first use, about a minute: start the
# build now so that it overlaps the GPU tests (a test that needs it first waits on torch's
# build lock, then loads the same binary)
timeout 240 python3 -c "import sys; from r2ec_fast.ops.sampling import _cuda_extension; \
sys.exit(_cuda_extension() is None)" >"$OUT/build-csrc.log" 2>&1 &
BUILD_PID=$!
stage pytest-gpu 150 env PYTHONSAFEPATH=1 python3 -m pytest -m gpu -v -rfE --tb=short --durations=15 -p no:cacheprovider \
    -o faulthandler_timeout=100
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest-gpu.log" | tail -n 40
if wait "$BUILD_PID"; then echo "== csrc build: ok"; else echo "== csrc build FAILED: see $OUT/build-csrc.log"; FAILED+=("build-csrc"); fi
stage bench-catalog 60 python3 -m r2ec_fast.cli bench --op catalog --device cuda \
    --json "$OUT/catalog-cuda.json"
cat "$OUT/bench-catalog.log"
stage bench-token_logp 50 python3 -m r2ec_fast.cli bench --op token_logp --device cuda --quick \
    --json "$OUT/token_logp-cuda.json"
cat "$OUT/bench-token_logp.log"
stage bench-rms_norm 30 python3 -m r2ec_fast.cli bench --op rms_norm --device cuda --quick \
    --json "$OUT/rms_norm-cuda.json"
cat "$OUT/bench-rms_norm.log"
# one whole RecPO step at the Gemma-2-2B shape (quick: the 1e5-item catalog, 128 reasoning
# tokens; its set-up builds and saves 2.6B random bf16 weights first; not yet run on a GPU)
stage bench-step 180 python3 -m r2ec_fast.cli bench --op step --device cuda --quick \
    --json "$OUT/step-cuda.json"
cat "$OUT/bench-step.log"
# last: its engine_compiled row compiles 26 layers first (not yet measured on a GPU)
stage bench-rollout 240 python3 -m r2ec_fast.cli bench --op rollout --device cuda --quick \
    --json "$OUT/rollout-cuda.json"
cat "$OUT/bench-rollout.log"

echo "== done in $(( $(date +%s) - SUITE_START ))s; logs and reports in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "FAILED stages: ${FAILED[*]}"
    exit 1
fi
