#!/usr/bin/env python3
"""torch._grouped_mm baseline (the same GEMM sets as `moe-verify bench grouped`, bench/src/grouped.rs).

    python3 scripts/torch_grouped_bench.py [--counts PATH] [--csv OUT.csv] [--iters 20]
        time every (shape, distribution, case) with torch._grouped_mm, plus torch.mm 8192^3

Shapes and token distributions: scripts/shapes.json (default --counts), the Rust shape
registry (moe_harness::shapes) as `moe-verify shapes --json` prints it; a Rust test keeps the
file equal to the registry.

Rows printed: ROW,torch,<shape>,<dist>,<case>,grouped_mm,<median ms>,<TFLOP/s>
bf16 operands and outputs; offs = cumulative token counts (int32, on device); CUDA-event
timed, median of --iters after 3 warm-ups, one event pair per iteration.

Cases (T rows = routed tokens, h hidden, n1 = 2*ffn (GLU), n2 = ffn):
  fc1     x[T,h]  . W1_e              -> a[T,n1]
  fc2     u[T,n2] . W2_e              -> y[T,h]
  dgrad1  da[T,n1] . W1_e^T           -> dx[T,h]
  wgrad1  da_e^T . x_e  (K = tokens)  -> dW1[E,n1,h]
  fwd     fc1 + fc2
  fwdbwd  fc1, fc2, dgrad2, dgrad1, wgrad2, wgrad1 (all six GEMMs of the layer)
Suffix _te: TEGroupedMLP weights [E, out, in] (the per-GEMM rows use it); _grp: legacy
GroupedMLP weights [E, in, out].
"""
import argparse
import json
import os
import sys

CASES = ["fc1_te", "fc2_te", "dgrad1_te", "wgrad1_te", "fwd_te", "fwdbwd_te", "fwdbwd_grp"]


def case_flops(case, counts, h, n1, n2):
    t = sum(counts)
    per = {
        "fc1": 2 * t * h * n1,
        "fc2": 2 * t * n2 * h,
        "dgrad2": 2 * t * h * n2,
        "dgrad1": 2 * t * n1 * h,
        "wgrad2": 2 * t * h * n2,
        "wgrad1": 2 * t * n1 * h,
    }
    return sum(per[g] for g in case_gemms(case))


def case_gemms(case):
    base = case.rsplit("_", 1)[0]
    if base == "fwd":
        return ["fc1", "fc2"]
    if base == "fwdbwd":
        return ["fc1", "fc2", "dgrad2", "dgrad1", "wgrad2", "wgrad1"]
    return [base]


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--counts", default=os.path.join(here, "shapes.json"))
    ap.add_argument("--csv")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shapes", default="")
    args = ap.parse_args()

    import torch

    dev = torch.device("cuda")
    bf = torch.bfloat16
    with open(args.counts) as f:
        spec = json.load(f)
    rows = []
    name = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__} on {name}", flush=True)

    def timeit(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(args.iters):
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        ts.sort()
        return ts[len(ts) // 2]

    def emit(shape, dist, case, strat, ms, flops):
        tf = flops / (ms * 1e-3) / 1e12
        line = f"ROW,torch,{shape},{dist},{case},{strat},{ms:.4f},{tf:.1f}"
        print(line, flush=True)
        rows.append(line)

    a = torch.randn(8192, 8192, device=dev, dtype=bf)
    b = torch.randn(8192, 8192, device=dev, dtype=bf)
    ms = timeit(lambda: torch.mm(a, b))
    emit("dense", "-", "mm8192", "mm", ms, 2 * 8192**3)
    del a, b

    gm = torch._grouped_mm
    for sh in spec["shapes"]:
        if args.shapes and sh["name"] not in args.shapes.split(","):
            continue
        h, ffn, E = sh["hidden"], sh["ffn"], sh["experts"]
        n1, n2 = 2 * ffn, ffn
        T = sh["rows"]
        x = torch.randn(T, h, device=dev, dtype=bf)
        u = torch.randn(T, n2, device=dev, dtype=bf)
        g = torch.randn(T, h, device=dev, dtype=bf)
        da = torch.randn(T, n1, device=dev, dtype=bf)
        w1 = torch.randn(E, n1, h, device=dev, dtype=bf) * 0.02  # TE [E, out, in]
        w2 = torch.randn(E, h, n2, device=dev, dtype=bf) * 0.02
        w1g = w1.view(E, h, n1)  # GroupedMLP [E, in, out] (same memory, row-major)
        w2g = w2.view(E, n2, h)
        for dist, counts in sh["dists"].items():
            offs = torch.tensor(counts, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
            te = {
                "fc1": lambda: gm(x, w1.transpose(-2, -1), offs=offs),
                "fc2": lambda: gm(u, w2.transpose(-2, -1), offs=offs),
                "dgrad2": lambda: gm(g, w2, offs=offs),
                "dgrad1": lambda: gm(da, w1, offs=offs),
                "wgrad2": lambda: gm(g.t(), u, offs=offs),
                "wgrad1": lambda: gm(da.t(), x, offs=offs),
            }
            grp = {
                "fc1": lambda: gm(x, w1g, offs=offs),
                "fc2": lambda: gm(u, w2g, offs=offs),
                "dgrad2": lambda: gm(g, w2g.transpose(-2, -1), offs=offs),
                "dgrad1": lambda: gm(da, w1g.transpose(-2, -1), offs=offs),
                "wgrad2": lambda: gm(u.t(), g, offs=offs),
                "wgrad1": lambda: gm(x.t(), da, offs=offs),
            }
            for case in CASES:
                fns = te if case.endswith("_te") else grp
                gems = [fns[k] for k in case_gemms(case)]

                def run(gems=gems):
                    for f in gems:
                        f()

                flops = case_flops(case, counts, h, n1, n2)
                try:
                    ms = timeit(run)
                    emit(sh["name"], dist, case, "grouped_mm", ms, flops)
                except Exception as ex:  # a layout grouped_mm rejects: say so, keep going
                    print(f"ERR,torch,{sh['name']},{dist},{case},grouped_mm,{type(ex).__name__}: {ex}".replace("\n", " "), flush=True)
            # correctness spot check: wgrad of empty experts must be exactly 0
            zero = [i for i, c in enumerate(counts) if c == 0]
            if zero:
                out = gm(da.t(), x, offs=offs)
                mx = out[zero].abs().max().item()
                print(f"CHECK,torch,{sh['name']},{dist},wgrad1_empty_experts_max_abs,{mx}", flush=True)
        del x, u, g, da, w1, w2, w1g, w2g
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
