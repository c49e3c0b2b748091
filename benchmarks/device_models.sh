#!/usr/bin/env bash
# Model-level device pass (issue 5) on a 4-GPU H100/H200 machine, about 10 minutes in all (each step
# under `timeout`, clamped to what is left of BUDGET_S):
#   a. convergence: the same seed trained with sp=1 and sp=4 for 200 steps in bf16, plus sp=1 in fp32
#      (the bf16-noise reference): examples/train.py --convergence-check --noise-ref.
#      -> $OUT/convergence.png, $OUT/convergence.json (all three loss curves, verdict), convergence.log
#   b. benchmarks/bench_model.py on 4 GPUs, a 150M model (LaspConfig.small), 64K / 256K / 1M tokens:
#      lasp ring, lasp allgather, ulysses, allgather-kv; tokens/s and peak memory per GPU; the model with
#      --compile (LaspConfig.compile), then with bf16 weights (lasp, ulysses), then eager at 256K.
#      -> $OUT/bench_model.{json,png,log}, bench_model_bf16.*, bench_model_eager.*
#   c. the longest-sequence probe of the ~1B model (LaspConfig.b1): 1M -> 2048K tokens over 4 GPUs,
#      layer checkpointing + lean token-chunked checkpoints, bf16 weights, chunked loss; stops at the
#      first out-of-memory length (caught, reported as OOM).  -> $OUT/probe_b1.{json,png,log}
#      If 2048K did not fit: 2048K again with the checkpoints in host memory. -> $OUT/probe_b1_offload.*
#   d. the longest sequence each method trains at: the 150M model (eager, layer checkpointing, bf16
#      autocast), every method doubling from 1M tokens until it runs out of memory (at most 16M).
#      -> $OUT/findmax.{json,log}
#   $OUT/summary.md: one table of everything, with card and date (also printed at the end).
# Needs the extension built in place (python/lasp/liblasp*.so); if it does not load here, the shared
# benchmarks/device_env.sh builds it first (minutes, outside the budget).
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
source "$(dirname "$0")/device_paths.sh"

if [[ "${SMOKE:-0}" == 1 ]]; then  # the script itself, on a CPU box: gloo, tiny sizes, 2 processes
  DEV=cpu NP=2; echo "0, cpu (smoke), 0 MiB" > "$OUT/gpus.txt"
else
  DEV=cuda
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
  NGPU=$(nvidia-smi -L | wc -l)
  NP=$(( NGPU < 4 ? NGPU : 4 ))
  if ! python3 -c "import lasp, torch; torch.ops.lasp.lasp_attention.default; assert torch.cuda.is_available()" \
       > "$OUT/import.log" 2>&1; then
    echo "lasp does not load here ($(tail -1 "$OUT/import.log")): benchmarks/device_env.sh builds it"
    source "$(dirname "$0")/device_env.sh"
  fi
fi
python3 -c "import lasp, torch; print('lasp', lasp.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)" \
  | tee "$OUT/versions.txt"
if [[ -n "${LASP_COMMIT:-}" ]]; then echo "commit $LASP_COMMIT" >> "$OUT/versions.txt"  # the device copy's .git may be stale
else git log -1 --format='commit %h %cd' --date=iso >> "$OUT/versions.txt" 2>/dev/null || true; fi

# sizes (SMOKE: tiny versions of the same runs)
if [[ $DEV == cuda ]]; then
  CONV=(--preset small --hidden-size 512 --num-layers 6 --num-heads 8 --vocab-size 4096 --loss-chunk-size 8192
        --seq-len 8192 --batch-size 4 --steps 200 --lr 1e-3 --warmup 20 --log-every 50)
  BENCH=(--preset small --seq-lens 65536,262144,1048576 --warmup 2 --iters 7); EAGER_LENS=262144
  PROBE=(--preset b1 --lean-chunk 65536 --seq-lens 1048576,2097152)
  FINDMAX=(--preset small --seq-lens 1048576 --max-seq-len 16777216)
else
  CONV=(--preset tiny --seq-len 128 --batch-size 2 --steps 10 --log-every 5)
  BENCH=(--preset tiny --seq-lens 64,256 --warmup 0 --iters 1); EAGER_LENS=256
  PROBE=(--preset tiny --lean-chunk 16 --seq-lens 64,128)
  FINDMAX=(--preset tiny --seq-lens 64 --max-seq-len 256)
fi

