#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) on lasp's CUDA kernels, tiny shapes.
#
#   bash benchmarks/sanitize.sh            # on a GPU machine (or: bash benchmarks/gpu_suite.sh sanitize)
#
# Two programs run under each tool:
#  * a Python driver (written to $RESULTS/sanitize_driver.py) that calls lasp.lasp_attention forward +
#    backward on CUDA for every code path of the single-device op: tensor-core path (bf16/fp16, D, E in
#    {64, 128}, D != E), generic path (fp32, fp64, bf16 with odd dims, D = E = 256, strided last dim),
#    GQA/MQA (the per-query-head backward workspace and its reduction), decay on/off, initial state and
#    final-state gradient, several segments per head (B*H small, N of a few chunks), N = 1, N = 0. Inputs
#    are made on the host and copied (few non-lasp kernels); PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every
#    tensor its own cudaMalloc, so memcheck sees tensor bounds (not the allocator's 2 MiB blocks) and
#    initcheck sees fresh memory. Each case is checked loosely against the float64 reference on the CPU
#    (a garbage result fails even where the tools see nothing).
#  * the GoogleTest binary build/cmake/lasp_cpp_tests (if built), filtered to the API tests (N = 0 state
#    pass-through) and LocalThenMainMatchFloat64Reference for bf16 and f32: the kernels the sequence-
#    parallel ring uses (fwd_local, bwd_local, bwd_prepare, main passes with the incoming state), driven
#    directly with workspaces from cudaMalloc ("content undefined": initcheck checks they are written
#    before being read); and, under racecheck and memcheck, the gated delta rule's kernel tests
#    ('Delta*.Cuda*', the tensor-core chain's): their block programs are checked on the host too, where a
#    missing barrier cannot show.
#
# initcheck does not see TMA stores (the probe below, benchmarks/tma_initcheck.cu), so the driver runs under
# initcheck with the mma.sync kernels; the sm_90a kernels' outputs are covered by the poisoned-output tests.
#
# Exit status: 0 clean; 1 a sanitizer reported errors (or a program failed its own checks under it);
# 3 no errors but some step timed out or was skipped for the time budget. Logs: $RESULTS/sanitize_*.
# Time: SANITIZE_BUDGET_S (default 240 s) over all steps; each step also has its own cap; steps run in
# priority order and later ones are skipped when the budget is spent.
# SANITIZE_ONLY: a regular expression; only the steps whose names match it run (e.g. driver-initcheck).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
# RESULTS (LASP_RESULTS_DIR, default bench_out/), the package importable, and built in place for sm_90a
# when the build in the tree does not load here (benchmarks/gpu_env.sh).
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
lasp_ensure_built || exit 2
BUDGET=${SANITIZE_BUDGET_S:-240}
START=$(date +%s)

CS=${COMPUTE_SANITIZER:-}
if [ -z "$CS" ]; then
  CS=$(command -v compute-sanitizer 2>/dev/null || true)
  [ -z "$CS" ] && CS=$(ls -d /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | tail -1)
fi
if [ -z "$CS" ] || [ ! -x "$CS" ]; then
  echo "sanitize: compute-sanitizer not found (PATH, /usr/local/cuda*/bin); set COMPUTE_SANITIZER=/path/to/it"
  exit 2
fi
"$CS" --version 2>&1 | tail -1 | tee "$RESULTS/sanitize_version.txt"

# LASP_TEST_SMALL: the GoogleTest cases up to 9000 token-heads (every path, sanitizer-sized)
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_MODULE_LOADING=LAZY PYTHONUNBUFFERED=1 LASP_TEST_SMALL=1

DRIVER="$RESULTS/sanitize_driver.py"
cat > "$DRIVER" <<'PY'
"""lasp_attention forward + backward on CUDA for each code path, tiny shapes (run under compute-sanitizer)."""
import os
import sys

import torch

