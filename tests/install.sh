#!/usr/bin/env bash
# Installs what lasp needs on a fresh machine and builds it (editable), CPU-only where there is no nvcc.
# Used by tests/run_all.sh and examples/run_demo.sh. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Build tools and GoogleTest from Debian's packages, only where missing.
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -e /usr/lib/x86_64-linux-gnu/libgtest.a ] || [ -e /usr/lib/libgtest.a ] || [ -e /usr/local/lib/libgtest.a ] || need+=(libgtest-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "lasp install: apt-get install ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# torch from tests/requirements.txt (the version the GPU machines run); lasp is then compiled against that
# torch, hence --no-build-isolation (an isolated build would fetch a torch of its own: see setup.py).
"$PY" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
"$PY" -c "import lasp, torch; print('lasp', lasp.__version__, 'built against torch', torch.__version__)"
