#!/usr/bin/env python3
"""Merge ROW lines of `moe-verify bench grouped --csv` (bench/src/grouped.rs) and
scripts/torch_grouped_bench.py into the markdown table of docs/performance.md.

    python3 scripts/grouped_table.py rust.csv torch.csv [rust_extra.csv ...]

Columns: every strategy found, torch, the best strategy that does not re-capture, its % of
the dense cuBLAS rate of the same run, best / torch, auto / torch and loop / torch.
"""
import sys
from collections import OrderedDict

rows = OrderedDict()
dense = {}
strategies = []
for path in sys.argv[1:]:
    for line in open(path):
        f = line.strip().split(",")
        if len(f) != 8 or f[0] != "ROW":
            continue
        _, impl, shape, dist, case, strat, ms, tf = f
        if shape == "dense":
            dense[impl] = float(tf)
            continue
        key = (shape, dist, case)
        label = "torch" if impl == "torch" else strat
        rows.setdefault(key, {})[label] = (float(ms), float(tf))
        if label != "torch" and label not in strategies:
            strategies.append(label)

peak = dense.get("rust")
print(f"Dense 8192³ bf16: cuBLAS (Rust, Engine::gemm) {dense.get('rust')} TFLOP/s, torch.mm {dense.get('torch')} TFLOP/s.\n")
fast = [s for s in strategies if s != "graph4-recapture"]
hdr = ["shape", "dist", "GEMMs"] + strategies
hdr += ["torch grouped_mm", "best (no recapture)", "best % dense", "best / torch", "auto / torch", "loop / torch"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for (shape, dist, case), r in rows.items():
    cells = [shape, dist, case]
    for s in strategies:
        cells.append(f"{r[s][1]:.0f}" if s in r else "")
    t = r.get("torch")
    cells.append(f"{t[1]:.0f}" if t else "ERR")
    cand = [(r[s][1], s) for s in fast if s in r]
    best_tf, best_s = max(cand)
    cells.append(f"{best_s} {best_tf:.0f}")
    cells.append(f"{100 * best_tf / peak:.0f}%" if peak else "")
    cells.append(f"**{best_tf / t[1]:.2f}**" if t else "")
    cells.append(f"{r['auto'][1] / t[1]:.2f}" if t and "auto" in r else "")
    cells.append(f"{r['loop'][1] / t[1]:.2f}" if t and "loop" in r else "")
    print("| " + " | ".join(cells) + " |")
