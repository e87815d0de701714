//! Per expert layer: forward and forward+backward of the CUDA expert layers at the model
//! shapes, with each GEMM strategy, against the card's dense rate (`moe-verify bench layer`).
//!
//! **Rows**: shape × distribution × class × mode × strategy, each chosen by [`LayerBench`]
//! (the command line's flags).
//! * Shapes and token distributions: the shape registry ([`moe_harness::shapes`]: Mixtral 8x7B,
//!   the DeepSeek-V3 EP slice of 32 experts, Qwen3-30B-A3B, GPT-OSS-120B; `uniform` and a Zipf
//!   split with empty experts), which `scripts/torch_experts_bench.py` reads as
//!   `scripts/shapes.json`, so both time the same problems. Each shape's layer configuration is
//!   [`ModelShape::config`]: GLU silu, bf16 weights and activations, fp32 probs, no bias, no
//!   padding. `--shape` keeps some (default all).
//! * Classes: `GroupedMLP` (weights `[E, in, out]`) and `TEGroupedMLP` (`[E, out, in]`) by
//!   default; `--class sequential,grouped,te_grouped` adds `SequentialMLP`.
//! * Modes: `fwd` = [`DeviceLayer::forward`]; `fwdbwd` = forward + [`DeviceLayer::backward`]
//!   with immediate weight gradients (dx, dprobs, dW1, dW2). `--mode` (default both).
//! * Strategies: `--strategy` (default `auto,loop`), labels of [`Strategy::parse`]; every set of
//!   per-expert GEMMs of the layer is issued with it.
//! * fp8 (`--fp8 RECIPE`, default none): one more row per (shape, distribution, class, mode,
//!   strategy), strategy column `fp8-<recipe>` (`auto`) or `fp8-<recipe>/<strategy>`: the same
//!   layer with `LayerConfig::fp8` set (the recipe's
//!   TE defaults; each expert's rows padded to the recipe's alignment; quantization kernels and
//!   fp8 GEMMs issued as the strategy says, `moe_gpu::fp8`), timed in the same call as the bf16 rows
//!   and with the same FLOPs (padding rows not counted). Not for GroupedMLP (no fp8 path), not
//!   in the interleaved rounds.
//!   With `--fp8`, the dense fp8 rate is measured too (`dense/fp8gemm8192`: one 8192³ e4m3
//!   cuBLASLt GEMM, bf16 out, after the bf16 dense row).
//! * Which rows criterion times: [`Selection`] (`--filter REGEX`, `--untimed`). With none timed
//!   each kept row still makes its one untimed call (and its interleaved rounds, below): that
//!   is how `scripts/gpu-device.sh`'s `profile` step gets one call per row under `ncu`, and how
//!   the rounds run alone.
//!
//! **Timing**: device-resident. Weights ([`DeviceLayer::random`], `U(-1, 1)/√fan_in`) and
//! inputs ([`Workspace::random_inputs`]: x and the upstream grad `U(-1, 1)`, probs
//! `U(0.05, 1)`) are generated on the device; kernels compiled, buffers allocated and one
//! untimed call made (which also surfaces errors: a failing strategy gets an `ERR` line and
//! row, the rest goes on) before criterion's warm-up. Criterion, flat sampling: 10 samples of
//! the same number of back-to-back calls (about 30 ms of them), the engine's stream
//! synchronized before the clock starts and after each sample's last call; the reported time is
//! the median per-call time of the 10 samples. Ids: `gpu_layer/<shape>/<dist>/<class>/<mode>/
//! <strategy>`, and `gpu_layer/dense/gemm8192` (before the layers),
//! `gpu_layer/dense/gemm8192_end` (after).
//!
//! **Dense reference**: one 8192³ bf16 [`moe_gpu::Engine::gemm`] (cuBLAS, f32 accumulation) on
//! random data, same process, same timing, measured before the first shape (`gemm8192`), before
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
//! **Interleaved rounds** (`--rounds R`, default 0 = off): after a (shape, distribution, class,
//! mode)'s criterion rows, `R` rounds that each time one block of about 20 ms of back-to-back
//! calls of the dense 8192³ GEMM and of every strategy (host clock between two stream
//! synchronizations; the order reversed every other round), so every strategy's reading has a
//! dense reading taken within tens of milliseconds of it, in the same thermal state, and
//! strategies are compared round by round rather than minutes apart. One `ROUNDS` line per
//! strategy (median TFLOP/s, median and range of its per-round % of dense, median and range of
//! its per-round time ratio to the first strategy); with `--rounds-csv PATH` every block goes
//! to a CSV (header `shape,dist,class,mode,item,round,calls,ms,tflops,device`; `item` =
//! `dense` or a strategy label) that `scripts/rounds_table.py` summarizes.
//!
//! **Output**: one `TFLOP/s` line per row as it finishes and a summary at the end; with
//! `--csv PATH`, a CSV (header `shape,dist,class,mode,strategy,tokens,experts,flops,min_bytes,
//! median_ms,tflops,device`; a `dense` row first; rows appended as they finish; `ERR` in
//! `median_ms` and `tflops` for a strategy that failed) that `scripts/layer_table.py` joins
//! with `scripts/torch_experts_bench.py`'s.

