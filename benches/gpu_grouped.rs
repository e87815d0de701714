//! Issue 5: grouped-GEMM strategies of the expert layers at model shapes, GPU-timed.
//!
//! Shapes and token distributions come from `benches/data/grouped_counts.json` (the same file
//! `scripts/torch_grouped_bench.py` reads, so both time identical problems). Cases per
//! (shape, distribution): fc1/fc2/dgrad1/wgrad1 of TEGroupedMLP (`[out, in]` weights), the
//! forward pair, and all six GEMMs of forward+backward for TEGroupedMLP and for GroupedMLP
//! (`[in, out]` weights). bf16 in and out, f32 accumulation, random data (never zeros).
//!
//! Timing: `iter_custom`, the engine's stream synchronized before starting the clock and after
//! the last iteration; buffers, fills, graph captures and pointer-array uploads happen in
//! set-up and warm-up (the `graph4-recapture` rows clear the caches inside the timed loop to
//! show what a capture per call costs). One `ROW,rust,<shape>,<dist>,<case>,<strategy>,<ms>,
//! <TFLOP/s>` line per benchmark (median per-iteration time of criterion's samples), plus the
//! dense 8192³ cuBLAS reference; `MOE_GG_CSV=path` also writes them to a file. Criterion ids:
//! `gpu_grouped/<shape>/<dist>/<case>/<strategy>` and `gpu_grouped/dense/gemm8192`; run this
//! module alone with the filter `gpu_grouped` (`scripts/gpu-device.sh`'s `grouped` step).
//!
//! Filters (comma lists): `MOE_GG_SHAPES`, `MOE_GG_CASES`, `MOE_GG_STRATEGIES` (labels of
//! [`Strategy::label`], default `loop,ms4,graph4,gbatched,auto`); `MOE_GG_LANE_SMS=n` sets
//! cuBLAS's SM-count target on the side-stream handles (an experiment).

use crate::gpu_common::{counts, dense_gemm, env_list, fill, random_chunk, time};
use criterion::{Criterion, SamplingMode};
use moe_gpu::gemm::wgrad_problem;
use moe_gpu::{DeviceBuffer, Engine, GemmProblem, Region, Strategy};
use moe_reference::Dtype;

const DT: Dtype = Dtype::Bf16;
const CASES: [&str; 7] = ["fc1_te", "fc2_te", "dgrad1_te", "wgrad1_te", "fwd_te", "fwdbwd_te", "fwdbwd_grp"];

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

/// The bench entry point (registered in `benches/main.rs`).
pub fn bench(c: &mut Criterion) {
    if !crate::selected(&["gpu_grouped"]) {
        return;
    }
    let Some(gpu) = moe_gpu::gpu_or_skip("bench gpu_grouped") else {
        return;
    };
    let mut guard = gpu.lock().expect("the engine");
    let eng: &mut Engine = &mut guard;
    println!("gpu_grouped on {} ({})", eng.device_name(), eng.arch());
    let counts = counts();
    let shapes = env_list("MOE_GG_SHAPES");
    let cases = env_list("MOE_GG_CASES");
    let strategies: Vec<String> = env_list("MOE_GG_STRATEGIES")
        .unwrap_or_else(|| ["loop", "ms4", "graph4", "gbatched", "auto"].map(String::from).to_vec());
    let mut report = Report { rows: Vec::new() };
    if let Some(sms) = std::env::var("MOE_GG_LANE_SMS").ok().and_then(|v| v.parse().ok()) {
        eng.set_lane_sm_count_target(sms).expect("cublasSetSmCountTarget");
        println!("lane cuBLAS SM-count target: {sms}");
    }

    // Random bf16 chunk (8 Mi elements) the fills copy from.
    let chunk = random_chunk(eng);

    // Dense reference: 8192³ bf16 GEMM through the same cuBLAS helper.
    if let Some((secs, fl)) = dense_gemm(c, eng, &chunk, "gpu_grouped/dense", SamplingMode::Auto) {
        report.emit("dense", "-", "gemm8192", "cublas", secs, fl);
    }

    for sh in &counts.shapes {
        if shapes.as_ref().is_some_and(|s| !s.contains(&sh.name)) {
            continue;
        }
        let (h, e, t) = (sh.hidden, sh.experts, sh.rows);
        let l = Layout { h, n1: 2 * sh.ffn, n2: sh.ffn };
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
        for (dist, cnt) in &sh.dists {
            for case in CASES {
                if cases.as_ref().is_some_and(|cs| !cs.iter().any(|c| c == case)) {
                    continue;
                }
                let calls = case_calls(&b, &l, cnt, case);
                let fl = flops(&calls);
                let mut strats: Vec<(String, Strategy, bool)> = strategies
                    .iter()
                    .map(|s| (s.clone(), Strategy::parse(s).unwrap_or_else(|| panic!("unknown strategy {s}")), false))
                    .collect();
                if case == "fwdbwd_te" && strategies.iter().any(|s| s == "graph4") {
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
                        let line = format!("ERR,rust,{},{dist},{case},{label},{err}", sh.name);
                        println!("{line}");
                        report.rows.push(line);
                        continue;
                    }
                    let group = format!("gpu_grouped/{}/{dist}/{case}", sh.name);
                    let secs = time(c, eng, &group, &label, SamplingMode::Auto, |en| {
                        for (ta, tb, probs) in &calls {
                            if recapture {
                                en.clear_grouped_caches();
                            }
                            en.grouped_gemm(strategy, DT, *ta, *tb, probs).expect("grouped_gemm");
                        }
                    });
                    if let Some(secs) = secs {
                        report.emit(&sh.name, dist, case, &label, secs, fl);
                    }
                }
            }
        }
        drop(b);
        eng.synchronize().expect("sync");
    }
    if let Ok(path) = std::env::var("MOE_GG_CSV") {
        std::fs::write(&path, report.rows.join("\n") + "\n").expect("write MOE_GG_CSV");
    }
}
