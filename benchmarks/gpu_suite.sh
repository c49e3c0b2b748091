#!/usr/bin/env bash
# The GPU test and benchmark suite: bash benchmarks/gpu_suite.sh PART... (--help lists the parts).
# Usage text below (between the markers) is what --help prints.
#<usage>
# usage: bash benchmarks/gpu_suite.sh PART [PART...]
#
# Runs the named parts in order on a machine with CUDA GPUs, from the repository root. Before the
# first GPU part it sources benchmarks/gpu_env.sh: the package and library built in place become
# findable, and lasp is built in place for sm_90a (LASP_CUDA_ARCHS) when the build in the tree does not
# load here (LASP_REBUILD=1: always). Logs, JSON and plots go to LASP_RESULTS_DIR (default bench_out/).
#
# parts (GPUs needed):
#   gtest        (1) the CUDA GoogleTest suites: build/cmake/lasp_cpp_tests --gtest_filter=$GTEST_FILTER
#                    (default '*Cuda*:Wgmma*:Tma*')
#   pytest       (1) pytest tests/python/test_op.py tests/python/test_distributed.py -k "cuda or nccl"
#                    (PYTEST_FILES, PYTEST_K override; 2-, 3- and 4-rank NCCL cases where the GPUs exist)
#   demo         (2) examples/demo.py under torchrun on 2 GPUs (split vs unsplit losses)
#   kernels      (1) benchmarks/bench_kernels.py --impls lasp,fla,torch, the headline shapes
#                    (KERNELS_SHAPES, KERNELS_IMPLS, KERNELS_REPS; give it 500 s: fla autotunes for minutes)
#   ab           (1) kernel A/B: the wgmma / mma.sync GoogleTest suites (TESTS=0 skips them; AB_PYTEST=1
#                    adds pytest test_op -k cuda), then bench_kernels.py --impls lasp for each kernel pair
#                    of VARIANTS (default "mma/mma wgmma/mma wgmma/wgmma" = LASP_FWD_KERNEL/LASP_BWD_KERNEL;
#                    an entry may add "/NAME=VALUE"), ROUNDS rounds, in separate processes; BASE_PKG: a
#                    folder holding another build of the package (lasp/ with its liblasp*.so), run as
#                    variant "base" first in every round. SHAPES, REPS tune the runs.
#   sp           (2) benchmarks/bench_sp.py on all GPUs (BENCH_SP_ARGS: extra arguments), plus
#                    nvidia-smi topo -m
#   models       (2) model benchmarks on up to 4 GPUs: a. convergence sp=1 vs sp=N (examples/train.py),
#                    b. bench_model.py 64K/256K/1M (compiled; bf16 weights; eager at 256K), c. the ~1B
#                    longest-sequence probe (1M, 2M; 2M again offloaded if it did not fit), d. the longest
#                    sequence per method; then summary.md (benchmarks/models_summary.py). SMOKE=1 runs
#                    the same steps on the CPU with tiny sizes (no GPU needed).
#   reliability  (1) tests/python/test_reliability.py -k "cuda or nccl"
#   groupchecks  (2) tests/python/test_group_checks.py -k "nccl or peer", output not captured
#   hf           (2) tests/python/test_hf.py -k nccl
#   hf-example   (2) examples/hf_minimax.py under torchrun on 2 GPUs, and on 4 where there are 4
#   sanitize     (1) benchmarks/sanitize.sh (compute-sanitizer memcheck, racecheck, initcheck, synccheck)
#   ncu          (1) benchmarks/ncu_kernels.sh (Nsight Compute; SHAPE, KERNELS as that script reads them)
#   pending      (1) the tests of the newest GPU paths: document starts (gate mode 2), the delta rule's
#                    kernels (the chain, its tensor-core and wide forms, the solves, the per-chunk programs of
#                    LASP_DELTA_KERNELS=fused), the peer hop's per-(b, h) factors, the gate value check:
#                    GoogleTest 'CudaKernelsApi.*:Wgmma*:DocStarts*:Delta*:PeerHop*:ValueCheck*', then pytest
#                    test_packed_op, test_compile, test_gates_cuda, test_delta_op, test_profile_kernels and
#                    test_op's test_cuda_decay_values -k "cuda or starts or profile_kernels"; then test_vs_fla (the ops against fla's kernels; skips where fla does
#                    not import)
#   delta        (1) benchmarks/bench_delta.py against fla (DELTA_SHAPES, DELTA_ARGS)
#   split        (1) benchmarks/bench_split.py: the segment split's forced counts against the plan's choice,
#                    with gates: the GVA forward (2x80x16384x128x64, one q / k head), the backward at
#                    2x24x16384x128 and 1x80x16384x128x64, the dense headline 1x16x65536x128 without gates
#                    (SPLIT_ROUNDS, default 1)
#   targets      (1) the speed targets, side by side with fla in one run: bench_kernels.py at the dense
#                    headline shapes, with gates, GVA (Hq = Hk = 1), 14 packed documents, bench_delta.py, then
#                    the other head dims; then benchmarks/targets.py prints what each target asks, what was
#                    measured and whether it is met (targets.md, targets.json)
#
# groups: check = gtest pytest demo;  robust = reliability groupchecks hf hf-example sanitize
#
# Time: every step runs under `timeout`, at most its own cap and never past LASP_BUDGET_S (default 570)
# seconds from the start of the suite; a step that no longer fits (under 20 s left) is skipped. Caps
# (seconds; 0 skips the step): GTEST_S 300, PYTEST_S 240, DEMO_S 90, KERNELS_S 500, AB_GTEST_S 120,
# AB_PYTEST_S 200, AB_BENCH_S 60 (each bench run), SP_S 300, CONV_S 200, BENCH_S 240, BENCH_BF16_S 110,
# BENCH_EAGER_S 60, PROBE_S 110, PROBE_OFFLOAD_S 90, FINDMAX_S 200, RELIABILITY_S 240,
# GROUPCHECKS_S 200, HF_S 120, HF_EXAMPLE_S 75 (each world size), SANITIZE_BUDGET_S (sanitize.sh's own
# budget; default: what is left minus 40, at most 180; the step's cap is 35 s more), NCU_S 450,
# PENDING_GTEST_S 200, PENDING_PYTEST_S 300, PENDING_FLA_S 240, DELTA_S 300; targets: T_DENSE_S 240,
# T_GATES_S 270, T_GVA_S 240, T_DOCS_S 240, T_DELTA_S 240, T_HEADDIMS_S 300. The targets' caps are sized
# for a cold Triton cache: fla's first run of a shape autotunes its kernels (on one H100, 218 s for the
# dense shapes and 238 s for the gated ones, fla's backward most of it); with TRITON_CACHE_DIR kept from an
# earlier run (TRITON_CACHE_AUTOTUNING, gpu_env.sh) a step takes 20-40 s.
#
# Exit status: 0 every step passed; 1 a step failed or timed out; 2 bad arguments, too few GPUs for a
# part, or the build failed; 3 nothing failed but a step was skipped for the time budget.
# Summary of the steps: $LASP_RESULTS_DIR/suite_summary.txt.
#</usage>
# shellcheck disable=SC2317,SC2054  # the part_* functions are called by name; commas are in arguments
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() { sed -n '/^#<usage>$/,/^#<\/usage>$/p' "$0" | sed -e '1d' -e '$d' -e 's/^# \{0,1\}//'; }