import lasp
from lasp.reference import attention_ref

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# (name, B, H, Hkv, N, D, E, dtype, decay, initial state, layout, strided last dim)
CASES = [
    ("tc bf16 64x64 segments decay state", 1, 2, 2, 200, 64, 64, BF16, "alibi", True, "bhnd", False),
    ("tc fp16 128x128 gqa segments", 1, 2, 1, 130, 128, 128, F16, None, False, "bnhd", False),
    ("tc bf16 D128 E64 one chunk strong decay", 2, 2, 2, 64, 128, 64, BF16, "strong", True, "bhnd", False),
    ("tc bf16 D64 E128 partial chunk", 1, 1, 1, 65, 64, 128, BF16, None, True, "bnhd", False),
    ("tc fp16 many segments B*H=1", 1, 1, 1, 1000, 64, 64, F16, "strong", True, "bhnd", False),
    ("tc bf16 N=1", 1, 2, 2, 1, 64, 64, BF16, "alibi", True, "bhnd", False),
    ("generic fp32 odd dims gqa segments", 1, 4, 2, 150, 17, 5, F32, "mixed", True, "bhnd", False),
    ("generic fp32 64x64 segments", 1, 1, 1, 300, 64, 64, F32, None, False, "bhnd", False),
    ("generic bf16 48x32 mqa", 1, 2, 1, 100, 48, 32, BF16, "alibi", True, "bnhd", False),
    ("generic fp64", 1, 2, 2, 70, 16, 16, F64, "mixed", True, "bhnd", False),
    ("generic fp32 256x256", 1, 2, 2, 33, 256, 256, F32, "alibi", True, "bhnd", False),
    ("generic bf16 strided last dim", 1, 2, 2, 80, 64, 64, BF16, "alibi", True, "bhnd", True),
    ("empty N=0", 2, 4, 2, 0, 16, 8, BF16, "alibi", True, "bhnd", False),
]


def decay_for(kind, H):
    if kind is None:
        return None
    if kind == "alibi":
        return lasp.alibi_slopes(H)
    if kind == "strong":
        return torch.full((H,), 2.0)
    g = torch.Generator().manual_seed(H)
    d = torch.rand(H, generator=g) * 3.0
    d[0] = 0.0
    return d


def run(case, dev):
    name, B, H, Hkv, N, D, E, dt, dk, with_state, layout, strided = case
    g = torch.Generator().manual_seed(N * 31 + D)
    acc = F64 if dt == F64 else F32

    def host(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(dtype)

    shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E), (B, H, N, E)]
    if layout == "bnhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    q, k, v, do = (host(*s) for s in shapes)
    s0 = host(B, H, D, E, dtype=acc) if with_state else None
    dS = host(B, H, D, E, dtype=acc)
    decay = decay_for(dk, H)

    def to_dev(t):
        if t is None:
            return None
        if strided and t.dim() == 4 and t.dtype == dt:  # last dim stride 2: the generic path
            big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            big[..., ::2] = t
            return big.to(dev)[..., ::2]
        return t.to(dev)

    dq_, dk_, dv_ = (to_dev(t).requires_grad_(True) for t in (q, k, v))
    ds0 = None if s0 is None else s0.to(dev).requires_grad_(True)
    o, f = lasp.lasp_attention(dq_, dk_, dv_, None if decay is None else decay.to(dev), initial_state=ds0,
                               output_final_state=True, layout=layout)
    ins = [dq_, dk_, dv_] + ([ds0] if ds0 is not None else [])
    gr = torch.autograd.grad([o, f], ins, [do.to(dev), dS.to(dev)])
    torch.cuda.synchronize()
    got = [o, f] + list(gr)

    # float64 reference on the host (the same rounded inputs)
    rq, rk, rv = (t.double().requires_grad_(True) for t in (q, k, v))
    rs0 = None if s0 is None else s0.double().requires_grad_(True)
    ro, rf = attention_ref(rq, rk, rv, decay, None, rs0, layout)
    rins = [rq, rk, rv] + ([rs0] if rs0 is not None else [])
    rg = torch.autograd.grad([ro, rf], rins, [do.double(), dS.double()])
    want = [ro, rf] + list(rg)
    check(name, ["o", "final_state", "dq", "dk", "dv", "d_initial_state"], got, want, dt)


