//! Checkpoint save and load throughput against a plain copy of the same bytes.
//!
//! The case is one DeepSeek-V3 expert-parallel slice: 32 experts of h = 7168, f = 2048 with
//! SwiGLU (3 matrices of 7168 x 2048 each), bf16, as a TEGroupedMLP rank (tp = ep = 1), about
//! 2.8 GB, and the same with 4 experts for a quick run: the ids name the expert count
//! (`checkpoint/save/32x7168x2048x3_bf16`), so criterion's filter picks one
//! (`cargo bench --bench main -- checkpoint/.*/4x`). Files go to cargo's temporary directory for
//! benches (`target/tmp`); a size's state and files are made only when one of its ids runs.
//!
//! * `save`: [`save`] into a fresh directory (CRC-32, write, fsync, rename) vs `copy_write`:
//!   one `File::write_all` of the same bytes plus `sync_all`.
//! * `load`: [`Checkpoint::open`] + [`Checkpoint::load`] into the same layout (CRC-checked)
//!   vs `copy_read`: `std::fs::read` of the copy's file. Both read from the page cache when it
//!   holds the files, which it does on a machine with room for them.

use criterion::{BenchmarkId, Criterion, Throughput};
use moe_checkpoint::{save, Checkpoint, ExpertLayout, RankCoord, RawStateDict, RawTensor, SaveOptions, SavePart};
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism};
use std::cell::OnceCell;
use std::io::Write;
use std::time::{Duration, Instant};

/// The expert counts benchmarked: the full DeepSeek-V3 slice and a quick one.
const EXPERTS: [usize; 2] = [32, 4];

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

/// One size's state dict and its files, in a temporary directory under cargo's `target/tmp`.
struct Setup {
    layout: ExpertLayout,
    state: RawStateDict,
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    copy: std::path::PathBuf,
}

impl Setup {
    fn new(experts: usize) -> Setup {
        let layout = ExpertLayout {
            prefix: "decoder.layers.3.mlp.".into(),
            ..ExpertLayout::new(LayerConfig {
                class: LayerClass::TeGrouped,
                num_experts: experts,
                hidden_size: 7168,
                ffn_hidden_size: 2048,
                gated_linear_unit: true,
                add_bias: false,
                parallel: Parallelism::SINGLE,
                ..LayerConfig::example()
            })
        };
        let state = state(&layout);
        let base = env!("CARGO_TARGET_TMPDIR");
        std::fs::create_dir_all(base).unwrap_or_else(|e| panic!("bench temp dir {base}: {e}"));
        let tmp = tempfile::tempdir_in(base).unwrap_or_else(|e| panic!("bench temp dir in {base}: {e}"));
        let (dir, copy) = (tmp.path().join("ckpt"), tmp.path().join("copy.bin"));
        Setup { layout, state, _tmp: tmp, dir, copy }
    }

    fn parts(&self) -> [SavePart<'_>; 1] {
        [SavePart { layout: &self.layout, rank: RankCoord::new(0, 0), state: &self.state }]
    }

    /// The plain copy of the bytes (written and synced).
    fn write_copy(&self) {
        let _ = std::fs::remove_file(&self.copy);
        let mut f = std::fs::File::create(&self.copy).unwrap();
        for t in self.state.values() {
            f.write_all(&t.data).unwrap();
        }
        f.sync_all().unwrap();
    }

    /// The checkpoint.
    fn save(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        save(&self.dir, &self.parts(), &SaveOptions::default()).unwrap();
    }
}

/// Registers the checkpoint benchmarks, for each of [`EXPERTS`].
pub fn checkpoint(c: &mut Criterion) {
    for experts in EXPERTS {
        // fc1 [2f, h] and fc2 [h, f] per expert, bf16.
        let bytes = (experts * 3 * 7168 * 2048 * 2) as u64;
        let label = format!("{experts}x7168x2048x3_bf16");
        // Made on first use: criterion calls the closures of the ids its filter keeps only.
        let setup = OnceCell::new();
        let setup = || setup.get_or_init(|| Setup::new(experts));

        let mut g = c.benchmark_group("checkpoint");
        g.sample_size(10).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(20));
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("copy_write", &label), |b| {
            let s = setup();
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_file(&s.copy);
                    let start = Instant::now();
                    let mut f = std::fs::File::create(&s.copy).unwrap();
                    for t in s.state.values() {
                        f.write_all(&t.data).unwrap();
                    }
                    f.sync_all().unwrap();
                    total += start.elapsed();
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new("save", &label), |b| {
            let s = setup();
            let parts = s.parts();
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&s.dir);
                    let start = Instant::now();
                    save(&s.dir, &parts, &SaveOptions::default()).unwrap();
                    total += start.elapsed();
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new("copy_read", &label), |b| {
            let s = setup();
            if !s.copy.exists() {
                s.write_copy();
            }
            b.iter(|| std::fs::read(&s.copy).unwrap())
        });
        g.bench_function(BenchmarkId::new("load", &label), |b| {
            let s = setup();
            if !s.dir.exists() {
                s.save();
            }
            let request = [(s.layout.clone(), RankCoord::new(0, 0))];
            b.iter(|| {
                let ck = Checkpoint::open(&s.dir).unwrap();
                ck.load(&request, Some(Dtype::Bf16)).unwrap()
            })
        });
        g.finish();
    }
}
