#!/usr/bin/env python3
"""Join the per-layer CSVs of `moe-verify bench layer --csv` (bench/src/layer) and
scripts/torch_experts_bench.py (--csv) into the markdown table of docs/performance.md.

    python3 scripts/layer_table.py layer-rust.csv layer-torch.csv [more.csv ...]

Rows: shape, dist, class, mode (Rust CSV order). Columns: min GB (each input/weight read once,
each output written once), TFLOP/s of every Rust strategy found, torch TFLOP/s, the best Rust
strategy, its % of the dense cuBLAS rate of the Rust run (Engine::gemm 8192^3 bf16, same
process) against the highest reading of the run ("best % dense", conservative) and against the
mean of the two readings that bracket the shape's rows ("% adjacent dense": the layer bench
measures the dense rate before the first shape, before each later shape and at the end, so
both sides of the ratio see the same thermal state; blank for CSVs without those readings),
best / torch and auto / torch as time ratios (torch ms / Rust ms: > 1 means Rust is faster);
"torch" is the eager PyTorch layer, and torch strategies besides it (torch-compile, ...: the
torch_experts_bench.py --strategies) get TFLOP/s columns after it. ERR: that run failed;
blank: not run. Warnings (rows on one side only, FLOP or byte counts that disagree, different
devices) go to stderr and under the table.
"""
import csv
import sys
from collections import OrderedDict

from bench_timing import print_warnings

