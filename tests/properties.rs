//! The differential property suite of spec §10, stamped onto a backend by
//! [`differential_suite!`](crate::properties::differential_suite).
//!
//! ```ignore
//! differential_suite!(reference, moe_harness::properties::ReferenceBackend);
//! // A backend whose constructor can fail (no CUDA device) is skipped loudly, unless
//! // MOE_REQUIRE_CUDA=1, which turns the skip into a failure. The CUDA backend is a
//! // `moe_harness::properties::PerClassBackend` of `moe_gpu::{CudaSequential, CudaGrouped,
//! // CudaTeGrouped}` (`cuda_backend` in `tests/gpu.rs`):
//! differential_suite!(cuda, try super::cuda_backend(), cases = 32);
//! ```
//!
//! Each stamp is a module (`reference::matches_oracle`, `reference::zero_tokens`, ...), so
//! `cargo test reference::` filters by backend and a failure names it. The module holds one
//! proptest per [`Property`] over `moe_harness::strategy::case` and one test per
//! token-distribution family (empty experts, one expert taking everything, Zipf, single tokens,
//! tile edges), each run through every property on a fixed set of configurations.
//!
//! Proptest failures are persisted under `proptest-regressions/`, in a file named after the file
//! that invokes the stamp (`properties.txt` for the reference stamp below, `gpu.txt` for the
//! CUDA one; commit it), and replayed first on the next run. The case count defaults to the
//! stamp's `cases` (small: CI has two cores) and can be raised with `PROPTEST_CASES=2000` for a
//! deep run; the generator seed is fixed (proptest's own `PROPTEST_RNG_SEED` overrides it).

use moe_harness::case::Case;
use moe_harness::properties::{check, Backend, Property, Verdict};
use moe_reference::{Activation, Dtype, LayerClass, LayerConfig, Parallelism, WgradTiming};
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestCaseError};

/// Largest token count per expert in generated cases (as `moe-verify verify`).
pub(crate) const MAX_TOKENS: i64 = 40;

