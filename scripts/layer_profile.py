#!/usr/bin/env python3
"""Per-kernel time breakdown of CUDA expert-layer calls, from Nsight Compute logs.

`scripts/gpu-device.sh`'s `profile` step runs the layer bench (`moe-verify bench layer
--untimed`) under `ncu --metrics gpu__time_duration.sum --csv`, once per (shape, class): each
of the shape's token distributions then makes exactly one untimed
layer call, right after the `init_uniform` kernels that fill its inputs. This script splits a
log at those `init_uniform` runs (one segment per distribution, in the bench's order: sorted
names), sums each segment's kernel durations by category, and prints a markdown table:

    shape | dist | class | mode | kernels | total ms | GEMM ms | act_fwd ms | act_bwd ms | other ms |
    elementwise share | act GB/s

`act GB/s` is the activation kernels' bytes (read a [T, 2f] and write u [T, f] forward; read a
and du, write da backward, bf16) over their time. ncu serializes kernels, so the total is the
sum of kernel times, without overlap between streams and without launch gaps.

Usage: layer_profile.py --counts scripts/shapes.json LOG:SHAPE:CLASS:MODE ... > profile.md
(the distributions, rows T and FFN size f of SHAPE come from the counts file).

       layer_profile.py --top N LOG ...
prints, per log, the N kernels with the largest summed time (whole log, every call in it:
e.g. an fp8 layer's quantization kernels next to its GEMMs), with their share and count.
"""
import csv
import json
import sys

ELEMENTWISE = ("scale_rows", "probs_in_bwd", "fill_bias_rows", "fc2_bias_fwd", "col_sum")


def kernels(path):
    """(name, ns) per profiled kernel, in launch order."""
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        scale = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit, 1.0)
        rows.append((r["Kernel Name"], value * scale))
    return rows


def category(name):
    if name.startswith("act_fwd"):
        return "act_fwd"
    if name.startswith("act_bwd"):
        return "act_bwd"
    if name.startswith(ELEMENTWISE):
        return "other"
    return "gemm"  # cuBLAS kernels and grouped_gemm_* (the persistent kernel)


def segments(rows):
    """Maximal runs of kernels that are not init_uniform (one layer call each)."""
    out, cur = [], []
    for name, ns in rows:
        if name.startswith("init_uniform"):
            if cur:
                out.append(cur)
                cur = []
        else:
            cur.append((name, ns))
    if cur:
        out.append(cur)
    return out


def top(n, paths):
    """The `--top` report: per log, the n kernels (name cut at 70 characters) of largest summed time."""
    for path in paths:
        totals, counts = {}, {}
        for name, ns in kernels(path):
            key = name[:70]
            totals[key] = totals.get(key, 0.0) + ns
            counts[key] = counts.get(key, 0) + 1
        whole = sum(totals.values())
        print(f"{path}: {whole / 1e6:.2f} ms over {sum(counts.values())} kernels")
        for key, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:n]:
            print(f"  {ns / 1e6:8.3f} ms {100 * ns / whole if whole else 0:5.1f}% x{counts[key]:5d}  {key}")


def main(args):
    if len(args) >= 3 and args[0] == "--top":
        return top(int(args[1]), args[2:])
    if len(args) < 3 or args[0] != "--counts":
        sys.exit(__doc__)
    shapes = {s["name"]: s for s in json.load(open(args[1]))["shapes"]}
    args = args[2:]
    print("| shape | dist | class | mode | kernels | total ms | GEMM ms | act_fwd ms | act_bwd ms | other ms "
          "| elementwise share | act GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args:
        path, shape, cls, mode = spec.split(":")
        if shape not in shapes:
            sys.exit(f"layer_profile.py: shape {shape!r} is not in the counts file ({', '.join(shapes)})")
        dists = sorted(shapes[shape]["dists"])
        tf = (shapes[shape]["rows"], shapes[shape]["ffn"])
        try:
            segs = segments(kernels(path))
        except OSError as e:
            print(f"| {shape} | - | {cls} | {mode} | ERR: {e} |")
            continue
        if len(segs) != len(dists):
            print(f"| {shape} | ? | {cls} | {mode} | ERR: {len(segs)} call segments in {path}, expected "
                  f"{len(dists)} ({','.join(dists)}) |")
            continue
        for dist, seg in zip(dists, segs):
            by = {"gemm": 0.0, "act_fwd": 0.0, "act_bwd": 0.0, "other": 0.0}
            for name, ns in seg:
                by[category(name)] += ns
            total = sum(by.values())
            act = by["act_fwd"] + by["act_bwd"]
            gbs = "-"
            if act > 0:
                t, f = tf
                nbytes = 0
                if by["act_fwd"] > 0:
                    nbytes += 2 * t * (2 * f + f)
                if by["act_bwd"] > 0:
                    nbytes += 2 * t * (2 * f + f + 2 * f)
                gbs = f"{nbytes / act:.0f}"
            ms = lambda v: f"{v / 1e6:.3f}"
            share = (total - by["gemm"]) / total if total else 0.0
            print(f"| {shape} | {dist} | {cls} | {mode} | {len(seg)} | {ms(total)} | {ms(by['gemm'])} | "
                  f"{ms(by['act_fwd'])} | {ms(by['act_bwd'])} | {ms(by['other'])} | {100 * share:.1f}% | {gbs} |")


if __name__ == "__main__":
    main(sys.argv[1:])
