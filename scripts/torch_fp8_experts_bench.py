#!/usr/bin/env python3
"""An fp8 TEGroupedMLP forward written in PyTorch on torch._scaled_grouped_mm, timed like
`moe-verify bench layer` (the peer of its `--fp8` rows).

    python3 scripts/torch_fp8_experts_bench.py [--counts scripts/shapes.json] [--csv OUT.csv]
        [--shapes a,b] [--samples 10] [--sample-ms 30] [--warmup 3]

Rows: shape x distribution (scripts/shapes.json, the Rust shape registry) x mode fwd, class
TEGroupedMLP, strategy "torch-fp8-rowwise"; CSV columns as the Rust bench's --csv. Forward only:
torch._scaled_grouped_mm has no autograd, so a forward+backward peer would be hand-written
dgrad/wgrad GEMMs, not PyTorch's layer.

The layer (the weights are quantized once, before the timed calls, as the Rust fp8 layer
quantizes its immutable weights on its first call and TE reuses a weight's fp8 copy across
micro-batches; everything else inside the timed call):
    rows of each expert padded with zero rows to a multiple of 16 (Megatron's fp8 padding; the
    grouped fp8 GEMM's offsets must be 16-aligned), probs 0 on padding rows
    x, W1 [E, 2f, h], u, W2 [E, h, f] quantized to float8_e4m3fn with rowwise scales
        (scale = 448 / amax of the row, clamped; dequant factor 1/scale, fp32)
    a = _scaled_grouped_mm(xq, W1qᵀ, sx, sW1, offs)      bf16 out
    z = silu(a[:, :f]) * a[:, f:];  u = bf16(float(z) * p)
    y = _scaled_grouped_mm(uq, W2qᵀ, su, sW2, offs)      bf16 out
FLOPs: 2*T*h*(N1+N2) over the routed rows T (padding rows not counted), as the Rust rows.
Timing: CUDA events, `--warmup` calls, `--samples` samples of n back-to-back calls (about
`--sample-ms` each), median per-call time (the Rust bench's method).
"""
import argparse
import csv
import json
import math
import os
import sys

HEADER = ["shape", "dist", "class", "mode", "strategy", "tokens", "experts", "flops", "min_bytes",
          "median_ms", "tflops", "device"]
STRATEGY = "torch-fp8-rowwise"
FP8_MAX = 448.0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default=os.path.join(here, "shapes.json"))
    ap.add_argument("--csv")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--sample-ms", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    with open(args.counts) as f:
        spec = json.load(f)
    shapes = [s for s in args.shapes.split(",") if s]

    import torch
    import torch.nn.functional as F

    if not hasattr(torch, "_scaled_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    dev = torch.device("cuda")
    bf, f8 = torch.bfloat16, torch.float8_e4m3fn
    device = torch.cuda.get_device_name(dev)
    print(f"torch {torch.__version__} on {device}; counts {args.counts}", flush=True)
    writer, out = None, None
    if args.csv:
        out = open(args.csv, "w", newline="")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)

    def quant_rows(t):
        """Rowwise e4m3 over the last dim: codes and the fp32 dequantization factor per row."""
        amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
        scale = FP8_MAX / amax
        q = (t.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(f8)
        return q, scale.reciprocal().squeeze(-1)

    def layer(x, wq, p, offs, f):
        (w1q, s1), (w2q, s2) = wq  # [E, 2f, h], [E, 2f]; [E, h, f], [E, h]
        xq, sx = quant_rows(x)
        a = torch._scaled_grouped_mm(xq, w1q.transpose(-2, -1), sx, s1, offs=offs, out_dtype=bf)
        z = F.silu(a[:, :f]) * a[:, f:]
        u = (z.float() * p.unsqueeze(-1)).to(bf)
        uq, su = quant_rows(u)
        return torch._scaled_grouped_mm(uq, w2q.transpose(-2, -1), su, s2, offs=offs, out_dtype=bf)

    def timeit(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        n = max(1, math.ceil(args.sample_ms / max(s.elapsed_time(e), 1e-3)))
        ts = []
        for _ in range(args.samples):
            s.record()
            for _ in range(n):
                fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / n)
        return sorted(ts)[len(ts) // 2]

    for sh in spec["shapes"]:
        if shapes and sh["name"] not in shapes:
            continue
        h, f, E, T = sh["hidden"], sh["ffn"], sh["experts"], sh["rows"]
        n1, n2 = 2 * f, f
        gen = torch.Generator(device=dev).manual_seed(7)

        def uniform(shape, scale):
            return (torch.rand(*shape, device=dev, dtype=bf, generator=gen) * 2 - 1) * scale

        w1 = uniform((E, n1, h), 1 / math.sqrt(h))
        w2 = uniform((E, h, n2), 1 / math.sqrt(f))
        wq = (quant_rows(w1), quant_rows(w2))
        for dist, counts in sh["dists"].items():
            padded = [(c + 15) // 16 * 16 for c in counts]
            rows = sum(padded)
            x = torch.zeros(rows, h, device=dev, dtype=bf)
            p = torch.zeros(rows, device=dev, dtype=torch.float32)
            start = 0
            for c, pc in zip(counts, padded):
                x[start:start + c] = uniform((c, h), 1.0)
                p[start:start + c] = torch.rand(c, device=dev, generator=gen) * 0.95 + 0.05
                start += pc
            offs = torch.tensor(padded, device=dev, dtype=torch.int64).cumsum(0).to(torch.int32)
            fl = 2 * T * h * (n1 + n2)
            mb = 2 * T * h * 2 + 4 * T + 2 * sum(1 for c in counts if c) * (n1 * h + h * n2)
            try:
                with torch.no_grad():
                    ms = timeit(lambda: layer(x, wq, p, offs, f))
                tf = fl / (ms * 1e-3) / 1e12
                ms_s, tf_s = f"{ms:.4f}", f"{tf:.1f}"
                print(f"TORCH-FP8 TFLOP/s {sh['name']:<13} {dist:<8} TEGroupedMLP fwd T={T:<6} median {ms:9.3f} ms "
                      f"{tf:7.1f} TFLOP/s ({device})", flush=True)
            except Exception as ex:  # report, keep going
                msg = f"{type(ex).__name__}: {ex}".replace("\n", " ")
                print(f"ERR,{STRATEGY},{sh['name']},{dist},TEGroupedMLP,fwd,{msg}", flush=True)
                ms_s, tf_s = "ERR", "ERR"
            if writer:
                writer.writerow([sh["name"], dist, "TEGroupedMLP", "fwd", STRATEGY, T, E, fl, mb, ms_s, tf_s, device])
                out.flush()
            del x, p
        del w1, w2, wq
        torch.cuda.empty_cache()
    if out:
        out.close()


if __name__ == "__main__":
    main()
