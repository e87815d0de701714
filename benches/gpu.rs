//! Issue 5, per expert layer: forward and forward+backward of the CUDA GroupedMLP and
//! TEGroupedMLP at the four model shapes, with each GEMM strategy, against the card's dense rate.
//!
//! **Rows**: shape × distribution × class × mode × strategy.
//! * Shapes and token distributions: `benches/data/grouped_counts.json` (Mixtral 8x7B, the
//!   DeepSeek-V3 EP slice of 32 experts, Qwen3-30B-A3B, GPT-OSS-120B; `uniform` and a Zipf split
//!   with empty experts), the file `scripts/torch_experts_bench.py` reads, so both time the same
//!   problems. Each shape's layer configuration is `moe_gpu::sampled::shape_config` of the
//!   `moe_gpu::sampled::SHAPES` entry with the same `h`, `f`, `E`: GLU silu, bf16 weights and
//!   activations, fp32 probs, no bias, no padding.
//! * Classes: `GroupedMLP` (weights `[E, in, out]`) and `TEGroupedMLP` (`[E, out, in]`);
//!   `MOE_LAYER_CLASSES=sequential,grouped,te` adds `SequentialMLP` (comma list of `sequential`,
//!   `grouped`, `te`; default `grouped,te`).
//! * Modes: `fwd` = `Engine::forward`; `fwdbwd` = `Engine::forward` + `Engine::backward` with
//!   immediate weight gradients (dx, dprobs, dW1, dW2).
//! * Strategies: `MOE_LAYER_STRATEGIES`, a comma list of labels of
//!   `moe_gpu::grouped::Strategy::parse` (default `auto,loop`); every set of per-expert GEMMs of
//!   the layer is issued with it (`Engine::set_gemm_strategy`). An unknown label stops the bench
//!   with a message naming it.
//! * `MOE_LAYER_SHAPES`: comma list of shape names to keep (default all);
//!   `MOE_LAYER_MODES`: comma list of `fwd`, `fwdbwd` (default both). With a criterion filter
//!   that matches no row, each kept row still makes its one untimed call (and its interleaved
//!   rounds, below): that is how `scripts/gpu-device.sh`'s `profile` step gets one call per row
//!   under `ncu`, and how the rounds run alone.
//!
//! **Timing**: device-resident. Weights (`Engine::prepare_random`, `U(-1, 1)/√fan_in`) and
//! inputs (`Engine::random_inputs`: x and the upstream grad `U(-1, 1)`, probs `U(0.05, 1)`) are
//! generated on the device; kernels compiled, buffers allocated and one untimed call made
//! (which also surfaces errors: a failing strategy gets an `ERR` line and row, the rest goes on)
//! before criterion's warm-up. Criterion, flat sampling: 10 samples of the same number of
//! back-to-back calls (about 30 ms of them), the engine's stream synchronized before the clock
//! starts and after each sample's last call; the reported time is the median per-call time of
//! the 10 samples. Ids: `gpu_layer/<shape>/<dist>/<class>/<mode>/<strategy>`, and
//! `gpu_layer/dense/gemm8192` (before the layers), `gpu_layer/dense/gemm8192_end` (after).
//!
//! **Dense reference**: one 8192³ bf16 `Engine::gemm` (cuBLAS, f32 accumulation) on random
//! data, same process, same timing, measured before the first shape (`gemm8192`), before
//! each later shape (`gemm8192_before_<shape>`) and after the last (`gemm8192_end`): the
//! card's sustained clock drops as it heats under a long run (H100: about 700 W, SM clock
//! median 1.4 GHz during the layer rows, 1.98 GHz peak). `scripts/layer_table.py` reports
//! `% dense` against the highest reading (conservative: usually the cool card's first) and
//! `% adjacent dense` against the mean of the two readings that bracket the shape's rows
//! (per-row lines printed during the run use the highest so far).
//!
//! **FLOPs** (GEMMs only, elementwise work not counted), with `T` = routed rows (the sum of the
//! counts), `N1 = 2f` (GLU), `N2 = f`: forward `2·T·h·(N1 + N2)`; forward+backward 3× that
//! (dgrad and wgrad each cost one forward).
//!
//! **Min bytes** (each input and weight read once, each output written once; bf16 = 2 bytes,
//! probs fp32 = 4 bytes; `E_live` = experts with at least one token, `E` = all local experts):
//! * forward: `2·T·h` (x) + `2·E_live·(N1·h + h·N2)` (W1, W2 of experts with tokens) + `4·T`
//!   (probs) + `2·T·h` (y);
//! * forward+backward: the forward's bytes + `2·T·h` (upstream grad read) + `2·T·h` (dx) +
//!   `2·E·(N1·h + h·N2)` (dW1, dW2 of every expert: empty experts' grads are written as zeros) +
//!   `4·T` (dprobs).
//!
//! Intermediates (fc1 output, fc2 input, their grads) are not counted: a fused layer need not
//! store them.
//!
//! **Interleaved rounds** (`MOE_LAYER_ROUNDS=R`, default 0 = off): after a (shape,
//! distribution, class, mode)'s criterion rows, `R` rounds that each time one block of about
//! 20 ms of back-to-back calls of the dense 8192³ GEMM and of every strategy (host clock
//! between two stream synchronizations; the order reversed every other round), so every
//! strategy's reading has a dense reading taken within tens of milliseconds of it, in the same
//! thermal state, and strategies are compared round by round rather than minutes apart. One
//! `ROUNDS` line per strategy (median TFLOP/s, median and range of its per-round % of dense,
//! median and range of its per-round time ratio to the first strategy); with
//! `MOE_LAYER_ROUNDS_CSV=path` every block goes to a CSV (header `shape,dist,class,mode,item,
//! round,calls,ms,tflops,device`; `item` = `dense` or a strategy label) that
//! `scripts/rounds_table.py` summarizes.
//!
//! **Output**: one `TFLOP/s` line per row as it finishes and a summary at the end; with
//! `MOE_LAYER_CSV=path`, a CSV (header `shape,dist,class,mode,strategy,tokens,experts,flops,
//! min_bytes,median_ms,tflops,device`; a `dense` row first; rows appended as they finish;
//! `ERR` in `median_ms` and `tflops` for a strategy that failed) that
//! `scripts/layer_table.py` joins with `scripts/torch_experts_bench.py`'s. Registered only when
//! a GPU is found (prints why not otherwise).

