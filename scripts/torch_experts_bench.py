#!/usr/bin/env python3
"""The expert layer written in PyTorch, timed like `moe-verify bench layer` (per-layer rows):
eager, and under torch.compile.

    python3 scripts/torch_experts_bench.py [--counts PATH] [--csv OUT.csv] [--shapes a,b]
        [--classes GroupedMLP,TEGroupedMLP] [--strategies torch,torch-compile,torch-compile-act]
        [--compile-backend inductor] [--samples 10] [--sample-ms 30] [--warmup 3]
        [--device cuda]   (--device cpu: a smoke test of the logic with a small counts file;
                           host-timed, a 256^3 dense row; torch._grouped_mm runs on CPU too)

Rows: shape x distribution (scripts/shapes.json, the Rust shape registry the Rust bench uses)
x class x mode (fwd, fwdbwd) x strategy, plus a dense torch.mm 8192^3 bf16 row. CSV columns, as
the Rust bench's --csv: shape,dist,class,mode,strategy,tokens,experts,flops,min_bytes,
median_ms,tflops,device; a failed row has ERR in median_ms and tflops (and an `ERR,...` line).

Strategies (`--strategies`, default torch), all timed in this one process the same way:
    torch              eager PyTorch (below)
    torch-compile      the whole layer function under torch.compile (fullgraph, static
                       shapes): forward and, in fwdbwd, the AOTAutograd backward compiled too;
                       Inductor's default mode (no max-autotune) keeps the _grouped_mm calls on
                       the ATen kernel and fuses the activation/probs part (forward and
                       backward) into generated kernels
    torch-compile-act  eager _grouped_mm calls, only the activation/probs part (silu-GLU and
                       the product with p, forward and backward) under torch.compile
torch.compile recompiles per (shape, class) (torch._dynamo.reset() before each, so the
recompile limit is never reached) and per mode (no_grad vs autograd); the `--warmup` calls
before the timed ones absorb the compilation. `--compile-backend` passes a backend to
torch.compile (default inductor; `aot_eager` or `eager` only to exercise the logic where
Inductor cannot compile). Numerics: Inductor computes the fused silu-GLU and probs product in
fp32 with one rounding to bf16 at the end, where eager rounds silu, the product and u
separately; the GEMMs are the same calls.

The layer, as moe_gpu's DeviceLayer::forward/backward compute it (GLU silu, no bias, bf16 weights
and activations, fp32 probs):
    a = x . W1_e          torch._grouped_mm, offs = int32 cumulative token counts
    z = silu(a[:, :f]) * a[:, f:]          (gate = first half, eager bf16 ops)
    u = bf16(float(z) * p)                 (p fp32, as Megatron's weighted swiglu)
    y = u . W2_e          torch._grouped_mm
GroupedMLP weights are [E, in, out] (W1 [E, h, 2f], W2 [E, f, h]) and go to _grouped_mm as
they are; TEGroupedMLP weights are [E, out, in] (W1 [E, 2f, h], W2 [E, h, f]) and go as
transposed views. fwd runs under torch.no_grad(); fwdbwd is the forward with autograd plus
y.backward(g): grads of x, p, W1, W2 (.grad reset to None before each call, so weight grads
are written, not accumulated), as the Rust backward with immediate weight grads.

Random data: x, g ~ U(-1, 1), W1 ~ U(-1, 1)/sqrt(h), W2 ~ U(-1, 1)/sqrt(f) (bf16), p ~ U(0.05,
1) fp32. Timing: scripts/bench_timing.py (CUDA events; `--warmup` calls, then `--samples`
samples of n back-to-back calls each, n chosen so that a sample lasts about `--sample-ms`,
median per-call time: the Rust bench's criterion flat sampling). FLOPs and min bytes: the
formulas of bench/src/layer (bench_timing.layer_flops, bench_timing.min_bytes).
"""
import argparse
import csv
import math
import os
import sys

from bench_timing import HEADER, Timer, layer_flops, min_bytes, selected_shapes

CLASSES = ["GroupedMLP", "TEGroupedMLP"]
MODES = ["fwd", "fwdbwd"]
STRATEGIES = ["torch", "torch-compile", "torch-compile-act"]
DENSE_N = 8192