mod report;
mod rounds;

use crate::timing::{criterion, dense_gemm, random_chunk, time, timed_block, DenseGemm, Selection, DENSE_N, SAMPLES};
use criterion::{Criterion, SamplingMode};
use moe_gpu::layer::{DeviceLayer, Workspace};
use moe_gpu::{Engine, GpuError, Strategy};
use moe_harness::shapes::ModelShape;
use moe_reference::{Fp8Config, LayerClass, LayerConfig};
use report::{Report, RoundsCsv, Row, RowId};
use rounds::{interleaved, rounds_summary};
use std::path::PathBuf;

/// Criterion group prefix of this bench.
const PREFIX: &str = "gpu_layer";

/// What a layer call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The forward pass.
    Fwd,
    /// Forward, then backward with immediate weight gradients.
    Fwdbwd,
}

impl Mode {
    /// Both modes, forward first.
    pub const ALL: [Mode; 2] = [Mode::Fwd, Mode::Fwdbwd];

    /// The `mode` column (`fwd`, `fwdbwd`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fwd => "fwd",
            Mode::Fwdbwd => "fwdbwd",
        }
    }
}

/// The rows and outputs of one layer bench run (module doc).
#[derive(Clone, Debug)]
pub struct LayerBench {
    /// Shapes, in this order.
    pub shapes: Vec<ModelShape>,
    /// Classes.
    pub classes: Vec<LayerClass>,
    /// Modes.
    pub modes: Vec<Mode>,
    /// GEMM strategies (duplicates are dropped).
    pub strategies: Vec<Strategy>,
    /// Interleaved rounds per (shape, distribution, class, mode); 0 = none.
    pub rounds: usize,
    /// The rows' CSV.
    pub csv: Option<PathBuf>,
    /// The interleaved rounds' CSV.
    pub rounds_csv: Option<PathBuf>,
    /// Which rows criterion times.
    pub selection: Selection,
    /// An fp8 row per (shape, distribution, class, mode) with this configuration (module doc).
    pub fp8: Option<Fp8Config>,
}