use crate::gpu_common::{
    block_calls, counts, dense_gemm, env_list, median, random_chunk, time, timed_block, DenseGemm, DENSE_N, SAMPLES,
};
use criterion::{Criterion, SamplingMode};
use moe_gpu::layer::{DeviceLayer, Workspace};
use moe_gpu::{Engine, GpuError, Strategy};
use moe_harness::shapes::ModelShape;
use moe_reference::LayerClass;
use std::io::Write;

/// Criterion group prefix of this module.
const PREFIX: &str = "gpu_layer";
/// Default `MOE_LAYER_STRATEGIES`.
const DEFAULT_STRATEGIES: &str = "auto,loop";
/// CSV header (shared with `scripts/torch_experts_bench.py`).
const CSV_HEADER: &str = "shape,dist,class,mode,strategy,tokens,experts,flops,min_bytes,median_ms,tflops,device";

/// The strategies of `MOE_LAYER_STRATEGIES` (default [`DEFAULT_STRATEGIES`]), labelled by
/// [`Strategy::label`], duplicates dropped. Panics naming an unknown label.
fn strategies() -> Vec<(String, Strategy)> {
    let labels =
        env_list("MOE_LAYER_STRATEGIES").unwrap_or_else(|| DEFAULT_STRATEGIES.split(',').map(String::from).collect());
    let mut out: Vec<(String, Strategy)> = Vec::new();
    for label in labels {
        let s = Strategy::parse(&label).unwrap_or_else(|| {
            panic!(
                "MOE_LAYER_STRATEGIES: unknown GEMM strategy {label:?} (moe_gpu::grouped::Strategy::parse rejects \
                 it; labels look like auto, loop, persistent, ms4, mt4, graph4, gbatched)"
            )
        });
        if !out.iter().any(|(_, t)| *t == s) {
            out.push((s.label(), s));
        }
    }
    out
}

/// The classes of `MOE_LAYER_CLASSES` (default GroupedMLP and TEGroupedMLP).
fn classes() -> Vec<LayerClass> {
    let labels = env_list("MOE_LAYER_CLASSES").unwrap_or_else(|| vec!["grouped".into(), "te".into()]);
    labels
        .iter()
        .map(|l| match l.to_ascii_lowercase().as_str() {
            "sequential" | "sequentialmlp" => LayerClass::Sequential,
            "grouped" | "groupedmlp" => LayerClass::Grouped,
            "te" | "te_grouped" | "te-grouped" | "tegroupedmlp" => LayerClass::TeGrouped,
            other => panic!("MOE_LAYER_CLASSES: unknown class {other:?} (expected sequential, grouped or te)"),
        })
        .collect()
}

