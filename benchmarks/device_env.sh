# Sourced by the device scripts: makes the extension importable on the GPU machine and sets $GTEST.
# The library and the GoogleTest binary built on a machine with nvcc (LASP_CUDA_ARCHS including 90a)
# travel with the tree; when they do not load here, this builds them for sm_90a.
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
_torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
_cudart=$(python3 - <<'EOF'
import glob, os, site
for d in site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    hits = glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.13"), recursive=True) + glob.glob(os.path.join(d, "libcudart.so.13"))
    if hits:
        print(os.path.dirname(hits[0])); break
EOF
)
export LD_LIBRARY_PATH=$PWD/build/cmake:$_torch_lib${_cudart:+:$_cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
GTEST=$PWD/build/cmake/lasp_cpp_tests
if ! python3 -c "import lasp, torch; torch.ops.lasp.lasp_attention.default" 2> "${OUT:-.}/import.log" \
   || ! "$GTEST" --gtest_list_tests > /dev/null 2>> "${OUT:-.}/import.log"; then
  echo "carried build does not load here ($(tail -1 "${OUT:-.}/import.log")); building for sm_90a"
  rm -rf build/cmake python/lasp/liblasp*.so
  LASP_CUDA_ARCHS=90a MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . > "${OUT:-.}/build.log" 2>&1 \
    || { tail -30 "${OUT:-.}/build.log"; exit 1; }
fi
