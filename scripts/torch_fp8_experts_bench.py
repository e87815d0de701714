#!/usr/bin/env python3
"""An fp8 TEGroupedMLP written in PyTorch on torch._scaled_grouped_mm (rowwise scales), forward
and forward+backward, timed like `moe-verify bench layer` (the peer of its `--fp8` rows).

    python3 scripts/torch_fp8_experts_bench.py [--counts scripts/shapes.json] [--csv OUT.csv]
        [--shapes a,b] [--modes fwd,fwdbwd] [--fast-accum fwd|all|none]
        [--samples 10] [--sample-ms 30] [--warmup 3]
        [--device cuda]   (--device cpu: a smoke test of the logic with a small counts file; the
                           GEMMs emulated, see "CPU smoke test" below)

Rows: shape x distribution (scripts/shapes.json, the Rust shape registry) x mode (fwd, fwdbwd),
class TEGroupedMLP, strategy "torch-fp8-rowwise"; CSV columns as the Rust bench's --csv
(scripts/bench_timing.py). A failed row has ERR in median_ms and tflops and an `ERR,...` line.

The layer. The weights are quantized once, before the timed calls (as the Rust fp8 layer
quantizes its immutable weights, both copies, on its first call, and TE reuses a weight's fp8
copies across micro-batches); everything else is inside the timed call.
    rows of each expert padded with zero rows to a multiple of 16 (Megatron's fp8 padding; the
    grouped fp8 GEMM's offsets must be 16-aligned), probs 0 on padding rows
    e4m3 codes with rowwise scales: scale = 448 / amax of the row (amax clamped to 1e-12), the
    GEMMs get the fp32 dequantization factor 1/scale
  forward (torch._scaled_grouped_mm, 2d x 3d: mat_a [T, K] row-major, mat_b [E, K, N]
  column-major, scale_a [T], scale_b [E, N], bf16 out):
    a = xq . W1qᵀ                 x rowwise over h; W1 [E, 2f, h] rowwise over h
    u = bf16(float(silu(a[:, :f]) * a[:, f:]) * p)     eager PyTorch ops (autograd below)
    y = uq . W2qᵀ                 u rowwise over f; W2 [E, h, f] rowwise over f
  backward (torch.autograd.Function: x, p, W1 and W2 get .grad from y.backward(g)):
    dgrad2  du = gq . W2          2d x 3d; g rowwise over h; W2's second copy [E, f, h] (W2ᵀ
                                  stored), rowwise over h = per column of W2
    act     da, dp = autograd of the eager activation/probs ops above, given du
    dgrad1  dx = daq . W1         2d x 3d; da rowwise over 2f; W1's second copy [E, h, 2f]
                                  (W1ᵀ stored), rowwise over 2f = per column of W1
    wgrad2  dW2 = gᵀ . u          2d x 2d (offs split the contraction, the tokens): mat_a =
                                  gᵀ [h, T] row-major, mat_b = u [T, f] column-major (uᵀ
                                  stored), one scale per (expert, row of gᵀ) and per (expert,
                                  column of u), i.e. over that expert's tokens only:
                                  scale_a [E*h], scale_b [E*f], expert-major; out [E, h, f]
    wgrad1  dW1 = daᵀ . x         the same with da [T, 2f] and x [T, h]: out [E, 2f, h]
  Every GEMM of the backward is an fp8 _scaled_grouped_mm with rowwise scales: nothing falls
  back to bf16. The per-expert column scales of the wgrad operands are computed with
  index_reduce_(amax) over the padded rows' expert ids and applied with a gather (one pass each,
  fp32 temporaries), then the codes are transposed (fp8 copies); a fused kernel would do better
  (torchao has Triton ones), eager PyTorch does not have one.
  Accumulation (`--fast-accum`): `fwd` (default) passes use_fast_accum=True to the forward GEMMs
  only, as TE (and our layer) use fast accumulation in fprop and split accumulation in dgrad and
  wgrad; `all` / `none` for every GEMM.
  Empty experts: their wgrad groups have no tokens; the gradients must be exact zeros. The
  self-check (below) verifies that the op writes them; if it does not, the script zeroes those
  experts' weight gradients explicitly inside the timed call and says so ("FALLBACK" line).

Self-check, before any timing (a small problem with 4 experts, one of them empty, and
per-expert and per-column magnitudes spread over 2^-3..2^6, so that a scale applied to the
wrong expert, row or column shows): y, dx, dp, dW1, dW2 against an fp64 per-expert reference of
the same layer (relative Frobenius error each at most MAX_REL_ERR: e4m3 has 3 mantissa bits, so
rowwise quantization gives a few % of relative error; a wiring mistake gives O(1)), and exact
zeros for the empty expert's weight gradients. A mode whose check fails gets ERR rows, no
timing.

FLOPs: 2*T*h*(N1+N2) per forward over the routed rows T (padding rows not counted), 3x for
forward+backward; min bytes: the bf16 layer's formula (bench_timing.min_bytes), as the Rust fp8
rows. Timing: scripts/bench_timing.py (CUDA events, `--warmup` calls, `--samples` samples of n
back-to-back calls of about `--sample-ms` each, median per-call time: the Rust bench's method).

CPU smoke test (`--device cpu`): torch._scaled_grouped_mm has no CPU kernel, so each call's
arguments go through the op itself on the "meta" device (its shape, dtype, layout and scale-shape
checks: the same checks as the CUDA op's), and the product is computed by dequantizing the codes
(exact) and an fp32 matmul per expert, after checking the offsets are 16-aligned. The
self-check then runs against that emulation.
"""
import argparse
import csv
import math
import os
import sys

