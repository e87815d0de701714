//! The differential runner: checks a [`Property`] of a [`Backend`] over random cases with
//! proptest, shrinking any failure to a minimal case.

use crate::case::Case;
use crate::properties::{check, Backend, Property, Verdict};
use moe_reference::{ExpertLayer, Inputs, LayerClass, LayerConfig, LayerError, LayerRun, StateDict, WgradTiming};
use ndarray::Array2;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The result of one (backend, property) run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PropertyReport {
    /// Backend name.
    pub backend: String,
    /// The property.
    pub property: Property,
    /// Cases checked (excluding skipped ones and shrink steps).
    pub checked: usize,
    /// Cases skipped as not applicable/unsupported.
    pub skipped: usize,
    /// Checked cases in which the implementation was called at least once at EP > 1 or
    /// ETP > 1 (counted from the calls it received, not from the case's layout).
    pub sharded: usize,
    /// The largest `error / bound` seen in passing cases (≤ 1).
    pub worst_ratio: f64,
    /// The tensor and case summary of that worst passing element.
    pub worst_where: String,
    /// Checked cases with an fp8 recipe.
    pub fp8_checked: usize,
    /// Skipped cases with an fp8 recipe (GroupedMLP's among them).
    pub fp8_skipped: usize,
    /// Skipped GroupedMLP cases with an fp8 recipe: Megatron's GroupedMLP has no fp8 path
    /// ([`crate::properties::grouped_fp8_skip`]).
    pub grouped_fp8_skipped: usize,
    /// Checked fp8 cases per recipe and format (`Fp8Config::label`, e.g. `blockwise/e4m3`).
    pub fp8_labels: std::collections::BTreeMap<String, usize>,
    /// The largest DeepGEMM `calc_diff` of any tensor compared in a checked fp8 case (`None`
    /// without one); the property's pass or fail does not depend on it.
    pub worst_calc_diff: Option<f64>,
    /// The tensor and case summary of that `calc_diff`.
    pub worst_calc_diff_where: String,
    /// The shrunk failing case and why it failed.
    pub failure: Option<FailureReport>,
}

/// A minimal failing case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailureReport {
    /// The shrunk case (`None` when the run was aborted before a case failed).
    pub case: Option<Case>,
    /// The failure message (diffs or error).
    pub message: String,
}

impl PropertyReport {
    /// True when no case failed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

#[derive(Default)]
struct Tally {
    checked: usize,
    skipped: usize,
    sharded: usize,
    worst_ratio: f64,
    worst_where: String,
    fp8_checked: usize,
    fp8_skipped: usize,
    grouped_fp8_skipped: usize,
    fp8_labels: std::collections::BTreeMap<String, usize>,
    worst_calc_diff: Option<f64>,
    worst_calc_diff_where: String,
    failing: bool,
}

/// Whether `new` is a worse DeepGEMM `calc_diff` than the worst so far, `current`: any value
/// beats none, a larger one beats a smaller one, and NaN (a NaN in a result) is the worst of
/// all, kept once seen.
fn worse_calc_diff(current: Option<f64>, new: f64) -> bool {
    match current {
        None => true,
        Some(w) => !w.is_nan() && (new.is_nan() || new > w),
    }
}

/// Runs `property` for `backend` over `cases` random cases drawn from `strategy` with a
/// deterministic `seed`; `on_case` is called after every case (for progress bars).
pub fn run_property<S>(
    backend: &dyn Backend,
    property: Property,
    strategy: &S,
    cases: u32,
    seed: u64,
    on_case: &(dyn Fn() + Sync),
) -> PropertyReport
where
    S: Strategy<Value = Case>,
{
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..16].copy_from_slice(&(property as u64).to_le_bytes());
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 2048, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let tally = Mutex::new(Tally::default());
    let counting = CallCounting::new(backend);
    let result = runner.run(strategy, |case| {
        let sharded_before = counting.sharded_calls();
        let outcome = check(&counting, property, &case);
        let sharded = counting.sharded_calls() > sharded_before;
        let mut t = tally.lock().unwrap();
        if !t.failing {
            on_case();
        }
        match outcome {
            Ok(Verdict::Checked(diffs)) => {
                if !t.failing {
                    t.checked += 1;
                    t.sharded += usize::from(sharded);
                    if let Some(f) = case.cfg.fp8 {
                        t.fp8_checked += 1;
                        *t.fp8_labels.entry(format!("{}/{}", f.recipe, f.format)).or_default() += 1;
                    }
                    for d in diffs {
                        if d.worst_ratio > t.worst_ratio {
                            t.worst_ratio = d.worst_ratio;
                            t.worst_where = format!("{} in {}", d.name, case.summary());
                        }
                        if case.cfg.fp8.is_some() && worse_calc_diff(t.worst_calc_diff, d.calc_diff) {
                            t.worst_calc_diff = Some(d.calc_diff);
                            t.worst_calc_diff_where = format!("{} in {}", d.name, case.summary());
                        }
                    }
                }
                Ok(())
            }
            Ok(Verdict::Skipped(_)) => {
                if !t.failing {
                    t.skipped += 1;
                    if case.cfg.fp8.is_some() {
                        t.fp8_skipped += 1;
                        t.grouped_fp8_skipped += usize::from(case.cfg.class == LayerClass::Grouped);
                    }
                }
                Ok(())
            }
            Err(f) => {
                t.failing = true;
                Err(TestCaseError::fail(f.to_string()))
            }
        }
    });
    let t = tally.into_inner().unwrap();
    let failure = match result {
        Ok(()) => None,
        Err(TestError::Fail(reason, case)) => Some(FailureReport { case: Some(case), message: reason.to_string() }),
        Err(TestError::Abort(reason)) => Some(FailureReport { case: None, message: format!("aborted: {reason}") }),
    };
    PropertyReport {
        backend: backend.name(),
        property,
        checked: t.checked,
        skipped: t.skipped,
        sharded: t.sharded,
        worst_ratio: t.worst_ratio,
        worst_where: t.worst_where,
        fp8_checked: t.fp8_checked,
        fp8_skipped: t.fp8_skipped,
        grouped_fp8_skipped: t.grouped_fp8_skipped,
        fp8_labels: t.fp8_labels,
        worst_calc_diff: t.worst_calc_diff,
        worst_calc_diff_where: t.worst_calc_diff_where,
        failure,
    }
}

