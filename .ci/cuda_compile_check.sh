#!/usr/bin/env bash
# CI compile check of the CUDA kernels (no GPU needed): in a fresh virtual environment with the CUDA
# build of torch, build seqfast with SEQFAST_CUDA=1 (a syntax or type error in a .cu file fails here)
# and check that the build registered the CUDA kernels. Nothing runs on a GPU.
#
# The build happens in a copy of the sources under a temporary folder, so the in-place CPU build of the
# main test run (seqfast/_C*.so against the CPU torch) is left alone.
#
#   .ci/cuda_compile_check.sh                       # fresh venv in a temp folder, removed afterwards
#   SEQFAST_CUDA_VENV=/path/venv .ci/cuda_compile_check.sh   # reuse (or create) that venv
# Needs nvcc on the PATH (a wrapper script is fine: setup.py asks nvcc for its toolkit root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_SPEC=${SEQFAST_CUDA_TORCH:-torch==2.14.1}
WORK=$(mktemp -d /tmp/seqfast_cuda_ci.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
VENV=${SEQFAST_CUDA_VENV:-$WORK/venv}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "CI (CUDA): creating $VENV with $TORCH_SPEC"
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "$TORCH_SPEC" ninja numpy setuptools
"$VENV/bin/python" -c "import torch, sys; print('CI (CUDA): torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.version.cuda else 'not a CUDA build of torch')"
after_install=$(date +%s)

mkdir -p "$WORK/src"
cp -r "$ROOT/setup.py" "$ROOT/csrc" "$ROOT/seqfast" "$WORK/src/"
rm -f "$WORK/src/seqfast/"_C*.so
cd "$WORK/src"
echo "CI (CUDA): building with SEQFAST_CUDA=1, MAX_JOBS=${MAX_JOBS:-2}"
PATH="$VENV/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} SEQFAST_CUDA=1 "$VENV/bin/python" setup.py build_ext --inplace \
  > "$WORK/build.log" 2>&1 || { tail -60 "$WORK/build.log"; echo "CI (CUDA): build FAILED" >&2; exit 1; }
grep -m1 '^seqfast: building' "$WORK/build.log"
"$VENV/bin/python" -c "
import torch, seqfast, seqfast._extension as e
assert e.cuda_kernels_compiled(), 'seqfast._C built without CUDA kernels'
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('seqfast::'))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, 'CUDA')]
assert ops and not missing, f'no CUDA kernel registered for {missing}'
print(f'CI (CUDA): cuda_kernels_compiled() = True; CUDA kernels registered for all {len(ops)} ops')"
end=$(date +%s)
echo "CI (CUDA): ok; install $((after_install - start)) s, build $((end - after_install)) s, total $((end - start)) s"