from bench_timing import HEADER, Timer, layer_flops, min_bytes, selected_shapes

STRATEGY = "torch-fp8-rowwise"
CLASS = "TEGroupedMLP"
MODES = ["fwd", "fwdbwd"]
FP8_MAX = 448.0
ALIGN = 16
MAX_REL_ERR = 0.25


class Fp8Ops:
    """The quantizers and the grouped fp8 GEMM of the layer (module doc), on one device."""

    def __init__(self, torch, device, fast_accum="fwd"):
        self.torch = torch
        self.dev = device
        self.emulate = device.type != "cuda"
        self.fast_fwd = fast_accum in ("fwd", "all")
        self.fast_bwd = fast_accum == "all"
        self.f8 = torch.float8_e4m3fn
        self.bf = torch.bfloat16

    def quant_rows(self, t):
        """Rowwise e4m3 over the last dim: codes (same shape, contiguous) and the fp32
        dequantization factor per row (shape t.shape[:-1])."""
        torch = self.torch
        amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
        scale = FP8_MAX / amax
        q = (t.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(self.f8)
        return q.contiguous(), scale.reciprocal().squeeze(-1).contiguous()

    def quant_cols_grouped(self, t, seg, experts):
        """t [T, n] (rows grouped by expert: seg [T] = expert of each row, int64): e4m3 codes
        of tᵀ, [n, T] contiguous, with one scale per (expert, column of t) over that expert's
        rows, returned as the fp32 dequantization factors [experts * n], expert-major (the
        2d x 2d scale layout of torch._scaled_grouped_mm)."""
        torch = self.torch
        n = t.shape[1]
        amax = torch.zeros(experts, n, device=t.device, dtype=t.dtype)
        amax.index_reduce_(0, seg, t.abs(), "amax", include_self=True)
        scale = FP8_MAX / amax.float().clamp(min=1e-12)  # [E, n]
        q = (t.float() * scale.index_select(0, seg)).clamp(-FP8_MAX, FP8_MAX).to(self.f8)
        return q.t().contiguous(), scale.reciprocal().reshape(-1).contiguous()

    def gmm(self, a, b, sa, sb, offs, fast):
        """torch._scaled_grouped_mm(a, b, sa, sb, offs, bf16 out); emulated on the CPU."""
        torch = self.torch
        if not self.emulate:
            return torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=self.bf, use_fast_accum=fast)
        return self._emulated(a, b, sa, sb, offs, fast)

    def _emulated(self, a, b, sa, sb, offs, fast):
        torch = self.torch

        def meta(t):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

        # The op's own argument checks (shapes, fp8 dtypes, row/column-major, scale shapes).
        out_meta = torch._scaled_grouped_mm(meta(a), meta(b), meta(sa), meta(sb), offs=meta(offs),
                                            out_dtype=self.bf, use_fast_accum=fast)
        ends = offs.tolist()
        if any(e % ALIGN for e in ends) or any(e1 < e0 for e0, e1 in zip([0] + ends, ends)):
            raise ValueError(f"offsets {ends} must be non-decreasing multiples of {ALIGN}")
        af = a.float()
        bf = b.float()
        starts = [0] + ends[:-1]
        if a.dim() == 2 and b.dim() == 3:  # ragged rows: out [M, N]
            out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float32)
            for g, (s, e) in enumerate(zip(starts, ends)):
                out[s:e] = (af[s:e] * sa[s:e, None]) @ (bf[g] * sb[g][None, :])
        elif a.dim() == 2 and b.dim() == 2:  # ragged contraction: out [G, M, N]
            m, n = a.shape[0], b.shape[1]
            out = torch.zeros(len(ends), m, n, dtype=torch.float32)
            for g, (s, e) in enumerate(zip(starts, ends)):
                out[g] = (af[:, s:e] * sa[g * m:(g + 1) * m, None]) @ (bf[s:e] * sb[g * n:(g + 1) * n][None, :])
        else:
            raise ValueError(f"emulation covers 2d x 3d and 2d x 2d, got {a.dim()}d x {b.dim()}d")
        if tuple(out.shape) != tuple(out_meta.shape):
            raise AssertionError(f"emulated shape {tuple(out.shape)} != the op's {tuple(out_meta.shape)}")
        return out.to(self.bf)

    def quant_weights(self, w1, w2):
        """Both fp8 copies of TE-layout weights W1 [E, 2f, h], W2 [E, h, f]: (codes, scales) of
        W1 and W2 rowwise (forward) and of W1ᵀ [E, h, 2f] and W2ᵀ [E, f, h] rowwise (dgrad)."""
        return {
            "w1": self.quant_rows(w1),
            "w2": self.quant_rows(w2),
            "w1t": self.quant_rows(w1.transpose(-2, -1).contiguous()),
            "w2t": self.quant_rows(w2.transpose(-2, -1).contiguous()),
        }


