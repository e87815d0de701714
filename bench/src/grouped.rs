//! The grouped-GEMM strategies of the expert layers at the model shapes, GPU-timed
//! (`moe-verify bench grouped`).
//!
//! Shapes and token distributions come from the shape registry ([`moe_harness::shapes`], which
//! `scripts/torch_grouped_bench.py` reads as `scripts/shapes.json`, so both time identical
//! problems). Cases per (shape, distribution) ([`GroupedCase`]): fc1/fc2/dgrad1/wgrad1 of
//! TEGroupedMLP (`[out, in]` weights), the forward pair, and all six GEMMs of forward+backward
//! for TEGroupedMLP and for GroupedMLP (`[in, out]` weights). bf16 in and out, f32
//! accumulation, random data (never zeros).
//!
//! Timing: `iter_custom`, the engine's stream synchronized before starting the clock and after
//! the last iteration; buffers, fills, graph captures and pointer-array uploads happen in
//! set-up and warm-up (the `graph4-recapture` rows, added when `graph4` is among the
//! strategies, clear the caches inside the timed loop to show what a capture per call costs).
//! One `ROW,rust,<shape>,<dist>,<case>,<strategy>,<ms>,<TFLOP/s>` line per benchmark (median
//! per-iteration time of criterion's samples), plus the dense 8192³ cuBLAS reference; `--csv
//! PATH` also writes them to a file. Criterion ids: `gpu_grouped/<shape>/<dist>/<case>/
//! <strategy>` and `gpu_grouped/dense/gemm8192`.
//!
//! Choices ([`GroupedBench`], the command line's flags): `--shape`, `--case`, `--strategy`
//! (default `loop,ms4,graph4,gbatched,auto`), `--lane-sms N` (cuBLAS's SM-count target on the
//! side-stream handles, an experiment), `--filter`/`--untimed` ([`Selection`]).

use crate::timing::{criterion, dense_gemm, fill, random_chunk, time, Selection};
use criterion::SamplingMode;
use moe_gpu::gemm::wgrad_problem;
use moe_gpu::{DeviceBuffer, Engine, GemmProblem, Region, Strategy};
use moe_harness::shapes::ModelShape;
use moe_reference::Dtype;
use std::path::PathBuf;

/// One timed set of grouped calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupedCase {
    /// fc1 of TEGroupedMLP.
    Fc1Te,
    /// fc2 of TEGroupedMLP.
    Fc2Te,
    /// fc1's data gradient of TEGroupedMLP.
    Dgrad1Te,
    /// fc1's weight gradient of TEGroupedMLP.
    Wgrad1Te,
    /// fc1 and fc2 of TEGroupedMLP.
    FwdTe,
    /// The six GEMMs of TEGroupedMLP's forward and backward.
    FwdbwdTe,
    /// The six GEMMs of GroupedMLP's forward and backward.
    FwdbwdGrp,
}

impl GroupedCase {
    /// Every case, in the bench's order.
    pub const ALL: [GroupedCase; 7] = [
        GroupedCase::Fc1Te,
        GroupedCase::Fc2Te,
        GroupedCase::Dgrad1Te,
        GroupedCase::Wgrad1Te,
        GroupedCase::FwdTe,
        GroupedCase::FwdbwdTe,
        GroupedCase::FwdbwdGrp,
    ];

    /// The `case` column (`fc1_te`, ..., `fwdbwd_grp`).
    pub fn name(self) -> &'static str {
        match self {
            GroupedCase::Fc1Te => "fc1_te",
            GroupedCase::Fc2Te => "fc2_te",
            GroupedCase::Dgrad1Te => "dgrad1_te",
            GroupedCase::Wgrad1Te => "wgrad1_te",
            GroupedCase::FwdTe => "fwd_te",
            GroupedCase::FwdbwdTe => "fwdbwd_te",
            GroupedCase::FwdbwdGrp => "fwdbwd_grp",
        }
    }
}

/// The rows and output of one grouped-GEMM bench run (module doc).
#[derive(Clone, Debug)]
pub struct GroupedBench {
    /// Shapes, in this order.
    pub shapes: Vec<ModelShape>,
    /// Cases (run in [`GroupedCase::ALL`] order).
    pub cases: Vec<GroupedCase>,
    /// GEMM strategies.
    pub strategies: Vec<Strategy>,
    /// cuBLAS's SM-count target on the side-stream handles (an experiment).
    pub lane_sms: Option<usize>,
    /// The rows' CSV.
    pub csv: Option<PathBuf>,
    /// Which rows criterion times.
    pub selection: Selection,
}