def check(name, names, got, want, dt):
    """Every result finite and within the dtype's relative error of its float64 reference; prints ok."""
    tol = {F64: 1e-10, F32: 1e-4}.get(dt, 5e-2)  # loose for 16-bit: this driver hunts garbage, not ulps
    for qname, a, b in zip(names, got, want):
        a = a.detach().cpu().double()
        if not torch.isfinite(a).all():
            raise AssertionError(f"{name}: {qname} has non-finite entries")
        den = b.norm().item()
        err = (a - b).norm().item() / den if den > 0 else (a - b).norm().item()
        if err > tol:
            raise AssertionError(f"{name}: {qname} relative error {err:.3e} > {tol:.0e}")
    print(f"ok  {name}", flush=True)


# Per-token gates (resets included) and head maps: (name, B, Hq, Hk, Hv, N, D, E, dtype, gates)
GATED_CASES = [
    ("gates fp32 segments resets", 1, 2, 2, 2, 300, 16, 8, F32, True),
    ("gates bf16 tensor-core fwd segments", 1, 2, 2, 2, 300, 64, 128, BF16, True),
    ("gates bf16 GVA segments", 1, 1, 1, 4, 200, 64, 32, BF16, True),
    ("gates fp64 mixed maps", 1, 6, 2, 3, 70, 8, 5, F64, True),
    ("head maps fp16 GVA no gates", 2, 2, 2, 4, 130, 32, 16, F16, False),
]