/// The modes of `MOE_LAYER_MODES` as `backward` flags (default forward, then forward+backward).
fn modes() -> Vec<bool> {
    let labels = env_list("MOE_LAYER_MODES").unwrap_or_else(|| vec!["fwd".into(), "fwdbwd".into()]);
    labels
        .iter()
        .map(|l| match l.as_str() {
            "fwd" => false,
            "fwdbwd" => true,
            other => panic!("MOE_LAYER_MODES: unknown mode {other:?} (expected fwd or fwdbwd)"),
        })
        .collect()
}

/// The `class` column: Megatron-Core's class name.
fn class_name(class: LayerClass) -> &'static str {
    match class {
        LayerClass::Sequential => "SequentialMLP",
        LayerClass::Grouped => "GroupedMLP",
        LayerClass::TeGrouped => "TEGroupedMLP",
    }
}

/// GEMM FLOPs of one call: forward `2·T·h·(N1 + N2)`, forward+backward 3× that.
fn layer_flops(t: usize, h: usize, n1: usize, n2: usize, backward: bool) -> f64 {
    let fwd = 2.0 * t as f64 * h as f64 * (n1 + n2) as f64;
    if backward {
        3.0 * fwd
    } else {
        fwd
    }
}

/// Minimum bytes moved by one call (see the module docs): bf16 activations and weights, fp32
/// probs, each input/weight read once and each output written once.
fn layer_min_bytes(counts: &[usize], h: usize, n1: usize, n2: usize, backward: bool) -> f64 {
    let (bf16, f32b) = (2.0, 4.0);
    let t = counts.iter().sum::<usize>() as f64;
    let live = counts.iter().filter(|&&c| c > 0).count() as f64;
    let experts = counts.len() as f64;
    let act = bf16 * t * h as f64; // one [T, h] tensor
    let weights = bf16 * (n1 * h + h * n2) as f64; // W1 + W2 of one expert
    let fwd = act + live * weights + f32b * t + act;
    if backward {
        fwd + act + act + experts * weights + f32b * t
    } else {
        fwd
    }
}

/// One timed call: forward, and with `backward` the backward with immediate weight grads, the
/// GEMMs issued with `strategy`.
fn step(
    eng: &mut Engine,
    layer: &DeviceLayer,
    ws: &mut Workspace,
    backward: bool,
    strategy: Strategy,
) -> Result<(), GpuError> {
    layer.forward(eng, ws, strategy)?;
    if backward {
        layer.backward(eng, ws, true, strategy)?;
    }
    Ok(())
}

/// A CSV field (quoted when it holds a comma or a quote).
fn csv_field(s: &str) -> String {
    if s.contains(',') || s.contains('"') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV file named by the environment variable `var` (none when unset or empty), created
/// with its `header` line; panics naming the variable and path when it cannot be written.
fn create_csv(var: &str, header: &str) -> Option<(String, std::fs::File)> {
    std::env::var(var).ok().filter(|p| !p.is_empty()).map(|path| {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{var}: cannot create {path:?}: {e}"));
        writeln!(f, "{header}").unwrap_or_else(|e| panic!("{var}: cannot write {path:?}: {e}"));
        (path, f)
    })
}

/// The rows, printed and (with `MOE_LAYER_CSV`) appended to the CSV as they come.
struct Report {
    csv: Option<(String, std::fs::File)>,
    device: String,
    dense_tflops: Option<f64>,
    summary: Vec<String>,
}

/// One row's identity and work.
struct Row<'a> {
    shape: &'a str,
    dist: &'a str,
    class: &'a str,
    mode: &'a str,
    strategy: &'a str,
    tokens: usize,
    experts: usize,
    flops: f64,
    min_bytes: f64,
}

impl Report {
    fn new(device: &str) -> Report {
        let csv = create_csv("MOE_LAYER_CSV", CSV_HEADER);
        Report { csv, device: device.to_string(), dense_tflops: None, summary: Vec::new() }
    }

    fn csv_line(&mut self, r: &Row, ms: &str, tflops: &str) {
        if let Some((path, f)) = &mut self.csv {
            let line = format!(
                "{},{},{},{},{},{},{},{:.0},{:.0},{ms},{tflops},{}",
                csv_field(r.shape),
                csv_field(r.dist),
                csv_field(r.class),
                csv_field(r.mode),
                csv_field(r.strategy),
                r.tokens,
                r.experts,
                r.flops,
                r.min_bytes,
                csv_field(&self.device)
            );
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .unwrap_or_else(|e| panic!("MOE_LAYER_CSV: cannot write {path:?}: {e}"));
        }
    }