START=$(date +%s); BUDGET_S=${BUDGET_S:-600}
# seconds for the next step: min(wanted, what is left of the budget); 0 = skip
step_s() { local want=$1 left=$(( BUDGET_S - ($(date +%s) - START) )); (( left < want )) && want=$left; (( want < 20 )) && want=0; echo "$want"; }
run_step() {  # name, wanted seconds, log, command...
  local name=$1 want=$2 log=$3; shift 3
  local t; t=$(step_s "$want")
  if (( t == 0 )); then echo "[$name] skipped: budget spent"; echo "skipped: budget spent" > "$log"; return; fi
  echo "[$name] up to ${t}s: $*"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc after $(( $(date +%s) - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' (timed out)')"
  echo "$rc" > "$log.rc"
}

# a. convergence: sp=1 vs sp=NP, 200 steps, bf16 (+ sp=1 fp32 as the noise reference).
# 25M params (hidden 512, 6 layers, 8 heads of 64: the tensor-core kernels), 4 x 8192 tokens a step.
run_step convergence "${CONV_S:-200}" "$OUT/convergence.log" \
  python3 examples/train.py --convergence-check --noise-ref --sp "$NP" --device "$DEV" --dtype bf16 "${CONV[@]}" \
    --seed 0 --no-progress --tolerance 2e-3 --timeout 120 --out-dir "$OUT/convergence" --plot "$OUT/convergence.png"
cp "$OUT/convergence/convergence.json" "$OUT/convergence.json" 2>/dev/null
grep -E "convergence check|step 200/200|Error|error" "$OUT/convergence.log" | tail -6

# b. methods side by side, 150M model, 64K / 256K / 1M tokens over NP GPUs (layer checkpointing, bf16 autocast
#    over fp32 weights, the per-token stages compiled: LaspConfig.compile), then b2: bf16 weights, lasp and
#    Ulysses only, and b3: the eager model (no --compile) at 256K, lasp and Ulysses.
run_step bench_model "${BENCH_S:-240}" "$OUT/bench_model.log" \
  torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${BENCH[@]}" --checkpoint \
    --compile --dtype bf16 --methods lasp,lasp-allgather,ulysses,allgather-kv --pg-timeout 120 \
    --json "$OUT/bench_model.json" --plot "$OUT/bench_model.png"
grep -E "^\||longest|Error" "$OUT/bench_model.log" | tail -20
run_step bench_model_bf16 "${BENCH_BF16_S:-110}" "$OUT/bench_model_bf16.log" \
  torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${BENCH[@]}" --checkpoint \
    --compile --param-dtype bf16 --methods lasp,ulysses --pg-timeout 120 --json "$OUT/bench_model_bf16.json"
grep -E "^\||Error" "$OUT/bench_model_bf16.log" | tail -8
run_step bench_model_eager "${BENCH_EAGER_S:-60}" "$OUT/bench_model_eager.log" \
  torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${BENCH[@]}" --checkpoint \
    --dtype bf16 --methods lasp,ulysses --seq-lens "${EAGER_LENS}" --pg-timeout 120 --json "$OUT/bench_model_eager.json"
grep -E "^\||Error" "$OUT/bench_model_eager.log" | tail -4

# c. the 1B probe: 1M, 1.5M, 2M tokens (256K .. 512K per GPU), bf16 weights, layer + lean token-chunked
#    checkpoints, until one runs out of memory; if 2M did not fit, 2M again with the layer checkpoints
#    offloaded to pinned host memory (--offload).
run_step probe_b1 "${PROBE_S:-110}" "$OUT/probe_b1.log" env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${PROBE[@]}" --checkpoint \
    --lean --param-dtype bf16 --methods lasp --warmup 1 --iters 1 --pg-timeout 180 \
    --json "$OUT/probe_b1.json" --plot "$OUT/probe_b1.png"
grep -E "^\||longest|Error" "$OUT/probe_b1.log" | tail -10
TARGET=${PROBE[-1]##*,}
if ! python3 -c "import json, sys; sys.exit(0 if (json.load(open('$OUT/probe_b1.json'))['max_seq_len'].get('lasp') or 0) >= $TARGET else 1)" 2>/dev/null; then
  run_step probe_b1_offload "${PROBE_OFFLOAD_S:-90}" "$OUT/probe_b1_offload.log" \
    env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${PROBE[@]}" --offload \
      --lean --param-dtype bf16 --methods lasp --seq-lens "$TARGET" --warmup 1 --iters 1 --pg-timeout 180 \
      --json "$OUT/probe_b1_offload.json"
  grep -E "^\||longest|Error" "$OUT/probe_b1_offload.log" | tail -6
fi

# d. the longest sequence per method (each doubles until out of memory; one step per length).
run_step findmax "${FINDMAX_S:-200}" "$OUT/findmax.log" env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  torchrun --standalone --nproc_per_node "$NP" benchmarks/bench_model.py --device "$DEV" "${FINDMAX[@]}" --find-max \
    --checkpoint --dtype bf16 --methods lasp,lasp-allgather,ulysses,allgather-kv --warmup 0 --iters 1 --pg-timeout 120 \
    --json "$OUT/findmax.json"
grep -E "^\||longest|Error" "$OUT/findmax.log" | tail -24

python3 - "$OUT" <<'EOF'
import json, os, sys, datetime
out = sys.argv[1]
def tok(n):
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
gpus = open(os.path.join(out, "gpus.txt")).read().strip().splitlines()
card = gpus[0].split(",")[1].strip() if gpus else "?"
vers = open(os.path.join(out, "versions.txt")).read().strip().replace("\n", "; ")
L = [f"# Model device pass: {len(gpus)} x {card}, {datetime.date.today()}", "", vers, ""]
c = load("convergence.json")
L.append(f"## a. Convergence (same seed, {c['steps'] if c else '?'} steps)")
if c:
    ls = c["losses"]
    L += ["", "| run | first loss | last loss |", "| --- | ---: | ---: |"]
    L += [f"| {k} | {v[0]:.4f} | {v[-1]:.4f} |" for k, v in ls.items()]
    L += ["", f"sp={c['sp']} vs sp=1 ({c['dtype']}): largest relative loss difference {c['max_rel_diff']:.3e} "
          f"(mean {c['mean_rel_diff']:.3e}); bf16-vs-fp32 difference of sp=1: largest "
          f"{c.get('bf16_noise_max_rel', float('nan')):.3e}; tolerance {c['tolerance']:.3e} -> "
          f"{'OK' if c['ok'] else 'MISMATCH'}. Plot: convergence.png"]
else:
    L.append("no result (see convergence.log)")
for name, title in (("bench_model.json", "b. Methods side by side (compiled per-token stages)"),
                    ("bench_model_bf16.json", "b2. bf16 weights (compiled per-token stages)"),
                    ("bench_model_eager.json", "b3. The eager model"), ("probe_b1.json", "c. ~1B longest-sequence probe"),
                    ("probe_b1_offload.json", "c'. ~1B at the target length, checkpoints offloaded to host memory"),
                    ("findmax.json", "d. Longest sequence per method (doubling until out of memory)")):
    r = load(name)
    if name == "probe_b1_offload.json" and not r and not os.path.exists(os.path.join(out, "probe_b1_offload.log")):
        continue  # not needed: the target length fit without offloading
    L += ["", f"## {title}"]
    if not r:
        L.append(f"no result (see {name[:-5]}.log)")
        continue
    i = r["info"]
    L += ["", f"{i['model_params'] / 1e6:.0f}M params, compile {i.get('compile', False)}, weights {i.get('param_dtype', 'fp32')}, autocast {i.get('autocast', i['dtype'])}, "
          f"checkpoint {i['checkpoint']}, lean {i.get('lean', False)}, offload {i.get('offload', False)}, batch {i['batch_size']}, {i['world']} x {i['device']}, "
          f"commit {i['commit']}; a step = forward + backward", "",
          "| method | tokens | s/step | tokens/s/GPU | peak GiB/GPU (alloc / reserved) | vs ulysses |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
    uly = {row["seq_len"]: row for row in r["rows"] if row["method"] == "ulysses" and not row["oom"]}
    for row in r["rows"]:
        n = tok(row["seq_len"])
        if row["oom"]:
            L.append(f"| {row['method']} | {n} | OOM | | | |")
            continue
        mem = "n/a" if row["peak_mem_bytes"] is None else \
            f"{row['peak_mem_bytes'] / 2**30:.1f} / {row.get('peak_reserved_bytes', 0) / 2**30:.1f}"
        u = uly.get(row["seq_len"])
        ratio = f"{row['tokens_per_s'] / u['tokens_per_s']:.2f}x" if u else ""
        L.append(f"| {row['method']} | {n} | {row['step_s']:.3f} | {row['tokens_per_s_per_gpu']:,.0f} | {mem} | {ratio} |")
    L.append("")
    oom = {row["method"] for row in r["rows"] if row["oom"]}
    capped = lambda m: " (the search's cap, no out-of-memory)" if r.get("find_max") and m not in oom else ""
    L.append("longest run: " + ", ".join(f"{m} {tok(v) if v else 'none'}{capped(m)}" for m, v in r["max_seq_len"].items()))
text = "\n".join(L) + "\n"
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(text)
print("\n" + text)
EOF
ls "$OUT"
