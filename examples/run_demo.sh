#!/usr/bin/env bash
# The demo command: installs and builds lasp, then trains a tiny linear-attention LM with its sequence
# split over 2 processes (torchrun; NCCL on GPUs, Gloo on CPU) beside the same model unsplit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh
torchrun --standalone --nproc_per_node "${NPROC:-2}" examples/demo.py "$@"
