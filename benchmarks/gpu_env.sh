# shellcheck shell=bash
# Sourced (from the repository root) by benchmarks/gpu_suite.sh, benchmarks/sanitize.sh and
# benchmarks/ncu_kernels.sh. It
#   * sets RESULTS (from LASP_RESULTS_DIR, default bench_out/, git-ignored) and creates it;
#   * exports the settings every GPU run here uses: NCCL_NVLS_ENABLE=0 (no NVLink multicast; the
#     published sequence-parallel numbers were taken with it off), TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
#     PYTHONUNBUFFERED=1, and TRITON_CACHE_AUTOTUNING=1 (unless set): Triton then keeps the autotuning
#     results of fla's kernels (the benchmarks' and tests' outside peer) in its cache directory
#     (TRITON_CACHE_DIR) beside the compiled kernels, so that a later run skips the minutes of tuning a
#     fresh machine spends on each new shape;
#   * makes the package and the library built in place findable: PYTHONPATH=python/ (unless this python has lasp installed), LD_LIBRARY_PATH
#     with build/cmake, torch's lib/ and the CUDA 13 runtime (a pip wheel's or /usr/local/cuda's), so a
#     build made on another machine with nvcc and copied with the tree loads without installing;
#   * sets GTEST (the GoogleTest binary, build/cmake/lasp_cpp_tests) and defines lasp_ensure_built,
#     which builds lasp in place when the build in the tree does not load here.
RESULTS=${LASP_RESULTS_DIR:-bench_out}
mkdir -p "$RESULTS"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}

# The tree's package unless this python has lasp installed (the rule tests/python/conftest.py follows): a
# regular install in a virtual environment has its own library, built for that environment's torch.
if ! python3 -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("lasp") else 1)' 2>/dev/null; then
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
fi
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
unset _torch_lib _cudart
GTEST=$PWD/build/cmake/lasp_cpp_tests

# Builds lasp in place (pip install -e, the GoogleTest binary included) when the op or the GoogleTest
# binary in the tree does not load here, or always with LASP_REBUILD=1. The build is for sm_90a unless
# LASP_CUDA_ARCHS says otherwise; MAX_JOBS defaults to 16. Log: $RESULTS/build.log (import errors:
# $RESULTS/import.log). Returns 1 when the build fails.
lasp_ensure_built() {
  if [ "${LASP_REBUILD:-0}" != 1 ] \
     && python3 -c "import lasp, torch; torch.ops.lasp.lasp_attention.default" 2> "$RESULTS/import.log" \
     && "$GTEST" --gtest_list_tests > /dev/null 2>> "$RESULTS/import.log"; then
    return 0
  fi
  if [ "${LASP_REBUILD:-0}" = 1 ]; then
    echo "LASP_REBUILD=1: building lasp in place for ${LASP_CUDA_ARCHS:-90a}"
  else
    echo "the build in the tree does not load here ($(tail -1 "$RESULTS/import.log")); building for ${LASP_CUDA_ARCHS:-90a}"
  fi
  rm -rf build/cmake python/lasp/liblasp*.so
  LASP_CUDA_ARCHS=${LASP_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$RESULTS/build.log" 2>&1 \
    || { tail -30 "$RESULTS/build.log"; return 1; }
}
