//! The differential runner: checks a [`Property`] of a [`Backend`] over random cases with
//! proptest, shrinking any failure to a minimal case.

use crate::case::Case;
use crate::properties::{check, Backend, Property, Verdict};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::sync::Mutex;

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
    /// The largest `error / bound` seen in passing cases (≤ 1).
    pub worst_ratio: f64,
    /// The tensor and case summary of that worst passing element.
    pub worst_where: String,
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
    worst_ratio: f64,
    worst_where: String,
    failing: bool,
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
    let result = runner.run(strategy, |case| {
        let outcome = check(backend, property, &case);
        let mut t = tally.lock().unwrap();
        if !t.failing {
            on_case();
        }
        match outcome {
            Ok(Verdict::Checked(diffs)) => {
                if !t.failing {
                    t.checked += 1;
                    for d in diffs {
                        if d.worst_ratio > t.worst_ratio {
                            t.worst_ratio = d.worst_ratio;
                            t.worst_where = format!("{} in {}", d.name, case.summary());
                        }
                    }
                }
                Ok(())
            }
            Ok(Verdict::Skipped(_)) => {
                if !t.failing {
                    t.skipped += 1;
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
        worst_ratio: t.worst_ratio,
        worst_where: t.worst_where,
        failure,
    }
}
