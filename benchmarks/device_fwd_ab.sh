#!/usr/bin/env bash
# One-GPU device pass for the forward main kernels: the wgmma building-block test, the kernel-choice
# test and the float64 checks with the mma.sync forward (the default suites run the wgmma one), then
# bench_kernels.py with the mma.sync and the wgmma forward alternating in separate processes
# (LASP_FWD_KERNEL; same build, same card). Logs and JSON under $OUT. ROUNDS (default 1), SHAPES, REPS
# and PYTEST=1 (test_op -k cuda with the wgmma forward) tune it.
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
T0=$(date +%s)
timeout 60 "$GTEST" --gtest_filter='Wgmma.*:CudaKernelsApi.ForwardKernelChoice:Dtypes16/CudaKernelsMmaFwd.*' > "$OUT/gtest_wgmma.log" 2>&1
echo "gtest rc=$? ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/gtest_wgmma.log"
grep -E "relative error|Failure|FAILED|PASSED|SKIPPED|OK \]" "$OUT/gtest_wgmma.log" | head -30
S=${SHAPES:-4x32x8192x128,1x16x65536x128,8x16x2048x64,1x12x65536x64}
for r in $(seq 1 "${ROUNDS:-1}"); do
  for kern in mma wgmma; do
    LASP_FWD_KERNEL=$kern timeout 60 python3 benchmarks/bench_kernels.py --impls lasp --shapes "$S" \
      --reps "${REPS:-20}" --json "$OUT/bk_${kern}_$r.json" > "$OUT/bk_${kern}_$r.log" 2>&1
    echo "== $kern round $r rc=$? ($(( $(date +%s) - T0 )) s)"
    grep -E "^# [0-9]+x|failed|Error" "$OUT/bk_${kern}_$r.log" | head -12
  done
done
if [ "${PYTEST:-0}" = 1 ]; then
  LASP_FWD_KERNEL=wgmma timeout 200 python3 -m pytest -q -x tests/python/test_op.py -k cuda -p no:cacheprovider \
    > "$OUT/test_op_cuda_wgmma.log" 2>&1
  echo "pytest (wgmma) rc=$?"; tail -3 "$OUT/test_op_cuda_wgmma.log"
fi