impl Default for GroupedBench {
    /// Every shape and case, `loop,ms4,graph4,gbatched,auto`, no SM target, no CSV, all timed.
    fn default() -> Self {
        GroupedBench {
            shapes: ModelShape::ALL.to_vec(),
            cases: GroupedCase::ALL.to_vec(),
            strategies: vec![
                Strategy::Loop,
                Strategy::MultiStream(4),
                Strategy::Graph(4),
                Strategy::GroupedBatched,
                Strategy::Auto,
            ],
            lane_sms: None,
            csv: None,
            selection: Selection::All,
        }
    }
}

const DT: Dtype = Dtype::Bf16;
struct Buffers {
    x: DeviceBuffer,
    a: DeviceBuffer,
    u: DeviceBuffer,
    y: DeviceBuffer,
    g: DeviceBuffer,
    da: DeviceBuffer,
    du: DeviceBuffer,
    dx: DeviceBuffer,
    w1: DeviceBuffer,
    w2: DeviceBuffer,
    dw1: DeviceBuffer,
    dw2: DeviceBuffer,
}

/// One grouped call of a case.
type Call<'a> = (bool, bool, Vec<GemmProblem<Region<'a>>>);

struct Layout {
    h: usize,
    n1: usize,
    n2: usize,
}

/// The six grouped calls of a layer for `counts`; `te`: `[out, in]` weights, else `[in, out]`.
fn gemm<'a>(b: &'a Buffers, l: &Layout, counts: &[usize], te: bool, which: &str) -> Call<'a> {
    let ds = DT.size_bytes();
    let (h, n1, n2) = (l.h, l.n1, l.n2);
    let mut off = 0;
    let mut probs = Vec::new();
    let (mut ta, mut tb) = (false, false);
    for (e, &c) in counts.iter().enumerate() {
        let p = |buf: &'a DeviceBuffer, elems: usize| buf.at(elems * ds);
        let pr = match which {
            // x_e·W1_e(ᵀ) -> a
            "fc1" => {
                tb = te;
                GemmProblem { m: c, n: n1, k: h, a: p(&b.x, off * h), b: p(&b.w1, e * n1 * h), c: p(&b.a, off * n1) }
            }
            "fc2" => {
                tb = te;
                GemmProblem { m: c, n: h, k: n2, a: p(&b.u, off * n2), b: p(&b.w2, e * h * n2), c: p(&b.y, off * h) }
            }
            "dgrad2" => {
                tb = !te;
                GemmProblem { m: c, n: n2, k: h, a: p(&b.g, off * h), b: p(&b.w2, e * h * n2), c: p(&b.du, off * n2) }
            }
            "dgrad1" => {
                tb = !te;
                GemmProblem { m: c, n: h, k: n1, a: p(&b.da, off * n1), b: p(&b.w1, e * n1 * h), c: p(&b.dx, off * h) }
            }
            // Weight grads, K = the expert's tokens: [out, in] = out_sideᵀ·in_side (TE), or the
            // transposed block in_sideᵀ·out_side for GroupedMLP's [in, out] weights.
            "wgrad2" => {
                ta = true;
                wgrad_problem((p(&b.g, off * h), h), (p(&b.u, off * n2), n2), p(&b.dw2, e * h * n2), c, te)
            }
            "wgrad1" => {
                ta = true;
                wgrad_problem((p(&b.da, off * n1), n1), (p(&b.x, off * h), h), p(&b.dw1, e * n1 * h), c, te)
            }
            other => panic!("unknown GEMM {other}"),
        };
        probs.push(pr);
        off += c;
    }
    (ta, tb, probs)
}

fn case_calls<'a>(b: &'a Buffers, l: &Layout, counts: &[usize], case: &str) -> Vec<Call<'a>> {
    let (base, layout) = case.rsplit_once('_').expect("case_layout");
    let te = layout == "te";
    let names: &[&str] = match base {
        "fwd" => &["fc1", "fc2"],
        "fwdbwd" => &["fc1", "fc2", "dgrad2", "dgrad1", "wgrad2", "wgrad1"],
        one => return vec![gemm(b, l, counts, te, one)],
    };
    names.iter().map(|n| gemm(b, l, counts, te, n)).collect()
}

fn flops(calls: &[Call]) -> f64 {
    calls.iter().flat_map(|c| c.2.iter()).map(GemmProblem::flops).sum()
}

struct Report {
    rows: Vec<String>,
}