/// Stamps the differential suite onto a backend: `differential_suite!(name, backend_expr)` or
/// `differential_suite!(name, try fallible_backend_expr)` (an expression returning
/// `Result<impl Backend + 'static, impl Display>`; `Err` skips loudly), optionally followed by
/// `, cases = N` (proptest cases per property).
macro_rules! differential_suite {
    ($name:ident, try $backend:expr, cases = $cases:expr) => {
        #[allow(unused_imports)]
        mod $name {
            use $crate::properties::{
                family_tokens, run_family, suite_config, verify_case, MAX_TOKENS,
            };
            use moe_harness::properties::{Backend, Property};
            use proptest::prelude::*;
            use std::sync::OnceLock;

            /// The backend, constructed once (a CUDA context is expensive), or why not.
            fn backend() -> Option<&'static dyn Backend> {
                static BACKEND: OnceLock<Result<Box<dyn Backend>, String>> = OnceLock::new();
                let b = BACKEND.get_or_init(|| match $backend {
                    Ok(b) => Ok(Box::new(b) as Box<dyn Backend>),
                    Err(e) => Err(e.to_string()),
                });
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                $crate::properties::backend_or_skip(stringify!($name), b, &WARNED)
            }

            fn check(property: Property, case: &moe_harness::case::Case) -> Result<(), TestCaseError> {
                match backend() {
                    Some(b) => verify_case(b, property, case),
                    None => Ok(()),
                }
            }

            proptest! {
                #![proptest_config(suite_config($cases))]

                /// §10 "matches the oracle": forward and every gradient within the error model.
                #[test]
                fn matches_oracle(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::MatchesOracle, &case)?;
                }

                /// §10.2/§10.3: ranks simulated rank by rank reproduce the unsharded oracle.
                /// The generic strategy simulates ranks in only ~3% of cases, so this one forces
                /// an EP/ETP layout wherever the sizes divide.
                #[test]
                fn parallel_decomposition_reproduces_single_rank(
                    case in moe_harness::strategy::case(MAX_TOKENS)
                        .prop_map($crate::properties::force_parallel_layout)
                ) {
                    check(Property::ParallelDecomposition, &case)?;
                }

                /// §10.1: the three classes agree on converted weights.
                #[test]
                fn classes_agree_on_converted_weights(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::ClassEquivalence, &case)?;
                }

                /// §10.4: empty experts get exactly-zero grads; an all-empty call returns [0, h].
                #[test]
                fn empty_experts_get_exactly_zero_grads(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::ZeroTokens, &case)?;
                }

                /// §10.5: zero rows with zero probs change nothing.
                #[test]
                fn padding_is_neutral(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::PaddingNeutrality, &case)?;
                }

                /// §10.6: backward + backward_dw equals the plain backward bit for bit.
                #[test]
                fn deferred_wgrad_equals_immediate(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::DeferredWgrad, &case)?;
                }

                /// §10.7: the output is linear in the probs.
                #[test]
                fn output_is_linear_in_probs(case in moe_harness::strategy::case(MAX_TOKENS)) {
                    check(Property::ProbsLinearity, &case)?;
                }
            }

            // One test per token-distribution family, every property, fixed configurations.

            /// TE commit 971001394 / PR #1527: GroupedLinear failed when the last split was empty.
            #[test]
            fn empty_first_middle_last_experts_satisfy_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "empty-first/middle/last", &family_tokens::EMPTY);
                }
            }

            /// Skew to the extreme: every row on one expert, the rest empty.
            #[test]
            fn one_expert_taking_everything_satisfies_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "one-takes-all", &family_tokens::ONE_TAKES_ALL);
                }
            }

            /// Zipf-like skew of real routers (bugs-shapes-anchors §B.2 skewed cases).
            #[test]
            fn zipf_skew_satisfies_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "zipf", &family_tokens::zipf());
                }
            }

            /// One row per expert, and a single row in the whole call.
            #[test]
            fn single_tokens_satisfy_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "single-tokens", &family_tokens::SINGLE);
                }
            }

            /// Segment lengths around a 16-row tile (CUTLASS/TE alignment, style §13).
            #[test]
            fn segments_around_16_row_tiles_satisfy_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "15/16/17", &family_tokens::TILE_16);
                }
            }

            /// Segment lengths around a 128-row tile (DeepGEMM block M, TE grouped GEMM tiles).
            #[test]
            fn segments_around_128_row_tiles_satisfy_every_property() {
                if let Some(b) = backend() {
                    run_family(b, "127/128/129", &family_tokens::TILE_128);
                }
            }
        }
    };
    ($name:ident, try $backend:expr) => {
        differential_suite!($name, try $backend, cases = 48);
    };
    ($name:ident, $backend:expr, cases = $cases:expr) => {
        differential_suite!($name, try Ok::<_, String>($backend), cases = $cases);
    };
    ($name:ident, $backend:expr) => {
        differential_suite!($name, try Ok::<_, String>($backend));
    };
}
#[allow(unused_imports)]
pub(crate) use differential_suite;

// The reference (emulating the storage dtype) against the f64 oracle: exercises the harness,
// the generators and the error model on every CI run, which has no GPU. A case takes about a
// millisecond here, so 1024 cases per property cost about ten seconds on two cores.
differential_suite!(reference, moe_harness::properties::ReferenceBackend, cases = 1024);

/// The proptest configuration of a suite: `cases` cases (or `PROPTEST_CASES`), a fixed seed (or
/// `PROPTEST_RNG_SEED`, proptest's own variable), failures persisted to `proptest-regressions/`.
pub(crate) fn suite_config(cases: u32) -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("PROPTEST_CASES").map_or(cases, |n| n as u32),
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0x5EED)),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        max_shrink_iters: 1024,
        ..Config::default()
    }
}

