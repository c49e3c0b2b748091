#!/usr/bin/env bash
# Nsight Compute profile of the lasp kernels of one forward+backward call (GPU machine):
#   SHAPE=4x32x8192x128 KERNELS="wgmma_bwd wgmma_fwd" bash benchmarks/ncu_kernels.sh
#   GATES=1 ...: with bench_kernels.py's per-token log gates (and their gradient)
#   SHAPE=2x80x16384x128x64 QK_HEADS=1 GATES=1 ...: BxHxNxDxE, and q / k with QK_HEADS heads (GVA), as
#   bench_kernels.py --qk-heads
#   (or: bash benchmarks/gpu_suite.sh ncu)
# For each kernel name (a regex): the details page (speed of light, occupancy, warp stalls, ...) and the
# SASS source page with per-instruction stall samples, as text under LASP_RESULTS_DIR (default
# bench_out/). Inputs as bench_kernels.py.
# ncu runs with --clock-control none (the clocks a benchmark sees).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
lasp_ensure_built || exit 2
SHAPE=${SHAPE:-4x32x8192x128}
cat > /tmp/lasp_ncu_drive.py <<'EOF'
import math, os, sys, torch
sys.path.insert(0, "benchmarks")
import lasp
from bench_kernels import alibi_decay
dims = [int(x) for x in os.environ["SHAPE"].split("x")]
B, H, N, D = dims[:4]
E = dims[4] if len(dims) > 4 else D
Hqk = int(os.environ.get("QK_HEADS") or H)
q, k = (torch.randn(B, Hqk, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
v, do = (torch.randn(B, H, N, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
g = torch.nn.functional.logsigmoid(torch.randn(B, H, N, device="cuda")) / 16 if os.environ.get("GATES") == "1" else None
leaves = tuple(x.requires_grad_(True) for x in (q, k, v) + ((g,) if g is not None else ()))
decay = alibi_decay(H, "cuda")
for _ in range(int(os.environ.get("CALLS", "2"))):
    o = lasp.lasp_attention(q, k, v, decay, g=g, scale=1.0 / math.sqrt(D))
    torch.autograd.grad(o, leaves, do)
torch.cuda.synchronize()
EOF
for kn in ${KERNELS:-wgmma_bwd wgmma_fwd}; do
  tag=${kn//[^A-Za-z0-9_]/}
  SHAPE=$SHAPE GATES=${GATES:-0} QK_HEADS=${QK_HEADS:-} timeout ${NCU_TIMEOUT:-200} ncu --clock-control none -k "regex:$kn" --launch-skip 1 --launch-count 1 \
    --set full --import-source yes -f -o "/tmp/ncu_$tag" python3 /tmp/lasp_ncu_drive.py > "$RESULTS/ncu_${tag}_run.log" 2>&1
  echo "ncu $kn rc=$?"
  ncu --import "/tmp/ncu_$tag.ncu-rep" --page details > "$RESULTS/ncu_${tag}_details.txt" 2>&1
  ncu --import "/tmp/ncu_$tag.ncu-rep" --page source --csv --print-source sass > "$RESULTS/ncu_${tag}_sass.csv" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" \
    "$RESULTS/ncu_${tag}_details.txt" | head -20
done
