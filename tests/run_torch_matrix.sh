#!/usr/bin/env bash
# The CPU test suite under an older torch that setup.py supports (default 2.10.0; tests/run_all.sh covers
# torch 2.11.0, the version the GPU machines run). In a virtual environment of its own (build/venv-torch-<ver>):
# that torch and the test requirements from PyPI, then lasp built CPU-only (LASP_WITH_CUDA=0) in its own CMake
# folder (build/cmake-torch-<ver>) and installed as a regular package, not an editable one, so the editable
# build in python/lasp/ (tests/install.sh) is left as it is. Then ctest on that build and pytest with the
# environment's python, which imports the environment's lasp. Needs the build tools tests/install.sh installs
# (cmake, g++, GoogleTest). Usage: bash tests/run_torch_matrix.sh [TORCH_VERSION [pytest args...]]
# The environment also takes a second transformers release (LASP_MATRIX_TRANSFORMERS, default 5.22.2; the main
# stage has tests/requirements.txt's 5.17.0), so the HuggingFace integration is tested on two releases.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:-2.10.0}
shift $(($# > 0 ? 1 : 0))
VENV=$PWD/build/venv-torch-$TORCH
BUILD=$PWD/build/cmake-torch-$TORCH
PY=$VENV/bin/python
start=$SECONDS
step() { echo "== torch $TORCH: $* ($((SECONDS - start)) s)"; }

step "environment $VENV"
[ -x "$PY" ] || python3 -m venv "$VENV"
mkdir -p "$BUILD"
TRANSFORMERS=${LASP_MATRIX_TRANSFORMERS:-5.22.2}
grep -v '^torch[=<>!~ ]' tests/requirements.txt | grep -v '^transformers[=<>!~ ]' > "$BUILD/requirements-without-torch.txt"
"$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH" "transformers==$TRANSFORMERS" \
  -r "$BUILD/requirements-without-torch.txt"

step "build (CPU only) and install lasp"
LASP_WITH_CUDA=0 LASP_BUILD_DIR=$BUILD "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation \
  --no-deps --force-reinstall .
# The suite must test this build: lasp from the environment's site-packages, under this torch.
"$PY" - "$TORCH" "$VENV" <<'EOF'
import os, sys
import torch, lasp, transformers
want, venv = sys.argv[1], os.path.realpath(sys.argv[2])
where = os.path.realpath(lasp.__file__)
print("lasp", lasp.__version__, "from", where, "under torch", torch.__version__, "and transformers",
      transformers.__version__)
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} in the environment, expected {want}"
assert where.startswith(venv + os.sep), f"lasp imported from {where}, not from the environment {venv}"
EOF

step "ctest (GoogleTest + C++ example, CPU build)"
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error -j2

step "pytest (CPU)"
# The environment's bin first, as if activated: scripts the tests run by name (python3, torchrun) are its own.
export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
# test_examples.py (the end-to-end torchrun scripts: demo, training, benchmarks' CPU smoke runs) runs in the
# main stage only: under torch 2.10 a torchrun child was once seen to abort in its interpreter shutdown
# ("terminate called without an active exception") after finishing its work and checks.
echo "pytest: tests/python/test_examples.py runs in the main stage (tests/run_all.sh) only"
exec "$PY" -m pytest tests/python -q -rs --ignore=tests/python/test_examples.py "$@"
