#!/usr/bin/env python3
"""One table of the models part of benchmarks/gpu_suite.sh: reads the JSON files it wrote into a results
folder (convergence.json, bench_model*.json, probe_b1*.json, findmax.json, gpus.txt, versions.txt) and
writes summary.md there (also printed), with card and date.

    python3 benchmarks/models_summary.py bench_out
"""
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
L = [f"# Model benchmarks: {len(gpus)} x {card}, {datetime.date.today()}", "", vers, ""]
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
