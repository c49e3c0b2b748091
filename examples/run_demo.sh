#!/usr/bin/env bash
# The demo command: installs and builds lasp, then trains a tiny linear-attention LM (lasp.models) with
# examples/train.py twice from the same seed: once with each sequence whole on one process, once with it
# split over NPROC processes (default 2) that pass the attention state along the LASP ring (NCCL with one
# GPU per process where there are enough GPUs, Gloo on the CPU otherwise). It prints both loss curves'
# logs and fails unless they agree (train.py --convergence-check; extra arguments go to train.py, e.g.
# --steps 100). LASP_SKIP_INSTALL=1 skips the install step (lasp already built).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${LASP_SKIP_INSTALL:-0}" = 1 ] || bash tests/install.sh
N=${NPROC:-2}
DEV=$(python3 -c "import torch; print('cuda' if torch.cuda.device_count() >= $N else 'cpu')")
exec python3 examples/train.py --convergence-check --sp "$N" --preset tiny --device "$DEV" --steps 30 \
  --log-every 10 --out-dir "${DEMO_OUT:-runs/demo}" "$@"