/// The backend, or `None` after printing a SKIP line (once per suite: `warned`); with
/// `MOE_REQUIRE_CUDA=1` a missing backend is a failure instead (device-machine runs set it, so a
/// broken library path cannot "pass"). The SKIP line goes straight to the stderr handle, which
/// libtest does not capture, so it shows in a plain `cargo test`.
pub(crate) fn backend_or_skip<'a>(
    suite: &str,
    backend: &'a Result<Box<dyn Backend>, String>,
    warned: &std::sync::atomic::AtomicBool,
) -> Option<&'a dyn Backend> {
    match backend {
        Ok(b) => Some(b.as_ref()),
        Err(why) => {
            if moe_harness::cuda_required() {
                panic!("{suite}: backend unavailable ({why}) and MOE_REQUIRE_CUDA=1");
            }
            if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP {suite}: backend unavailable ({why}); set MOE_REQUIRE_CUDA=1 to fail instead"
                );
            }
            None
        }
    }
}

/// The same case at an EP × ETP layout: ETP 2 or 4 where `f` allows it and there is no bias
/// (Megatron forbids bias with ETP > 1), EP 2 or 4 where `E` allows it; the seed picks among
/// the choices so every combination occurs.
pub(crate) fn force_parallel_layout(mut case: Case) -> Case {
    let pick = |n: usize, allowed: bool, bit: u64| -> usize {
        let options: Vec<usize> = [2, 4].into_iter().filter(|&d| allowed && n.is_multiple_of(d)).collect();
        match options.len() {
            0 => 1,
            k => options[(case.seed >> bit) as usize % k],
        }
    };
    let tp = pick(case.cfg.ffn_hidden_size, !case.cfg.add_bias, 0);
    let ep = pick(case.cfg.num_experts, true, 8);
    case.cfg.parallel = Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 };
    // A GLU interleave size must still divide each rank's half width.
    case.cfg = moe_harness::strategy::make_valid(case.cfg);
    case
}

/// Checks one property on one case; a failure carries the case summary, the diffs and Rust
/// source to paste into a regression test.
pub(crate) fn verify_case(backend: &dyn Backend, property: Property, case: &Case) -> Result<(), TestCaseError> {
    match check(backend, property, case) {
        Ok(Verdict::Checked(_)) | Ok(Verdict::Skipped(_)) => Ok(()),
        Err(f) => Err(TestCaseError::fail(format!(
            "{} / {}: {}\n{f}\nregression case:\n{}",
            backend.name(),
            property.name(),
            case.summary(),
            case.to_rust()
        ))),
    }
}

/// Token splits of each distribution family (global expert order).
pub(crate) mod family_tokens {
    /// An empty expert first, in the middle, last (TE PR #1527) and two adjacent.
    pub(crate) const EMPTY: [&[i64]; 4] = [&[0, 5, 3, 2], &[5, 0, 3, 2], &[5, 3, 2, 0], &[0, 0, 7, 1]];
    /// Everything on one expert: first, inner, last.
    pub(crate) const ONE_TAKES_ALL: [&[i64]; 3] = [&[37, 0, 0, 0], &[0, 0, 37, 0], &[0, 0, 0, 37]];
    /// A single row per expert, and a single row in total.
    pub(crate) const SINGLE: [&[i64]; 3] = [&[1, 1, 1, 1], &[0, 1, 0, 0], &[1, 0, 0, 0]];
    /// Segments around a 16-row tile.
    pub(crate) const TILE_16: [&[i64]; 2] = [&[15, 16, 17, 0], &[17, 0, 16, 15]];
    /// Segments around a 128-row tile.
    pub(crate) const TILE_128: [&[i64]; 1] = [&[127, 128, 129, 1]];

    /// Zipf-like skew over 8 experts: expert of rank `r` gets `⌊200 / (r+1)^1.2⌋` rows, in a fixed
    /// shuffled order (the hot expert is not expert 0).
    pub(crate) fn zipf() -> [Vec<i64>; 1] {
        let order = [3usize, 0, 6, 1, 7, 2, 5, 4];
        let mut counts = vec![0i64; 8];
        for (rank, &expert) in order.iter().enumerate() {
            counts[expert] = (200.0 / ((rank + 1) as f64).powf(1.2)).floor() as i64;
        }
        [counts]
    }
}

