#!/usr/bin/env bash
# One-shot check on a bare GPU machine (torch with CUDA, nvcc and ninja installed; no network needed):
#   1. builds seqfast in place with the CUDA kernels (SEQFAST_CUDA=1: fails if they cannot be built),
#   2. runs the CUDA tests (tests/test_cuda.py: recurrent layers; tests/test_cuda_attention.py),
#   3. runs the GPU benchmarks (benchmarks/bench_gpu.py: seqfast vs cuDNN; bench_gpu_attention.py:
#      seqfast vs the padded reference and SDPA; CUDA events, median),
# and prints a short summary with the benchmark tables last. Budget: under 8 minutes (each stage has
# its own timeout: build 240 s, tests 180 s, benchmarks 90 s + 45 s; not yet run on a GPU machine,
# so the actual durations are unknown). Full logs go to $OUT when it is set, else to a temporary folder (printed).
#
#   benchmarks/gpu_check.sh                   # uses `python` (or $PYTHON)
#   OUT=/some/dir PYTHON=/venv/bin/python MAX_JOBS=8 benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LOGS=${OUT:-$(mktemp -d /tmp/seqfast_gpu_check.XXXXXX)}
mkdir -p "$LOGS"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
summary=()
now() { date +%s; }

{
  echo "== machine"
  nvidia-smi -L 2>&1 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  command -v nvcc && nvcc --version | tail -2
} > "$LOGS/machine.log" 2>&1
cat "$LOGS/machine.log"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA GPU; stopping" >&2
  exit 2
fi

# 1. Build (in place; a second run reuses build/ and is quick).
t0=$(now)
echo "== build (MAX_JOBS=$MAX_JOBS), log: $LOGS/build.log"
if SEQFAST_CUDA=1 timeout 240 "$PYTHON" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 &&
   "$PYTHON" -c "import seqfast._extension as e, sys; sys.exit(0 if e.cuda_kernels_compiled() else 1)" \
     >> "$LOGS/build.log" 2>&1; then
  summary+=("build: ok in $(( $(now) - t0 )) s ($(grep -m1 '^seqfast: building' "$LOGS/build.log"))")
else
  summary+=("build: FAILED after $(( $(now) - t0 )) s, see $LOGS/build.log")
  tail -30 "$LOGS/build.log"
  printf '%s\n' "${summary[@]}"
  exit 1
fi

# 2. CUDA tests.
t0=$(now)
echo "== tests/test_cuda.py tests/test_cuda_attention.py, log: $LOGS/test_cuda.log"
timeout 180 "$PYTHON" -m pytest tests/test_cuda.py tests/test_cuda_attention.py -q -rfEs -p no:cacheprovider \
  > "$LOGS/test_cuda.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
summary+=("CUDA tests: rc=$rc in $(( $(now) - t0 )) s: $(tail -1 "$LOGS/test_cuda.log")")
grep -E "^(FAILED|ERROR)" "$LOGS/test_cuda.log" | head -20

# 3. Benchmark.
t0=$(now)
echo "== benchmarks/bench_gpu.py, log: $LOGS/bench_gpu.log"
timeout 90 "$PYTHON" benchmarks/bench_gpu.py --json "$LOGS/bench_gpu.json" > "$LOGS/bench_gpu.md" 2> "$LOGS/bench_gpu.log"
rc=$?
[ $rc -ne 0 ] && status=1
summary+=("benchmark: rc=$rc in $(( $(now) - t0 )) s, json: $LOGS/bench_gpu.json")

t0=$(now)
echo "== benchmarks/bench_gpu_attention.py, log: $LOGS/bench_gpu_attention.log"
timeout 45 "$PYTHON" benchmarks/bench_gpu_attention.py --json "$LOGS/bench_gpu_attention.json" \
  > "$LOGS/bench_gpu_attention.md" 2> "$LOGS/bench_gpu_attention.log"
rc=$?
[ $rc -ne 0 ] && status=1
summary+=("attention benchmark: rc=$rc in $(( $(now) - t0 )) s, json: $LOGS/bench_gpu_attention.json")

echo
echo "== summary (logs in $LOGS)"
printf '%s\n' "${summary[@]}"
echo
if [ -s "$LOGS/bench_gpu.md" ]; then cat "$LOGS/bench_gpu.md"; else tail -20 "$LOGS/bench_gpu.log"; fi
echo
if [ -s "$LOGS/bench_gpu_attention.md" ]; then cat "$LOGS/bench_gpu_attention.md"; else tail -20 "$LOGS/bench_gpu_attention.log"; fi
exit $status