def act_probs(a, p):
    """The eager activation/probs part of the bf16 PyTorch layer (torch_experts_bench.py)."""
    import torch.nn.functional as F

    gate, lin = a.chunk(2, dim=-1)
    z = F.silu(gate) * lin
    return (z.float() * p.unsqueeze(-1)).to(a.dtype)


class Problem:
    """What the timed calls share for one (shape, distribution): the padded row layout (offs,
    each padded row's expert id, the empty experts) and the quantized weights."""

    def __init__(self, ops, wq, padded, experts):
        torch = ops.torch
        self.ops, self.wq, self.experts = ops, wq, experts
        counts = torch.tensor(padded, device=ops.dev, dtype=torch.int64)
        self.offs = counts.cumsum(0).to(torch.int32)
        self.seg = torch.repeat_interleave(torch.arange(experts, device=ops.dev), counts)
        empty = [e for e, c in enumerate(padded) if c == 0]
        self.empty = torch.tensor(empty, device=ops.dev, dtype=torch.int64) if empty else None
        self.zero_empty = False  # set when the op leaves empty groups' wgrad unwritten


def forward(prob, x, p, keep=False):
    """The fp8 forward (module doc); with `keep`, also what the backward needs."""
    ops, wq, offs = prob.ops, prob.wq, prob.offs
    torch = ops.torch
    (w1q, s1), (w2q, s2) = wq["w1"], wq["w2"]
    xq, sx = ops.quant_rows(x)
    a = ops.gmm(xq, w1q.transpose(-2, -1), sx, s1, offs, ops.fast_fwd)
    if keep:
        with torch.enable_grad():
            a_leaf = a.detach().requires_grad_(True)
            p_leaf = p.detach().requires_grad_(True)
            u = act_probs(a_leaf, p_leaf)
        saved = (a_leaf, p_leaf, u)
    else:
        u = act_probs(a, p)
        saved = None
    uq, su = ops.quant_rows(u.detach())
    y = ops.gmm(uq, w2q.transpose(-2, -1), su, s2, offs, ops.fast_fwd)
    return y, saved