ALL_PARTS="gtest pytest demo kernels ab sp models reliability groupchecks hf hf-example sanitize ncu pending delta split targets"
# GPUs a part needs
need_gpus() {
  case $1 in
    demo|sp|models|groupchecks|hf|hf-example) echo 2 ;;
    *) echo 1 ;;
  esac
}

PARTS=()
for a in "$@"; do
  case $a in
    -h|--help) usage; exit 0 ;;
    check) PARTS+=(gtest pytest demo) ;;
    robust) PARTS+=(reliability groupchecks hf hf-example sanitize) ;;
    -*) echo "gpu_suite: unknown option '$a' (see --help)" >&2; exit 2 ;;
    *)
      if [[ " $ALL_PARTS " != *" $a "* ]]; then
        echo "gpu_suite: unknown part '$a'; parts: $ALL_PARTS; groups: check, robust (see --help)" >&2
        exit 2
      fi
      PARTS+=("$a") ;;
  esac
done
if [ ${#PARTS[@]} -eq 0 ]; then
  usage >&2
  exit 2
fi

# SMOKE=1: the models part on the CPU (its only part without GPUs).
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  for p in "${PARTS[@]}"; do
    [ "$p" = models ] || { echo "gpu_suite: SMOKE=1 runs the models part only (got '$p')" >&2; exit 2; }
  done
fi

# GPUs present (0 where nvidia-smi is missing or finds none); every part's need is checked before anything runs.
NGPU=0
if command -v nvidia-smi > /dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ')
fi
if [ "$SMOKE" != 1 ]; then
  for p in "${PARTS[@]}"; do
    n=$(need_gpus "$p")
    if [ "$NGPU" -lt "$n" ]; then
      echo "gpu_suite: part '$p' needs at least $n CUDA GPU(s); found $NGPU (nvidia-smi -L)" >&2
      exit 2
    fi
  done
fi

# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
export LASP_RESULTS_DIR=$RESULTS  # sanitize.sh and ncu_kernels.sh write there too
START=$(date +%s)
BUDGET=${LASP_BUDGET_S:-570}
export LASP_COMMIT=${LASP_COMMIT:-$(git log -1 --format=%h 2> /dev/null)}  # set it when the tree's .git is not current
left() { echo $((BUDGET - ($(date +%s) - START))); }
el() { echo "[$(($(date +%s) - START)) s] $*"; }

if [ "$SMOKE" != 1 ]; then
  nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader | tee "$RESULTS/gpus.txt"
  lasp_ensure_built || { echo "gpu_suite: the build failed (log: $RESULTS/build.log)" >&2; exit 2; }
else
  echo "0, cpu (smoke), 0 MiB" > "$RESULTS/gpus.txt"
fi

declare -a SUMMARY
FAIL=0
SKIPPED=0
# step NAME CAP_S LOG COMMAND...: runs COMMAND under timeout (min(CAP_S, what is left of the budget)),
# output to LOG; CAP_S 0 skips it (asked); the last line of the log goes into the summary.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  if [ "$cap" -le 0 ]; then
    SUMMARY+=("$(printf '%-18s %s' "$name" "SKIPPED (cap 0)")")
    echo "skipped: cap 0" > "$log"
    return 0
  fi
  local t
  t=$(left)
  if [ "$t" -lt 20 ]; then
    SUMMARY+=("$(printf '%-18s %s' "$name" "SKIPPED (LASP_BUDGET_S=$BUDGET spent)")")
    echo "skipped: budget spent" > "$log"
    SKIPPED=1
    return 0
  fi
  [ "$cap" -lt "$t" ] && t=$cap
  el "$name: up to ${t}s: $*"
  local t0 rc secs status=PASS
  t0=$(date +%s)
  timeout --kill-after=15 "$t" "$@" > "$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  echo "$rc" > "$log.rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT(${t}s)"; FAIL=1
  elif [ "$rc" -ne 0 ]; then status="FAIL(rc=$rc)"; FAIL=1; fi
  SUMMARY+=("$(printf '%-18s %-13s %4ss  %s' "$name" "$status" "$secs" "$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-150)")")
  el "$name: $status in ${secs}s ($log)"
  return "$rc"
}
show() { grep -E "$1" "$2" 2> /dev/null | cut -c1-240 | tail -"${3:-12}"; }