def run_gated(case, dev):
    from lasp.reference import gated_recurrent_grads

    name, B, Hq, Hk, Hv, N, D, E, dt, gates = case
    H = max(Hq, Hv)
    g = torch.Generator().manual_seed(N * 7 + D)
    acc = F64 if dt == F64 else F32
    q, k, v = (torch.randn(B, h, N, x, generator=g).to(dt) for h, x in ((Hq, D), (Hk, D), (Hv, E)))
    do = torch.randn(B, H, N, E, generator=g).to(dt)
    s0, dS = (torch.randn(B, H, D, E, generator=g).to(acc) for _ in range(2))
    lg = None
    if gates:
        lg = -torch.nn.functional.softplus(torch.randn(B, H, N, generator=g)).to(acc)
        lg[:, :, N // 2] = float("-inf")
        lg[0, 0, 0] = float("-inf")
    ins = [t.to(dev).requires_grad_(True) for t in (q, k, v, s0)] + ([lg.to(dev).requires_grad_(True)] if gates else [])
    o, f = lasp.lasp_attention(ins[0], ins[1], ins[2], g=ins[4] if gates else None, initial_state=ins[3],
                               output_final_state=True)
    gr = torch.autograd.grad([o, f], ins, [do.to(dev), dS.to(dev)])
    torch.cuda.synchronize()
    r = gated_recurrent_grads(q.double(), k.double(), v.double(), None if lg is None else lg.double(), None, None,
                              s0.double(), do.double(), dS.double())
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"] + (["dg"] if gates else [])
    got = [o, f] + list(gr)  # o, final state, dq, dk, dv, d_initial_state, (dg)
    check(name, names, got, [r[n] for n in names], dt)


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda", 0)
    failed = 0
    # SANITIZE_CASES: "plain" (no gates), "gated" (GATED_CASES) or all
    which = os.environ.get("SANITIZE_CASES", "all")
    groups = [(fn, cs) for name, fn, cs in (("plain", run, CASES), ("gated", run_gated, GATED_CASES))
              if which in ("all", name)]
    for fn, cases in groups:
        for case in cases:
            try:
                fn(case, dev)
            except Exception as e:  # noqa: BLE001 - report every case, fail at the end
                failed += 1
                print(f"FAIL {case[0]}: {type(e).__name__}: {e}", flush=True)
    total = sum(len(cs) for _, cs in groups)
    print(f"driver: {total - failed}/{total} cases ok", flush=True)
    torch.cuda.synchronize()
    sys.stdout.flush()
    # Leave without interpreter teardown: once, under initcheck, the process aborted in teardown
    # ("terminate called without an active exception") after every case passed with 0 errors; the
    # exit status is the cases' verdict, and the tools' own report still covers every kernel that ran.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
PY

GT_FILTER='CudaKernelsApi.*:PeerHop.ChainMatchesFloat64InLaunchOrder:AllDtypes/CudaKernels.LocalThenMainMatchFloat64Reference/bf16:AllDtypes/CudaKernels.LocalThenMainMatchFloat64Reference/f32'
GT_FILTER_RACE='CudaKernelsApi.*:PeerHop.ChainMatchesFloat64InLaunchOrder:AllDtypes/CudaKernels.LocalThenMainMatchFloat64Reference/bf16'

declare -a SUMMARY
ERRORS=0
INCOMPLETE=0

# step NAME TOOL CAP_S PROGRAM...
step() {
  local name=$1 tool=$2 cap=$3
  shift 3
  if [ -n "${SANITIZE_ONLY:-}" ] && ! [[ "$name" =~ $SANITIZE_ONLY ]]; then return; fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$(printf '%-22s SKIPPED (time budget of %ss spent)' "$name" "$BUDGET")")
    INCOMPLETE=1
    return
  fi
  local t=$((cap < left ? cap : left))
  local log="$RESULTS/sanitize_${name}.log" out="$RESULTS/sanitize_${name}.out"
  local t0=$(date +%s)
  timeout --kill-after=10 "$t" "$CS" --tool "$tool" --error-exitcode 86 --print-limit 100 \
    --log-file "$log" "$@" > "$out" 2>&1
  local rc=$?
  local secs=$(($(date +%s) - t0))
  local found
  found=$(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$log" 2>/dev/null | sed 's/=========//' | tr -s ' ' | paste -sd';' -)
  local status
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    # no summary is printed when killed: look for individual reports
    if grep -qE "^========= (Invalid|Uninitialized|Error|Program hit|Barrier|Race|Out-of-range|Misaligned|Host API)" "$log" 2>/dev/null; then
      status="ERRORS (and timed out after ${t}s)"
      ERRORS=1
    else
      status="TIMEOUT after ${t}s, no report so far (raise SANITIZE_BUDGET_S)"
      INCOMPLETE=1
    fi
  elif [ $rc -eq 86 ]; then
    status="ERRORS"
    ERRORS=1
  elif [ $rc -ne 0 ]; then
    status="FAILED (exit $rc; program output in $out)"
    ERRORS=1
  elif grep -q "\[  SKIPPED \]" "$out" 2>/dev/null; then
    status="clean, but tests were skipped (see $out)"
    INCOMPLETE=1
  else
    status="clean"
  fi
  SUMMARY+=("$(printf '%-22s %-9s %4ss  %s  %s' "$name" "$tool" "$secs" "$status" "${found:-}")")
  echo "sanitize: $name ($tool): $status ${found:-} [${secs}s]"
}

# the driver alone first: a failure here is the op's (or the driver's), not a sanitizer finding
if timeout 90 python3 "$DRIVER" > "$RESULTS/sanitize_driver-plain.out" 2>&1; then
  SUMMARY+=("$(printf '%-22s %-9s %4s   %s' driver-plain none - "ok: $(tail -1 "$RESULTS/sanitize_driver-plain.out")")")
else
  SUMMARY+=("$(printf '%-22s %-9s %4s   %s' driver-plain none - "FAILED without a sanitizer, see $RESULTS/sanitize_driver-plain.out")")
  ERRORS=1
  tail -20 "$RESULTS/sanitize_driver-plain.out"
fi
step driver-memcheck memcheck 60 python3 "$DRIVER"
if [ -x "$GTEST" ]; then
  step gtest-memcheck memcheck 50 "$GTEST" --gtest_filter="$GT_FILTER"
else
  SUMMARY+=("$(printf '%-22s SKIPPED (%s not built)' gtest "$GTEST")")
fi
# the gated delta rule's kernels (chain, solves, per-chunk block programs): their GoogleTest device cases, whose
# host runs cannot see a missing barrier (racecheck can) or an out-of-bounds shared/global access (memcheck)
GT_FILTER_DELTA='Delta*.Cuda*:DeltaChain.*TensorCore*'
[ -x "$GTEST" ] && step gtest-delta-racecheck racecheck 150 "$GTEST" --gtest_filter="$GT_FILTER_DELTA"
[ -x "$GTEST" ] && step gtest-delta-memcheck memcheck 90 "$GTEST" --gtest_filter="$GT_FILTER_DELTA"
step driver-racecheck racecheck 75 python3 "$DRIVER"
# initcheck does not count TMA stores as writes: benchmarks/tma_initcheck.cu writes one tile by a TMA store
# and one by ordinary stores, and on 2026-12-02 (1 x H200, CUDA 13.0) initcheck reported all 256 granules of
# the TMA-written one (values right) and none of the other. So the driver's initcheck runs with the mma.sync
# kernels (no TMA); the TMA kernels' outputs are checked for full coverage by the poisoned-output tests
# (tests/python). The probe runs first: should a later initcheck track TMA stores, the driver's initcheck
# also runs on the default (wgmma / TMA) kernels.
TMA_TRACKED=0
if command -v nvcc > /dev/null 2>&1 && nvcc -std=c++17 -arch=sm_90a -I kernels benchmarks/tma_initcheck.cu \
     -o "$RESULTS/tma_initcheck" > "$RESULTS/sanitize_tma-probe.out" 2>&1 && "$RESULTS/tma_initcheck" >> "$RESULTS/sanitize_tma-probe.out" 2>&1; then
  n=$(timeout 60 "$CS" --tool initcheck --show-backtrace no "$RESULTS/tma_initcheck" 2>&1 | grep -oE "ERROR SUMMARY: [0-9]+" | head -1 | grep -oE "[0-9]+")
  if [ "${n:-x}" = 0 ]; then
    TMA_TRACKED=1
    SUMMARY+=("$(printf '%-22s %-9s %4s   %s' tma-probe initcheck - "initcheck tracks TMA stores")")
  else
    SUMMARY+=("$(printf '%-22s %-9s %4s   %s' tma-probe initcheck - "initcheck does not track TMA stores (${n:-?} reports on the TMA-written tile)")")
  fi
else
  SUMMARY+=("$(printf '%-22s %-9s %4s   %s' tma-probe initcheck - "not run (no nvcc, or no sm_90a GPU: see $RESULTS/sanitize_tma-probe.out)")")
fi
#
# Only the cases without gates run under initcheck: with gates, the backward forms the final-state
# cotangent's terms with cuBLAS products (attention.cpp, add_gated_state_grad), and cuBLAS's sm_90 kernels
# store by TMA too, so every later read of their results is reported. Measured on 2026-12-04 (1 x H200,
# CUDA 13.0): the gated cases gave 294400 reports, all in ATen's addcmul and copy kernels, exactly the
# reads of those products' elements (dk, dv: 38400 + 2 x 76800 and 51200 + 2 x 25600 in the two 16-bit
# cases). Restricting initcheck to lasp's kernels (--kernel-name) does not help: memory written by the
# kernels it then leaves out counts as unwritten. The gated cases run under memcheck, racecheck and
# synccheck; their outputs are checked for full coverage by test_gates_cuda.py (poisoned allocator).
step driver-initcheck initcheck 60 env SANITIZE_CASES=plain LASP_FWD_KERNEL=mma LASP_BWD_KERNEL=mma python3 "$DRIVER"
[ "$TMA_TRACKED" = 1 ] && step driver-initcheck-tma initcheck 150 env SANITIZE_CASES=plain python3 "$DRIVER"
[ -x "$GTEST" ] && step gtest-initcheck initcheck 40 "$GTEST" --gtest_filter="$GT_FILTER"
[ -x "$GTEST" ] && step gtest-racecheck racecheck 200 "$GTEST" --gtest_filter="$GT_FILTER_RACE"
step driver-synccheck synccheck 90 python3 "$DRIVER"

echo "== compute-sanitizer summary ($(($(date +%s) - START)) s, logs in $RESULTS/sanitize_*)"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/sanitize_summary.txt"
if [ $ERRORS -ne 0 ]; then exit 1; fi
if [ $INCOMPLETE -ne 0 ]; then exit 3; fi
exit 0
