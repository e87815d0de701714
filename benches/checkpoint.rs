//! Checkpoint save and load throughput against a plain copy of the same bytes.
//!
//! The case is one DeepSeek-V3 expert-parallel slice: 32 experts of h = 7168, f = 2048 with
//! SwiGLU (3 matrices of 7168 x 2048 each), bf16, as a TEGroupedMLP rank (tp = ep = 1), about
//! 2.8 GB. `MOE_CKPT_BENCH_EXPERTS` scales the number of experts (e.g. 4 for a quick run).
//!
//! * `save`: [`save`] into a fresh directory (CRC-32, write, fsync, rename) vs `copy_write`:
//!   one `File::write_all` of the same bytes plus `sync_all`.
//! * `load`: [`Checkpoint::open`] + [`Checkpoint::load`] into the same layout (CRC-checked)
//!   vs `copy_read`: `std::fs::read` of the copy's file. Both read from the page cache when it
//!   holds the files, which it does on a machine with room for them.

use criterion::{BenchmarkId, Criterion, Throughput};
use moe_checkpoint::{save, Checkpoint, ExpertLayout, RankCoord, RawStateDict, RawTensor, SaveOptions, SavePart};
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism};
use std::io::Write;
use std::time::{Duration, Instant};

fn experts() -> usize {
    std::env::var("MOE_CKPT_BENCH_EXPERTS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

fn state(l: &ExpertLayout) -> RawStateDict {
    let mut sd = RawStateDict::new();
    let mut fill = 0u8;
    for e in 0..l.local_experts() {
        for (name, shape) in [
            (format!("linear_fc1.weight{e}"), vec![2 * l.config.ffn_hidden_size, l.config.hidden_size]),
            (format!("linear_fc2.weight{e}"), vec![l.config.hidden_size, l.config.ffn_hidden_size]),
        ] {
            let mut t = RawTensor::zeros(Dtype::Bf16, shape);
            for (i, b) in t.data.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(fill);
            }
            fill = fill.wrapping_add(7);
            sd.insert(name, t);
        }
    }
    sd
}

/// Registers the checkpoint benchmarks.
pub fn checkpoint(c: &mut Criterion) {
    if !crate::selected(&["checkpoint"]) {
        return;
    }
    let l = ExpertLayout {
        prefix: "decoder.layers.3.mlp.".into(),
        ..ExpertLayout::new(LayerConfig {
            class: LayerClass::TeGrouped,
            num_experts: experts(),
            hidden_size: 7168,
            ffn_hidden_size: 2048,
            gated_linear_unit: true,
            add_bias: false,
            parallel: Parallelism::SINGLE,
            ..LayerConfig::example()
        })
    };
    let sd = state(&l);
    let bytes: u64 = sd.values().map(|t| t.data.len() as u64).sum();
    let base = std::env::var("MOE_CKPT_BENCH_DIR").unwrap_or_else(|_| "target".into());
    std::fs::create_dir_all(&base).unwrap_or_else(|e| panic!("bench temp dir {base}: {e}"));
    let tmp = tempfile::tempdir_in(&base).unwrap_or_else(|e| panic!("bench temp dir in {base}: {e}"));
    let dir = tmp.path().join("ckpt");
    let copy = tmp.path().join("copy.bin");
    let parts = [SavePart { layout: &l, rank: RankCoord::new(0, 0), state: &sd }];
    let label = format!("{}x7168x2048x3_bf16", l.config.num_experts);

    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(BenchmarkId::new("copy_write", &label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&copy);
                let start = Instant::now();
                let mut f = std::fs::File::create(&copy).unwrap();
                for t in sd.values() {
                    f.write_all(&t.data).unwrap();
                }
                f.sync_all().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("save", &label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_dir_all(&dir);
                let start = Instant::now();
                save(&dir, &parts, &SaveOptions::default()).unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("copy_read", &label), |b| b.iter(|| std::fs::read(&copy).unwrap()));
    let request = [(l.clone(), RankCoord::new(0, 0))];
    g.bench_function(BenchmarkId::new("load", &label), |b| {
        b.iter(|| {
            let ck = Checkpoint::open(&dir).unwrap();
            ck.load(&request, Some(Dtype::Bf16)).unwrap()
        })
    });
    g.finish();
}
