//! proptest strategies for configurations, token distributions and whole cases.
//!
//! Token distributions deliberately include the shapes that break expert kernels: empty
//! experts (first, middle, last), one expert taking everything, Zipf-like skew, single tokens,
//! and segment sizes around tile boundaries (15/16/17, 127/128/129). Dimensions stay small so a
//! shrunk failure is readable.

use crate::case::Case;
use moe_reference::{
    Activation, Dtype, Fp8Config, Fp8Recipe, LayerClass, LayerConfig, Parallelism, TeFormat, WgradTiming,
};
use proptest::prelude::*;
use proptest::sample::select;

/// Splits of tokens over `num_experts` experts: at most `max_tokens` per expert, except one
/// expert taking everything and the Zipf-like head, which take up to `2·max_tokens`, and the
/// tile-edge counts (up to 129).
pub fn tokens_per_expert(num_experts: usize, max_tokens: i64) -> BoxedStrategy<Vec<i64>> {
    let e = num_experts;
    let uniform = proptest::collection::vec(0..=max_tokens, e).boxed();
    let with_empty = (proptest::collection::vec(1..=max_tokens, e), proptest::collection::vec(any::<bool>(), e))
        .prop_map(|(counts, empty)| counts.into_iter().zip(empty).map(|(c, z)| if z { 0 } else { c }).collect())
        .boxed();
    let one_takes_all = (0..e, 1..=max_tokens * 2)
        .prop_map(move |(hot, n)| (0..e).map(|i| if i == hot { n } else { 0 }).collect())
        .boxed();
    // Zipf-like: expert i gets about n / (i+1)^1.2 tokens, in a shuffled expert order.
    let zipf = (
        1..=max_tokens * 2,
        Just(()).prop_perturb(move |_, mut rng| {
            let mut order: Vec<usize> = (0..e).collect();
            for i in (1..e).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            order
        }),
    )
        .prop_map(move |(n, order)| {
            let mut counts = vec![0i64; e];
            for (rank, &expert) in order.iter().enumerate() {
                counts[expert] = (n as f64 / ((rank + 1) as f64).powf(1.2)).floor() as i64;
            }
            counts
        })
        .boxed();
    let single_token = (0..e).prop_map(move |hot| (0..e).map(|i| i64::from(i == hot)).collect()).boxed();
    let tile_edges = proptest::collection::vec(select(vec![0i64, 1, 15, 16, 17, 127, 128, 129]), e).boxed();
    prop_oneof![3 => uniform, 2 => with_empty, 1 => one_takes_all, 2 => zipf, 1 => single_token, 1 => tile_edges]
        .boxed()
}

fn divisors(n: usize, of: &[usize]) -> Vec<usize> {
    of.iter().copied().filter(|&d| n.is_multiple_of(d)).collect()
}

/// The (ETP, EP) layouts a configuration with `f` ffn features and `e` experts can take, sizes
/// up to 8, the single-rank layout excluded (Megatron forbids bias with ETP > 1).
pub fn parallel_layouts(f: usize, e: usize, bias: bool) -> Vec<(usize, usize)> {
    let tps = if bias { vec![1] } else { divisors(f, &[1, 2, 4, 8]) };
    let eps = divisors(e, &[1, 2, 4, 8]);
    tps.iter().flat_map(|&tp| eps.iter().map(move |&ep| (tp, ep))).filter(|&l| l != (1, 1)).collect()
}

/// Valid small configurations of every class, activation, GLU/clamp/offset/bias/probs-on-input
/// option, dtype, EP/ETP layout and (in about 5% of them, 30% of the GLU TEGroupedMLP ones)
/// Megatron HEAD's GLU interleaving. About half of them are sharded (EP and ETP up to 8, wherever
/// the sizes divide); `tests/properties.rs` measures the share.
pub fn layer_config() -> impl Strategy<Value = LayerConfig> {
    (
        select(LayerClass::ALL.to_vec()),
        select(vec![1usize, 2, 3, 4, 6, 8]),
        select(vec![1usize, 4, 8, 15, 16, 17, 24]),
        select(vec![2usize, 4, 8, 12, 16, 17, 24, 32]),
        any::<bool>(),
        select(Activation::ALL.to_vec()),
        (any::<bool>(), prop::option::weighted(0.3, select(vec![0.5f64, 1.0, 7.0])), select(vec![0.0f64, 0.0, 1.0])),
        (
            any::<bool>(),
            select(Dtype::ALL.to_vec()),
            any::<bool>(),
            prop::option::weighted(0.2, select(vec![4usize, 16])),
        ),
        (
            any::<prop::sample::Index>(),
            prop::bool::weighted(0.6),
            prop::option::weighted(0.3, select(vec![1usize, 2, 4])),
        ),
    )
        .prop_map(
            |(
                class,
                e,
                h,
                f,
                glu,
                act,
                (bias, clamp, offset),
                (probs_on_input, dtype, bf16_probs, pad),
                (layout_i, parallel, interleave),
            )| {
                let mut cfg = LayerConfig {
                    class,
                    num_experts: e,
                    hidden_size: h,
                    ffn_hidden_size: f,
                    gated_linear_unit: glu,
                    activation: act,
                    add_bias: bias,
                    clamp_value: if glu { clamp } else { None },
                    glu_linear_offset: if glu { offset } else { 0.0 },
                    apply_probs_on_input: probs_on_input,
                    params_dtype: dtype,
                    probs_dtype: if bf16_probs && dtype == Dtype::Bf16 { Dtype::Bf16 } else { Dtype::F32 },
                    padding_multiple: pad,
                    parallel: Parallelism::SINGLE,
                    fp8: None,
                    glu_interleave_size: interleave,
                };
                // GroupedMLP never has a bias (make_valid drops it): decide the layout without it.
                let bias = bias && class != LayerClass::Grouped;
                let layouts = parallel_layouts(f, e, bias);
                if parallel && !layouts.is_empty() {
                    let (tp, ep) = *layout_i.get(&layouts);
                    cfg.parallel.tp_size = tp;
                    cfg.parallel.ep_size = ep;
                }
                make_valid(cfg)
            },
        )
}

