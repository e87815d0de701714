"""What the PyTorch peers of `moe-verify bench layer` share (scripts/torch_experts_bench.py,
scripts/torch_fp8_experts_bench.py): the counts file's shapes, the CSV columns, the layer's FLOP
and min-byte counts, and the timer; and what the table scripts share (scripts/fp8_table.py,
scripts/layer_table.py): the warning printer.

Timing, as the Rust bench (criterion flat sampling, bench/src/timing.rs): `warmup` calls (which
absorb one-off work such as torch.compile's compilation), then one timed call that picks n so
that a sample of n back-to-back calls lasts about `sample_ms`, then `samples` samples of n calls
each; per-call time = sample / n, the row is the upper median over the samples. On CUDA the clock
is a pair of CUDA events (recorded on the current stream; the end event synchronized); on the
CPU (smoke tests only) the host clock.

Imported by the scripts beside it (Python puts the script's directory on sys.path), so
scripts/gpu-run.sh stages this file next to them.
"""
import json
import math
import sys
import time

# The CSV columns of `moe-verify bench layer --csv` (bench/src/layer/report.rs).
HEADER = ["shape", "dist", "class", "mode", "strategy", "tokens", "experts", "flops", "min_bytes",
          "median_ms", "tflops", "device"]


def selected_shapes(counts_path, shapes_arg):
    """The shapes of the counts file (scripts/shapes.json) that `--shapes` (comma-separated, empty:
    all) selects, in the file's order; an unknown name exits naming what the file has."""
    with open(counts_path) as f:
        spec = json.load(f)
    names = [sh["name"] for sh in spec["shapes"]]
    wanted = [s for s in shapes_arg.split(",") if s]
    for s in wanted:
        if s not in names:
            sys.exit(f"--shapes: unknown shape {s!r} (the counts file has {names})")
    return [sh for sh in spec["shapes"] if not wanted or sh["name"] in wanted]


def print_warnings(notes):
    """A table script's warnings (rows on one side only, counts that disagree, ...): under the table
    on stdout, after a blank line, as a markdown list (`* warning: NOTE`), and each as a
    `warning: NOTE` line on stderr; nothing when there are none."""
    if notes:
        print()
        for n in notes:
            print(f"* warning: {n}")
            print(f"warning: {n}", file=sys.stderr)


def layer_flops(t, h, n1, n2, backward):
    """GEMM FLOPs of one call: forward 2*T*h*(N1+N2), forward+backward 3x (bench/src/layer)."""
    fwd = 2 * t * h * (n1 + n2)
    return 3 * fwd if backward else fwd


def min_bytes(counts, h, n1, n2, backward):
    """Each input/weight read once, each output written once (bf16 2 bytes, probs fp32 4):
    fwd: x, W1+W2 of experts with tokens, p read; y written. fwdbwd: + g read; dx, dW1+dW2 of
    every expert (zeros for empty ones), dp written. Same formula as bench/src/layer, for the
    bf16 and the fp8 rows alike (the Rust fp8 rows use it too)."""
    t = sum(counts)
    live = sum(1 for c in counts if c > 0)
    act = 2 * t * h
    weights = 2 * (n1 * h + h * n2)
    fwd = act + live * weights + 4 * t + act
    if backward:
        return fwd + act + act + len(counts) * weights + 4 * t
    return fwd


def median(v):
    """The upper median (the Rust bench's `timing::median`)."""
    v = sorted(v)
    return v[len(v) // 2]


class HostEvent:
    """The torch.cuda.Event calls the timer uses, on the host clock (CPU smoke tests)."""

    def __init__(self):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class Timer:
    """`Timer(torch, cuda, warmup, samples, sample_ms).time(fn)`: the median per-call
    milliseconds of `fn` (module doc)."""

    def __init__(self, torch, cuda, warmup=3, samples=10, sample_ms=30.0):
        if warmup < 1 or samples < 1 or not sample_ms > 0:
            raise ValueError(f"timer: warmup {warmup} and samples {samples} must be >= 1, "
                             f"sample_ms {sample_ms} > 0")
        self.torch, self.cuda = torch, cuda
        self.warmup, self.samples, self.sample_ms = warmup, samples, sample_ms

    def event(self):
        return self.torch.cuda.Event(enable_timing=True) if self.cuda else HostEvent()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def calls_per_sample(self, one_call_ms):
        """n: back-to-back calls of one sample, so that it lasts about sample_ms."""
        return max(1, math.ceil(self.sample_ms / max(one_call_ms, 1e-3)))

    def time(self, fn):
        for _ in range(self.warmup):
            fn()
        self.sync()
        s, e = self.event(), self.event()
        s.record()
        fn()
        e.record()
        e.synchronize()
        n = self.calls_per_sample(s.elapsed_time(e))
        ts = []
        for _ in range(self.samples):
            s.record()
            for _ in range(n):
                fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / n)
        return median(ts)