/// The fixed configurations a token family runs on, for `e` global experts: every class, every
/// dtype, GLU and not, bias, clamp + offset, probs on input, deferred wgrad, and an EP×ETP layout.
pub(crate) fn family_configs(e: usize) -> Vec<(LayerConfig, WgradTiming)> {
    let base = LayerConfig { num_experts: e, hidden_size: 16, ffn_hidden_size: 8, ..LayerConfig::example() };
    let mut out = vec![
        // SequentialMLP, bf16 SwiGLU, deferred wgrad.
        (base.clone(), WgradTiming::Deferred),
        // TEGroupedMLP, f32, gelu with biases.
        (
            LayerConfig {
                class: LayerClass::TeGrouped,
                gated_linear_unit: false,
                activation: Activation::Gelu,
                add_bias: true,
                params_dtype: Dtype::F32,
                ..base.clone()
            },
            WgradTiming::Immediate,
        ),
        // GroupedMLP (bf16 only), GLU gelu.
        (
            LayerConfig { class: LayerClass::Grouped, activation: Activation::Gelu, ..base.clone() },
            WgradTiming::Immediate,
        ),
        // TEGroupedMLP, f16 clamped quick-GEGLU with the GPT-OSS offset, deferred.
        (
            LayerConfig {
                class: LayerClass::TeGrouped,
                activation: Activation::QuickGelu,
                clamp_value: Some(1.0),
                glu_linear_offset: 1.0,
                params_dtype: Dtype::F16,
                probs_dtype: Dtype::F16,
                ..base.clone()
            },
            WgradTiming::Deferred,
        ),
        // SequentialMLP, f32 squared ReLU with the probs applied on the input.
        (
            LayerConfig {
                gated_linear_unit: false,
                activation: Activation::SquaredRelu,
                apply_probs_on_input: true,
                params_dtype: Dtype::F32,
                ..base.clone()
            },
            WgradTiming::Immediate,
        ),
    ];
    if e.is_multiple_of(2) {
        // EP = 2 × ETP = 2 SwiGLU (Megatron #360: each rank holds [W_r; V_r]).
        out.push((
            LayerConfig {
                class: LayerClass::TeGrouped,
                parallel: Parallelism { tp_size: 2, tp_rank: 0, ep_size: 2, ep_rank: 0 },
                ..base
            },
            WgradTiming::Immediate,
        ));
    }
    out
}

/// Runs every property on every (configuration, token split) of a family and fails with every
/// violation found. Each (configuration, split) must be *checked* by at least one property, so
/// a backend that skips everything cannot pass a family vacuously.
pub(crate) fn run_family<T: AsRef<[i64]>>(backend: &dyn Backend, family: &str, splits: &[T]) {
    let mut failures = Vec::new();
    for (i, tokens) in splits.iter().enumerate() {
        let tokens = tokens.as_ref();
        for (cfg, timing) in family_configs(tokens.len()) {
            let case = Case { cfg, tokens_per_expert: tokens.to_vec(), seed: 1000 + i as u64, timing };
            let mut checked = 0;
            for property in Property::ALL {
                match check(backend, property, &case) {
                    Ok(Verdict::Checked(_)) => checked += 1,
                    Ok(Verdict::Skipped(_)) => {}
                    Err(f) => {
                        failures.push(format!("{} / {}: {}\n{f}", backend.name(), property.name(), case.summary()))
                    }
                }
            }
            if checked == 0 {
                failures.push(format!("{}: every property skipped {}", backend.name(), case.summary()));
            }
        }
    }
    assert!(failures.is_empty(), "family {family}: {} failure(s)\n{}", failures.len(), failures.join("\n\n"));
}