impl Report {
    fn emit(&mut self, shape: &str, dist: &str, case: &str, strat: &str, secs: f64, flops: f64) {
        let line = format!("ROW,rust,{shape},{dist},{case},{strat},{:.4},{:.1}", secs * 1e3, flops / secs / 1e12);
        println!("{line}");
        self.rows.push(line);
    }
}

/// Runs the grouped-GEMM bench `bench` on `eng` (module doc). `Err` when the SM-count target
/// cannot be set or the CSV cannot be written.
pub fn run(eng: &mut Engine, bench: &GroupedBench) -> Result<(), String> {
    let c = &mut criterion(&bench.selection);
    println!("gpu_grouped on {} ({})", eng.device_name(), eng.arch());
    let mut report = Report { rows: Vec::new() };
    if let Some(sms) = bench.lane_sms {
        eng.set_lane_sm_count_target(sms).map_err(|e| format!("--lane-sms {sms}: {e}"))?;
        println!("lane cuBLAS SM-count target: {sms}");
    }

    // Random bf16 chunk (8 Mi elements) the fills copy from.
    let chunk = random_chunk(eng);

    // Dense reference: 8192³ bf16 GEMM through the same cuBLAS helper.
    if let Some((secs, fl)) = dense_gemm(c, eng, &chunk, "gpu_grouped/dense", SamplingMode::Auto) {
        report.emit("dense", "-", "gemm8192", "cublas", secs, fl);
    }

    for &shape in &bench.shapes {
        let (name, d) = (shape.name(), shape.dims());
        let (h, e, t) = (d.hidden, d.experts, d.tokens);
        let l = Layout { h, n1: 2 * d.ffn, n2: d.ffn };
        let ds = DT.size_bytes();
        let mut alloc = |elems: usize| eng.alloc(elems * ds).expect("alloc");
        let mut b = Buffers {
            x: alloc(t * h),
            a: alloc(t * l.n1),
            u: alloc(t * l.n2),
            y: alloc(t * h),
            g: alloc(t * h),
            da: alloc(t * l.n1),
            du: alloc(t * l.n2),
            dx: alloc(t * h),
            w1: alloc(e * l.n1 * h),
            w2: alloc(e * h * l.n2),
            dw1: alloc(e * l.n1 * h),
            dw2: alloc(e * h * l.n2),
        };
        for buf in [
            &mut b.x, &mut b.a, &mut b.u, &mut b.y, &mut b.g, &mut b.da, &mut b.du, &mut b.dx, &mut b.w1, &mut b.w2,
            &mut b.dw1, &mut b.dw2,
        ] {
            fill(eng, buf, &chunk);
        }
        eng.synchronize().expect("fill");
        for (dist, cnt) in &shape.bench_distributions() {
            for case in GroupedCase::ALL.into_iter().filter(|c| bench.cases.contains(c)).map(GroupedCase::name) {
                let calls = case_calls(&b, &l, cnt, case);
                let fl = flops(&calls);
                let mut strats: Vec<(String, Strategy, bool)> =
                    bench.strategies.iter().map(|&s| (s.label(), s, false)).collect();
                if case == "fwdbwd_te" && bench.strategies.contains(&Strategy::Graph(4)) {
                    strats.push(("graph4-recapture".into(), Strategy::Graph(4), true));
                }
                for (label, strategy, recapture) in strats {
                    // Pre-flight outside timing: a strategy that errors gets an ERR line, and
                    // the rest of the run goes on.
                    let pre: Result<(), moe_gpu::GpuError> = calls
                        .iter()
                        .try_for_each(|(ta, tb, probs)| eng.grouped_gemm(strategy, DT, *ta, *tb, probs))
                        .and_then(|()| eng.synchronize());
                    if let Err(err) = pre {
                        let line = format!("ERR,rust,{name},{dist},{case},{label},{err}");
                        println!("{line}");
                        report.rows.push(line);
                        continue;
                    }
                    let group = format!("gpu_grouped/{name}/{dist}/{case}");
                    let secs = time(c, eng, &group, &label, SamplingMode::Auto, |en| {
                        for (ta, tb, probs) in &calls {
                            if recapture {
                                en.clear_grouped_caches();
                            }
                            en.grouped_gemm(strategy, DT, *ta, *tb, probs).expect("grouped_gemm");
                        }
                    });
                    if let Some(secs) = secs {
                        report.emit(name, dist, case, &label, secs, fl);
                    }
                }
            }
        }
        drop(b);
        eng.synchronize().expect("sync");
    }
    c.final_summary();
    if let Some(path) = &bench.csv {
        std::fs::write(path, report.rows.join("\n") + "\n")
            .map_err(|e| format!("--csv: cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