/// Adjusts a configuration to the rules Megatron enforces (GroupedMLP: bf16, no bias, GLU only
/// with silu/gelu, no padding; bias only with ETP size 1; GLU interleaving only in a GLU
/// TEGroupedMLP, in blocks dividing each rank's `N2`).
pub fn make_valid(mut cfg: LayerConfig) -> LayerConfig {
    if cfg.class == LayerClass::Grouped {
        cfg.add_bias = false;
        cfg.params_dtype = Dtype::Bf16;
        cfg.padding_multiple = None;
        if cfg.gated_linear_unit && !matches!(cfg.activation, Activation::Silu | Activation::Gelu) {
            cfg.activation = Activation::Silu;
        }
    }
    if cfg.add_bias {
        cfg.parallel.tp_size = 1;
    }
    if cfg.probs_dtype == Dtype::F16 && cfg.params_dtype != Dtype::F16 {
        cfg.probs_dtype = Dtype::F32;
    }
    // GLU interleaving (Megatron HEAD, spec §4.10): TEGroupedMLP with GLU only, blocks that
    // divide each rank's half width N2 (halved until they do; 1 always does).
    if cfg.class != LayerClass::TeGrouped || !cfg.gated_linear_unit {
        cfg.glu_interleave_size = None;
    }
    if let Some(s) = cfg.glu_interleave_size.as_mut() {
        while !cfg.ffn_hidden_size.is_multiple_of(cfg.parallel.tp_size * *s) {
            *s /= 2;
        }
    }
    cfg
}

/// Whole cases: a configuration, a token split over its global experts (≤ `max_tokens` per
/// expert), a seed and a wgrad timing (deferral only where the class supports it). In a quarter
/// of the sharded cases one EP rank receives no tokens at all (its experts emptied).
pub fn case(max_tokens: i64) -> impl Strategy<Value = Case> {
    layer_config().prop_flat_map(move |cfg| {
        let e = cfg.num_experts;
        (
            Just(cfg),
            tokens_per_expert(e, max_tokens),
            any::<u64>(),
            any::<bool>(),
            (prop::bool::weighted(0.25), any::<prop::sample::Index>()),
        )
            .prop_map(|(cfg, mut tokens, seed, defer, (empty_rank, rank_i))| {
                let ep = cfg.parallel.ep_size;
                if empty_rank && ep > 1 {
                    let el = cfg.num_local_experts();
                    let q = rank_i.index(ep);
                    tokens[q * el..(q + 1) * el].iter_mut().for_each(|n| *n = 0);
                }
                let timing = if defer && cfg.class != LayerClass::Grouped {
                    WgradTiming::Deferred
                } else {
                    WgradTiming::Immediate
                };
                Case { cfg, tokens_per_expert: tokens, seed, timing }
            })
    })
}

/// Which fp8 recipes and formats generated cases use (`verify --fp8-recipe`, `--fp8-format`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fp8Cases {
    /// The recipes drawn from (empty: no fp8 case).
    pub recipes: Vec<Fp8Recipe>,
    /// The formats drawn from (non-empty when `recipes` is).
    pub formats: Vec<TeFormat>,
    /// The share of cases that get a recipe (1 when one recipe was asked for).
    pub share: f64,
}

impl Fp8Cases {
    /// The default of `verify`: [`Fp8Cases::DEFAULT_SHARE`] of the cases get a recipe and a
    /// format drawn uniformly from all of them.
    pub const DEFAULT_SHARE: f64 = 0.35;

    /// Every recipe and format, on a share of the cases (`verify`'s default).
    pub fn mixed() -> Fp8Cases {
        Fp8Cases { recipes: Fp8Recipe::ALL.to_vec(), formats: TeFormat::ALL.to_vec(), share: Fp8Cases::DEFAULT_SHARE }
    }

    /// No fp8 cases (`--fp8-recipe none`).
    pub fn none() -> Fp8Cases {
        Fp8Cases { recipes: Vec::new(), formats: TeFormat::ALL.to_vec(), share: 0.0 }
    }