def backward(prob, x, saved, g):
    """The fp8 backward (module doc): (dx, dp, dW1, dW2)."""
    ops, wq, offs, seg, E = prob.ops, prob.wq, prob.offs, prob.seg, prob.experts
    torch = ops.torch
    a_leaf, p_leaf, u = saved
    fast = ops.fast_bwd
    (w1tq, s1t), (w2tq, s2t) = wq["w1t"], wq["w2t"]
    gq, sg = ops.quant_rows(g)
    du = ops.gmm(gq, w2tq.transpose(-2, -1), sg, s2t, offs, fast)  # [T, f]
    gtq, sgt = ops.quant_cols_grouped(g, seg, E)  # [h, T]
    utq, sut = ops.quant_cols_grouped(u.detach(), seg, E)  # [f, T]
    dw2 = ops.gmm(gtq, utq.t(), sgt, sut, offs, fast)  # [E, h, f]
    da, dp = torch.autograd.grad(u, (a_leaf, p_leaf), du)
    daq, sda = ops.quant_rows(da)
    dx = ops.gmm(daq, w1tq.transpose(-2, -1), sda, s1t, offs, fast)  # [T, h]
    datq, sdat = ops.quant_cols_grouped(da, seg, E)  # [2f, T]
    xtq, sxt = ops.quant_cols_grouped(x, seg, E)  # [h, T]
    dw1 = ops.gmm(datq, xtq.t(), sdat, sxt, offs, fast)  # [E, 2f, h]
    if prob.zero_empty and prob.empty is not None:
        dw1.index_fill_(0, prob.empty, 0)
        dw2.index_fill_(0, prob.empty, 0)
    return dx, dp, dw1, dw2


def make_function(torch):
    class Fp8GroupedExperts(torch.autograd.Function):
        """y = the fp8 layer of (x, p, W1, W2); the backward gives dx, dp, dW1, dW2."""

        @staticmethod
        def forward(ctx, x, p, w1, w2, prob):
            y, saved = forward(prob, x, p, keep=True)
            ctx.prob, ctx.saved = prob, saved
            ctx.save_for_backward(x)
            return y

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            dx, dp, dw1, dw2 = backward(ctx.prob, x, ctx.saved, g.contiguous())
            ctx.saved = None
            return dx, dp, dw1, dw2, None

    return Fp8GroupedExperts