/// A backend that forwards every call to another and counts the `forward`/`forward_backward`
/// calls its layers receive, all of them and those made at a sharded layout (EP > 1 or
/// ETP > 1): how the runner reports the `sharded` column, and how a test shows that a property
/// ran the implementation it is reported for.
pub struct CallCounting<'a> {
    inner: &'a dyn Backend,
    layers: [Option<CountingLayer<'a>>; 3],
    counts: Arc<CallCounts>,
}

#[derive(Default)]
struct CallCounts {
    all: AtomicUsize,
    sharded: AtomicUsize,
}

impl<'a> CallCounting<'a> {
    /// `inner`, its calls counted from zero.
    pub fn new(inner: &'a dyn Backend) -> CallCounting<'a> {
        let counts = Arc::new(CallCounts::default());
        let layers =
            LayerClass::ALL.map(|c| inner.layer(c).map(|l| CountingLayer { inner: l, counts: Arc::clone(&counts) }));
        CallCounting { inner, layers, counts }
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.counts.all.load(Ordering::Relaxed)
    }

    /// Calls received so far at EP > 1 or ETP > 1.
    pub fn sharded_calls(&self) -> usize {
        self.counts.sharded.load(Ordering::Relaxed)
    }
}

impl Backend for CallCounting<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn layer(&self, class: LayerClass) -> Option<&dyn ExpertLayer> {
        let i = LayerClass::ALL.iter().position(|&c| c == class)?;
        self.layers[i].as_ref().map(|l| l as &dyn ExpertLayer)
    }
    fn reduction(&self, cfg: &LayerConfig) -> moe_reference::parallel::EtpReduction {
        self.inner.reduction(cfg)
    }
}

struct CountingLayer<'a> {
    inner: &'a dyn ExpertLayer,
    counts: Arc<CallCounts>,
}

impl CountingLayer<'_> {
    fn note(&self, cfg: &LayerConfig) {
        self.counts.all.fetch_add(1, Ordering::Relaxed);
        if cfg.parallel.tp_size > 1 || cfg.parallel.ep_size > 1 {
            self.counts.sharded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ExpertLayer for CountingLayer<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
        self.inner.supports(cfg)
    }
    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
        self.note(cfg);
        self.inner.forward(cfg, params, inputs)
    }
    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        self.note(cfg);
        self.inner.forward_backward(cfg, params, inputs, grad_output, timing)
    }
}

#[cfg(test)]
mod tests {
    use super::worse_calc_diff;

    /// The report's worst fp8 `calc_diff` is the largest seen, NaN the worst of all and kept:
    /// a rule that took the latest value, or let a number replace a NaN, would report a
    /// better worst case than the run had.
    #[test]
    fn the_worst_calc_diff_is_the_largest_and_nan_wins() {
        assert!(worse_calc_diff(None, 0.0));
        assert!(worse_calc_diff(Some(0.1), 0.2));
        assert!(!worse_calc_diff(Some(0.2), 0.1), "a smaller value replaced the worst");
        assert!(!worse_calc_diff(Some(0.2), 0.2));
        assert!(worse_calc_diff(Some(0.2), f64::NAN));
        assert!(!worse_calc_diff(Some(f64::NAN), 0.5), "a number replaced a NaN");
        assert!(!worse_calc_diff(Some(f64::NAN), f64::NAN));
    }
}
