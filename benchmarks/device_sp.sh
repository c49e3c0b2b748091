#!/usr/bin/env bash
# One device-machine pass for the sequence-parallel work (issue 4) on 1..4 GPUs: the CUDA GoogleTest,
# the CUDA/NCCL pytest cases (2-, 3- and 4-rank NCCL rings where the GPUs exist), bench_sp.py.
# Uses the extension built in place (python/lasp/liblasp*.so, build/cmake/lasp_cpp_tests, carried from a
# machine with nvcc) when it loads; otherwise builds it here for sm_90a. Logs under $OUT.
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L | tee "$OUT/gpus.txt"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
NGPU=$(nvidia-smi -L | wc -l)
source "$(dirname "$0")/device_env.sh"
export LASP_COMMIT=${LASP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}

timeout 300 "$GTEST" --gtest_filter='*Cuda*' > "$OUT/gtest_cuda.log" 2>&1; echo "gtest rc=$?"; tail -3 "$OUT/gtest_cuda.log"
timeout ${PYTEST_S:-240} python3 -m pytest -q tests/python/test_op.py tests/python/test_distributed.py -k "cuda or nccl" \
  -p no:cacheprovider -rs > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest_gpu.log"
timeout ${BENCH_S:-300} torchrun --standalone --nproc_per_node "$NGPU" benchmarks/bench_sp.py \
  --json "$OUT/bench_sp.json" --plot "$OUT/bench_sp.png" ${BENCH_SP_ARGS:-} > "$OUT/bench_sp.log" 2>&1
echo "bench_sp rc=$?"; grep -E "^#|^\|" "$OUT/bench_sp.log" | tail -40