def self_check(torch, ops, fn):
    """The self-check of the module doc. Returns (ok_fwd, ok_bwd, zero_empty, lines)."""
    dev = ops.dev
    E, h, f = 4, 64, 32
    counts = [0, 20, 45, 16]
    padded = [(c + ALIGN - 1) // ALIGN * ALIGN for c in counts]
    rows = sum(padded)
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1

    expert_mag = [2.0 ** k for k in (0, 6, -3, 3)]
    x = torch.zeros(rows, h, dtype=torch.float64)
    g = torch.zeros(rows, h, dtype=torch.float64)
    p = torch.zeros(rows, dtype=torch.float64)
    col_x = 2.0 ** (torch.arange(h) % 5 - 2).double()
    col_g = 2.0 ** (torch.arange(h) % 3 - 1).double()
    start = 0
    for e, (c, pc) in enumerate(zip(counts, padded)):
        x[start:start + c] = rnd(c, h) * col_x * expert_mag[e]
        g[start:start + c] = rnd(c, h) * col_g / expert_mag[e]
        p[start:start + c] = torch.rand(c, generator=gen, dtype=torch.float64) * 0.95 + 0.05
        start += pc
    w1 = rnd(E, 2 * f, h) / math.sqrt(h) * torch.tensor(expert_mag, dtype=torch.float64)[:, None, None]
    w2 = rnd(E, h, f) / math.sqrt(f) * (2.0 ** (torch.arange(f) % 4)).double()
    # The inputs the fp8 layer sees are bf16: the reference takes the same rounded values.
    xb, gb, w1b, w2b = (t.to(torch.bfloat16) for t in (x, g, w1, w2))
    pf = p.float()
    x64, g64, w164, w264, p64 = (t.double() for t in (xb, gb, w1b, w2b, pf))

    # fp64 reference, per expert, with autograd.
    rx, rp, rw1, rw2 = (t.clone().requires_grad_(True) for t in (x64, p64, w164, w264))
    ys = []
    start = 0
    for e, pc in enumerate(padded):
        xs = rx[start:start + pc]
        a = xs @ rw1[e].t()
        z = torch.nn.functional.silu(a[:, :f]) * a[:, f:]
        ys.append((z * rp[start:start + pc, None]) @ rw2[e].t())
        start += pc
    ry = torch.cat(ys)
    ry.backward(g64)
    ref = {"y": ry.detach(), "dx": rx.grad, "dp": rp.grad, "dW1": rw1.grad, "dW2": rw2.grad}

    prob = Problem(ops, ops.quant_weights(w1b.to(dev), w2b.to(dev)), padded, E)
    xd, pd, gd = xb.to(dev), pf.to(dev), gb.to(dev)
    w1d, w2d = w1b.to(dev).requires_grad_(True), w2b.to(dev).requires_grad_(True)
    lines = []

    def rel(name, got):
        r = ref[name]
        err = (got.detach().double().cpu() - r).norm() / r.norm().clamp(min=1e-300)
        return float(err)

    with torch.no_grad():
        y, _ = forward(prob, xd, pd)
    errs = {"y": rel("y", y)}
    ok_fwd = errs["y"] <= MAX_REL_ERR

    def run_bwd():
        xl, pl = xd.clone().requires_grad_(True), pd.clone().requires_grad_(True)
        w1d.grad = w2d.grad = None
        fn.apply(xl, pl, w1d, w2d, prob).backward(gd)
        return xl.grad, pl.grad, w1d.grad, w2d.grad

    dx, dp, dw1, dw2 = run_bwd()
    empty_nonzero = bool(dw1[0].count_nonzero() + dw2[0].count_nonzero())
    zero_empty = False
    if empty_nonzero:
        lines.append("FALLBACK: torch._scaled_grouped_mm (2d x 2d) leaves the weight gradients of an empty "
                     "expert (a group with no tokens) unwritten: the timed backward zeroes them explicitly")
        zero_empty = True
        prob.zero_empty = True
        dx, dp, dw1, dw2 = run_bwd()
    for name, got in (("dx", dx), ("dp", dp), ("dW1", dw1), ("dW2", dw2)):
        errs[name] = rel(name, got)
    exact_zero = not bool(dw1[0].count_nonzero() + dw2[0].count_nonzero())
    ok_bwd = ok_fwd and exact_zero and all(errs[k] <= MAX_REL_ERR for k in ("dx", "dp", "dW1", "dW2"))
    lines.append("SELF-CHECK fp8 layer against fp64 (relative Frobenius error, limit "
                 f"{MAX_REL_ERR}): " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items())
                 + f"; empty expert's weight grads exactly zero: {exact_zero}; "
                 + f"fwd {'ok' if ok_fwd else 'FAILED'}, fwdbwd {'ok' if ok_bwd else 'FAILED'}")
    return ok_fwd, ok_bwd, zero_empty, lines


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default=os.path.join(here, "shapes.json"))
    ap.add_argument("--csv")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--fast-accum", default="fwd", choices=["fwd", "all", "none"])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--sample-ms", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of the logic (emulated GEMMs)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            sys.exit(f"--modes: unknown mode {m!r} (expected {', '.join(MODES)})")
    shapes = selected_shapes(args.counts, args.shapes)

    import torch

    if not hasattr(torch, "_scaled_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    bf = torch.bfloat16
    device = torch.cuda.get_device_name(dev) if cuda else f"{args.device} (smoke test, emulated fp8 GEMMs)"
    print(f"torch {torch.__version__} on {device}; counts {args.counts}; modes {modes}; "
          f"fast accumulation: {args.fast_accum}", flush=True)
    try:
        timer = Timer(torch, cuda, args.warmup, args.samples, args.sample_ms)
    except ValueError as ex:
        sys.exit(str(ex))
    ops = Fp8Ops(torch, dev, args.fast_accum)
    fn = make_function(torch)
    try:
        ok_fwd, ok_bwd, zero_empty, lines = self_check(torch, ops, fn)
        ok = {"fwd": ok_fwd, "fwdbwd": ok_bwd}
    except Exception as ex:  # the op refused an argument: every row ERR, with the reason
        msg = f"{type(ex).__name__}: {ex}".replace("\n", " ")[:2000]
        print(f"ERR,{STRATEGY},self-check,-,{CLASS},-,{msg}", flush=True)
        ok, zero_empty, lines = {m: False for m in MODES}, False, []
    for line in lines:
        print(line, flush=True)

    writer, out = None, None
    if args.csv:
        out = open(args.csv, "w", newline="")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        out.flush()

    for sh in shapes:
        h, f, E, T = sh["hidden"], sh["ffn"], sh["experts"], sh["rows"]
        n1, n2 = 2 * f, f
        gen = torch.Generator(device=dev).manual_seed(7)

        def uniform(shape, scale):
            return (torch.rand(*shape, device=dev, dtype=bf, generator=gen) * 2 - 1) * scale

        w1 = uniform((E, n1, h), 1 / math.sqrt(h))
        w2 = uniform((E, h, n2), 1 / math.sqrt(f))
        wq = ops.quant_weights(w1, w2)
        for dist, counts in sh["dists"].items():
            if len(counts) != E or sum(counts) != T:
                sys.exit(f"{sh['name']}/{dist}: {len(counts)} counts summing to {sum(counts)}, expected {E} / {T}")
            padded = [(c + ALIGN - 1) // ALIGN * ALIGN for c in counts]
            rows = sum(padded)
            x = torch.zeros(rows, h, device=dev, dtype=bf)
            g = torch.zeros(rows, h, device=dev, dtype=bf)
            p = torch.zeros(rows, device=dev, dtype=torch.float32)
            start = 0
            for c, pc in zip(counts, padded):
                x[start:start + c] = uniform((c, h), 1.0)
                g[start:start + c] = uniform((c, h), 1.0)
                p[start:start + c] = torch.rand(c, device=dev, generator=gen) * 0.95 + 0.05
                start += pc
            prob = Problem(ops, wq, padded, E)
            prob.zero_empty = zero_empty
            for mode in modes:
                backward_mode = mode == "fwdbwd"
                fl = layer_flops(T, h, n1, n2, backward_mode)
                mb = min_bytes(counts, h, n1, n2, backward_mode)
                ms = None
                if not ok[mode]:
                    print(f"ERR,{STRATEGY},{sh['name']},{dist},{CLASS},{mode},the self-check failed (above)", flush=True)
                else:
                    try:
                        if backward_mode:
                            leaves = (x, p, w1, w2)
                            for t in leaves:
                                t.requires_grad_(True)

                            def fb():
                                for t in leaves:
                                    t.grad = None
                                fn.apply(x, p, w1, w2, prob).backward(g)

                            ms = timer.time(fb)
                        else:
                            with torch.no_grad():
                                ms = timer.time(lambda: forward(prob, x, p))
                    except Exception as ex:  # report, keep going
                        msg = f"{type(ex).__name__}: {ex}".replace("\n", " ")[:2000]
                        print(f"ERR,{STRATEGY},{sh['name']},{dist},{CLASS},{mode},{msg}", flush=True)
                        ms = None
                    finally:
                        for t in (x, p, w1, w2):
                            t.requires_grad_(False)
                            t.grad = None
                if ms is None:
                    ms_s, tf_s = "ERR", "ERR"
                else:
                    tf = fl / (ms * 1e-3) / 1e12
                    ms_s, tf_s = f"{ms:.4f}", f"{tf:.1f}"
                    print(f"TORCH-FP8 TFLOP/s {sh['name']:<13} {dist:<10} {CLASS} {mode:<6} T={T:<6} median "
                          f"{ms:9.3f} ms {tf:7.1f} TFLOP/s ({device})", flush=True)
                if writer:
                    writer.writerow([sh["name"], dist, CLASS, mode, STRATEGY, T, E, f"{fl:.0f}", f"{mb:.0f}",
                                     ms_s, tf_s, device])
                    out.flush()
            del x, g, p, prob
        del w1, w2, wq
        if cuda:
            torch.cuda.empty_cache()
    if out:
        out.close()
        print(f"CSV: {args.csv}", flush=True)


if __name__ == "__main__":
    main()
