#!/usr/bin/env python3
"""Regenerates the wgmma wrappers between the GENERATED markers of gpu/kernels/grouped_gemm.cu.

`wgmma.mma_async` lists every accumulator register of the warpgroup tile as its own asm operand
(64 for n128, 128 for n256), which is unreadable to write by hand; this prints them: the bf16/f16
k16 wrappers and the fp8 (e4m3 or e5m2 times e4m3) k32 wrappers of the fp8 grouped GEMM.
Run from the repository root: python3 scripts/gen_wgmma.py
"""
import re
import sys

PATH = "gpu/kernels/grouped_gemm.cu"


def wrapper(n: int, ty: str) -> str:
    regs = n // 2
    dlist = ", ".join(f"%{i}" for i in range(regs))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f'''template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n{n}k16_{ty}(float (&d)[{regs}], u64 desc_a, u64 desc_b) {{
    asm volatile(
        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
        "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} "
        "{{{dlist}}}, %{regs}, %{regs + 1}, p, 1, 1, %{regs + 3}, %{regs + 4};\\n}}\\n"
        : {outs}
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB));
}}
'''


def fp8_wrapper(n: int, a: str, b: str) -> str:
    """m64nNk32 with fp8 operands (both K-major: wgmma has no transpose for 8-bit types) and
    a run-time scale-d (0: D = A·B, the first k-step of a split-accumulation partial sum)."""
    regs = n // 2
    dlist = ", ".join(f"%{i}" for i in range(regs))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return f'''__device__ __forceinline__ void wgmma_m64n{n}k32_{a}_{b}(float (&d)[{regs}], u64 desc_a, u64 desc_b, int scale_d) {{
    asm volatile(
        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
        "wgmma.mma_async.sync.aligned.m64n{n}k32.f32.{a}.{b} "
        "{{{dlist}}}, %{regs}, %{regs + 1}, p, 1, 1;\\n}}\\n"
        : {outs}
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}}
'''


def main() -> int:
    text = open(PATH).read()
    body = "".join(wrapper(n, ty) for n in (128, 256) for ty in ("bf16", "f16"))
    body += "".join(fp8_wrapper(n, a, "e4m3") for n in (128, 256) for a in ("e4m3", "e5m2"))
    begin, end = "// GENERATED BEGIN (scripts/gen_wgmma.py)\n", "// GENERATED END\n"
    pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pat.search(text):
        print(f"{PATH}: markers not found", file=sys.stderr)
        return 1
    open(PATH, "w").write(pat.sub(lambda _: begin + body + end, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