PYTEST_CMD=(python3 -m pytest -q -rs -p no:cacheprovider)
NP4=$((NGPU < 4 ? NGPU : 4))

part_gtest() {
  step gtest "${GTEST_S:-300}" "$RESULTS/gtest_cuda.log" "$GTEST" --gtest_filter="${GTEST_FILTER:-*Cuda*:Wgmma*:Tma*}"
  show "Failure|FAILED|PASSED|SKIPPED" "$RESULTS/gtest_cuda.log"
}

part_pytest() {
  # shellcheck disable=SC2086  # PYTEST_FILES is a list of paths
  step pytest "${PYTEST_S:-240}" "$RESULTS/pytest_gpu.log" "${PYTEST_CMD[@]}" \
    ${PYTEST_FILES:-tests/python/test_op.py tests/python/test_distributed.py} -k "${PYTEST_K:-cuda or nccl}"
  show "^(FAILED|ERROR|SKIPPED)|passed|failed" "$RESULTS/pytest_gpu.log"
}

part_demo() {
  step demo "${DEMO_S:-90}" "$RESULTS/demo.log" torchrun --standalone --nproc_per_node 2 examples/demo.py
  tail -3 "$RESULTS/demo.log"
}

part_kernels() {
  local shapes=()
  [ -n "${KERNELS_SHAPES:-}" ] && shapes=(--shapes "$KERNELS_SHAPES")
  step kernels "${KERNELS_S:-500}" "$RESULTS/bench_kernels.log" python3 benchmarks/bench_kernels.py \
    --impls "${KERNELS_IMPLS:-lasp,fla,torch}" --reps "${KERNELS_REPS:-20}" "${shapes[@]}" \
    --json "$RESULTS/bench_kernels.json" --plot "$RESULTS/bench_kernels.png"
  show "^# [0-9]+x|^\||failed|Error" "$RESULTS/bench_kernels.log" 30
}

