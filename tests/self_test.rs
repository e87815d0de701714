//! The harness tests itself: every property's verdict must be able to fail for the
//! implementation under test. For each property a wrapper of the reference carries a planted bug
//! that only this property can see on a suitable case (`moe_harness::planted`); the whole
//! verdict matrix (bug × property) is checked, so a property that stopped running the backend,
//! or started seeing another property's bug, fails here. The random case strategy is measured
//! too: it must reach sharded layouts often enough for the sharded properties to mean something.

use moe_harness::case::Case;
use moe_harness::planted::{PlantedBackend, PlantedBug};
use moe_harness::properties::{check, Property, PropertyFailure, ReferenceBackend, Verdict};
use moe_harness::runner::run_property;
use moe_harness::strategy;
use moe_reference::{LayerClass, LayerConfig, Parallelism, WgradTiming};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};

/// The property that must see `bug` (and the only one that sees it on [`sharded_case`]).
fn seen_by(bug: PlantedBug) -> Property {
    match bug {
        PlantedBug::UnshardedOutput => Property::MatchesOracle,
        PlantedBug::EtpRankPartial => Property::ParallelDecomposition,
        PlantedBug::GroupedOnly => Property::ClassEquivalence,
        PlantedBug::AllEmptyGrads => Property::ZeroTokens,
        PlantedBug::UnderPadding => Property::PaddingNeutrality,
        PlantedBug::DeferredWgradOnly => Property::DeferredWgrad,
        PlantedBug::SaturatedProbs => Property::ProbsLinearity,
    }
}

/// A case every property applies to: SequentialMLP (so GroupedMLP is another class), bf16
/// SwiGLU without bias (so GroupedMLP agrees), EP 2 × ETP 2 with tokens on every EP rank (so
/// no planted bug for empty calls triggers outside zero-tokens), immediate wgrad, no padding.
fn sharded_case() -> Case {
    Case {
        cfg: LayerConfig {
            num_experts: 4,
            hidden_size: 16,
            ffn_hidden_size: 8,
            parallel: Parallelism { tp_size: 2, tp_rank: 0, ep_size: 2, ep_rank: 0 },
            ..LayerConfig::example()
        },
        tokens_per_expert: vec![5, 3, 4, 6],
        seed: 7,
        timing: WgradTiming::Immediate,
    }
}

#[test]
fn every_property_checks_the_self_test_case_on_the_reference() {
    // Otherwise a planted bug could "pass" a property by making it skip.
    let case = sharded_case();
    for property in Property::ALL {
        match check(&ReferenceBackend, property, &case) {
            Ok(Verdict::Checked(diffs)) => assert!(!diffs.is_empty(), "{}: no tensor compared", property.name()),
            other => panic!("{} on the clean reference: {other:?}", property.name()),
        }
    }
}