KEY = ("shape", "dist", "class", "mode")


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def main(paths):
    if len(paths) < 1:
        sys.exit(__doc__)
    rows = OrderedDict()  # key -> {"strategies": {label: (ms, tf) or None}, "flops", "min_bytes"}
    dense_seq = {}  # "rust" / "torch" -> [(mode, tflops)] of the dense rows, in file (= time) order
    rust_shapes = []  # shapes of the Rust rows, in file order
    devices = {}  # "rust" / "torch" -> set of device names
    strategies = []
    torch_extra = []  # torch strategies besides eager "torch" (torch-compile, ...), as columns
    notes = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in KEY + ("strategy", "flops", "min_bytes", "median_ms", "tflops", "device")
                       if c not in (reader.fieldnames or [])]
            if missing:
                sys.exit(f"{path}: missing columns {missing}")
            for r in reader:
                side = "torch" if r["strategy"].startswith("torch") else "rust"
                devices.setdefault(side, set()).add(r["device"])
                ms, tf = num(r["median_ms"]), num(r["tflops"])
                if r["shape"] != "dense" and side == "rust" and r["shape"] not in rust_shapes:
                    rust_shapes.append(r["shape"])
                if r["shape"] == "dense":
                    if tf is not None:
                        dense_seq.setdefault(side, []).append((r["mode"], tf))
                    continue
                key = tuple(r[k] for k in KEY)
                entry = rows.setdefault(key, {"strategies": {}, "flops": {}, "min_bytes": {}})
                label = r["strategy"]
                entry["strategies"][label] = (ms, tf) if ms is not None and tf is not None and ms > 0 else None
                entry["flops"][label] = num(r["flops"])
                entry["min_bytes"][label] = num(r["min_bytes"])
                if side == "rust" and label not in strategies:
                    strategies.append(label)
                if side == "torch" and label != "torch" and label not in torch_extra:
                    torch_extra.append(label)

    # Order: shapes, dists, classes as first seen; fwd before fwdbwd.
    def first_seen(i):
        order = []
        for k in rows:
            if k[i] not in order:
                order.append(k[i])
        return {v: n for n, v in enumerate(order)}

    orders = [first_seen(i) for i in range(3)]
    mode_order = {"fwd": 0, "fwdbwd": 1}
    keys = sorted(rows, key=lambda k: (orders[0][k[0]], orders[1][k[1]], orders[2][k[2]],
                                       mode_order.get(k[3], 2), k[3]))

    for side in ("rust", "torch"):
        if len(devices.get(side, ())) > 1:
            notes.append(f"{side} rows come from several devices: {sorted(devices[side])}")
    if devices.get("rust") and devices.get("torch") and devices["rust"] != devices["torch"]:
        notes.append(f"Rust ran on {sorted(devices['rust'])}, torch on {sorted(devices['torch'])}: ratios compare different cards")

    # Conservative peak: the highest reading (measured before, between and after the layers).
    dense = {side: max(tf for _, tf in seq) for side, seq in dense_seq.items()}
    rust_dense_seq = dense_seq.get("rust", [])
    peak = dense.get("rust")
    # Bracketing dense readings: gemm8192, gemm8192_before_<shape 2..n>, gemm8192_end.
    adjacent = {}
    expected = ["gemm8192"] + [f"gemm8192_before_{x}" for x in rust_shapes[1:]] + ["gemm8192_end"]
    if [m for m, _ in rust_dense_seq] == expected:
        for i, shape in enumerate(rust_shapes):
            adjacent[shape] = (rust_dense_seq[i][1] + rust_dense_seq[i + 1][1]) / 2
    elif rust_dense_seq:
        notes.append("no bracketing dense readings (expected modes " + ", ".join(expected) + "; found "
                     + ", ".join(m for m, _ in rust_dense_seq) + "): % adjacent dense left blank")
    parts = []
    for side, what in (("rust", "cuBLAS (Rust, Engine::gemm)"), ("torch", "torch.mm")):
        if side in dense:
            runs = [tf for _, tf in dense_seq[side]]
            each = f" (measurements: {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
            parts.append(f"{what} {dense[side]:.1f} TFLOP/s{each}")
    dev = sorted(devices.get("rust", set()) | devices.get("torch", set()))
    print(f"Device: {', '.join(dev) or 'unknown'}. Dense 8192³ bf16: {', '.join(parts) or 'not measured'}.\n")

    hdr = list(KEY) + ["min GB"] + strategies + ["torch"] + torch_extra + ["best", "best % dense", "% adjacent dense",
                                                                          "best / torch"]
    if "auto" in strategies:
        hdr.append("auto / torch")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for key in keys:
        e = rows[key]
        st = e["strategies"]
        fl = {v for v in e["flops"].values() if v is not None}
        mb = {v for v in e["min_bytes"].values() if v is not None}
        if len(fl) > 1 or len(mb) > 1:
            notes.append(f"{'/'.join(key)}: FLOP or min-byte counts differ between CSVs ({sorted(fl)}, {sorted(mb)})")
        if not any(s in st for s in strategies):
            notes.append(f"{'/'.join(key)}: no Rust row")
        if "torch" not in st:
            notes.append(f"{'/'.join(key)}: no torch row")

        def cell(label):
            if label not in st:
                return ""
            return "ERR" if st[label] is None else f"{st[label][1]:.0f}"

        cells = list(key) + [f"{max(mb) / 1e9:.2f}" if mb else ""]
        cells += [cell(s) for s in strategies]
        cells.append(cell("torch"))
        cells += [cell(s) for s in torch_extra]
        ok = [(st[s][0], s) for s in strategies if st.get(s) is not None]
        torch_ms = st["torch"][0] if st.get("torch") is not None else None
        if ok:
            best_ms, best = min(ok)
            best_tf = st[best][1]
            cells.append(f"{best} {best_tf:.0f}")
            cells.append(f"{100 * best_tf / peak:.0f}%" if peak else "")
            adj = adjacent.get(key[0])
            cells.append(f"{100 * best_tf / adj:.0f}%" if adj else "")
            cells.append(f"**{torch_ms / best_ms:.2f}**" if torch_ms else "")
        else:
            cells += ["", "", "", ""]
        if "auto" in strategies:
            cells.append(f"{torch_ms / st['auto'][0]:.2f}" if torch_ms and st.get("auto") is not None else "")
        print("| " + " | ".join(cells) + " |")
    print("\nTFLOP/s per column; ratios are time ratios torch / Rust (> 1: Rust faster); "
          "% dense against the highest of the Rust run's dense cuBLAS readings; % adjacent dense against the mean "
          "of the two readings taken right before and right after the shape's rows.")
    if adjacent:
        print("Bracketing dense readings (TFLOP/s): " + ", ".join(f"{m} {tf:.1f}" for m, tf in rust_dense_seq) + ".")
    print_warnings(notes)


if __name__ == "__main__":
    main(sys.argv[1:])