    fn ok(&mut self, r: &Row, secs: f64) {
        let tflops = r.flops / secs / 1e12;
        let dense = self.dense_tflops.map(|d| format!("{:>5.1}% dense", 100.0 * tflops / d)).unwrap_or_default();
        let line = format!(
            "TFLOP/s {:<9} {:<11} {:<13} {:<7} {:<11} T={:<6} median {:>9.3} ms  {:>7.1} TFLOP/s {dense}  {:>7.1} GB min  ({})",
            r.shape,
            r.dist,
            r.class,
            r.mode,
            r.strategy,
            r.tokens,
            secs * 1e3,
            tflops,
            r.min_bytes / 1e9,
            self.device
        );
        println!("{line}");
        self.summary.push(line);
        self.csv_line(r, &format!("{:.4}", secs * 1e3), &format!("{tflops:.1}"));
    }

    fn err(&mut self, r: &Row, err: &GpuError) {
        let line = format!("ERR {} {} {} {} {}: {err}", r.shape, r.dist, r.class, r.mode, r.strategy);
        println!("{line}");
        self.summary.push(line);
        self.csv_line(r, "ERR", "ERR");
    }
}

/// A (shape, distribution, class, mode) of the interleaved rounds.
struct RowId<'a> {
    shape: &'a str,
    dist: &'a str,
    class: &'a str,
    mode: &'a str,
}

/// One timed block of the interleaved rounds: (item, round, calls, seconds per call).
type Block = (usize, usize, usize, f64);

/// `rounds` rounds over `items` items (`run(eng, item, calls)` times `calls` calls of item
/// `item` and returns the seconds per call), the order reversed every other round. Each item's
/// block length is set once, from a 2-call block before the first round, to about
/// [`crate::gpu_common::BLOCK_SECS`].
fn interleaved(
    eng: &mut Engine,
    rounds: usize,
    items: usize,
    run: &mut dyn FnMut(&mut Engine, usize, usize) -> Result<f64, GpuError>,
) -> Result<Vec<Block>, GpuError> {
    let calls: Vec<usize> = (0..items).map(|i| run(eng, i, 2).map(block_calls)).collect::<Result<_, _>>()?;
    let mut blocks = Vec::with_capacity(rounds * items);
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 { (0..items).collect() } else { (0..items).rev().collect() };
        for i in order {
            blocks.push((i, r, calls[i], run(eng, i, calls[i])?));
        }
    }
    Ok(blocks)
}

/// Per strategy (item ≥ 1): median TFLOP/s, its per-round % of the same round's dense reading
/// (median, min-max) and its per-round time ratio to the first strategy (median, min-max; > 1:
/// faster than the first).
fn rounds_summary(id: &RowId, labels: &[&str], blocks: &[Block], flops: &dyn Fn(usize) -> f64) -> Vec<String> {
    let per_round = |item: usize| -> Vec<f64> {
        let mut v: Vec<(usize, f64)> = blocks.iter().filter(|b| b.0 == item).map(|b| (b.1, b.3)).collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    };
    let range = |v: &[f64]| -> (f64, f64, f64) {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(v.to_vec()), lo, hi)
    };
    let dense = per_round(0);
    let first = per_round(1);
    let mut out = Vec::new();
    let (dm, dlo, dhi) = range(&dense.iter().map(|s| flops(0) / s / 1e12).collect::<Vec<_>>());
    out.push(format!(
        "ROUNDS {} {} {} {} dense: {dm:.1} TFLOP/s (rounds {}, {dlo:.1}-{dhi:.1})",
        id.shape,
        id.dist,
        id.class,
        id.mode,
        dense.len()
    ));
    for (item, label) in labels.iter().enumerate().skip(1) {
        let t = per_round(item);
        let (tm, _, _) = range(&t.iter().map(|s| flops(item) / s / 1e12).collect::<Vec<_>>());
        let pct: Vec<f64> = t.iter().zip(&dense).map(|(s, d)| 100.0 * (flops(item) / s) / (flops(0) / d)).collect();
        let (pm, plo, phi) = range(&pct);
        let ratio: Vec<f64> = first.iter().zip(&t).map(|(f, s)| f / s).collect();
        let (rm, rlo, rhi) = range(&ratio);
        out.push(format!(
            "ROUNDS {} {} {} {} {label}: {tm:.1} TFLOP/s, {pm:.1}% of interleaved dense ({plo:.1}-{phi:.1}), \
             x{rm:.3} vs {} ({rlo:.3}-{rhi:.3})",
            id.shape, id.dist, id.class, id.mode, labels[1]
        ));
    }
    out
}