    /// Every case with `recipe` (`--fp8-recipe X`).
    pub fn only(recipe: Fp8Recipe) -> Fp8Cases {
        Fp8Cases { recipes: vec![recipe], formats: TeFormat::ALL.to_vec(), share: 1.0 }
    }

    /// The same choice restricted to one format (`--fp8-format F`).
    pub fn with_format(self, format: TeFormat) -> Fp8Cases {
        Fp8Cases { formats: vec![format], ..self }
    }
}

/// Gives `cfg` the fp8 `config` and makes its shapes ones TE runs (`docs/spec/fp8-recipes.md`
/// §9, §11): no explicit `padding_multiple` (the recipe's alignment pads); MXFP8 needs `h` and
/// `f/t` multiples of 32; SequentialMLP's TE `Linear` needs `h` and `f/t` multiples of 16 and its
/// rows padded (`assert_dim_for_fp8_exec`). TEGroupedMLP with the other recipes keeps any shape
/// (partial blocks, odd sizes). GroupedMLP keeps the recipe: it has no fp8 path in Megatron, so
/// the case is a declared skip ([`crate::properties::check`]).
pub fn with_fp8(mut cfg: LayerConfig, config: Fp8Config) -> LayerConfig {
    cfg.fp8 = Some(config);
    cfg.padding_multiple = None;
    let tp = cfg.parallel.tp_size.max(1);
    let multiple = match (config.recipe, cfg.class) {
        (Fp8Recipe::Mxfp8, _) => 32,
        (_, LayerClass::Sequential) => 16,
        _ => 1,
    };
    cfg.hidden_size = cfg.hidden_size.next_multiple_of(multiple);
    cfg.ffn_hidden_size = cfg.ffn_hidden_size.next_multiple_of(multiple * tp);
    if let Some(f) = cfg.fp8.as_mut() {
        if cfg.class == LayerClass::Sequential || f.recipe == Fp8Recipe::Mxfp8 {
            f.pad_to_alignment = true;
        }
        if f.activation_input_store && !(cfg.gated_linear_unit && cfg.activation == Activation::Silu) {
            f.activation_input_store = false;
        }
    }
    cfg
}

/// The fp8 configuration of a generated case: `recipe` and `format` with TE's defaults, and
/// now and then (`knobs`) the other scale mode, Megatron's fp8 activation-input store and, for
/// TEGroupedMLP, no padding (the router pads, `moe_router_padding_for_quantization`).
fn fp8_config(recipe: Fp8Recipe, format: TeFormat, knobs: [bool; 3]) -> Fp8Config {
    let base = Fp8Config::new(recipe).with_format(format);
    Fp8Config {
        power_2_scales: if knobs[0] && recipe != Fp8Recipe::Mxfp8 { !base.power_2_scales } else { base.power_2_scales },
        activation_input_store: knobs[1],
        pad_to_alignment: !knobs[2],
        ..base
    }
}

/// Whole cases as [`case`], a share of them (`fp8`) with an fp8 recipe and format
/// ([`with_fp8`]).
pub fn case_fp8(max_tokens: i64, fp8: &Fp8Cases) -> impl Strategy<Value = Case> {
    let recipes = if fp8.recipes.is_empty() { vec![Fp8Recipe::Tensorwise] } else { fp8.recipes.clone() };
    let formats = if fp8.formats.is_empty() { TeFormat::ALL.to_vec() } else { fp8.formats.clone() };
    let share = if fp8.recipes.is_empty() { 0.0 } else { fp8.share.clamp(0.0, 1.0) };
    (
        case(max_tokens),
        prop::bool::weighted(share),
        select(recipes),
        select(formats),
        (prop::bool::weighted(0.2), prop::bool::weighted(0.2), prop::bool::weighted(0.2)),
    )
        .prop_map(|(mut c, on, recipe, format, (a, b, d))| {
            if on {
                c.cfg = with_fp8(c.cfg, fp8_config(recipe, format, [a, b, d]));
            }
            c
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    /// The token splits include one expert taking every token, more than the uniform splits'
    /// `max_tokens` can give one expert (the hot expert of real routing), and stay in
    /// `[0, max(2·max_tokens, 129)]` per expert (129: the largest tile-edge count).
    #[test]
    fn token_splits_include_one_hot_expert_past_the_uniform_limit() {
        let (e, max) = (4, 64i64);
        let strategy = tokens_per_expert(e, max);
        let mut runner = TestRunner::deterministic();
        let mut one_hot_past_limit = 0;
        for _ in 0..600 {
            let split = strategy.new_tree(&mut runner).expect("split").current();
            assert_eq!(split.len(), e);
            assert!(split.iter().all(|&n| (0..=(2 * max).max(129)).contains(&n)), "{split:?}");
            let nonzero: Vec<i64> = split.iter().copied().filter(|&n| n > 0).collect();
            if nonzero.len() == 1 && nonzero[0] > max + 2 {
                one_hot_past_limit += 1;
            }
        }
        assert!(one_hot_past_limit >= 5, "one hot expert past {max} + 2 tokens in {one_hot_past_limit} of 600");
    }
}
