//! The model shapes: one registry of the expert shapes of four MoE models, their layer
//! configuration and the token distributions the GPU benches time.
//!
//! Everything that names a model shape reads it from here: `moe-verify verify --shape` and
//! `moe-verify bench --shape` (values and names from [`ModelShape::ALL`]), the sampled
//! verification, the Rust benches, and the PyTorch bench scripts through `scripts/shapes.json`,
//! which `moe-verify shapes --json` writes and a test keeps equal to [`registry_json`].

use moe_reference::{Activation, Dtype, LayerClass, LayerConfig, Parallelism};
use std::collections::BTreeMap;

/// Token counts of the bench distributions are multiples of this (`torch._grouped_mm` wants
/// 16-byte aligned offsets).
pub const ALIGN: usize = 16;
/// The Zipf exponent of the skewed bench distributions.
pub const ZIPF_S: f64 = 1.2;

/// A model's expert shape (bugs-shapes-anchors §C): GLU silu, bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelShape {
    /// Mixtral 8x7B: h 4096, f 14336, 8 experts, 16384 rows.
    Mixtral,
    /// One expert-parallel slice of DeepSeek-V3: h 7168, f 2048, 32 local experts, 32768 rows.
    DeepseekV3,
    /// Qwen3-30B-A3B: h 2048, f 768, 128 experts, 65536 rows.
    Qwen3,
    /// GPT-OSS-120B: h 2880, f 2880, 128 experts, 32768 rows.
    GptOss,
}

/// The sizes of an expert shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeDims {
    /// Hidden size `h`.
    pub hidden: usize,
    /// MoE FFN hidden size `f` (fc1 is `2f` wide: SwiGLU).
    pub ffn: usize,
    /// Local experts `E_l`.
    pub experts: usize,
    /// Default number of routed (permuted) token rows `T`.
    pub tokens: usize,
}

impl ShapeDims {
    /// The layer configuration of the shape for `class`: GLU silu, bf16 parameters, fp32
    /// probs, no bias, no clamp, no padding, one rank, no fp8.
    pub fn config(&self, class: LayerClass) -> LayerConfig {
        LayerConfig {
            class,
            num_experts: self.experts,
            hidden_size: self.hidden,
            ffn_hidden_size: self.ffn,
            gated_linear_unit: true,
            activation: Activation::Silu,
            add_bias: false,
            clamp_value: None,
            glu_linear_offset: 0.0,
            apply_probs_on_input: false,
            params_dtype: Dtype::Bf16,
            probs_dtype: Dtype::F32,
            padding_multiple: None,
            parallel: Parallelism::SINGLE,
            fp8: None,
            glu_interleave_size: None,
        }
    }
}

impl ModelShape {
    /// Every shape, in the order the benches and tables use.
    pub const ALL: [ModelShape; 4] =
        [ModelShape::Mixtral, ModelShape::DeepseekV3, ModelShape::Qwen3, ModelShape::GptOss];

    /// The shape's one name (command lines, CSV `shape` columns, `scripts/shapes.json`).
    pub fn name(self) -> &'static str {
        match self {
            ModelShape::Mixtral => "mixtral",
            ModelShape::DeepseekV3 => "deepseek-v3",
            ModelShape::Qwen3 => "qwen3-30b-a3b",
            ModelShape::GptOss => "gpt-oss-120b",
        }
    }

    /// The shape named `name` ([`ModelShape::name`]).
    pub fn parse(name: &str) -> Option<ModelShape> {
        ModelShape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its sizes.
    pub fn dims(self) -> ShapeDims {
        let (hidden, ffn, experts, tokens) = match self {
            ModelShape::Mixtral => (4096, 14336, 8, 16384),
            ModelShape::DeepseekV3 => (7168, 2048, 32, 32768),
            ModelShape::Qwen3 => (2048, 768, 128, 65536),
            ModelShape::GptOss => (2880, 2880, 128, 32768),
        };
        ShapeDims { hidden, ffn, experts, tokens }
    }

    /// The layer configuration of the shape for `class` ([`ShapeDims::config`]).
    pub fn config(self, class: LayerClass) -> LayerConfig {
        self.dims().config(class)
    }

    /// The token distributions the benches time, by name: `uniform` (`T / E` rows each) and
    /// `zipf<k>empty` ([`zipf_counts`] with `k` = 8 empty experts for 32 experts or more, 2
    /// for Mixtral's 8, where 8 would leave no layer).
    pub fn bench_distributions(self) -> BTreeMap<String, Vec<usize>> {
        let ShapeDims { experts, tokens, .. } = self.dims();
        let empty = if experts >= 32 { 8 } else { 2 };
        BTreeMap::from([
            ("uniform".to_string(), vec![tokens / experts; experts]),
            (format!("zipf{empty}empty"), zipf_counts(tokens, experts, empty)),
        ])
    }
}