part_ab() {
  if [ "${TESTS:-1}" = 1 ]; then
    step ab-gtest-wgmma "${AB_GTEST_S:-120}" "$RESULTS/gtest_wgmma.log" "$GTEST" \
      --gtest_filter='Wgmma.*:CudaKernelsApi.*:Dtypes16/CudaKernelsMmaFwd.*:Dtypes16/CudaKernelsMmaBwd.*'
    show "relative error|Failure|FAILED|PASSED|SKIPPED|OK \]" "$RESULTS/gtest_wgmma.log" 30
    step ab-gtest-default "${AB_GTEST_S:-120}" "$RESULTS/gtest_default.log" "$GTEST" \
      --gtest_filter='AllDtypes/CudaKernels.*/bf16:AllDtypes/CudaKernels.*/f16'
    show "Failure|FAILED|PASSED|OK \]" "$RESULTS/gtest_default.log"
    if [ "${AB_PYTEST:-0}" = 1 ]; then
      step ab-pytest "${AB_PYTEST_S:-200}" "$RESULTS/test_op_cuda.log" "${PYTEST_CMD[@]}" -x tests/python/test_op.py \
        -k "cuda and not float64"
      tail -3 "$RESULTS/test_op_cuda.log"
    fi
  fi
  local S=${SHAPES:-4x32x8192x128,1x16x65536x128,8x16x2048x64,1x12x65536x64}
  ab_bench() {  # tag, then env assignments
    local tag=$1
    shift
    step "ab-$tag" "${AB_BENCH_S:-60}" "$RESULTS/bk_${tag}.log" env "$@" python3 benchmarks/bench_kernels.py \
      --impls lasp --shapes "$S" --reps "${REPS:-20}" --json "$RESULTS/bk_${tag}.json"
    show "^# [0-9]+x|failed|Error" "$RESULTS/bk_${tag}.log"
  }
  local r pair f bk extra tag
  for r in $(seq 1 "${ROUNDS:-1}"); do
    if [ -n "${BASE_PKG:-}" ]; then ab_bench "base_$r" PYTHONPATH="$BASE_PKG:$PYTHONPATH"; fi
    for pair in ${VARIANTS:-mma/mma wgmma/mma wgmma/wgmma}; do
      IFS=/ read -r f bk extra <<< "$pair"
      tag="${f}-${bk}${extra:+-${extra//[^A-Za-z0-9]/}}_$r"
      ab_bench "$tag" LASP_FWD_KERNEL="$f" LASP_BWD_KERNEL="$bk" ${extra:+"$extra"}
    done
  done
}

part_sp() {
  nvidia-smi topo -m > "$RESULTS/topo.txt" 2>&1
  # shellcheck disable=SC2086  # BENCH_SP_ARGS is a list of arguments
  step sp "${SP_S:-300}" "$RESULTS/bench_sp.log" torchrun --standalone --nproc_per_node "$NGPU" benchmarks/bench_sp.py \
    --json "$RESULTS/bench_sp.json" --plot "$RESULTS/bench_sp.png" ${BENCH_SP_ARGS:-}
  show "^#|^\|" "$RESULTS/bench_sp.log" 40
}

