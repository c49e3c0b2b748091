# Sourced by the device scripts: makes the extension importable on the GPU machine and sets $GTEST.
# The library and the GoogleTest binary built on a machine with nvcc (LASP_CUDA_ARCHS including 90a)
# travel with the tree; when they do not load here, this builds them for sm_90a.
source "$(dirname "${BASH_SOURCE[0]}")/device_paths.sh"
GTEST=$PWD/build/cmake/lasp_cpp_tests
if ! python3 -c "import lasp, torch; torch.ops.lasp.lasp_attention.default" 2> "${OUT:-.}/import.log" \
   || ! "$GTEST" --gtest_list_tests > /dev/null 2>> "${OUT:-.}/import.log"; then
  echo "carried build does not load here ($(tail -1 "${OUT:-.}/import.log")); building for sm_90a"
  rm -rf build/cmake python/lasp/liblasp*.so
  LASP_CUDA_ARCHS=90a MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . > "${OUT:-.}/build.log" 2>&1 \
    || { tail -30 "${OUT:-.}/build.log"; exit 1; }
fi
