#!/usr/bin/env bash
# One-GPU device pass for the tensor-core main kernels (mma.sync and wgmma, forward and backward):
#   1. GoogleTest: the wgmma building blocks, the kernel-choice tests, the float64 checks with the
#      mma.sync forward (CudaKernelsMmaFwd) and with the mma.sync backward (CudaKernelsMmaBwd), then the
#      default suites (bf16, f16: the wgmma forward and backward on sm_90a);
#   2. with PYTEST=1: pytest test_op -k cuda (the defaults);
#   3. bench_kernels.py --impls lasp with the kernel pairs of VARIANTS alternating in separate processes
#      (same build, same card), ROUNDS rounds.
# Logs and JSON under $OUT. SHAPES, REPS, ROUNDS (default 1), VARIANTS (default "mma/mma wgmma/mma
# wgmma/wgmma": LASP_FWD_KERNEL/LASP_BWD_KERNEL; an entry may add "/NAME=VALUE" for one more setting,
# e.g. "wgmma/wgmma/LASP_WGMMA_BWD_D64_BLOCKS=1") tune it. BASE_PKG: a folder holding another build of
# the package (lasp/ with its liblasp*.so, e.g. of the previous commit): it runs as variant "base" in
# every round, before the others, for a same-card A/B of two trees. TESTS=0 skips steps 1 and 2.
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export LASP_COMMIT=${LASP_COMMIT:-$(git log -1 --format=%h 2>/dev/null)}  # set it here when the copy's .git is stale
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if [ "${TESTS:-1}" = 1 ]; then
timeout 120 "$GTEST" --gtest_filter='Wgmma.*:CudaKernelsApi.*:Dtypes16/CudaKernelsMmaFwd.*:Dtypes16/CudaKernelsMmaBwd.*' \
  > "$OUT/gtest_wgmma.log" 2>&1
el "gtest (wgmma suites) rc=$?" | tee -a "$OUT/gtest_wgmma.log"
grep -E "relative error|Failure|FAILED|PASSED|SKIPPED|OK \]" "$OUT/gtest_wgmma.log" | head -30
timeout 120 "$GTEST" --gtest_filter='AllDtypes/CudaKernels.*/bf16:AllDtypes/CudaKernels.*/f16' \
  > "$OUT/gtest_default.log" 2>&1
el "gtest (default suites) rc=$?" | tee -a "$OUT/gtest_default.log"
grep -E "Failure|FAILED|PASSED|OK \]" "$OUT/gtest_default.log" | head -12
if [ "${PYTEST:-0}" = 1 ]; then
  timeout 200 python3 -m pytest -q -x tests/python/test_op.py -k "cuda and not float64" \
    -p no:cacheprovider > "$OUT/test_op_cuda.log" 2>&1
  el "pytest test_op -k cuda rc=$?"; tail -3 "$OUT/test_op_cuda.log"
fi
fi
S=${SHAPES:-4x32x8192x128,1x16x65536x128,8x16x2048x64,1x12x65536x64}
bench() {  # tag, then env assignments
  local tag=$1; shift
  env "$@" timeout 60 python3 benchmarks/bench_kernels.py --impls lasp --shapes "$S" --reps "${REPS:-20}" \
    --json "$OUT/bk_${tag}.json" > "$OUT/bk_${tag}.log" 2>&1
  el "== $tag ($*) rc=$?"
  grep -E "^# [0-9]+x|failed|Error" "$OUT/bk_${tag}.log" | head -12
}
for r in $(seq 1 "${ROUNDS:-1}"); do
  if [ -n "${BASE_PKG:-}" ]; then bench "base_$r" PYTHONPATH="$BASE_PKG:$PYTHONPATH"; fi
  for pair in ${VARIANTS:-mma/mma wgmma/mma wgmma/wgmma}; do
    IFS=/ read -r f bk extra <<< "$pair"
    tag="${f}-${bk}${extra:+-${extra//[^A-Za-z0-9]/}}_$r"
    bench "$tag" LASP_FWD_KERNEL="$f" LASP_BWD_KERNEL="$bk" ${extra:+"$extra"}
  done
done
