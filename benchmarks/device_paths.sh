# Sourced by the device scripts (device_env.sh, device_models.sh): makes the package and the library
# carried with the tree findable (PYTHONPATH; LD_LIBRARY_PATH with torch's and CUDA's runtime libraries).
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
