//! Megatron HEAD's GLU interleaving (`moe_mlp_glu_interleave_size`, spec §4.10) through the
//! property suite: every property on interleaved TEGroupedMLP cases (sharded ones included,
//! where each ETP rank interleaves its own rows), and planted interleaving bugs that the suite
//! must catch while they stay invisible on non-interleaved cases.

use crate::properties::{force_parallel_layout, verify_case, MAX_TOKENS};
use moe_harness::case::Case;
use moe_harness::properties::{check, Backend, EveryClass, Property, ReferenceBackend, Verdict};
use moe_harness::strategy;
use moe_reference::{
    ExpertLayer, Inputs, LayerClass, LayerConfig, LayerError, LayerRun, Parallelism, Reference, StateDict, WgradTiming,
};
use ndarray::Array2;
use proptest::prelude::*;

/// `case` made a GLU TEGroupedMLP with an interleave size (1, 2 or 4 by the seed, halved until
/// it divides each rank's `N2`, as [`strategy::make_valid`] does).
fn interleaved(mut case: Case) -> Case {
    case.cfg.class = LayerClass::TeGrouped;
    case.cfg.gated_linear_unit = true;
    case.cfg.glu_interleave_size = Some([1, 2, 4][(case.seed % 3) as usize]);
    case.cfg = strategy::make_valid(case.cfg);
    case
}

proptest! {
    #![proptest_config(crate::properties::suite_config(48))]

    /// Every property holds on interleaved cases (the generic strategy draws them in ~5% of
    /// its cases; here all are), half of them at a forced EP × ETP layout.
    #[test]
    fn every_property_holds_on_interleaved_cases(
        case in strategy::case(MAX_TOKENS).prop_map(interleaved),
        sharded in any::<bool>(),
    ) {
        let case = if sharded { interleaved(force_parallel_layout(case)) } else { case };
        prop_assert!(case.cfg.validate().is_ok(), "{}", case.summary());
        for property in Property::ALL {
            verify_case(&ReferenceBackend, property, &case)?;
        }
    }
}

/// How a planted implementation gets the interleaving wrong.
#[derive(Clone, Copy, Debug)]
enum Mishandling {
    /// Reads fc1 as the plain halves (ignores the option).
    Ignored,
    /// Un-interleaves with the wrong block size (twice the configured one where that divides,
    /// else half of it, else the plain halves).
    WrongBlock,
    /// Un-interleaves the layer's full `2f` rows instead of each rank's own (visible only when
    /// ETP > 1): emulated by interleaving with a block size the ETP size times larger.
    GlobalNotPerRank,
}

/// The reference with one [`Mishandling`] of the interleave size; everything else exact.
struct Planted(Mishandling);

impl Planted {
    fn cfg(&self, cfg: &LayerConfig) -> LayerConfig {
        let Some(s) = cfg.glu_interleave_size else { return cfg.clone() };
        let n2 = cfg.n2();
        let size = match self.0 {
            Mishandling::Ignored => None,
            Mishandling::WrongBlock if n2.is_multiple_of(2 * s) => Some(2 * s),
            Mishandling::WrongBlock if s > 1 => Some(s / 2),
            Mishandling::WrongBlock => None,
            Mishandling::GlobalNotPerRank => {
                let t = cfg.parallel.tp_size;
                if t > 1 && n2.is_multiple_of(t * s) {
                    Some(t * s)
                } else {
                    Some(s)
                }
            }
        };
        LayerConfig { glu_interleave_size: size, ..cfg.clone() }
    }
}

impl ExpertLayer for Planted {
    fn name(&self) -> String {
        format!("reference with interleaving {:?}", self.0)
    }
    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
        Reference::EMULATED.supports(cfg)
    }
    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
        Reference::EMULATED.forward(&self.cfg(cfg), params, inputs)
    }
    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        Reference::EMULATED.forward_backward(&self.cfg(cfg), params, inputs, grad_output, timing)
    }
}

/// A TEGroupedMLP SwiGLU case, `f = 16`, 4 experts, tokens on every expert.
fn te_case(size: Option<usize>, tp: usize) -> Case {
    Case {
        cfg: LayerConfig {
            class: LayerClass::TeGrouped,
            num_experts: 4,
            hidden_size: 8,
            ffn_hidden_size: 16,
            glu_interleave_size: size,
            parallel: Parallelism { tp_size: tp, tp_rank: 0, ep_size: 1, ep_rank: 0 },
            ..LayerConfig::example()
        },
        tokens_per_expert: vec![5, 3, 4, 6],
        seed: 11,
        timing: WgradTiming::Immediate,
    }
}

fn failed(backend: &dyn Backend, property: Property, case: &Case) -> bool {
    check(backend, property, case).is_err()
}

fn passed(backend: &dyn Backend, property: Property, case: &Case) -> bool {
    matches!(check(backend, property, case), Ok(Verdict::Checked(ref d)) if !d.is_empty())
}

/// Each mishandling is caught by matches-oracle (unsharded) or parallel-decomposition
/// (sharded) on an interleaved case, and is invisible without interleaving: so what is caught
/// is the interleave handling, not something else the wrapper does. The clean reference passes
/// the same checks.
#[test]
fn planted_interleaving_bugs_are_caught() {
    let reference = ReferenceBackend;
    for s in [1, 2] {
        let case = te_case(Some(s), 1);
        assert!(passed(&reference, Property::MatchesOracle, &case), "clean reference, s = {s}");
        for m in [Mishandling::Ignored, Mishandling::WrongBlock] {
            let b = EveryClass(Planted(m));
            assert!(failed(&b, Property::MatchesOracle, &case), "{m:?} not caught at s = {s}");
            assert!(passed(&b, Property::MatchesOracle, &te_case(None, 1)), "{m:?} seen without interleaving");
        }
    }
    // Per-rank vs whole-tensor interleaving: equal at ETP 1, different at ETP 2.
    let b = EveryClass(Planted(Mishandling::GlobalNotPerRank));
    let sharded = te_case(Some(2), 2);
    assert!(passed(&reference, Property::ParallelDecomposition, &sharded), "clean reference, ETP 2");
    assert!(failed(&b, Property::ParallelDecomposition, &sharded), "whole-tensor interleaving not caught at ETP 2");
    assert!(passed(&b, Property::MatchesOracle, &te_case(Some(2), 1)), "whole-tensor interleaving seen at ETP 1");
}

/// The configurations Megatron HEAD does not interleave are refused with a message naming why
/// (SequentialMLP ignores the option, the legacy GroupedMLP predates it, no GLU, blocks that do
/// not divide a rank's half width).
#[test]
fn interleaving_is_refused_where_megatron_does_not_apply_it() {
    let te = te_case(Some(2), 1).cfg;
    for (cfg, needle) in [
        (LayerConfig { class: LayerClass::Sequential, ..te.clone() }, "SequentialMLP"),
        (LayerConfig { class: LayerClass::Grouped, ..te.clone() }, "GroupedMLP"),
        (LayerConfig { gated_linear_unit: false, ..te.clone() }, "gated_linear_unit"),
        (LayerConfig { glu_interleave_size: Some(3), ..te.clone() }, "N1 = 32"),
        (
            LayerConfig {
                glu_interleave_size: Some(8),
                parallel: Parallelism { tp_size: 4, ..te.parallel },
                ..te.clone()
            },
            "expert_tensor_parallel_size 4",
        ),
        (LayerConfig { glu_interleave_size: Some(0), ..te.clone() }, "positive"),
    ] {
        let err = cfg.validate().expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