/// `MOE_LAYER_ROUNDS_CSV`: every block of the interleaved rounds.
struct RoundsCsv(Option<(String, std::fs::File)>);

impl RoundsCsv {
    const HEADER: &'static str = "shape,dist,class,mode,item,round,calls,ms,tflops,device";

    fn open() -> RoundsCsv {
        RoundsCsv(create_csv("MOE_LAYER_ROUNDS_CSV", Self::HEADER))
    }

    fn write(&mut self, id: &RowId, labels: &[&str], blocks: &[Block], flops: &dyn Fn(usize) -> f64, device: &str) {
        let Some((path, f)) = &mut self.0 else { return };
        for &(item, round, calls, secs) in blocks {
            writeln!(
                f,
                "{},{},{},{},{},{round},{calls},{:.4},{:.1},{}",
                csv_field(id.shape),
                csv_field(id.dist),
                csv_field(id.class),
                csv_field(id.mode),
                csv_field(labels[item]),
                secs * 1e3,
                flops(item) / secs / 1e12,
                csv_field(device)
            )
            .and_then(|()| f.flush())
            .unwrap_or_else(|e| panic!("MOE_LAYER_ROUNDS_CSV: cannot write {path:?}: {e}"));
        }
    }
}

/// The bench entry point (registered in `benches/main.rs`).
pub fn bench(c: &mut Criterion) {
    if !crate::selected(&[PREFIX]) {
        return;
    }
    // Parse the environment before touching the GPU: a typo fails at once.
    let strategies = strategies();
    let classes = classes();
    let modes = modes();
    let shapes = env_list("MOE_LAYER_SHAPES");
    let rounds: usize = std::env::var("MOE_LAYER_ROUNDS").ok().filter(|v| !v.trim().is_empty()).map_or(0, |v| {
        v.trim().parse().unwrap_or_else(|_| panic!("MOE_LAYER_ROUNDS={v:?}: expected a count of rounds (0 = off)"))
    });
    let mut rounds_csv = RoundsCsv::open();
    let counts = counts();
    let Some(gpu) = moe_gpu::gpu_or_skip("bench gpu_layer") else {
        return;
    };
    let mut guard = gpu.lock().expect("the engine");
    let eng: &mut Engine = &mut guard;
    let device = eng.device_name().to_string();
    println!(
        "gpu_layer on {device} ({}); strategies {:?}; classes {:?}",
        eng.arch(),
        strategies.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        classes.iter().map(|&c| class_name(c)).collect::<Vec<_>>()
    );
    let mut report = Report::new(&device);

    // The dense reference, measured before the layers and again after them: the card's
    // sustained clock drifts over a long run, so the table divides by the higher of the two.
    let measure_dense = |c: &mut Criterion, eng: &mut Engine, report: &mut Report, mode: &str| {
        let chunk = random_chunk(eng);
        if let Some((secs, fl)) = dense_gemm(c, eng, &chunk, &format!("{PREFIX}/dense/{mode}"), SamplingMode::Flat) {
            let n = DENSE_N;
            let row = Row {
                shape: "dense",
                dist: "-",
                class: "-",
                mode,
                strategy: "cublas",
                tokens: n,
                experts: 0,
                flops: fl,
                min_bytes: 3.0 * 2.0 * (n * n) as f64,
            };
            report.ok(&row, secs);
            let tflops = fl / secs / 1e12;
            report.dense_tflops = Some(report.dense_tflops.map_or(tflops, |d| d.max(tflops)));
        }
    };
    measure_dense(c, eng, &mut report, "gemm8192");
    let interleave_dense = (rounds > 0).then(|| {
        let chunk = random_chunk(eng);
        DenseGemm::new(eng, &chunk)
    });

    let mut first = true;
    for sh in &counts.shapes {
        if shapes.as_ref().is_some_and(|s| !s.contains(&sh.name)) {
            continue;
        }
        // The dense rate again right before each later shape, so that every shape's rows are
        // bracketed by two dense readings taken in the same thermal state (layer_table.py's
        // "% adjacent dense").
        if !first {
            measure_dense(c, eng, &mut report, &format!("gemm8192_before_{}", sh.name));
        }
        first = false;
        let model = ModelShape::parse(&sh.name).expect("the registry's own shape");
        for &class in &classes {
            let cname = class_name(class);
            let cfg = model.config(class);
            let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
            let layer = DeviceLayer::random(eng, &cfg, 7)
                .unwrap_or_else(|e| panic!("gpu_layer {} {cname}: DeviceLayer::random failed: {e}", sh.name));
            for (dist, cnt) in &sh.dists {
                let ctx = format!("gpu_layer {} {dist} {cname}", sh.name);
                let mut ws = layer
                    .workspace(eng, cnt, false)
                    .unwrap_or_else(|e| panic!("{ctx}: DeviceLayer::workspace failed: {e}"));
                ws.random_inputs(eng, 9)
                    .and_then(|()| eng.synchronize())
                    .unwrap_or_else(|e| panic!("{ctx}: Workspace::random_inputs failed: {e}"));
                for &backward in &modes {
                    let mode = if backward { "fwdbwd" } else { "fwd" };
                    for (label, strategy) in &strategies {
                        let row = Row {
                            shape: &sh.name,
                            dist,
                            class: cname,
                            mode,
                            strategy: label,
                            tokens: sh.rows,
                            experts: sh.experts,
                            flops: layer_flops(sh.rows, h, n1, n2, backward),
                            min_bytes: layer_min_bytes(cnt, h, n1, n2, backward),
                        };
                        let strategy = *strategy;
                        // Untimed first call: compiles/warms, and a failing strategy is
                        // reported without stopping the other rows.
                        let pre = step(eng, &layer, &mut ws, backward, strategy).and_then(|()| eng.synchronize());
                        if let Err(err) = pre {
                            report.err(&row, &err);
                            continue;
                        }
                        let group = format!("{PREFIX}/{}/{dist}/{cname}", sh.name);
                        let id = format!("{mode}/{label}");
                        let secs = time(c, eng, &group, &id, SamplingMode::Flat, |en| {
                            step(en, &layer, &mut ws, backward, strategy)
                                .unwrap_or_else(|e| panic!("{ctx} {mode} {label}: timed call failed: {e}"))
                        });
                        if let Some(secs) = secs {
                            report.ok(&row, secs);
                        }
                    }
                    if let Some(dense) = &interleave_dense {
                        let flops = layer_flops(sh.rows, h, n1, n2, backward);
                        let id = RowId { shape: &sh.name, dist, class: cname, mode };
                        let mut run_item = |eng: &mut Engine, item: usize, calls: usize| -> Result<f64, GpuError> {
                            if item == 0 {
                                return Ok(timed_block(eng, calls, |e| dense.run(e)));
                            }
                            let strategy = strategies[item - 1].1;
                            step(eng, &layer, &mut ws, backward, strategy)?;
                            let mut failed = None;
                            let secs = timed_block(eng, calls, |e| {
                                if let Err(err) = step(e, &layer, &mut ws, backward, strategy) {
                                    failed.get_or_insert(err);
                                }
                            });
                            failed.map_or(Ok(secs), Err)
                        };
                        match interleaved(eng, rounds, 1 + strategies.len(), &mut run_item) {
                            Ok(blocks) => {
                                let labels: Vec<&str> =
                                    std::iter::once("dense").chain(strategies.iter().map(|s| s.0.as_str())).collect();
                                let item_flops = |item: usize| if item == 0 { dense.flops() } else { flops };
                                rounds_csv.write(&id, &labels, &blocks, &item_flops, &device);
                                for line in rounds_summary(&id, &labels, &blocks, &item_flops) {
                                    println!("{line}");
                                    report.summary.push(line);
                                }
                            }
                            Err(err) => {
                                let line = format!("ERR ROUNDS {} {dist} {cname} {mode}: {err}", sh.name);
                                println!("{line}");
                                report.summary.push(line);
                            }
                        }
                    }
                }
                drop(ws);
                eng.synchronize().unwrap_or_else(|e| panic!("{ctx}: synchronize failed: {e}"));
            }
        }
    }
    measure_dense(c, eng, &mut report, "gemm8192_end");
    println!("\n== GPU layer bench summary (median of {SAMPLES} criterion samples per row)");
    for l in &report.summary {
        println!("{l}");
    }
    if let Some((path, _)) = &report.csv {
        println!("CSV: {path}");
    }
}
