#!/usr/bin/env bash
# The one test command: installs and builds everything on a fresh machine, then runs the GoogleTest
# suite (ctest) and the pytest suite. GPU tests skip, with their reason shown, where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
echo "== ctest (GoogleTest + C++ example)"
ctest --test-dir "${LASP_BUILD_DIR:-build/cmake}" --output-on-failure --no-tests=error -j2
echo "== pytest"
python3 -m pytest tests/python -q -rs "$@"