impl Default for LayerBench {
    /// Every shape, GroupedMLP and TEGroupedMLP, both modes, `auto` and `loop`, no rounds, no
    /// CSV, every row timed.
    fn default() -> Self {
        LayerBench {
            shapes: ModelShape::ALL.to_vec(),
            classes: vec![LayerClass::Grouped, LayerClass::TeGrouped],
            modes: vec![Mode::Fwd, Mode::Fwdbwd],
            strategies: vec![Strategy::Auto, Strategy::Loop],
            rounds: 0,
            csv: None,
            rounds_csv: None,
            selection: Selection::All,
            fp8: None,
        }
    }
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

/// The dense fp8 rate beside the layers' fp8 rows: one 8192³ e4m3 × e4m3 cuBLASLt GEMM (per-tensor
/// scales, fast accumulation as TE's fprop, bf16 output) on quantized random data, row
/// `dense/fp8gemm8192`.
fn measure_dense_fp8(c: &mut Criterion, eng: &mut Engine, report: &mut Report) {
    use moe_gpu::fp8::{DeviceScales, QuantSpec};
    use moe_reference::fp8::{Fp8Format, ScaleOptions, Usage};
    let n = DENSE_N;
    let chunk = random_chunk(eng);
    let mut src = eng.alloc(n * n * 2).expect("alloc for the dense fp8 GEMM");
    crate::timing::fill(eng, &mut src, &chunk);
    let spec = QuantSpec::Current { format: Fp8Format::E4M3, options: ScaleOptions::CURRENT_SCALING_DEFAULT };
    let q = eng
        .quantize(spec, &src, moe_reference::Dtype::Bf16, (n, n), Usage::ROWWISE)
        .expect("quantize for the dense fp8 GEMM");
    let a = q.rowwise.expect("rowwise copy");
    let out = eng.alloc(n * n * 2).expect("alloc for the dense fp8 GEMM");
    let DeviceScales::PerTensor(s) = &a.scales else { panic!("per-tensor scales expected") };
    let op = (a.codes.at(0), Fp8Format::E4M3, s.at(0));
    let run = |e: &mut Engine| {
        e.fp8_gemm((n, n, n), op, op, out.at(0), moe_reference::Dtype::Bf16, 0.0, true).expect("dense fp8 GEMM")
    };
    let secs = time(c, eng, &format!("{PREFIX}/dense/fp8gemm8192"), "fp8gemm8192", SamplingMode::Flat, run);
    if let Some(secs) = secs {
        let fl = 2.0 * (n as f64).powi(3);
        let row = Row {
            shape: "dense",
            dist: "-",
            class: "-",
            mode: "fp8gemm8192",
            strategy: "cublaslt-fp8",
            tokens: n,
            experts: 0,
            flops: fl,
            min_bytes: 2.0 * (n * n) as f64 + 2.0 * (n * n) as f64,
        };
        report.ok(&row, secs);
    }
}

/// Runs the layer bench `bench` on `eng` (module doc). `Err` when a CSV cannot be created.
pub fn run(eng: &mut Engine, bench: &LayerBench) -> Result<(), String> {
    let mut strategies: Vec<(String, Strategy)> = Vec::new();
    for &s in &bench.strategies {
        if !strategies.iter().any(|(_, t)| *t == s) {
            strategies.push((s.label(), s));
        }
    }
    let (classes, rounds) = (&bench.classes, bench.rounds);
    let modes: Vec<bool> = bench.modes.iter().map(|&m| m == Mode::Fwdbwd).collect();
    let mut rounds_csv = RoundsCsv::open(bench.rounds_csv.as_deref())?;
    let c = &mut criterion(&bench.selection);
    let device = eng.device_name().to_string();
    println!(
        "gpu_layer on {device} ({}); strategies {:?}; classes {:?}",
        eng.arch(),
        strategies.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        classes.iter().map(|&c| class_name(c)).collect::<Vec<_>>()
    );
    let mut report = Report::new(&device, bench.csv.as_deref())?;

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
    if bench.fp8.is_some() {
        measure_dense_fp8(c, eng, &mut report);
    }
    let interleave_dense = (rounds > 0).then(|| {
        let chunk = random_chunk(eng);
        DenseGemm::new(eng, &chunk)
    });

    for (si, &model) in bench.shapes.iter().enumerate() {
        let (name, dims, dists) = (model.name(), model.dims(), model.bench_distributions());
        // The dense rate again right before each later shape, so that every shape's rows are
        // bracketed by two dense readings taken in the same thermal state (layer_table.py's
        // "% adjacent dense").
        if si > 0 {
            measure_dense(c, eng, &mut report, &format!("gemm8192_before_{name}"));
        }
        for &class in classes {
            let cname = class_name(class);
            let cfg = model.config(class);
            let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
            let layer = DeviceLayer::random(eng, &cfg, 7)
                .unwrap_or_else(|e| panic!("gpu_layer {} {cname}: DeviceLayer::random failed: {e}", name));
            let fp8_cfg =
                bench.fp8.filter(|_| class != LayerClass::Grouped).map(|f| LayerConfig { fp8: Some(f), ..cfg.clone() });
            let fp8_layer = fp8_cfg.as_ref().map(|c| {
                DeviceLayer::random(eng, c, 7)
                    .unwrap_or_else(|e| panic!("gpu_layer {} {cname} fp8: DeviceLayer::random failed: {e}", name))
            });
            let fp8_label = bench.fp8.map(|f| format!("fp8-{}", f.recipe)).unwrap_or_default();
            // One fp8 row per strategy: `fp8-<recipe>` for auto, `fp8-<recipe>/<strategy>` else.
            let fp8_strategies: Vec<(String, Strategy)> = strategies
                .iter()
                .map(|(l, s)| (if *s == Strategy::Auto { fp8_label.clone() } else { format!("{fp8_label}/{l}") }, *s))
                .collect();
            for (dist, cnt) in &dists {
                let ctx = format!("gpu_layer {} {dist} {cname}", name);
                let mut ws = layer
                    .workspace(eng, cnt, false)
                    .unwrap_or_else(|e| panic!("{ctx}: DeviceLayer::workspace failed: {e}"));
                ws.random_inputs(eng, 9)
                    .and_then(|()| eng.synchronize())
                    .unwrap_or_else(|e| panic!("{ctx}: Workspace::random_inputs failed: {e}"));
                let mut fp8_ws = fp8_layer.as_ref().map(|l| {
                    let mut w =
                        l.workspace(eng, cnt, false).unwrap_or_else(|e| panic!("{ctx} fp8: workspace failed: {e}"));
                    w.random_inputs(eng, 9)
                        .and_then(|()| eng.synchronize())
                        .unwrap_or_else(|e| panic!("{ctx} fp8: Workspace::random_inputs failed: {e}"));
                    w
                });
                for &backward in &modes {
                    let mode = if backward { "fwdbwd" } else { "fwd" };
                    for (label, strategy) in &strategies {
                        let row = Row {
                            shape: name,
                            dist,
                            class: cname,
                            mode,
                            strategy: label,
                            tokens: dims.tokens,
                            experts: dims.experts,
                            flops: layer_flops(dims.tokens, h, n1, n2, backward),
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
                        let group = format!("{PREFIX}/{}/{dist}/{cname}", name);
                        let id = format!("{mode}/{label}");
                        let secs = time(c, eng, &group, &id, SamplingMode::Flat, |en| {
                            step(en, &layer, &mut ws, backward, strategy)
                                .unwrap_or_else(|e| panic!("{ctx} {mode} {label}: timed call failed: {e}"))
                        });
                        if let Some(secs) = secs {
                            report.ok(&row, secs);
                        }
                    }
                    if let (Some(fl), Some(fws)) = (&fp8_layer, fp8_ws.as_mut()) {
                        for (fp8_label, strategy) in &fp8_strategies {
                            let strategy = *strategy;
                            let row = Row {
                                shape: name,
                                dist,
                                class: cname,
                                mode,
                                strategy: fp8_label,
                                tokens: dims.tokens,
                                experts: dims.experts,
                                flops: layer_flops(dims.tokens, h, n1, n2, backward),
                                min_bytes: layer_min_bytes(cnt, h, n1, n2, backward),
                            };
                            let pre = step(eng, fl, fws, backward, strategy).and_then(|()| eng.synchronize());
                            match pre {
                                Err(err) => report.err(&row, &err),
                                Ok(()) => {
                                    let group = format!("{PREFIX}/{}/{dist}/{cname}", name);
                                    let id = format!("{mode}/{fp8_label}");
                                    let secs = time(c, eng, &group, &id, SamplingMode::Flat, |en| {
                                        step(en, fl, fws, backward, strategy).unwrap_or_else(|e| {
                                            panic!("{ctx} {mode} {fp8_label}: timed call failed: {e}")
                                        })
                                    });
                                    if let Some(secs) = secs {
                                        report.ok(&row, secs);
                                    }
                                }
                            }
                        }
                    }
                    if let Some(dense) = &interleave_dense {
                        let flops = layer_flops(dims.tokens, h, n1, n2, backward);
                        let id = RowId { shape: name, dist, class: cname, mode };
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
                                let line = format!("ERR ROUNDS {} {dist} {cname} {mode}: {err}", name);
                                println!("{line}");
                                report.summary.push(line);
                            }
                        }
                    }
                }
                drop(ws);
                drop(fp8_ws);
                eng.synchronize().unwrap_or_else(|e| panic!("{ctx}: synchronize failed: {e}"));
            }
        }
    }
    measure_dense(c, eng, &mut report, "gemm8192_end");
    c.final_summary();
    println!("\n== GPU layer bench summary (median of {SAMPLES} criterion samples per row)");
    for l in &report.summary {
        println!("{l}");
    }
    if let Some((path, _)) = &report.csv {
        println!("CSV: {}", path.display());
    }
    Ok(())
}
