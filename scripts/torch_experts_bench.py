#!/usr/bin/env python3
"""The expert layer in PyTorch, for a ratio table against the Rust CUDA benches (benches/gpu.rs).

Same shapes (moe_gpu::sampled::SHAPES), same skewed token split (a port of
moe_gpu::sampled::skewed_counts, seed 42), same math as TEGroupedMLP's non-fused path without
bias: a = x·W1ᵀ (torch._grouped_mm), z = silu(gate)·lin (eager), u = bf16(z·p) (fp32 probs),
y = u·W2ᵀ (torch._grouped_mm); backward through autograd. bf16 weights and activations.
Timed with CUDA events: median of 10 after 3 warm-ups. FLOPs: forward 2·T·h·(N1+N2), forward+
backward three times that (elementwise work not counted), as in the Rust benches.
"""
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("mixtral", 4096, 14336, 8, 16384),
    ("deepseek-v3", 7168, 2048, 32, 32768),
    ("qwen3-30b-a3b", 2048, 768, 128, 65536),
    ("gpt-oss-120b", 2880, 2880, 128, 32768),
]
M64 = (1 << 64) - 1


def skewed_counts(tokens, experts, seed):
    unit = 16 if tokens % 16 == 0 else 1
    units = tokens // unit
    state = seed | 1

    def nxt():
        nonlocal state
        state ^= (state << 13) & M64
        state ^= state >> 7
        state ^= (state << 17) & M64
        return (state >> 11) / float(1 << 53)

    def empty(e):
        return experts >= 4 and (e == 1 or e == experts - 2)

    w = [0.0 if empty(e) else (0.5 + nxt()) / (1.0 + e) ** 0.3 for e in range(experts)]
    total = sum(w)
    counts = [int(x / total * units) for x in w]
    rest = units - sum(counts)
    e = 0
    while rest > 0:
        if not empty(e % experts):
            counts[e % experts] += 1
            rest -= 1
        e += 1
    return [c * unit for c in counts]


def grouped_mm(a, b, offs, counts):
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a, b, offs=offs)
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(a[start:start + c] @ b[e])
        start += c
    return torch.cat(outs)


def layer(x, w1, w2, p, offs, counts):
    a = grouped_mm(x, w1.transpose(-2, -1), offs, counts)
    g, l = a.chunk(2, dim=-1)
    z = F.silu(g) * l
    u = (z.float() * p[:, None]).to(torch.bfloat16)
    return grouped_mm(u, w2.transpose(-2, -1), offs, counts)


def timed(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__} on {name}; grouped_mm: {hasattr(torch, '_grouped_mm')}")
    only = sys.argv[1:]
    for shape, h, f, E, T in SHAPES:
        if only and shape not in only:
            continue
        n1, n2 = 2 * f, f
        counts = skewed_counts(T, E, 42)
        offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        gen = torch.Generator(device=dev).manual_seed(7)
        w1 = ((torch.rand(E, n1, h, device=dev, generator=gen) * 2 - 1) / h ** 0.5).to(torch.bfloat16)
        w2 = ((torch.rand(E, h, n2, device=dev, generator=gen) * 2 - 1) / f ** 0.5).to(torch.bfloat16)
        x = (torch.rand(T, h, device=dev, generator=gen) * 2 - 1).to(torch.bfloat16)
        g = (torch.rand(T, h, device=dev, generator=gen) * 2 - 1).to(torch.bfloat16)
        p = torch.rand(T, device=dev, generator=gen) * 0.95 + 0.05
        fwd_flops = 2.0 * T * h * (n1 + n2)
        with torch.no_grad():
            ms = timed(lambda: layer(x, w1, w2, p, offs, counts))
        print(f"TORCH TFLOP/s {shape:<14} torch-grouped-mm fwd     T={T:<6} median {ms:9.3f} ms  {fwd_flops / ms / 1e9:7.1f} TFLOP/s  ({name})")
        for t in (x, w1, w2, p):
            t.requires_grad_(True)

        def fb():
            for t in (x, w1, w2, p):
                t.grad = None
            layer(x, w1, w2, p, offs, counts).backward(g)

        ms = timed(fb)
        print(f"TORCH TFLOP/s {shape:<14} torch-grouped-mm fwd+bwd T={T:<6} median {ms:9.3f} ms  {3 * fwd_flops / ms / 1e9:7.1f} TFLOP/s  ({name})")
        for t in (x, w1, w2, p):
            t.requires_grad_(False)
            t.grad = None
        del w1, w2, x, g, p
        torch.cuda.empty_cache()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s")
