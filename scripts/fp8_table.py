#!/usr/bin/env python3
"""Join the CSVs of the fp8 layer comparison into the fp8 table of docs/performance.md.

    python3 scripts/fp8_table.py CSV...

The CSVs (any order; each file is recognised by its rows):
  * `moe-verify bench layer --class te_grouped --strategy auto --fp8 RECIPE --csv ...`, one per
    recipe (tensorwise, blockwise, ...): our bf16 layer (strategy `auto`), our fp8 layer
    (`fp8-RECIPE`), the dense bf16 cuBLAS rate (`dense/gemm8192*`) and the dense fp8 cuBLASLt
    rate (`dense/fp8gemm8192`), all from one process;
  * `scripts/torch_experts_bench.py --classes TEGroupedMLP --strategies torch,torch-compile
    --csv ...`: the PyTorch bf16 layer, eager (`torch`) and under torch.compile
    (`torch-compile`; `torch-compile-act` gets a column of its own when present);
  * `scripts/torch_fp8_experts_bench.py --csv ...`: the PyTorch fp8 layer (`torch-fp8-rowwise`).

Rows: (shape, dist, mode) of TEGroupedMLP, in the order the first Rust CSV has them. Columns:
  bf16 ms                  our bf16 layer (`auto`), from the first recipe's CSV
  fp8 R ms                 our fp8 layer under recipe R (tensorwise, blockwise, then any other)
  R % dense fp8            its TFLOP/s over the dense fp8 rate measured in the same process
  bf16 / R                 time ratio, our bf16 over our fp8 (> 1: fp8 faster), both from R's
                           CSV (one process)
  torch bf16 ms, torch.compile bf16 ms, torch fp8 ms    the PyTorch layers
  torch fp8 / R            time ratio, PyTorch fp8 over our fp8 under R (> 1: ours faster)
Cells: `ERR` where that run failed, `-` where it was not run. Warnings (rows on one side only,
FLOP counts that disagree, several devices, more than one CSV of a kind) go under the table and
to stderr. Exit 2 on a file that cannot be read or lacks a column.
"""
import csv
import sys
from collections import OrderedDict

from bench_timing import print_warnings

NEEDED = ("shape", "dist", "class", "mode", "strategy", "flops", "median_ms", "tflops", "device")
CLASS = "TEGroupedMLP"
RECIPE_ORDER = ["tensorwise", "blockwise", "delayed", "mxfp8"]
TORCH = {"torch": "torch bf16", "torch-compile": "torch.compile bf16",
         "torch-compile-act": "torch.compile (act only) bf16", "torch-fp8-rowwise": "torch fp8"}


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def read(path):
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"missing columns {missing} (expected the CSV of moe-verify bench layer "
                                 "or of scripts/torch_*experts_bench.py)")
            return list(reader)
    except (OSError, ValueError, csv.Error) as ex:
        print(f"error: {path}: {ex}", file=sys.stderr)
        sys.exit(2)


class Source:
    """One CSV: its kind ("rust" with its recipe, or "torch"), rows by (shape, dist, mode) and
    strategy, dense readings."""

    def __init__(self, path, rows):
        self.path = path
        self.rows = {}  # (shape, dist, mode) -> {strategy: (ms, tflops) or None}
        self.flops = {}  # (shape, dist, mode) -> {strategy: flops}
        self.dense = []  # (mode, strategy, tflops) in file order
        self.devices = set()
        self.order = []
        self.other_classes = set()
        for r in rows:
            self.devices.add(r["device"])
            if r["shape"] == "dense":
                tf = num(r["tflops"])
                if tf is not None:
                    self.dense.append((r["mode"], r["strategy"], tf))
                continue
            if r["class"] != CLASS:
                self.other_classes.add(r["class"])
                continue
            key = (r["shape"], r["dist"], r["mode"])
            if key not in self.rows:
                self.order.append(key)
            ms, tf = num(r["median_ms"]), num(r["tflops"])
            ok = ms is not None and tf is not None and ms > 0
            self.rows.setdefault(key, {})[r["strategy"]] = (ms, tf) if ok else None
            self.flops.setdefault(key, {})[r["strategy"]] = num(r["flops"])
        strategies = {s for st in self.rows.values() for s in st}
        self.recipes = sorted(s[len("fp8-"):] for s in strategies if s.startswith("fp8-"))
        self.torch = sorted(s for s in strategies if s in TORCH)
        self.rust_bf16 = "auto" in strategies

    def dense_fp8(self):
        v = [tf for mode, _, tf in self.dense if mode.startswith("fp8gemm")]
        return max(v) if v else None

    def dense_bf16(self):
        return [tf for mode, s, tf in self.dense if mode.startswith("gemm") and s != "torch"]