def act_probs(a, p):
    """silu-GLU of the fc1 output `a` ([T, 2f], gate = first half) times the fp32 probs `p`,
    rounded to a's dtype (bf16): the layer's activation/probs part."""
    import torch.nn.functional as F

    gate, lin = a.chunk(2, dim=-1)
    z = F.silu(gate) * lin
    return (z.float() * p.unsqueeze(-1)).to(a.dtype)


def layer(x, w1, w2, p, offs, te, act=act_probs):
    """The expert layer: `act` (default act_probs) between two torch._grouped_mm calls (see the
    module doc). `te`: weights are [E, out, in] (TEGroupedMLP), else [E, in, out] (GroupedMLP)."""
    import torch

    b1 = w1.transpose(-2, -1) if te else w1
    b2 = w2.transpose(-2, -1) if te else w2
    a = torch._grouped_mm(x, b1, offs=offs)
    u = act(a, p)
    return torch._grouped_mm(u, b2, offs=offs)


def layer_fns(torch, strategies, te, backend):
    """strategy -> fn(x, w1, w2, p, offs) for one (shape, class); compiled ones are fresh
    torch.compile objects (the caller resets dynamo first)."""
    fns = {}
    for s in strategies:
        if s == "torch":
            fns[s] = lambda x, w1, w2, p, offs: layer(x, w1, w2, p, offs, te)
        elif s == "torch-compile":
            whole = torch.compile(lambda x, w1, w2, p, offs: layer(x, w1, w2, p, offs, te),
                                  backend=backend, fullgraph=True, dynamic=False)
            fns[s] = whole
        elif s == "torch-compile-act":
            act = torch.compile(act_probs, backend=backend, fullgraph=True, dynamic=False)
            fns[s] = lambda x, w1, w2, p, offs, act=act: layer(x, w1, w2, p, offs, te, act)
        else:
            raise ValueError(f"unknown strategy {s!r}")
    return fns


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default=os.path.join(here, "shapes.json"))
    ap.add_argument("--csv")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--strategies", default="torch", help=f"comma list of {', '.join(STRATEGIES)}")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile strategies")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--sample-ms", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of the logic (host-timed)")
    args = ap.parse_args()
    classes = [c for c in args.classes.split(",") if c]
    for c in classes:
        if c not in CLASSES:
            sys.exit(f"--classes: unknown class {c!r} (expected {', '.join(CLASSES)})")
    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            sys.exit(f"--strategies: unknown strategy {s!r} (expected {', '.join(STRATEGIES)})")
    if not strategies:
        sys.exit("--strategies: empty")
    shapes = selected_shapes(args.counts, args.shapes)

    import torch

    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._grouped_mm")
    compiled = [s for s in strategies if s != "torch"]
    if compiled and not hasattr(torch, "compile"):
        sys.exit(f"torch {torch.__version__} has no torch.compile (strategies {compiled})")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    bf = torch.bfloat16
    device = torch.cuda.get_device_name(dev) if cuda else f"{args.device} (smoke test)"
    print(f"torch {torch.__version__} on {device}; counts {args.counts}; strategies {strategies}"
          + (f"; torch.compile backend {args.compile_backend}" if compiled else ""), flush=True)
    try:
        timer = Timer(torch, cuda, args.warmup, args.samples, args.sample_ms)
    except ValueError as ex:
        sys.exit(str(ex))

    out = None
    writer = None
    if args.csv:
        out = open(args.csv, "w", newline="")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        out.flush()
    dense_tf = [None]

    def emit(shape, dist, cls, mode, strategy, tokens, experts, flops, mbytes, ms):
        if ms is None:
            ms_s, tf_s = "ERR", "ERR"
        else:
            tf = flops / (ms * 1e-3) / 1e12
            ms_s, tf_s = f"{ms:.4f}", f"{tf:.1f}"
            pct = f"{100 * tf / dense_tf[0]:5.1f}% dense" if dense_tf[0] else ""
            print(f"TORCH TFLOP/s {shape:<9} {dist:<11} {cls:<13} {mode:<7} {strategy:<17} T={tokens:<6} "
                  f"median {ms:9.3f} ms  {tf:7.1f} TFLOP/s {pct}  {mbytes / 1e9:7.1f} GB min  ({device})", flush=True)
        if writer:
            writer.writerow([shape, dist, cls, mode, strategy, tokens, experts, f"{flops:.0f}", f"{mbytes:.0f}",
                             ms_s, tf_s, device])
            out.flush()

    # Dense reference: torch.mm 8192^3 bf16 on random data (256^3 in a cpu smoke test).
    n = DENSE_N if cuda else 256
    gen = torch.Generator(device=dev).manual_seed(1)
    a = torch.rand(n, n, device=dev, dtype=bf, generator=gen) - 0.5
    b = torch.rand(n, n, device=dev, dtype=bf, generator=gen) - 0.5
    ms = timer.time(lambda: torch.mm(a, b))
    dense_flops = 2 * n ** 3
    dense_tf[0] = dense_flops / (ms * 1e-3) / 1e12
    emit("dense", "-", "-", f"gemm{n}", "torch", n, 0, dense_flops, 3 * 2 * n * n, ms)
    del a, b
    if cuda:
        torch.cuda.empty_cache()

    def uniform(shape, scale, gen):
        t = torch.rand(*shape, device=dev, dtype=bf, generator=gen)
        return t.mul_(2).sub_(1).mul_(scale)

    for sh in shapes:
        h, f, E, T = sh["hidden"], sh["ffn"], sh["experts"], sh["rows"]
        n1, n2 = 2 * f, f
        for cls in classes:
            te = cls == "TEGroupedMLP"
            gen = torch.Generator(device=dev).manual_seed(7)
            if te:  # [E, out, in]
                w1 = uniform((E, n1, h), 1 / math.sqrt(h), gen)
                w2 = uniform((E, h, n2), 1 / math.sqrt(f), gen)
            else:  # [E, in, out]
                w1 = uniform((E, h, n1), 1 / math.sqrt(h), gen)
                w2 = uniform((E, n2, h), 1 / math.sqrt(f), gen)
            x = uniform((T, h), 1.0, gen)
            g = uniform((T, h), 1.0, gen)
            p = torch.rand(T, device=dev, dtype=torch.float32, generator=gen) * 0.95 + 0.05
            params = (x, w1, w2, p)
            if compiled:
                torch._dynamo.reset()  # fresh caches per (shape, class): no recompile limit reached
            fns = layer_fns(torch, strategies, te, args.compile_backend)

            for dist, counts in sh["dists"].items():
                if len(counts) != E or sum(counts) != T:
                    sys.exit(f"{sh['name']}/{dist}: {len(counts)} counts summing to {sum(counts)}, expected {E} / {T}")
                offs = torch.tensor(counts, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
                for mode in MODES:
                    backward = mode == "fwdbwd"
                    fl = layer_flops(T, h, n1, n2, backward)
                    mb = min_bytes(counts, h, n1, n2, backward)
                    for strategy in strategies:
                        fn = fns[strategy]
                        try:
                            if backward:
                                for t in params:
                                    t.requires_grad_(True)

                                def fb():
                                    for t in params:
                                        t.grad = None
                                    fn(x, w1, w2, p, offs).backward(g)

                                ms = timer.time(fb)
                            else:
                                with torch.no_grad():
                                    ms = timer.time(lambda: fn(x, w1, w2, p, offs))
                        except Exception as ex:  # report, keep going
                            msg = f"{type(ex).__name__}: {ex}".replace("\n", " ")[:2000]
                            print(f"ERR,{strategy},{sh['name']},{dist},{cls},{mode},{msg}", flush=True)
                            ms = None
                        finally:
                            for t in params:
                                t.requires_grad_(False)
                                t.grad = None
                        emit(sh["name"], dist, cls, mode, strategy, T, E, fl, mb, ms)
            del w1, w2, x, g, p, params, fns
            if cuda:
                torch.cuda.empty_cache()
    if out:
        out.close()
        print(f"CSV: {args.csv}", flush=True)


if __name__ == "__main__":
    main()
