#!/usr/bin/env bash
# Reliability pass on a 4-GPU machine (issues 6 and 7), about 6 minutes:
#   tests   - the CUDA/NCCL cases of tests/python/test_reliability.py: non-finite propagation, decay edge
#             cases, bitwise determinism, memory over 1000 iterations, 1M tokens over 2 and 4 GPUs
#   groupchecks - the NCCL cases of tests/python/test_group_checks.py, output not captured (2 GPUs: mismatched shapes, a rank
#             that never calls, with checks and a timeout on)
#   hf      - the NCCL sequence-parallel cases of tests/python/test_hf.py (sp=2, sp=4)
#   example - examples/hf_minimax.py under torchrun on 2 and 4 GPUs (split vs unsplit losses)
#   sanitize- benchmarks/sanitize.sh (compute-sanitizer on the kernels)
#
#   bash benchmarks/device_reliability.sh            # everything
#   bash benchmarks/device_reliability.sh tests hf   # some parts
#
# Expects the extension built in place (python3 -m pip install --no-deps --no-build-isolation -e .).
# Logs under $OUT (device tool) or ./device_out. Every step runs under `timeout`: its own cap, and never
# past DEVICE_BUDGET_S (default 570 s: the whole script fits a 10-minute device call; steps that no longer
# fit are reported as skipped). Exit status 1 if any step failed, 3 if none failed but some were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export OUT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
PARTS=${*:-tests groupchecks hf example sanitize}
START=$(date +%s)
BUDGET=${DEVICE_BUDGET_S:-570}
left() { echo $((BUDGET - ($(date +%s) - START))); }

nvidia-smi -L | tee "$OUT/gpus.txt"
if ! python3 - > "$OUT/cuda_check.log" 2>&1 <<'PY'
import torch, lasp
q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
lasp.lasp_attention(q, q, q)
torch.cuda.synchronize()
print(f"lasp runs on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
then
  cat "$OUT/cuda_check.log"
  echo "lasp does not run on CUDA here: build it first (python3 -m pip install --no-deps --no-build-isolation -e .)"
  exit 2
fi
cat "$OUT/cuda_check.log"

declare -a SUMMARY
FAIL=0
SKIPPED=0
# run NAME CAP_S LOG COMMAND...: the last line of the log goes into the summary
run() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t
  t=$(left)
  if [ "$t" -lt 30 ]; then
    SUMMARY+=("$(printf '%-14s %-13s' "$name" "SKIPPED (DEVICE_BUDGET_S=$BUDGET spent)")")
    SKIPPED=1
    return
  fi
  [ "$cap" -lt "$t" ] && t=$cap
  local t0=$(date +%s)
  timeout --kill-after=15 "$t" "$@" > "$log" 2>&1
  local rc=$?
  local secs=$(($(date +%s) - t0)) status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT(${t}s)"; FAIL=1
  elif [ $rc -ne 0 ]; then status="FAIL(rc=$rc)"; FAIL=1; fi
  SUMMARY+=("$(printf '%-14s %-13s %4ss  %s' "$name" "$status" "$secs" "$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-150)")")
  echo "[$name] $status in ${secs}s ($log)"
}

PYTEST=(python3 -m pytest -q -rs -p no:cacheprovider)
for part in $PARTS; do
  case $part in
    tests)
      run reliability 240 "$OUT/test_reliability_gpu.log" \
        "${PYTEST[@]}" tests/python/test_reliability.py -k "cuda or nccl" --junitxml="$OUT/test_reliability_gpu.xml"
      # what failed or was skipped, with the reason
      grep -E "^(FAILED|ERROR|SKIPPED)|AssertionError" "$OUT/test_reliability_gpu.log" | cut -c1-240 | head -30 ;;
    groupchecks)
      run group_checks 200 "$OUT/test_group_checks_nccl.log" "${PYTEST[@]}" -s tests/python/test_group_checks.py -k "nccl or peer"
      grep -E "^(FAILED|ERROR|SKIPPED)|AssertionError" "$OUT/test_group_checks_nccl.log" | cut -c1-240 | head -10 ;;
    hf)
      run hf_nccl 120 "$OUT/test_hf_nccl.log" "${PYTEST[@]}" tests/python/test_hf.py -k nccl
      grep -E "^(FAILED|ERROR|SKIPPED)|AssertionError" "$OUT/test_hf_nccl.log" | cut -c1-240 | head -10 ;;
    example)
      for n in 2 4; do
        run "hf_minimax_x$n" 75 "$OUT/hf_minimax_$n.log" torchrun --standalone --nproc_per_node "$n" examples/hf_minimax.py
      done ;;
    sanitize)
      b=$(( $(left) - 40 ))
      [ "$b" -gt 180 ] && b=180
      export SANITIZE_BUDGET_S=${SANITIZE_BUDGET_S:-$b}
      run sanitize $((SANITIZE_BUDGET_S + 35)) "$OUT/sanitize.log" bash benchmarks/sanitize.sh
      [ -f "$OUT/sanitize_summary.txt" ] && cat "$OUT/sanitize_summary.txt" ;;
    *) echo "unknown part '$part' (tests, groupchecks, hf, example, sanitize)"; exit 2 ;;
  esac
done

echo "== device_reliability summary ($(($(date +%s) - START)) s, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/device_reliability_summary.txt"
[ $FAIL -ne 0 ] && exit 1
[ $SKIPPED -ne 0 ] && exit 3
exit 0