#[test]
fn each_planted_bug_fails_exactly_its_own_property() {
    let case = sharded_case();
    let mut wrong = Vec::new();
    for bug in PlantedBug::ALL {
        let backend = PlantedBackend::new(&ReferenceBackend, bug);
        for property in Property::ALL {
            let should_fail = property == seen_by(bug);
            let outcome = check(&backend, property, &case);
            let failed = matches!(outcome, Err(PropertyFailure::Mismatch(_)));
            let errored = matches!(outcome, Err(PropertyFailure::Error(_)));
            if failed != should_fail || errored {
                wrong.push(format!(
                    "{} / {}: expected {}, got {:?}",
                    bug.name(),
                    property.name(),
                    if should_fail { "a mismatch" } else { "a pass" },
                    outcome.map(|v| matches!(v, Verdict::Checked(_)))
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "verdict matrix differs:\n{}", wrong.join("\n"));
}

#[test]
fn random_cases_find_the_sharding_bug_and_shrink_it() {
    // The runner over the generated cases (as `moe-verify verify` runs it) must find the bug
    // that only a sharded run shows, and shrink it to a case that is still sharded with ETP > 1.
    let backend = PlantedBackend::new(&ReferenceBackend, PlantedBug::EtpRankPartial);
    let report = run_property(&backend, Property::ParallelDecomposition, &strategy::case(40), 64, 0x5EED, &|| {});
    let failure = report.failure.expect("the planted ETP bug is found");
    let case = failure.case.expect("a shrunk case");
    assert!(case.cfg.parallel.tp_size > 1, "shrunk to {}", case.summary());
    // The reference itself passes the same run, with its sharded cases counted.
    let clean =
        run_property(&ReferenceBackend, Property::ParallelDecomposition, &strategy::case(40), 64, 0x5EED, &|| {});
    assert!(clean.passed(), "{:?}", clean.failure);
    assert_eq!(clean.sharded, clean.checked, "every checked case of the sharded property is sharded");
    assert!(clean.checked >= 20, "only {} of 64 cases sharded", clean.checked);
}

#[test]
fn the_runner_checks_exactly_the_requested_number_of_cases() {
    // `verify --cases N` promises N cases per (implementation, property): checked + skipped.
    for n in [1, 7] {
        let r = run_property(&ReferenceBackend, Property::DeferredWgrad, &strategy::case(40), n, 9, &|| {});
        assert_eq!(r.checked + r.skipped, n as usize, "{r:?}");
    }
}

#[test]
fn the_report_counts_sharded_calls_from_the_backend() {
    // matches-oracle calls the backend unsharded only; zero-tokens calls it at the case's layout.
    let mo = run_property(&ReferenceBackend, Property::MatchesOracle, &strategy::case(40), 48, 1, &|| {});
    assert_eq!(mo.sharded, 0);
    let zt = run_property(&ReferenceBackend, Property::ZeroTokens, &strategy::case(40), 48, 1, &|| {});
    assert!(zt.sharded > 0 && zt.sharded < zt.checked, "{} of {}", zt.sharded, zt.checked);
}

/// `n` cases drawn from the generator `verify` and the stamped suites use.
fn generated_cases(n: usize) -> Vec<Case> {
    let mut runner = TestRunner::new(Config::default());
    let s = strategy::case(40);
    (0..n).map(|_| s.new_tree(&mut runner).expect("strategy draws").current()).collect()
}

#[test]
fn generated_cases_are_sharded_often_with_layouts_up_to_8_and_empty_ranks() {
    let cases = generated_cases(3000);
    let sharded = cases.iter().filter(|c| c.cfg.parallel.tp_size > 1 || c.cfg.parallel.ep_size > 1).count();
    let share = sharded as f64 / cases.len() as f64;
    assert!(share >= 0.30, "only {:.1}% of generated cases are sharded", 100.0 * share);
    assert!(cases.iter().any(|c| c.cfg.parallel.ep_size == 8), "EP 8 never generated");
    assert!(cases.iter().any(|c| c.cfg.parallel.tp_size == 8), "ETP 8 never generated");
    assert!(cases.iter().any(|c| c.cfg.parallel.tp_size > 1 && c.cfg.class == LayerClass::Grouped));
    // An EP rank that receives no tokens at all, and EP ranks with unequal token counts.
    let rank_tokens = |c: &Case| -> Vec<i64> {
        let el = c.cfg.num_local_experts();
        c.tokens_per_expert.chunks(el).map(|r| r.iter().sum()).collect()
    };
    let multi_ep: Vec<&Case> = cases.iter().filter(|c| c.cfg.parallel.ep_size > 1).collect();
    let empty_rank = multi_ep.iter().filter(|c| rank_tokens(c).contains(&0)).count();
    let uneven = multi_ep.iter().filter(|c| rank_tokens(c).windows(2).any(|w| w[0] != w[1])).count();
    assert!(empty_rank * 10 >= multi_ep.len(), "{empty_rank} of {} EP cases have an empty rank", multi_ep.len());
    assert!(uneven * 2 >= multi_ep.len(), "{uneven} of {} EP cases are uneven", multi_ep.len());
}

/// The verdict matrix on an fp8 case (SequentialMLP, tensorwise/hybrid, EP 2 × ETP 2, h = f = 32).
/// No property fails on a bug that is not its own, and the clean reference passes them all. Seen:
/// the unsharded output doubled (matches-oracle), uninitialised empty grads (zero-tokens), the
/// padded output doubled (padding-neutrality, whose two runs quantize their input, weights and
/// upstream gradient alike, so its bound counts only the derived operands' quantization:
/// `Fp8Channel::Paired`), doubled deferred grads (deferred-wgrad, exact). Not seen on this small
/// layer: saturated probs (probs-linearity: up to half the output on rows with `p > ½`, inside
/// twice the paired bound) and a doubled ETP partial (parallel-decomposition: the shards quantize
/// differently, so its bound carries the whole fp8 channel, about a quarter of the largest output
/// here). GroupedMLP has no fp8 path, so class-equivalence compares SequentialMLP with
/// TEGroupedMLP only and its bug is not there to see.
#[test]
fn planted_bugs_on_an_fp8_case_fail_only_their_own_property() {
    let mut case = sharded_case();
    case.cfg.hidden_size = 32;
    case.cfg.ffn_hidden_size = 32;
    case.cfg.fp8 = Some(moe_reference::Fp8Config::new(moe_reference::Fp8Recipe::Tensorwise));
    for property in Property::ALL {
        match check(&ReferenceBackend, property, &case) {
            Ok(Verdict::Checked(diffs)) => assert!(!diffs.is_empty(), "{}: no tensor compared", property.name()),
            other => panic!("{} on the clean reference: {other:?}", property.name()),
        }
    }
    let seen_on_fp8 = [
        PlantedBug::UnshardedOutput,
        PlantedBug::AllEmptyGrads,
        PlantedBug::UnderPadding,
        PlantedBug::DeferredWgradOnly,
    ];
    let mut wrong = Vec::new();
    for bug in PlantedBug::ALL {
        let backend = PlantedBackend::new(&ReferenceBackend, bug);
        for property in Property::ALL {
            let should_fail = property == seen_by(bug) && seen_on_fp8.contains(&bug);
            let outcome = check(&backend, property, &case);
            let failed = matches!(outcome, Err(PropertyFailure::Mismatch(_)));
            if failed != should_fail || matches!(outcome, Err(PropertyFailure::Error(_))) {
                wrong.push(format!(
                    "{} / {}: expected fail={should_fail}, got {outcome:?}",
                    bug.name(),
                    property.name()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "fp8 verdict matrix differs:\n{}", wrong.join("\n"));
}

/// The generator draws GLU-interleaved TEGroupedMLP cases (Megatron HEAD, spec §4.10) as a
/// small share — enough that every stamped property meets some — including sharded ones and
/// every block size, and only where Megatron applies the option.
#[test]
fn generated_cases_include_a_small_share_of_interleaved_glu() {
    let cases = generated_cases(3000);
    let interleaved: Vec<&Case> = cases.iter().filter(|c| c.cfg.glu_interleave_size.is_some()).collect();
    let share = interleaved.len() as f64 / cases.len() as f64;
    assert!((0.02..=0.10).contains(&share), "{:.1}% of generated cases are interleaved", 100.0 * share);
    assert!(interleaved.iter().all(|c| c.cfg.class == LayerClass::TeGrouped && c.cfg.gated_linear_unit));
    assert!(interleaved.iter().all(|c| c.cfg.validate().is_ok()));
    assert!(interleaved.iter().any(|c| c.cfg.parallel.tp_size > 1), "no interleaved case at ETP > 1");
    for s in [1, 2, 4] {
        assert!(interleaved.iter().any(|c| c.cfg.glu_interleave_size == Some(s)), "block size {s} never drawn");
    }
}