def recipe_key(r):
    return (RECIPE_ORDER.index(r) if r in RECIPE_ORDER else len(RECIPE_ORDER), r)


def main(paths):
    if not paths:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    notes = []
    sources = [Source(p, read(p)) for p in paths]
    by_recipe = OrderedDict()  # recipe -> Source
    torch_src = {}  # torch strategy -> Source
    for s in sources:
        if s.other_classes:
            notes.append(f"{s.path}: rows of {sorted(s.other_classes)} left out (the table is {CLASS}'s)")
        if len(s.recipes) > 1:
            notes.append(f"{s.path}: several fp8 recipes in one file ({s.recipes})")
        for r in s.recipes:
            if r in by_recipe:
                notes.append(f"recipe {r} in {by_recipe[r].path} and {s.path}: the first is used")
            else:
                by_recipe[r] = s
        for t in s.torch:
            if t in torch_src:
                notes.append(f"{t} rows in {torch_src[t].path} and {s.path}: the first is used")
            else:
                torch_src[t] = s
        if not s.recipes and not s.torch and s.rust_bf16:
            notes.append(f"{s.path}: bf16 rows without an fp8 recipe: not used (the bf16 column comes from "
                         "the recipes' CSVs, one process each)")
        if not s.recipes and not s.torch and not s.rust_bf16:
            notes.append(f"{s.path}: no rows this table uses")
    recipes = sorted(by_recipe, key=recipe_key)
    if not recipes:
        notes.append("no fp8 rows of ours (`moe-verify bench layer --fp8 RECIPE --csv`)")
    first = by_recipe[recipes[0]] if recipes else None

    # Row order: the first recipe's CSV, then keys only other files have.
    keys = []
    for s in ([first] if first else []) + sources:
        for k in s.order:
            if k not in keys:
                keys.append(k)

    def get(src, key, strategy):
        """(present, (ms, tf) or None)."""
        if src is None or key not in src.rows or strategy not in src.rows[key]:
            return False, None
        return True, src.rows[key][strategy]

    def ms_cell(src, key, strategy):
        present, v = get(src, key, strategy)
        if not present:
            return "-"
        return "ERR" if v is None else f"{v[0]:.2f}"

    def ratio(num_src, num_strategy, den_src, den_strategy, key, bold=True):
        _, a = get(num_src, key, num_strategy)
        _, b = get(den_src, key, den_strategy)
        if a is None or b is None:
            return "-"
        r = f"{a[0] / b[0]:.2f}"
        return f"**{r}**" if bold else r

    torch_cols = [t for t in ("torch", "torch-compile", "torch-compile-act") if t in torch_src]
    bf16_torch_cols = ["torch", "torch-compile"] + (["torch-compile-act"] if "torch-compile-act" in torch_src else [])
    for t in ("torch", "torch-compile"):
        if t not in torch_src:
            notes.append(f"no {t} rows (scripts/torch_experts_bench.py --strategies {t})")
    if "torch-fp8-rowwise" not in torch_src:
        notes.append("no torch-fp8-rowwise rows (scripts/torch_fp8_experts_bench.py)")
    torch_fp8 = torch_src.get("torch-fp8-rowwise")

    head = ["shape", "dist", "mode", "bf16 ms"]
    head += [f"fp8 {r} ms" for r in recipes]
    head += [f"{r} % dense fp8" for r in recipes]
    head += [f"bf16 / {r}" for r in recipes]
    head += [f"{TORCH[t]} ms" for t in bf16_torch_cols]
    head.append("torch fp8 ms")
    head += [f"torch fp8 / {r}" for r in recipes]

    # Header: devices and dense rates.
    devices = sorted(set().union(*(s.devices for s in sources)))
    if len(devices) > 1:
        notes.append(f"rows come from several devices: {devices}: ratios across them compare different cards")
    parts = []
    for r in recipes:
        s = by_recipe[r]
        d8 = s.dense_fp8()
        d16 = s.dense_bf16()
        parts.append(f"`--fp8 {r}` run: dense bf16 cuBLAS " + (", ".join(f"{x:.0f}" for x in d16) or "not measured")
                     + ", dense fp8 cuBLASLt " + (f"**{d8:.0f}**" if d8 else "not measured") + " TFLOP/s")
        if d8 is None:
            notes.append(f"{s.path}: no dense fp8 reading (dense/fp8gemm8192): `{r} % dense fp8` left blank")
    torch_dense = sorted({tf for t in torch_cols for (_, st, tf) in torch_src[t].dense if st == "torch"})
    if torch_dense:
        parts.append("torch.mm bf16 " + ", ".join(f"{x:.0f}" for x in torch_dense) + " TFLOP/s")
    print(f"Device: {', '.join(devices) or 'unknown'}. " + "; ".join(parts) + ".\n")

    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        cells = list(key)
        cells.append(ms_cell(first, key, "auto"))
        for r in recipes:
            cells.append(ms_cell(by_recipe[r], key, f"fp8-{r}"))
        for r in recipes:
            s = by_recipe[r]
            _, v = get(s, key, f"fp8-{r}")
            d8 = s.dense_fp8()
            cells.append(f"{100 * v[1] / d8:.1f}%" if v is not None and d8 else "-")
        for r in recipes:
            cells.append(ratio(by_recipe[r], "auto", by_recipe[r], f"fp8-{r}", key))
        for t in bf16_torch_cols:
            cells.append(ms_cell(torch_src.get(t), key, t))
        cells.append(ms_cell(torch_fp8, key, "torch-fp8-rowwise"))
        for r in recipes:
            cells.append(ratio(torch_fp8, "torch-fp8-rowwise", by_recipe[r], f"fp8-{r}", key))
        print("| " + " | ".join(cells) + " |")

        # Consistency: FLOP counts of one key agree across every source.
        fl = {v for s in sources for v in s.flops.get(key, {}).values() if v is not None}
        if len(fl) > 1:
            notes.append(f"{'/'.join(key)}: FLOP counts differ between CSVs ({sorted(fl)})")
        for r in recipes:
            if not get(by_recipe[r], key, f"fp8-{r}")[0]:
                notes.append(f"{'/'.join(key)}: no fp8-{r} row")
        if not get(first, key, "auto")[0]:
            notes.append(f"{'/'.join(key)}: no bf16 auto row")
        if torch_fp8 is not None and not get(torch_fp8, key, "torch-fp8-rowwise")[0]:
            notes.append(f"{'/'.join(key)}: no torch fp8 row")

    print("\nTimes are medians per call. `bf16 / R` and `torch fp8 / R` are time ratios (> 1: our fp8 layer "
          "under recipe R is faster); `bf16 / R` takes both times from R's own run (one process). "
          "`R % dense fp8`: our fp8 TFLOP/s over the dense 8192³ fp8 rate of the same run. "
          "FLOPs count the routed rows' GEMMs only (padding rows not counted).")
    if len(recipes) > 1:
        # Our bf16 rows were timed in every recipe's run: how far apart (run-to-run noise).
        devs = []
        for r in recipes[1:]:
            for k in keys:
                _, a = get(first, k, "auto")
                _, b = get(by_recipe[r], k, "auto")
                if a is not None and b is not None:
                    devs.append(abs(b[0] / a[0] - 1))
        if devs:
            print(f"Our bf16 rows, timed again in the {', '.join(recipes[1:])} run(s), differ from the first run's "
                  f"by at most {100 * max(devs):.1f}% (median {100 * sorted(devs)[len(devs) // 2]:.1f}%): "
                  "the run-to-run spread of these readings.")
    print_warnings(notes)


if __name__ == "__main__":
    main(sys.argv[1:])
