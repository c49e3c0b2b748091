#!/usr/bin/env bash
# One device-machine pass: build for sm_90a, GoogleTest (CUDA kernels), the CUDA/NCCL pytest cases,
# the NCCL demo. Logs under $OUT (device tool) or ./device_out.
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 LASP_CUDA_ARCHS=90a MAX_JOBS=16
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
ctest --test-dir build/cmake -R Cuda --output-on-failure > "$OUT/ctest.log" 2>&1; tail -4 "$OUT/ctest.log"
timeout 240 python3 -m pytest -q -x tests/python/test_op.py tests/python/test_distributed.py -k "cuda or nccl" -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1; tail -4 "$OUT/pytest_gpu.log"
timeout 90 torchrun --standalone --nproc_per_node 2 examples/demo.py > "$OUT/demo.log" 2>&1; tail -3 "$OUT/demo.log"