impl std::fmt::Display for ModelShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Zipf(`ZIPF_S`) token counts over `experts - empty` ranks, multiples of [`ALIGN`] summing
/// to `total` exactly; the `empty` experts get 0 rows (placed first, last and evenly
/// between), and the ranks are shuffled over the other experts by a fixed LCG.
pub fn zipf_counts(total: usize, experts: usize, empty: usize) -> Vec<usize> {
    let live = experts - empty;
    let w: Vec<f64> = (0..live).map(|r| 1.0 / ((r + 1) as f64).powf(ZIPF_S)).collect();
    let sw: f64 = w.iter().sum();
    let blocks = total / ALIGN;
    let mut cnt: Vec<usize> = w.iter().map(|x| (blocks as f64 * x / sw) as usize).collect();
    let mut rem = blocks - cnt.iter().sum::<usize>();
    let mut i = 0;
    while rem > 0 {
        cnt[i % live] += 1;
        rem -= 1;
        i += 1;
    }
    let empty_pos: Vec<usize> = if empty == 1 {
        vec![0]
    } else {
        (0..empty).map(|j| (j as f64 * (experts - 1) as f64 / (empty - 1) as f64).round_ties_even() as usize).collect()
    };
    let mut slots: Vec<usize> = (0..experts).filter(|e| !empty_pos.contains(e)).collect();
    let mut state: u64 = 12345;
    for j in (1..slots.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let k = ((state >> 33) % (j as u64 + 1)) as usize;
        slots.swap(j, k);
    }
    let mut out = vec![0; experts];
    for (r, &e) in slots.iter().enumerate() {
        out[e] = cnt[r] * ALIGN;
    }
    out
}

/// One shape of [`RegistryJson`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShapeJson {
    /// [`ModelShape::name`].
    pub name: String,
    /// Hidden size `h`.
    pub hidden: usize,
    /// MoE FFN size `f`.
    pub ffn: usize,
    /// Local experts.
    pub experts: usize,
    /// Routed token rows `T` (every distribution sums to it).
    pub rows: usize,
    /// [`ModelShape::bench_distributions`].
    pub dists: BTreeMap<String, Vec<usize>>,
}

/// The registry as `scripts/shapes.json` holds it, for the PyTorch scripts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RegistryJson {
    /// [`ALIGN`].
    pub align: usize,
    /// [`ZIPF_S`].
    pub zipf_s: f64,
    /// Every shape, in [`ModelShape::ALL`] order.
    pub shapes: Vec<ShapeJson>,
}

/// The whole registry in the form of `scripts/shapes.json`.
pub fn registry_json() -> RegistryJson {
    let shapes = ModelShape::ALL
        .into_iter()
        .map(|s| {
            let d = s.dims();
            ShapeJson {
                name: s.name().into(),
                hidden: d.hidden,
                ffn: d.ffn,
                experts: d.experts,
                rows: d.tokens,
                dists: s.bench_distributions(),
            }
        })
        .collect();
    RegistryJson { align: ALIGN, zipf_s: ZIPF_S, shapes }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model shapes are timed and verified as GLU silu, bf16, fp32 probs, no bias (what the
    /// PyTorch benches build too).
    #[test]
    fn shape_configs_are_glu_silu_bf16_without_bias() {
        for s in ModelShape::ALL {
            let c = s.config(LayerClass::TeGrouped);
            assert!(c.gated_linear_unit && c.activation == Activation::Silu && !c.add_bias);
            assert_eq!(
                (c.params_dtype, c.probs_dtype, c.clamp_value, c.padding_multiple),
                (Dtype::Bf16, Dtype::F32, None, None)
            );
            assert!(!c.apply_probs_on_input && c.glu_linear_offset == 0.0 && c.parallel == Parallelism::SINGLE);
            assert!(c.validate().is_ok());
            assert_eq!(ModelShape::parse(s.name()), Some(s));
        }
        assert_eq!(ModelShape::parse("deepseek"), None);
    }

    /// Every distribution has one count per expert, multiples of 16, summing to the shape's rows;
    /// the Zipf ones leave exactly their empty experts empty. Mixtral's Zipf split is pinned.
    #[test]
    fn bench_distributions_fit_their_shapes() {
        for s in ModelShape::ALL {
            let d = s.dims();
            for (name, c) in s.bench_distributions() {
                assert_eq!((c.len(), c.iter().sum::<usize>()), (d.experts, d.tokens), "{s}/{name}");
                assert!(c.iter().all(|n| n % ALIGN == 0), "{s}/{name}");
                if let Some(k) = name.strip_prefix("zipf").and_then(|r| r.strip_suffix("empty")) {
                    assert_eq!(c.iter().filter(|&&n| n == 0).count(), k.parse::<usize>().unwrap(), "{s}/{name}");
                }
            }
        }
        assert_eq!(zipf_counts(16384, 8, 2), [0, 3312, 2048, 1440, 1088, 880, 7616, 0]);
    }
}
