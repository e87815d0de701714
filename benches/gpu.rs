//! GPU benches: forward and forward+backward of each CUDA class at the four model shapes
//! (moe_gpu::sampled::SHAPES: GLU silu, bf16, skewed token split with two empty experts).
//!
//! Device-resident: weights and inputs are generated on the device, kernels compiled and
//! buffers allocated before the timed region; each timed region is synchronized on both
//! ends (`Engine::synchronize`), so no PCIe copy is timed. FLOPs counted: forward
//! `2·T·h·(N1 + N2)`, backward twice that (dgrad + wgrad); elementwise work not counted.
//! After criterion's samples each case prints one `TFLOP/s` line from a median of 10 timed
//! calls. Registered only when a GPU is found (prints why not otherwise).

use criterion::{BenchmarkId, Criterion, Throughput};
use moe_gpu::grouped::Strategy;
use moe_gpu::kernels::engine;
use moe_gpu::sampled::{shape_config, skewed_counts, SHAPES};
use moe_reference::LayerClass;
use std::time::{Duration, Instant};

fn flops_forward(h: usize, n1: usize, n2: usize, t: usize) -> f64 {
    2.0 * t as f64 * h as f64 * (n1 + n2) as f64
}

/// One bench case: `backward` false = forward only, true = forward + backward.
fn bench_gpu(c: &mut Criterion) {
    let mut eng = match engine() {
        Ok(e) => e,
        Err(e) => {
            println!("SKIP gpu benches: {e}");
            return;
        }
    };
    let device = eng.device_name().to_string();
    let mut summary = Vec::new();
    for shape in SHAPES {
        let mut group = c.benchmark_group(format!("gpu/{}", shape.name));
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        group.throughput(Throughput::Elements(shape.tokens as u64));
        // Every class with the default strategy, and TEGroupedMLP with the per-expert loop.
        let variants = [
            (LayerClass::Sequential, Strategy::Auto),
            (LayerClass::Grouped, Strategy::Auto),
            (LayerClass::TeGrouped, Strategy::Auto),
            (LayerClass::TeGrouped, Strategy::Loop),
        ];
        for (class, strategy) in variants {
            eng.set_gemm_strategy(strategy);
            let cfg = shape_config(&shape, class);
            let counts: Vec<usize> =
                skewed_counts(shape.tokens, shape.experts, 42).iter().map(|&c| c as usize).collect();
            let w = eng.prepare_random(&cfg, 7).expect("weights");
            let mut ws = eng.workspace(&cfg, &counts, false).expect("workspace");
            eng.random_inputs(&cfg, &mut ws, 9).expect("inputs");
            eng.synchronize().expect("sync");
            let name = match (class, strategy) {
                (LayerClass::Sequential, _) => "cuda-sequential",
                (LayerClass::Grouped, _) => "cuda-grouped",
                (LayerClass::TeGrouped, Strategy::Auto) => "cuda-te-grouped",
                (LayerClass::TeGrouped, _) => "cuda-te-grouped-loop",
            };
            let fwd_flops = flops_forward(cfg.hidden_size, cfg.n1(), cfg.n2(), shape.tokens);
            for backward in [false, true] {
                let mode = if backward { "fwd+bwd" } else { "fwd" };
                let mut step = |eng: &mut moe_gpu::kernels::Engine| {
                    eng.forward(&cfg, &w, &mut ws).expect("forward");
                    if backward {
                        eng.backward(&cfg, &w, &mut ws, true).expect("backward");
                    }
                };
                step(&mut eng);
                eng.synchronize().expect("sync");
                group.bench_function(BenchmarkId::new(name, mode), |b| {
                    b.iter_custom(|iters| {
                        eng.synchronize().expect("sync");
                        let t0 = Instant::now();
                        for _ in 0..iters {
                            step(&mut eng);
                        }
                        eng.synchronize().expect("sync");
                        t0.elapsed()
                    })
                });
                let mut times: Vec<f64> = (0..10)
                    .map(|_| {
                        eng.synchronize().expect("sync");
                        let t0 = Instant::now();
                        step(&mut eng);
                        eng.synchronize().expect("sync");
                        t0.elapsed().as_secs_f64()
                    })
                    .collect();
                times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let med = times[times.len() / 2];
                let flops = if backward { 3.0 * fwd_flops } else { fwd_flops };
                let line = format!(
                    "TFLOP/s {:<14} {:<16} {:<8} T={:<6} median {:>9.3} ms  {:>7.1} TFLOP/s  ({device})",
                    shape.name,
                    name,
                    mode,
                    shape.tokens,
                    med * 1e3,
                    flops / med / 1e12
                );
                println!("{line}");
                summary.push(line);
            }
        }
        group.finish();
    }
    eng.set_gemm_strategy(Strategy::Auto);
    println!("\n== GPU bench summary");
    for l in summary {
        println!("{l}");
    }
}

criterion::criterion_group!(benches, bench_gpu);
