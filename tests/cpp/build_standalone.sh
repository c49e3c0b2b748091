#!/usr/bin/env bash
# Builds the CUDA kernels and tests/cpp/test_cuda_kernels.cpp without CMake or torch, against a copy
# of GoogleTest's sources in .gtest/ (cp -r /usr/src/googletest/googletest .gtest; git-ignored).
# Usage (repo root): ARCH="-gencode=arch=compute_90a,code=sm_90a" OUTD=/tmp/lasp_build bash tests/cpp/build_standalone.sh
set -e
ARCH=${ARCH:-"-gencode=arch=compute_90a,code=sm_90a"}
OUTD=${OUTD:-/tmp/lasp_build}
mkdir -p "$OUTD"
pids=()
SM90A=""
case "$ARCH" in *compute_90a*) SM90A="-DLASP_HAVE_SM90A=1" ;; esac
for f in kernels/*.cu; do
  nvcc -std=c++17 $ARCH $SM90A -O3 --expt-relaxed-constexpr --use_fast_math -lineinfo -Xcompiler -fPIC -Ikernels -c "$f" -o "$OUTD/$(basename "$f").o" &
  pids+=($!)
done
g++ -std=c++17 -O2 -I.gtest/include -I.gtest -c .gtest/src/gtest-all.cc -o "$OUTD/gtest-all.o" & pids+=($!)
g++ -std=c++17 -O2 -I.gtest/include -c .gtest/src/gtest_main.cc -o "$OUTD/gtest_main.o" & pids+=($!)
g++ -std=c++17 -O2 -DLASP_WITH_CUDA=1 -I.gtest/include -Ikernels -I/usr/local/cuda/include \
  -c tests/cpp/test_cuda_kernels.cpp -o "$OUTD/test.o" & pids+=($!)
for f in tests/cpp/*.cu; do
  nvcc -std=c++17 $ARCH $SM90A -O3 --expt-relaxed-constexpr -I.gtest/include -Ikernels -c "$f" -o "$OUTD/test_$(basename "$f").o" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
rm -f "$OUTD/lasp_cuda_test"
nvcc "$OUTD"/*.o -o "$OUTD/lasp_cuda_test" -lpthread
echo "built $OUTD/lasp_cuda_test"
