//! Planted bugs: wrappers of an implementation that are wrong in exactly one way, each visible
//! to exactly one [`Property`](crate::properties::Property) on a suitable case. They prove that
//! every property's verdict can fail for the implementation under test (a property that only
//! re-checked the reference could not see them). `tests/self_test.rs` runs every property on
//! every planted bug and checks the whole verdict matrix.

use crate::properties::Backend;
use moe_reference::parallel::EtpReduction;
use moe_reference::{ExpertLayer, Inputs, LayerClass, LayerConfig, LayerError, LayerRun, StateDict, WgradTiming};
use ndarray::Array2;

/// The factor a planted bug multiplies a result by: a partial or a term counted twice. (The
/// bf16 error model of a small eager layer allows relative errors of several percent on
/// elements that are differences of larger terms, so a subtler factor would hide in it.)
const WRONG_BY: f64 = 2.0;

/// The planted bugs, one per property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// Wrong only in an unsharded call (a special fast path for `E_l = E`, ETP 1): the output is
    /// doubled. Only `matches-oracle` calls the layer unsharded on a sharded case.
    UnshardedOutput,
    /// ETP rank 1's partial output is doubled (its partial counted twice): only the sharded
    /// property sees it; everything else on a sharded case compares two equally wrong runs.
    EtpRankPartial,
    /// GroupedMLP's output is doubled: only the comparison of the classes sees it on a case
    /// of another class.
    GroupedOnly,
    /// When every expert is empty, the weight grads are left uninitialised (filled with 2⁻²⁰),
    /// a kernel that returns early without zeroing its outputs.
    AllEmptyGrads,
    /// With Megatron's padding to a multiple, the output is doubled (padding rows leaking
    /// into the result).
    UnderPadding,
    /// `backward_dw` (deferred wgrad) returns fc2's weight grads doubled.
    DeferredWgradOnly,
    /// Probs above 1 are saturated to 1 (a kernel assuming router probabilities ≤ 1): the
    /// output is not linear in the probs beyond 1.
    SaturatedProbs,
}

impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 7] = [
        PlantedBug::UnshardedOutput,
        PlantedBug::EtpRankPartial,
        PlantedBug::GroupedOnly,
        PlantedBug::AllEmptyGrads,
        PlantedBug::UnderPadding,
        PlantedBug::DeferredWgradOnly,
        PlantedBug::SaturatedProbs,
    ];

    /// A short kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::UnshardedOutput => "unsharded-output",
            PlantedBug::EtpRankPartial => "etp-rank-partial",
            PlantedBug::GroupedOnly => "grouped-only",
            PlantedBug::AllEmptyGrads => "all-empty-grads",
            PlantedBug::UnderPadding => "under-padding",
            PlantedBug::DeferredWgradOnly => "deferred-wgrad-only",
            PlantedBug::SaturatedProbs => "saturated-probs",
        }
    }
}

/// An [`ExpertLayer`] that runs `inner` and then applies `bug`.
pub struct PlantedLayer<'a> {
    inner: &'a dyn ExpertLayer,
    bug: PlantedBug,
}

impl PlantedLayer<'_> {
    fn output_is_wrong(&self, cfg: &LayerConfig) -> bool {
        let p = cfg.parallel;
        match self.bug {
            PlantedBug::UnshardedOutput => p.tp_size == 1 && p.ep_size == 1,
            PlantedBug::EtpRankPartial => p.tp_size > 1 && p.tp_rank == 1,
            PlantedBug::GroupedOnly => cfg.class == LayerClass::Grouped,
            PlantedBug::UnderPadding => cfg.padding_multiple.is_some(),
            _ => false,
        }
    }

    fn inputs(&self, inputs: &Inputs) -> Inputs {
        let mut inputs = inputs.clone();
        if self.bug == PlantedBug::SaturatedProbs {
            inputs.probs.mapv_inplace(|p| p.min(1.0));
        }
        inputs
    }
}

impl ExpertLayer for PlantedLayer<'_> {
    fn name(&self) -> String {
        format!("{} with {}", self.inner.name(), self.bug.name())
    }

    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
        self.inner.supports(cfg)
    }

    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
        let mut y = self.inner.forward(cfg, params, &self.inputs(inputs))?;
        if self.output_is_wrong(cfg) {
            y.mapv_inplace(|v| v * WRONG_BY);
        }
        Ok(y)
    }

    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        let mut run = self.inner.forward_backward(cfg, params, &self.inputs(inputs), grad_output, timing)?;
        if self.output_is_wrong(cfg) {
            run.output.mapv_inplace(|v| v * WRONG_BY);
        }
        let all_empty = inputs.tokens_per_expert.iter().all(|&n| n == 0);
        for (name, grad) in &mut run.weight_grads {
            match self.bug {
                PlantedBug::AllEmptyGrads if all_empty => grad.fill(2f64.powi(-20)),
                PlantedBug::DeferredWgradOnly if timing == WgradTiming::Deferred && name.contains("fc2") => {
                    grad.mapv_inplace(|v| v * WRONG_BY)
                }
                _ => {}
            }
        }
        Ok(run)
    }
}

/// A [`Backend`] whose every class is `inner`'s with `bug` planted.
pub struct PlantedBackend<'a> {
    inner: &'a dyn Backend,
    bug: PlantedBug,
    layers: [Option<PlantedLayer<'a>>; 3],
}

impl<'a> PlantedBackend<'a> {
    /// `inner` with `bug` planted in every class it implements.
    pub fn new(inner: &'a dyn Backend, bug: PlantedBug) -> PlantedBackend<'a> {
        let layers = LayerClass::ALL.map(|c| inner.layer(c).map(|l| PlantedLayer { inner: l, bug }));
        PlantedBackend { inner, bug, layers }
    }
}

impl Backend for PlantedBackend<'_> {
    fn name(&self) -> String {
        format!("{} with {}", self.inner.name(), self.bug.name())
    }
    fn layer(&self, class: LayerClass) -> Option<&dyn ExpertLayer> {
        let i = LayerClass::ALL.iter().position(|&c| c == class)?;
        self.layers[i].as_ref().map(|l| l as &dyn ExpertLayer)
    }
    fn reduction(&self, cfg: &LayerConfig) -> EtpReduction {
        self.inner.reduction(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_reference::{Parallelism, Reference};

    /// Each planted bug is wrong exactly where its doc says: `EtpRankPartial` on ETP rank 1 of
    /// a sharded call only (rank 0's partial and an unsharded call stay right, or the sharded
    /// property would not be the only one to see it), `UnshardedOutput` on an unsharded call only.
    #[test]
    fn planted_outputs_are_wrong_exactly_where_documented() {
        let reference = Reference::ORACLE;
        let at = |bug: PlantedBug, tp_size: usize, tp_rank: usize| {
            let layer = PlantedLayer { inner: &reference, bug };
            let cfg = LayerConfig {
                parallel: Parallelism { tp_size, tp_rank, ep_size: 1, ep_rank: 0 },
                ..LayerConfig::example()
            };
            layer.output_is_wrong(&cfg)
        };
        assert!(at(PlantedBug::EtpRankPartial, 2, 1));
        assert!(!at(PlantedBug::EtpRankPartial, 2, 0), "rank 0's partial must stay right");
        assert!(!at(PlantedBug::EtpRankPartial, 1, 0));
        assert!(at(PlantedBug::UnshardedOutput, 1, 0));
        assert!(!at(PlantedBug::UnshardedOutput, 2, 1));
    }
}
