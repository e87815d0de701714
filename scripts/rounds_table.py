#!/usr/bin/env python3
"""Summarize the interleaved rounds of `moe-verify bench layer --rounds R --rounds-csv PATH`
as the markdown table of docs/performance.md.

    python3 scripts/rounds_table.py rounds.csv [torch.csv]

Each (shape, dist, class, mode) was timed in R rounds; a round times one ~20 ms block of the
dense 8192^3 cuBLAS GEMM and one of every strategy, back to back (order reversed every other
round). Columns per row: the dense rate (median of the rounds), then per strategy its median
TFLOP/s and its % of interleaved dense: the median, over rounds, of (strategy rate / the same
round's dense rate), with the lowest and highest round in brackets. With more than one
strategy: each later strategy's per-round time ratio to the first (median, range; > 1: faster
than the first). With torch.csv (scripts/torch_experts_bench.py --csv): torch's TFLOP/s and the
first strategy's median rate over torch's (torch was timed after the Rust run, in another
thermal state: read it as in layer_table.py).
"""
import csv
import statistics
import sys
from collections import OrderedDict

KEY = ("shape", "dist", "class", "mode")


def med_range(v):
    return statistics.median(v), min(v), max(v)


def main(args):
    if not 1 <= len(args) <= 2:
        sys.exit(__doc__)
    rows = OrderedDict()  # key -> {item: {round: (ms, tflops)}}
    items = []
    devices = set()
    with open(args[0], newline="") as f:
        for r in csv.DictReader(f):
            key = tuple(r[k] for k in KEY)
            item = r["item"]
            if item != "dense" and item not in items:
                items.append(item)
            rows.setdefault(key, {}).setdefault(item, {})[int(r["round"])] = float(r["tflops"])
            devices.add(r["device"])
    if not items:
        sys.exit(f"{args[0]}: no interleaved rounds (the bench ran with --rounds 0?)")
    torch = {}
    if len(args) == 2:
        with open(args[1], newline="") as f:
            for r in csv.DictReader(f):
                if r.get("strategy", "torch") != "torch":
                    continue  # torch-compile etc.: the eager layer is this table's torch column
                try:
                    torch[tuple(r[k] for k in KEY)] = float(r["tflops"])
                except (KeyError, ValueError):
                    pass
    head = ["shape", "dist", "class", "mode", "dense (median)"]
    for it in items:
        head += [f"{it} TFLOP/s", f"{it} % interleaved dense"]
    for it in items[1:]:
        head.append(f"{it} / {items[0]}")
    if torch:
        head += ["torch", f"{items[0]} / torch"]
    print(f"Device: {', '.join(sorted(devices))}.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, by_item in rows.items():
        dense = by_item.get("dense", {})
        cells = list(key) + [f"{statistics.median(dense.values()):.0f}" if dense else ""]
        for it in items:
            rs = by_item.get(it, {})
            common = [r for r in rs if r in dense]
            if not common:
                cells += ["", ""]
                continue
            tf = statistics.median(rs.values())
            m, lo, hi = med_range([100 * rs[r] / dense[r] for r in common])
            cells += [f"{tf:.0f}", f"**{m:.1f}%** ({lo:.1f}-{hi:.1f})"]
        first = by_item.get(items[0], {})
        for it in items[1:]:
            rs = by_item.get(it, {})
            common = [r for r in rs if r in first]
            if not common:
                cells.append("")
                continue
            # Time ratio first / it = rate ratio it / first.
            m, lo, hi = med_range([rs[r] / first[r] for r in common])
            cells.append(f"{m:.3f} ({lo:.3f}-{hi:.3f})")
        if torch:
            t = torch.get(key)
            cells += [f"{t:.0f}" if t else "", f"{statistics.median(first.values()) / t:.2f}" if t and first else ""]
        print("| " + " | ".join(cells) + " |")
    print(
        "\n% interleaved dense: median over rounds of the strategy's rate over the dense rate of the "
        "same round (lowest-highest round); ratios: per-round rate ratio to the first strategy."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
