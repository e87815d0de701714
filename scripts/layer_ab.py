#!/usr/bin/env python3
"""Compare two builds' layer-bench rows, base (A) against new (B), run A, B, B, A in one call.

    python3 scripts/layer_ab.py A1.csv B1.csv B2.csv A2.csv > ab.md

Each CSV is a layer-bench row CSV (`moe-verify bench layer --csv`, or the older criterion
bench's MOE_LAYER_CSV: same columns; its short shape names deepseek, qwen3, gptoss are mapped
to the registry's deepseek-v3, qwen3-30b-a3b, gpt-oss-120b). The order A B B A cancels a
linear drift of the card's clock over the four runs.

Per row (shape, dist, class, mode, strategy) and for the dense GEMM readings: the median ms of
each run, the change new / base - 1 of the mean times (> 0: the new build is slower), and the
run-to-run noise of the row, max(|A1/A2 - 1|, |B1/B2 - 1|): the spread between two runs of the
same binary. Two runs give a rough per-row noise, so a row is flagged SLOWER when the change
exceeds its own noise, the 90th percentile of all rows' noise (the run-to-run noise of the
setup) and the largest noise of the dense readings (the card's own drift). The last lines say
how many rows were flagged.
Exit status 0 either way (a report, not a test).
"""
import csv
import statistics
import sys

OLD_NAMES = {"deepseek": "deepseek-v3", "qwen3": "qwen3-30b-a3b", "gptoss": "gpt-oss-120b"}
KEY = ("shape", "dist", "class", "mode", "strategy")


def read(path):
    out = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            r["shape"] = OLD_NAMES.get(r["shape"], r["shape"])
            for old, new in OLD_NAMES.items():  # dense readings gemm8192_before_<shape>
                if r["mode"] == f"gemm8192_before_{old}":
                    r["mode"] = f"gemm8192_before_{new}"
            try:
                ms = float(r["median_ms"])
            except ValueError:
                ms = None  # ERR row
            out[tuple(r[k] for k in KEY)] = ms
    return out


def main(paths):
    if len(paths) != 4:
        sys.exit(__doc__)
    a1, b1, b2, a2 = (read(p) for p in paths)
    keys = [k for k in a1 if k in b1 and k in b2 and k in a2]
    missing = sorted(set(a1) ^ set(b1) | set(a1) ^ set(b2) | set(a1) ^ set(a2))
    rows = []
    for k in keys:
        v = (a1[k], b1[k], b2[k], a2[k])
        if any(x is None for x in v):
            rows.append((k, v, None, None))
            continue
        ra, rb = v[0] / v[3], v[1] / v[2]
        noise = max(abs(ra - 1), abs(rb - 1))
        change = ((v[1] + v[2]) / 2) / ((v[0] + v[3]) / 2) - 1
        rows.append((k, v, change, noise))
    dense = [r for r in rows if r[0][0] == "dense" and r[3] is not None]
    card = max((r[3] for r in dense), default=0.0)
    noises = sorted(r[3] for r in rows if r[3] is not None and r[0][0] != "dense")
    p90 = noises[min(len(noises) - 1, int(0.9 * len(noises)))] if noises else 0.0
    print("| shape | dist | class | mode | strategy | A1 ms | B1 ms | B2 ms | A2 ms | new/base - 1 | noise | |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    flagged = 0
    for k, v, change, noise in rows:
        if change is None:
            cells = " | ".join("ERR" if x is None else f"{x:.4f}" for x in v)
            print(f"| {' | '.join(k)} | {cells} | | | ERR |")
            flagged += 1
            continue
        slower = k[0] != "dense" and change > max(noise, p90, card)
        flagged += slower
        cells = " | ".join(f"{x:.4f}" for x in v)
        print(f"| {' | '.join(k)} | {cells} | {100 * change:+.2f}% | {100 * noise:.2f}% | {'SLOWER' if slower else ''} |")
    print()
    if noises:
        print(f"run-to-run noise over {len(noises)} rows: median {100 * statistics.median(noises):.2f}%, "
              f"90th percentile {100 * p90:.2f}%, max {100 * max(noises):.2f}%; dense readings' noise (card "
              f"drift) {100 * card:.2f}%")
    if missing:
        print(f"rows not in all four runs ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    print(f"VERDICT: {flagged} of {len(rows)} rows slower (or failed) beyond the noise")


if __name__ == "__main__":
    main(sys.argv[1:])