part_models() {
  local DEV NP
  if [ "$SMOKE" = 1 ]; then DEV=cpu NP=2; else DEV=cuda NP=$NP4; fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  python3 -c "import lasp, torch; print('lasp', lasp.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    | tee "$RESULTS/versions.txt"
  if [ -n "${LASP_COMMIT:-}" ]; then echo "commit $LASP_COMMIT" >> "$RESULTS/versions.txt"; fi
  local CONV BENCH EAGER_LENS PROBE FINDMAX
  if [ "$DEV" = cuda ]; then
    # 25M params (hidden 512, 6 layers, 8 heads of 64: the tensor-core kernels), 4 x 8192 tokens a step
    CONV=(--preset small --hidden-size 512 --num-layers 6 --num-heads 8 --vocab-size 4096 --loss-chunk-size 8192
          --seq-len 8192 --batch-size 4 --steps 200 --lr 1e-3 --warmup 20 --log-every 50)
    BENCH=(--preset small --seq-lens 65536,262144,1048576 --warmup 2 --iters 7); EAGER_LENS=262144
    PROBE=(--preset b1 --lean-chunk 65536 --seq-lens 1048576,2097152)
    FINDMAX=(--preset small --seq-lens 1048576 --max-seq-len 16777216)
  else  # tiny versions of the same runs
    CONV=(--preset tiny --seq-len 128 --batch-size 2 --steps 10 --log-every 5)
    BENCH=(--preset tiny --seq-lens 64,256 --warmup 0 --iters 1); EAGER_LENS=256
    PROBE=(--preset tiny --lean-chunk 16 --seq-lens 64,128)
    FINDMAX=(--preset tiny --seq-lens 64 --max-seq-len 256)
  fi
  local TR=(torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV")
  local EXP=(env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)

  # a. convergence: sp=1 vs sp=NP, bf16 (+ sp=1 fp32 as the bf16-noise reference)
  step convergence "${CONV_S:-200}" "$RESULTS/convergence.log" \
    python3 examples/train.py --convergence-check --noise-ref --sp "$NP" --device "$DEV" --dtype bf16 "${CONV[@]}" \
      --seed 0 --no-progress --tolerance 2e-3 --timeout 120 --out-dir "$RESULTS/convergence" --plot "$RESULTS/convergence.png"
  cp "$RESULTS/convergence/convergence.json" "$RESULTS/convergence.json" 2> /dev/null
  show "convergence check|step 200/200|Error|error" "$RESULTS/convergence.log" 6

  # b. methods side by side, 150M model (layer checkpointing, bf16 autocast over fp32 weights, per-token
  #    stages compiled), then bf16 weights (lasp, Ulysses), then the eager model at 256K
  step bench_model "${BENCH_S:-240}" "$RESULTS/bench_model.log" "${TR[@]}" "${BENCH[@]}" --checkpoint \
    --compile --dtype bf16 --methods lasp,lasp-allgather,ulysses,allgather-kv --pg-timeout 120 \
    --json "$RESULTS/bench_model.json" --plot "$RESULTS/bench_model.png"
  show "^\||longest|Error" "$RESULTS/bench_model.log" 20
  step bench_model_bf16 "${BENCH_BF16_S:-110}" "$RESULTS/bench_model_bf16.log" "${TR[@]}" "${BENCH[@]}" --checkpoint \
    --compile --param-dtype bf16 --methods lasp,ulysses --pg-timeout 120 --json "$RESULTS/bench_model_bf16.json"
  show "^\||Error" "$RESULTS/bench_model_bf16.log" 8
  step bench_model_eager "${BENCH_EAGER_S:-60}" "$RESULTS/bench_model_eager.log" "${TR[@]}" "${BENCH[@]}" --checkpoint \
    --dtype bf16 --methods lasp,ulysses --seq-lens "$EAGER_LENS" --pg-timeout 120 --json "$RESULTS/bench_model_eager.json"
  show "^\||Error" "$RESULTS/bench_model_eager.log" 4

  # c. the ~1B probe: bf16 weights, layer + lean token-chunked checkpoints, until out of memory; if the
  #    longest length did not fit, that length again with the layer checkpoints in pinned host memory
  step probe_b1 "${PROBE_S:-110}" "$RESULTS/probe_b1.log" "${EXP[@]}" "${TR[@]}" "${PROBE[@]}" --checkpoint \
    --lean --param-dtype bf16 --methods lasp --warmup 1 --iters 1 --pg-timeout 180 \
    --json "$RESULTS/probe_b1.json" --plot "$RESULTS/probe_b1.png"
  show "^\||longest|Error" "$RESULTS/probe_b1.log" 10
  local TARGET=${PROBE[-1]##*,}
  if ! python3 -c "import json, sys; sys.exit(0 if (json.load(open('$RESULTS/probe_b1.json'))['max_seq_len'].get('lasp') or 0) >= $TARGET else 1)" 2> /dev/null; then
    step probe_b1_offload "${PROBE_OFFLOAD_S:-90}" "$RESULTS/probe_b1_offload.log" "${EXP[@]}" "${TR[@]}" "${PROBE[@]}" \
      --offload --lean --param-dtype bf16 --methods lasp --seq-lens "$TARGET" --warmup 1 --iters 1 --pg-timeout 180 \
      --json "$RESULTS/probe_b1_offload.json"
    show "^\||longest|Error" "$RESULTS/probe_b1_offload.log" 6
  fi

  # d. the longest sequence per method (each doubles until out of memory; one step per length)
  step findmax "${FINDMAX_S:-200}" "$RESULTS/findmax.log" "${EXP[@]}" "${TR[@]}" "${FINDMAX[@]}" --find-max \
    --checkpoint --dtype bf16 --methods lasp,lasp-allgather,ulysses,allgather-kv --warmup 0 --iters 1 --pg-timeout 120 \
    --json "$RESULTS/findmax.json"
  show "^\||longest|Error" "$RESULTS/findmax.log" 24

  python3 benchmarks/models_summary.py "$RESULTS"
}

part_reliability() {
  step reliability "${RELIABILITY_S:-240}" "$RESULTS/test_reliability_gpu.log" "${PYTEST_CMD[@]}" \
    tests/python/test_reliability.py -k "cuda or nccl" --junitxml="$RESULTS/test_reliability_gpu.xml"
  show "^(FAILED|ERROR|SKIPPED)|AssertionError" "$RESULTS/test_reliability_gpu.log" 30
}

part_groupchecks() {
  step groupchecks "${GROUPCHECKS_S:-200}" "$RESULTS/test_group_checks_nccl.log" "${PYTEST_CMD[@]}" -s \
    tests/python/test_group_checks.py -k "nccl or peer"
  show "^(FAILED|ERROR|SKIPPED)|AssertionError" "$RESULTS/test_group_checks_nccl.log" 10
}

part_hf() {
  step hf "${HF_S:-120}" "$RESULTS/test_hf_nccl.log" "${PYTEST_CMD[@]}" tests/python/test_hf.py -k nccl
  show "^(FAILED|ERROR|SKIPPED)|AssertionError" "$RESULTS/test_hf_nccl.log" 10
}

part_hf_example() {
  local n
  for n in 2 4; do
    [ "$NGPU" -ge "$n" ] || continue
    step "hf-example-x$n" "${HF_EXAMPLE_S:-75}" "$RESULTS/hf_minimax_$n.log" \
      torchrun --standalone --nproc_per_node "$n" examples/hf_minimax.py
  done
}

part_sanitize() {
  local b=$(($(left) - 40))
  [ "$b" -gt 180 ] && b=180
  local budget=${SANITIZE_BUDGET_S:-$b}
  step sanitize $((budget + 35)) "$RESULTS/sanitize.log" env SANITIZE_BUDGET_S="$budget" bash benchmarks/sanitize.sh
  [ -f "$RESULTS/sanitize_summary.txt" ] && cat "$RESULTS/sanitize_summary.txt"
}

part_pending() {
  step pending-gtest "${PENDING_GTEST_S:-200}" "$RESULTS/gtest_pending.log" "$GTEST" \
    --gtest_filter='CudaKernelsApi.*:Wgmma*:DocStarts*:Delta*:PeerHop*:ValueCheck*'
  show "Failure|FAILED|PASSED|SKIPPED" "$RESULTS/gtest_pending.log"
  step pending-pytest "${PENDING_PYTEST_S:-300}" "$RESULTS/pytest_pending.log" "${PYTEST_CMD[@]}" \
    tests/python/test_packed_op.py tests/python/test_compile.py tests/python/test_gates_cuda.py \
    tests/python/test_delta_op.py tests/python/test_profile_kernels.py tests/python/test_op.py::test_cuda_decay_values \
    -k "cuda or starts or profile_kernels"
  show "^(FAILED|ERROR|SKIPPED)|passed|failed" "$RESULTS/pytest_pending.log"
  step pending-vs-fla "${PENDING_FLA_S:-240}" "$RESULTS/pytest_vs_fla.log" "${PYTEST_CMD[@]}" tests/python/test_vs_fla.py
  show "^(FAILED|ERROR|SKIPPED)|passed|failed" "$RESULTS/pytest_vs_fla.log"
}

part_delta() {
  # shellcheck disable=SC2086  # DELTA_ARGS is a list of arguments
  step delta "${DELTA_S:-300}" "$RESULTS/bench_delta.log" python3 benchmarks/bench_delta.py \
    --shapes "${DELTA_SHAPES:-4x32x8192x128,1x16x65536x128}" ${DELTA_ARGS:-} --json "$RESULTS/bench_delta.json"
  show "^# [0-9]+x|vs fla|failed|Error" "$RESULTS/bench_delta.log" 30
}

part_split() {
  local bs=(python3 benchmarks/bench_split.py --rounds "${SPLIT_ROUNDS:-1}")
  step split-gva "${SPLIT_S:-150}" "$RESULTS/split_gva.log" "${bs[@]}" --gates --qk-heads 1 \
    --shapes 2x80x16384x128x64 --fwd 1,3,8,16 --bwd 4,8 --both 16 --json "$RESULTS/split_gva.json"
  step split-gates "${SPLIT_S:-150}" "$RESULTS/split_gates.log" "${bs[@]}" --gates \
    --shapes 2x24x16384x128,1x80x16384x128x64 --bwd 1,2,4,8 --json "$RESULTS/split_gates.json"
  step split-dense "${SPLIT_S:-150}" "$RESULTS/split_dense.log" "${bs[@]}" \
    --shapes 1x16x65536x128 --fwd 4,12,16 --bwd 4,12,16 --json "$RESULTS/split_dense.json"
  for t in gva gates dense; do show "^[0-9]+x|Error|failed" "$RESULTS/split_$t.log" 12; done
}

part_targets() {
  local bk=(python3 benchmarks/bench_kernels.py --impls lasp,fla)
  step t-dense "${T_DENSE_S:-240}" "$RESULTS/targets_dense.log" "${bk[@]}" --reps 20 \
    --shapes 4x32x8192x128,1x16x65536x128 --json "$RESULTS/targets_dense.json"
  step t-gates "${T_GATES_S:-270}" "$RESULTS/targets_gates.log" "${bk[@]}" --gates --reps 10 \
    --shapes 4x32x8192x128,1x16x65536x128 --json "$RESULTS/targets_gates.json"
  step t-gva "${T_GVA_S:-240}" "$RESULTS/targets_gva.log" "${bk[@]}" --gates --qk-heads 1 --reps 5 \
    --shapes 2x80x16384x128x64 --json "$RESULTS/targets_gva.json"
  step t-docs "${T_DOCS_S:-240}" "$RESULTS/targets_docs14.log" "${bk[@]}" --docs 14 --reps 10 \
    --shapes 4x32x8192x128 --json "$RESULTS/targets_docs14.json"
  step t-delta "${T_DELTA_S:-240}" "$RESULTS/targets_delta.log" python3 benchmarks/bench_delta.py --impls lasp,fla \
    --reps 5 --shapes 4x32x8192x128 --json "$RESULTS/targets_delta.json"
  step t-headdims "${T_HEADDIMS_S:-300}" "$RESULTS/targets_headdims.log" "${bk[@]}" --reps 10 \
    --shapes 2x16x8192x256,4x16x8192x32,4x16x8192x96,2x16x8192x192,4x16x8192x128x64,4x16x8192x256x64 \
    --json "$RESULTS/targets_headdims.json"
  python3 benchmarks/targets.py "$RESULTS" --json "$RESULTS/targets.json" | tee "$RESULTS/targets.md"
}

part_ncu() {
  step ncu "${NCU_S:-450}" "$RESULTS/ncu.log" bash benchmarks/ncu_kernels.sh
  show "ncu |Duration|Throughput|Registers|Occupancy" "$RESULTS/ncu.log" 40
}

for p in "${PARTS[@]}"; do
  el "== part $p"
  "part_${p//-/_}"
done

el "== gpu_suite summary (parts: ${PARTS[*]}; results in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/suite_summary.txt"
[ $FAIL -ne 0 ] && exit 1
[ $SKIPPED -ne 0 ] && exit 3
exit 0
