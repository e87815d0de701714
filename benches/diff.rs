//! `moe-verify diff` throughput on a synthetic identical pair against reading both sides' bytes.
//!
//! The pair is one DeepSeek-V3 expert-parallel slice as in [`super::checkpoint`] (experts of
//! h = 7168, f = 2048 with SwiGLU, bf16): A a moe-verify checkpoint (TEGroupedMLP, tp = ep = 1),
//! B a Hugging Face `model.safetensors` with per-expert `gate_proj`/`up_proj`/`down_proj`
//! (Qwen3-MoE naming). Ids name the expert count (`diff/diff/32x7168x2048x3_bf16`; quick run:
//! `cargo bench --bench main -- diff/.*/4x`).
//!
//! * `diff`: [`open_source`] on both sides + [`diff`] (every tensor read, compared byte for
//!   byte; identical).
//! * `read_both`: `std::fs::read` of A's data file and B's file, the `cat` baseline.

use criterion::{BenchmarkId, Criterion, Throughput};
use moe_checkpoint::diff::{diff, DiffOptions};
use moe_checkpoint::{
    open_source, save, ExpertLayout, RankCoord, RawStateDict, RawTensor, SaveOptions, SavePart, SourceOverrides,
};
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism};
use safetensors::tensor::TensorView;
use std::cell::OnceCell;
use std::path::PathBuf;
use std::time::Duration;

const EXPERTS: [usize; 2] = [32, 4];
const H: usize = 7168;
const F: usize = 2048;

struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn fill(t: &mut RawTensor, seed: u8) {
    for (i, b) in t.data.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

impl Pair {
    fn new(experts: usize) -> Pair {
        let base = env!("CARGO_TARGET_TMPDIR");
        std::fs::create_dir_all(base).unwrap_or_else(|e| panic!("bench temp dir {base}: {e}"));
        let tmp = tempfile::tempdir_in(base).unwrap_or_else(|e| panic!("bench temp dir in {base}: {e}"));
        let (a, b) = (tmp.path().join("ours"), tmp.path().join("hf"));
        let layout = ExpertLayout {
            prefix: "decoder.layers.3.mlp.".into(),
            ..ExpertLayout::new(LayerConfig {
                class: LayerClass::TeGrouped,
                num_experts: experts,
                hidden_size: H,
                ffn_hidden_size: F,
                gated_linear_unit: true,
                add_bias: false,
                parallel: Parallelism::SINGLE,
                ..LayerConfig::example()
            })
        };
        let mut sd = RawStateDict::new();
        let mut hf: Vec<(String, RawTensor)> = Vec::new();
        for e in 0..experts {
            let mut fc1 = RawTensor::zeros(Dtype::Bf16, vec![2 * F, H]);
            fill(&mut fc1, e as u8);
            let mut fc2 = RawTensor::zeros(Dtype::Bf16, vec![H, F]);
            fill(&mut fc2, (e as u8).wrapping_add(100));
            let half = fc1.data.len() / 2;
            let p = format!("model.layers.3.mlp.experts.{e}.");
            hf.push((
                format!("{p}gate_proj.weight"),
                RawTensor { dtype: Dtype::Bf16, shape: vec![F, H], data: fc1.data[..half].to_vec() },
            ));
            hf.push((
                format!("{p}up_proj.weight"),
                RawTensor { dtype: Dtype::Bf16, shape: vec![F, H], data: fc1.data[half..].to_vec() },
            ));
            hf.push((format!("{p}down_proj.weight"), fc2.clone()));
            sd.insert(format!("linear_fc1.weight{e}"), fc1);
            sd.insert(format!("linear_fc2.weight{e}"), fc2);
        }
        save(&a, &[SavePart { layout: &layout, rank: RankCoord::new(0, 0), state: &sd }], &SaveOptions::default())
            .unwrap();
        drop(sd);
        std::fs::create_dir(&b).unwrap();
        let views: Vec<(String, TensorView)> = hf
            .iter()
            .map(|(k, t)| (k.clone(), TensorView::new(safetensors::Dtype::BF16, t.shape.clone(), &t.data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &b.join("model.safetensors")).unwrap();
        Pair { _tmp: tmp, a, b }
    }
}

/// Registers the diff benchmarks, for each of [`EXPERTS`].
pub fn diff_benches(c: &mut Criterion) {
    for experts in EXPERTS {
        let bytes = (2 * experts * 3 * H * F * 2) as u64;
        let label = format!("{experts}x{H}x{F}x3_bf16");
        let pair = OnceCell::new();
        let pair = || pair.get_or_init(|| Pair::new(experts));
        let mut g = c.benchmark_group("diff");
        g.sample_size(10).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(20));
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("read_both", &label), |b| {
            let p = pair();
            b.iter(|| {
                let x = std::fs::read(p.a.join("rank00000.safetensors")).unwrap();
                let y = std::fs::read(p.b.join("model.safetensors")).unwrap();
                x.len() + y.len()
            })
        });
        g.bench_function(BenchmarkId::new("diff", &label), |b| {
            let p = pair();
            b.iter(|| {
                let o = SourceOverrides::default();
                let (sa, sb) = (open_source(&p.a, &o).unwrap(), open_source(&p.b, &o).unwrap());
                let r = diff(sa.as_ref(), sb.as_ref(), &DiffOptions::default()).unwrap();
                assert!(r.same());
                r.rows.len()
            })
        });
        g.finish();
    }
}
