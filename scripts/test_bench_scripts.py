"""Tests of the benchmark helper scripts (no GPU needed; `cargo test` runs them through
tests/bench_scripts.rs):

    python3 -m unittest discover -s scripts -p 'test_*.py' -v

The table scripts run on synthetic CSVs; the PyTorch peers (torch_experts_bench.py with its
torch.compile strategies, torch_fp8_experts_bench.py with its hand-written fp8 backward) run
their CPU smoke path on a tiny counts file, and the fp8 peer's self-check must catch planted
wiring faults. Without torch those tests skip, each with a SKIP line.
"""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_timing  # noqa: E402

HEADER = bench_timing.HEADER
HAVE_TORCH = importlib.util.find_spec("torch") is not None
DEV = "NVIDIA H200"


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for r in rows:
            w.writerow(r)


def row(shape, dist, cls, mode, strategy, flops, ms, device=DEV):
    tf = "ERR" if ms == "ERR" else f"{flops / (ms * 1e-3) / 1e12:.1f}"
    ms_s = "ERR" if ms == "ERR" else f"{ms:.4f}"
    return [shape, dist, cls, mode, strategy, 64, 4, f"{flops:.0f}", 1000, ms_s, tf, device]


def run_script(name, *args):
    """(exit code, stdout, stderr) of scripts/<name> in this interpreter."""
    p = subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def table_rows(md):
    """{(shape, dist, mode): {column: cell}} of the first markdown table in md."""
    lines = [l for l in md.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for l in lines[2:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        d = dict(zip(head, cells))
        out[(d["shape"], d["dist"], d["mode"])] = d
    return head, out


F = 1e12  # FLOPs of a fwd row in the synthetic CSVs (fwdbwd: 3x)


class Fp8TableTest(unittest.TestCase):
    """scripts/fp8_table.py on synthetic CSVs of the four kinds it joins."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = self.tmp.name
        self.tw = os.path.join(d, "fp8-rust-tensorwise.csv")
        self.bw = os.path.join(d, "fp8-rust-blockwise.csv")
        self.tb = os.path.join(d, "fp8-torch-bf16.csv")
        self.tf = os.path.join(d, "fp8-torch-fp8.csv")
        dense = [["dense", "-", "-", "gemm8192", "cublas", 8192, 0, 1, 1, "1.4", "800.0", DEV],
                 ["dense", "-", "-", "fp8gemm8192", "cublaslt-fp8", 8192, 0, 1, 1, "0.8", "1000.0", DEV]]
        # Our runs: bf16 auto 10 ms (fwd) / 30 ms (fwdbwd); tensorwise 5 / 20; blockwise 8 / ERR
        # on fwdbwd; the blockwise run's bf16 rows 11 / 30.
        write_csv(self.tw, dense + [
            row("mix", "uniform", "TEGroupedMLP", "fwd", "auto", F, 10.0),
            row("mix", "uniform", "TEGroupedMLP", "fwd", "fp8-tensorwise", F, 5.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "auto", 3 * F, 30.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "fp8-tensorwise", 3 * F, 20.0),
        ])
        write_csv(self.bw, dense + [
            row("mix", "uniform", "TEGroupedMLP", "fwd", "auto", F, 11.0),
            row("mix", "uniform", "TEGroupedMLP", "fwd", "fp8-blockwise", F, 8.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "auto", 3 * F, 30.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "fp8-blockwise", 3 * F, "ERR"),
        ])
        write_csv(self.tb, [
            ["dense", "-", "-", "gemm8192", "torch", 8192, 0, 1, 1, "1.5", "700.0", DEV],
            row("mix", "uniform", "TEGroupedMLP", "fwd", "torch", F, 12.0),
            row("mix", "uniform", "TEGroupedMLP", "fwd", "torch-compile", F, 11.5),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "torch", 3 * F, 36.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "torch-compile", 3 * F, "ERR"),
        ])
        write_csv(self.tf, [
            row("mix", "uniform", "TEGroupedMLP", "fwd", "torch-fp8-rowwise", F, 10.0),
            row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "torch-fp8-rowwise", 3 * F, 40.0),
        ])

    def tearDown(self):
        self.tmp.cleanup()

    def test_every_column_comes_from_its_csv_whatever_the_argument_order(self):
        # Why: the table recognises each CSV by its rows; a swapped source would put the wrong
        # run's time in a column and every ratio after it.
        rc, out, err = run_script("fp8_table.py", self.tf, self.bw, self.tb, self.tw)
        self.assertEqual(rc, 0, err)
        head, rows = table_rows(out)
        self.assertEqual(head, ["shape", "dist", "mode", "bf16 ms", "fp8 tensorwise ms", "fp8 blockwise ms",
                                "tensorwise % dense fp8", "blockwise % dense fp8", "bf16 / tensorwise",
                                "bf16 / blockwise", "torch bf16 ms", "torch.compile bf16 ms", "torch fp8 ms",
                                "torch fp8 / tensorwise", "torch fp8 / blockwise"])
        fwd = rows[("mix", "uniform", "fwd")]
        self.assertEqual(fwd["bf16 ms"], "10.00")  # the tensorwise run's bf16 row
        self.assertEqual(fwd["fp8 tensorwise ms"], "5.00")
        self.assertEqual(fwd["fp8 blockwise ms"], "8.00")
        self.assertEqual(fwd["tensorwise % dense fp8"], "20.0%")  # 200 TFLOP/s over 1000
        self.assertEqual(fwd["blockwise % dense fp8"], "12.5%")
        self.assertEqual(fwd["bf16 / tensorwise"], "**2.00**")
        self.assertEqual(fwd["bf16 / blockwise"], "**1.38**")  # 11 / 8: the blockwise run's own bf16 row
        self.assertEqual(fwd["torch bf16 ms"], "12.00")
        self.assertEqual(fwd["torch.compile bf16 ms"], "11.50")
        self.assertEqual(fwd["torch fp8 ms"], "10.00")
        self.assertEqual(fwd["torch fp8 / tensorwise"], "**2.00**")
        self.assertEqual(fwd["torch fp8 / blockwise"], "**1.25**")
        bwd = rows[("mix", "uniform", "fwdbwd")]
        self.assertEqual(bwd["fp8 blockwise ms"], "ERR")
        self.assertEqual(bwd["blockwise % dense fp8"], "-")
        self.assertEqual(bwd["bf16 / blockwise"], "-")
        self.assertEqual(bwd["torch.compile bf16 ms"], "ERR")
        self.assertEqual(bwd["torch fp8 / tensorwise"], "**2.00**")
        self.assertIn("dense fp8 cuBLASLt **1000**", out)
        self.assertIn("at most 10.0%", out)  # the two runs' bf16 fwd rows: 11 against 10

    def test_missing_rows_and_disagreeing_flop_counts_are_warned_about(self):
        # Why: a row only one side ran, or rows of different problems, must not pass silently.
        write_csv(self.tf, [row("mix", "uniform", "TEGroupedMLP", "fwd", "torch-fp8-rowwise", 2 * F, 10.0)])
        rc, out, err = run_script("fp8_table.py", self.tw, self.bw, self.tb, self.tf)
        self.assertEqual(rc, 0, err)
        self.assertIn("mix/uniform/fwd: FLOP counts differ", err)
        self.assertIn("mix/uniform/fwdbwd: no torch fp8 row", err)
        _, rows = table_rows(out)
        self.assertEqual(rows[("mix", "uniform", "fwdbwd")]["torch fp8 ms"], "-")

    def test_a_csv_without_the_columns_is_refused_with_its_name(self):
        # Why: bad input gets exit 2 and names the file, never a half table.
        bad = os.path.join(self.tmp.name, "bad.csv")
        with open(bad, "w") as f:
            f.write("a,b\n1,2\n")
        rc, out, err = run_script("fp8_table.py", self.tw, bad)
        self.assertEqual(rc, 2)
        self.assertIn("bad.csv", err)
        self.assertIn("missing columns", err)
        self.assertEqual(out, "")


class LayerTablesTest(unittest.TestCase):
    """layer_table.py and rounds_table.py with torch-compile rows in the torch CSV."""

    def test_torch_compile_rows_are_torch_columns_not_rust_strategies(self):
        # Why: before, any strategy other than "torch" counted as a Rust strategy, so a
        # torch-compile row would have been a candidate for "best" (ours).
        with tempfile.TemporaryDirectory() as d:
            rust, torch = os.path.join(d, "r.csv"), os.path.join(d, "t.csv")
            write_csv(rust, [row("mix", "uniform", "TEGroupedMLP", "fwd", "auto", F, 10.0)])
            write_csv(torch, [row("mix", "uniform", "TEGroupedMLP", "fwd", "torch", F, 12.0),
                              row("mix", "uniform", "TEGroupedMLP", "fwd", "torch-compile", F, 5.0)])
            rc, out, err = run_script("layer_table.py", rust, torch)
            self.assertEqual(rc, 0, err)
            head_line = [l for l in out.splitlines() if l.startswith("| shape")][0]
            head = [c.strip() for c in head_line.strip("|").split("|")]
            self.assertEqual(head[:8], ["shape", "dist", "class", "mode", "min GB", "auto", "torch", "torch-compile"])
            line = [l for l in out.splitlines() if l.startswith("| mix")][0]
            self.assertIn("| auto 100 |", line)  # best is ours, not the faster torch-compile
            self.assertIn("**1.20**", line)  # best / torch against eager torch

    def test_layer_table_warns_under_the_table_and_on_stderr_about_a_missing_torch_row(self):
        # Why: a Rust row the torch CSV lacks must be said (both places), not left as a blank cell.
        with tempfile.TemporaryDirectory() as d:
            rust, torch = os.path.join(d, "r.csv"), os.path.join(d, "t.csv")
            write_csv(rust, [row("mix", "uniform", "TEGroupedMLP", "fwd", "auto", F, 10.0),
                             row("mix", "uniform", "TEGroupedMLP", "fwdbwd", "auto", 3 * F, 30.0)])
            write_csv(torch, [row("mix", "uniform", "TEGroupedMLP", "fwd", "torch", F, 12.0)])
            rc, out, err = run_script("layer_table.py", rust, torch)
            self.assertEqual(rc, 0, err)
            self.assertIn("warning: mix/uniform/TEGroupedMLP/fwdbwd: no torch row", err)
            self.assertIn("* warning: mix/uniform/TEGroupedMLP/fwdbwd: no torch row", out)

    def test_rounds_table_takes_the_eager_torch_row(self):
        # Why: the rounds table's torch column is the eager layer; a later torch-compile row of
        # the same key must not replace it.
        with tempfile.TemporaryDirectory() as d:
            rounds, torch = os.path.join(d, "rounds.csv"), os.path.join(d, "t.csv")
            with open(rounds, "w") as f:
                f.write("shape,dist,class,mode,round,item,ms,tflops,device\n")
                for rnd in range(3):
                    f.write(f"mix,uniform,TEGroupedMLP,fwd,{rnd},dense,1.0,800.0,{DEV}\n")
                    f.write(f"mix,uniform,TEGroupedMLP,fwd,{rnd},auto,10.0,100.0,{DEV}\n")
            write_csv(torch, [row("mix", "uniform", "TEGroupedMLP", "fwd", "torch", F, 20.0),
                              row("mix", "uniform", "TEGroupedMLP", "fwd", "torch-compile", F, 5.0)])
            rc, out, err = run_script("rounds_table.py", rounds, torch)
            self.assertEqual(rc, 0, err)
            line = [l for l in out.splitlines() if l.startswith("| mix")][0]
            self.assertIn("| 50 |", line)  # eager torch: 1e12 / 20 ms = 50 TFLOP/s
            self.assertNotIn("| 200 |", line)


    def test_rounds_table_without_rounds_says_so(self):
        # Why: `bench layer --rounds 0` writes a rounds CSV with only its header; the table
        # crashed on it (IndexError) instead of saying there are no rounds.
        with tempfile.TemporaryDirectory() as d:
            rounds = os.path.join(d, "rounds.csv")
            with open(rounds, "w") as f:
                f.write("shape,dist,class,mode,item,round,calls,ms,tflops,device\n")
            rc, out, err = run_script("rounds_table.py", rounds)
            self.assertEqual(rc, 1, out)
            self.assertIn("no interleaved rounds", err)
            self.assertNotIn("Traceback", err)


class LayerProfileTopTest(unittest.TestCase):
    """layer_profile.py --top: the per-kernel report the fp8 notes of docs/performance.md quote."""

    def test_top_sums_each_kernel_over_the_log_in_ns_and_sorts_by_time(self):
        # Why: the report's shares decide which kernel gets fixed; ncu mixes units (ns, us) and
        # thousands separators, and a kernel launched many times must add up, not be counted once.
        head = ('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n')
        lines = [
            '"0","block_quant_bf16_e4m3","gpu__time_duration.sum","ns","3,000"\n',
            '"1","nvjet_gemm","gpu__time_duration.sum","ns","4000"\n',
            '"2","block_quant_bf16_e4m3","gpu__time_duration.sum","us","2"\n',
            '"3","nvjet_gemm","sm__cycles","cycle","99999"\n',
        ]
        with tempfile.TemporaryDirectory() as d:
            log = os.path.join(d, "ncu.csv")
            with open(log, "w") as f:
                f.write("==PROF== a line ncu writes\n" + head + "".join(lines))
            rc, out, err = run_script("layer_profile.py", "--top", "5", log)
            self.assertEqual(rc, 0, err)
            rows = [l.split() for l in out.splitlines()[1:]]
            self.assertEqual([r[-1] for r in rows], ["block_quant_bf16_e4m3", "nvjet_gemm"])
            self.assertEqual(rows[0][:5], ["0.005", "ms", "55.6%", "x", "2"])
            self.assertIn("0.01 ms over 3 kernels", out.splitlines()[0])


class BenchTimingTest(unittest.TestCase):
    def test_min_bytes_matches_the_rust_formula_by_hand(self):
        # Why: the fp8 and bf16 peers share this count with the Rust rows (layer_table warns on
        # a mismatch); a hand-computed case pins it. T=48 (one empty expert of 3), h=4, n1=6, n2=3.
        act, w = 2 * 48 * 4, 2 * (6 * 4 + 4 * 3)
        fwd = act + 2 * w + 4 * 48 + act
        self.assertEqual(bench_timing.min_bytes([16, 0, 32], 4, 6, 3, False), fwd)
        self.assertEqual(bench_timing.min_bytes([16, 0, 32], 4, 6, 3, True), fwd + 2 * act + 3 * w + 4 * 48)
        self.assertEqual(bench_timing.layer_flops(48, 4, 6, 3, True), 3 * 2 * 48 * 4 * 9)

    def test_print_warnings_lists_each_note_under_the_table_and_on_stderr(self):
        # Why: the table scripts share this printer; a warning must reach both the markdown
        # (after a blank line, so it does not join the table) and stderr, and no notes print nothing.
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            bench_timing.print_warnings(["a: no torch row", "b: FLOP counts differ"])
        self.assertEqual(out.getvalue(), "\n* warning: a: no torch row\n* warning: b: FLOP counts differ\n")
        self.assertEqual(err.getvalue(), "warning: a: no torch row\nwarning: b: FLOP counts differ\n")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            bench_timing.print_warnings([])
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))

    def test_timer_refuses_empty_sampling_and_sizes_samples(self):
        # Why: zero samples would make the median of nothing; n must cover sample_ms.
        with self.assertRaises(ValueError):
            bench_timing.Timer(None, False, warmup=1, samples=0)
        t = bench_timing.Timer(None, False, warmup=1, samples=3, sample_ms=30.0)
        self.assertEqual(t.calls_per_sample(7.0), 5)
        self.assertEqual(t.calls_per_sample(100.0), 1)
        calls = []
        self.assertGreaterEqual(t.time(lambda: calls.append(1)), 0.0)
        self.assertGreaterEqual(len(calls), 1 + 1 + 3)


TINY = {"align": 16, "shapes": [{"name": "tiny", "hidden": 64, "ffn": 32, "experts": 4, "rows": 64,
                                 "dists": {"uniform": [16, 16, 16, 16], "skew": [0, 20, 28, 16]}}]}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@unittest.skipUnless(HAVE_TORCH, "torch not installed")
class TorchPeersSmokeTest(unittest.TestCase):
    """The CPU smoke paths of the PyTorch peers on a 4-expert problem."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.counts = os.path.join(cls.tmp.name, "counts.json")
        with open(cls.counts, "w") as f:
            json.dump(TINY, f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_bf16_peer_runs_eager_and_both_compile_strategies(self):
        # Why: the torch.compile strategies must compile and time the same layer as eager, in
        # one process, fwd and fwdbwd (recompiles per mode absorbed by the warm-up).
        out = os.path.join(self.tmp.name, "bf16.csv")
        rc, so, se = run_script("torch_experts_bench.py", "--device", "cpu", "--counts", self.counts,
                                "--classes", "TEGroupedMLP", "--strategies", "torch,torch-compile,torch-compile-act",
                                "--samples", "2", "--sample-ms", "1", "--warmup", "2", "--csv", out)
        self.assertEqual(rc, 0, se)
        rows = [r for r in read_rows(out) if r["shape"] != "dense"]
        self.assertEqual(len(rows), 2 * 2 * 3, rows)
        self.assertEqual({r["strategy"] for r in rows}, {"torch", "torch-compile", "torch-compile-act"})
        for r in rows:
            self.assertNotEqual(r["median_ms"], "ERR", f"{r} ({so[-2000:]})")

    def test_compiled_layer_matches_eager(self):
        # Why: a compile strategy timing a different computation would be no peer.
        import torch
        import torch_experts_bench as teb

        gen = torch.Generator().manual_seed(0)
        E, h, f, T = 4, 64, 32, 64
        x = torch.rand(T, h, generator=gen).to(torch.bfloat16)
        w1 = (torch.rand(E, 2 * f, h, generator=gen) / 8).to(torch.bfloat16)
        w2 = (torch.rand(E, h, f, generator=gen) / 8).to(torch.bfloat16)
        p = torch.rand(T, generator=gen)
        offs = torch.tensor([0, 20, 48, 64], dtype=torch.int32)
        fns = teb.layer_fns(torch, teb.STRATEGIES, True, "inductor")
        with torch.no_grad():
            ref = fns["torch"](x, w1, w2, p, offs).float()
            for s in ("torch-compile", "torch-compile-act"):
                got = fns[s](x, w1, w2, p, offs).float()
                rel = float((got - ref).norm() / ref.norm())
                self.assertLess(rel, 0.02, s)  # bf16 rounding of u differs (module doc), nothing else

    def test_fp8_peer_runs_fwd_and_fwdbwd_after_its_self_check(self):
        # Why: the fp8 backward is hand-written; its rows may only exist once the self-check
        # passed (the op's own argument checks run on the meta device here).
        out = os.path.join(self.tmp.name, "fp8.csv")
        rc, so, se = run_script("torch_fp8_experts_bench.py", "--device", "cpu", "--counts", self.counts,
                                "--samples", "2", "--sample-ms", "1", "--warmup", "1", "--csv", out)
        self.assertEqual(rc, 0, se)
        self.assertRegex(so, r"SELF-CHECK .* fwd ok, fwdbwd ok")
        rows = read_rows(out)
        self.assertEqual([(r["dist"], r["mode"]) for r in rows],
                         [("uniform", "fwd"), ("uniform", "fwdbwd"), ("skew", "fwd"), ("skew", "fwdbwd")])
        for r in rows:
            self.assertNotEqual(r["median_ms"], "ERR", r)
            self.assertEqual(r["strategy"], "torch-fp8-rowwise")

    def check(self, ops):
        import torch
        import torch_fp8_experts_bench as m

        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            return m.self_check(torch, ops, m.make_function(torch))

    def test_fp8_self_check_passes_the_correct_layer(self):
        # Why: the baseline of the planted faults below: only the planted fault fails them.
        import torch
        import torch_fp8_experts_bench as m

        ok_fwd, ok_bwd, zero_empty, lines = self.check(m.Fp8Ops(torch, torch.device("cpu")))
        self.assertTrue(ok_fwd and ok_bwd, lines)
        self.assertFalse(zero_empty)

    def test_fp8_self_check_catches_wgrad_scales_in_the_wrong_order(self):
        # Why: the 2d x 2d scales are expert-major ([E*n]); column-major order must fail.
        import torch
        import torch_fp8_experts_bench as m

        class Planted(m.Fp8Ops):
            def quant_cols_grouped(self, t, seg, experts):
                q, s = super().quant_cols_grouped(t, seg, experts)
                return q, s.reshape(experts, t.shape[1]).t().reshape(-1).contiguous()

        ok_fwd, ok_bwd, _, lines = self.check(Planted(torch, torch.device("cpu")))
        self.assertTrue(ok_fwd, lines)
        self.assertFalse(ok_bwd, lines)

    def test_fp8_self_check_catches_dgrad_weight_scales_of_another_expert(self):
        # Why: the dgrad weight copy's scales are per (expert, column); another expert's fail.
        import torch
        import torch_fp8_experts_bench as m

        class Planted(m.Fp8Ops):
            def quant_weights(self, w1, w2):
                d = super().quant_weights(w1, w2)
                d["w1t"] = (d["w1t"][0], d["w1t"][1].flip(0).contiguous())
                return d

        ok_fwd, ok_bwd, _, lines = self.check(Planted(torch, torch.device("cpu")))
        self.assertTrue(ok_fwd, lines)
        self.assertFalse(ok_bwd, lines)

    def test_fp8_self_check_catches_a_forward_scale_fault(self):
        # Why: the forward row needs its own check: x's scales applied to the wrong rows.
        import torch
        import torch_fp8_experts_bench as m

        class Planted(m.Fp8Ops):
            def quant_rows(self, t):
                q, s = super().quant_rows(t)
                return (q, s.flip(0).contiguous()) if t.dim() == 2 and t.shape[1] == 64 else (q, s)

        ok_fwd, ok_bwd, _, lines = self.check(Planted(torch, torch.device("cpu")))
        self.assertFalse(ok_fwd, lines)
        self.assertFalse(ok_bwd, lines)

    def test_fp8_self_check_zeroes_unwritten_empty_expert_grads_and_says_so(self):
        # Why: an op that leaves empty groups' wgrad unwritten must switch on the explicit
        # zeroing (a FALLBACK line), not pass with garbage weight gradients.
        import torch
        import torch_fp8_experts_bench as m

        class Garbage(m.Fp8Ops):
            def gmm(self, a, b, sa, sb, offs, fast):
                out = super().gmm(a, b, sa, sb, offs, fast)
                if a.dim() == 2 and b.dim() == 2:  # wgrad: fill empty groups with garbage
                    ends = offs.tolist()
                    for g, (s, e) in enumerate(zip([0] + ends[:-1], ends)):
                        if s == e:
                            out[g] = 7.0
                return out

        ok_fwd, ok_bwd, zero_empty, lines = self.check(Garbage(torch, torch.device("cpu")))
        self.assertTrue(ok_fwd and ok_bwd, lines)
        self.assertTrue(zero_empty)
        self.assertTrue(any(l.startswith("FALLBACK") for l in lines), lines)

    def test_a_failed_self_check_gives_err_rows_not_timings(self):
        # Why: "do not fake a row": with the backward wired wrong, the fwdbwd rows must be ERR
        # while the (correct) forward is still timed.
        import torch_fp8_experts_bench as m

        class Planted(m.Fp8Ops):
            def quant_cols_grouped(self, t, seg, experts):
                q, s = super().quant_cols_grouped(t, seg, experts)
                return q, s.reshape(experts, t.shape[1]).t().reshape(-1).contiguous()

        out = os.path.join(self.tmp.name, "fp8-planted.csv")
        argv, ops = sys.argv, m.Fp8Ops
        sys.argv = ["torch_fp8_experts_bench.py", "--device", "cpu", "--counts", self.counts, "--samples", "2",
                    "--sample-ms", "1", "--warmup", "1", "--csv", out]
        m.Fp8Ops = Planted
        printed = io.StringIO()
        try:
            with redirect_stdout(printed), redirect_stderr(io.StringIO()):
                m.main()
        finally:
            sys.argv, m.Fp8Ops = argv, ops
        self.assertIn("fwdbwd FAILED", printed.getvalue())
        modes = {(r["dist"], r["mode"]): r["median_ms"] for r in read_rows(out)}
        self.assertEqual(modes[("uniform", "fwdbwd")], "ERR")
        self.assertEqual(modes[("skew", "fwdbwd")], "ERR")
        self.assertNotEqual(modes[("uniform", "fwd")], "ERR")

    def test_emulation_refuses_what_the_op_refuses(self):
        # Why: the CPU smoke path is only worth something if a layout the CUDA op rejects is
        # rejected here too (the op's meta checks): a row-major mat_b must fail.
        import torch
        import torch_fp8_experts_bench as m

        ops = m.Fp8Ops(torch, torch.device("cpu"))
        a, sa = ops.quant_rows(torch.rand(32, 64))
        b, sb = ops.quant_rows(torch.rand(2, 16, 64))  # [E, N, K]
        offs = torch.tensor([16, 32], dtype=torch.int32)
        self.assertEqual(tuple(ops.gmm(a, b.transpose(-2, -1), sa, sb, offs, False).shape), (32, 16))
        with self.assertRaises(RuntimeError):
            ops.gmm(a, b.transpose(-2, -1).contiguous(), sa, sb, offs, False)  # row-major [E, K, N]
        with self.assertRaises(ValueError):
            ops.gmm(a, b.transpose(-2, -1), sa, sb, torch.tensor([8, 32], dtype=torch.int32), False)


if not HAVE_TORCH:
    print("SKIP: torch not installed: the PyTorch peer smoke tests of scripts/test_bench_scripts.py do not run",
          file=sys.stderr)

if __name__ == "__main__":
    unittest.main()


class PtxasReportTest(unittest.TestCase):
    """scripts/ptxas_report.py, the spill verdict of scripts/kernel-check.sh."""

    LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_clean' for 'sm_90a'
ptxas info    : Function properties for k_clean
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compiling entry function 'k_spills' for 'sm_90a'
ptxas info    : Function properties for k_spills
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers
"""

    def load(self):
        spec = importlib.util.spec_from_file_location("ptxas_report", os.path.join(HERE, "ptxas_report.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def test_a_spilling_kernel_fails_and_a_clean_one_passes(self):
        # Why: the check exists to stop spills; a parser that missed the spill line, or read
        # the previous kernel's, would pass them silently.
        m = self.load()
        rows = m.parse(self.LOG)
        self.assertEqual(rows, [("k_clean", 0, 0, 168), ("k_spills", 8, 12, 255)])
        lines, ok = m.report(rows, "mod.sm_90a")
        self.assertFalse(ok)
        self.assertTrue(lines[1].startswith("SPILL mod.sm_90a k_spills: 255 registers"))
        _, ok_clean = m.report(rows[:1], "mod.sm_90a")
        self.assertTrue(ok_clean)

    def test_a_log_without_kernels_fails(self):
        # Why: a ptxas that wrote nothing (wrong flags, empty PTX) must not read as clean.
        m = self.load()
        lines, ok = m.report(m.parse("ptxas info    : 0 bytes gmem\n"), "empty.sm_90")
        self.assertFalse(ok)
        self.assertIn("no kernel", lines[0])
