//! Save under one layout or class, load under another: Megatron-Core's own reconfiguration
//! and interchangeability tables (spec §8.1), random pairs, other dtypes and many experts.

use super::{global_weights, layout, rank_states, reconfigure, sized, with, Side, DTYPE, TEST_DTYPE};
use moe_checkpoint::{reshard, save, Checkpoint, ExpertLayout, ReshardOptions, ReshardTarget, SaveOptions, SavePart};
use moe_reference::{Dtype, LayerClass};
use proptest::prelude::*;

use LayerClass::{Grouped, Sequential, TeGrouped};

/// spec §8.1 `test_parallel_reconfiguration_e2e`: (use_fpsl, src (tp,pp,ep,etp), dest, glu).
/// use_fpsl (FullyParallel save/load wrappers) only changes which rank writes, not the data.
const RECONFIGURATION: [(bool, [usize; 4], [usize; 4], bool); 16] = [
    (false, [2, 4, 1, 2], [2, 4, 1, 2], false),
    (true, [2, 4, 1, 2], [2, 4, 1, 2], false),
    (false, [2, 4, 1, 2], [1, 4, 1, 2], false),
    (true, [2, 1, 1, 2], [1, 1, 1, 2], false),
    (false, [1, 1, 1, 1], [1, 1, 1, 1], false),
    (true, [1, 1, 1, 1], [1, 1, 4, 1], false),
    (false, [1, 1, 8, 1], [1, 1, 2, 1], false),
    (false, [2, 2, 2, 2], [4, 2, 1, 4], false),
    (true, [1, 1, 4, 1], [8, 1, 1, 1], false),
    (false, [1, 8, 1, 1], [1, 8, 1, 1], false),
    (false, [1, 1, 4, 1], [2, 1, 1, 2], false),
    (false, [2, 1, 4, 1], [2, 1, 1, 4], false),
    (false, [1, 1, 1, 1], [1, 1, 1, 1], true),
    (false, [1, 1, 1, 1], [1, 1, 4, 1], true),
    (true, [1, 1, 1, 1], [2, 1, 1, 1], true),
    (false, [1, 1, 4, 1], [8, 1, 1, 8], true),
];

/// Megatron runs these on 8 ranks: expert-DP size = 8 / (pp · etp · ep).
fn side_8(class: LayerClass, [_tp, pp, ep, etp]: [usize; 4], glu: bool, singleton: bool) -> Side {
    Side { layout: layout(class, etp, ep, glu, singleton), pp, edp: 8 / (pp * etp * ep) }
}

#[test]
fn parallel_reconfiguration_matches_megatron_table() {
    for (i, (_fpsl, src, dst, glu)) in RECONFIGURATION.iter().enumerate() {
        for class in LayerClass::ALL {
            for singleton in [false, true] {
                let a = side_8(class, *src, *glu, singleton);
                let b = side_8(class, *dst, *glu, singleton);
                reconfigure(&a, &b, 100 + i as u64);
            }
        }
    }
}

/// spec §8.1 `test_sequential_grouped_mlp_interchangeable`: src (tp,pp,ep), dest, glu,
/// singleton; ETP = TP. `te_sequential` is SequentialMLP with TE linears, the same layout.
const INTERCHANGE: [([usize; 3], [usize; 3], bool, bool); 10] = [
    ([2, 4, 1], [2, 4, 1], false, false),
    ([1, 1, 1], [1, 1, 4], false, true),
    ([2, 2, 2], [4, 2, 1], false, false),
    ([1, 1, 4], [8, 1, 1], false, true),
    ([2, 1, 4], [1, 1, 8], false, false),
    ([2, 4, 1], [2, 4, 1], true, true),
    ([1, 1, 1], [1, 1, 4], true, false),
    ([2, 2, 2], [4, 2, 1], true, true),
    ([1, 1, 4], [8, 1, 1], true, false),
    ([2, 1, 4], [1, 1, 8], true, true),
];

#[test]
fn sequential_grouped_interchangeable_matches_megatron_table() {
    // OLD's module pairs mapped onto our classes (te_sequential == sequential), plus the two
    // grouped <-> te_grouped pairs Megatron never ran.
    let pairs = [
        (Sequential, Grouped),
        (Grouped, Sequential),
        (Sequential, Sequential),
        (Sequential, TeGrouped),
        (TeGrouped, Sequential),
        (Grouped, TeGrouped),
        (TeGrouped, Grouped),
    ];
    for (i, ([tp, pp, ep], [dtp, dpp, dep], glu, singleton)) in INTERCHANGE.iter().enumerate() {
        for (ca, cb) in pairs {
            let a = side_8(ca, [*tp, *pp, *ep, *tp], *glu, *singleton);
            let b = side_8(cb, [*dtp, *dpp, *dep, *dtp], *glu, *singleton);
            reconfigure(&a, &b, 200 + i as u64);
        }
    }
}

#[test]
fn biases_round_trip_between_classes_and_ep() {
    // Bias requires ETP 1 (spec §6.3) and is absent from GroupedMLP; Megatron-Bridge #1151
    // (expert biases failed to save with TP > 1, EP = 1) motivates the ep = 1 source.
    for (glu, singleton) in [(false, false), (true, false), (true, true), (false, true)] {
        for (ca, cb, ep_a, ep_b) in [(Sequential, TeGrouped, 1, 4), (TeGrouped, Sequential, 2, 1)] {
            let mut la = layout(ca, 1, ep_a, glu, singleton);
            let mut lb = layout(cb, 1, ep_b, glu, !singleton);
            la.config.add_bias = true;
            lb.config.add_bias = true;
            reconfigure(&Side { layout: la, pp: 1, edp: 2 }, &Side { layout: lb, pp: 1, edp: 1 }, 7);
        }
    }
}

fn arb_side(glu: bool, bias: bool) -> impl Strategy<Value = Side> {
    let classes = if bias { vec![Sequential, TeGrouped] } else { LayerClass::ALL.to_vec() };
    let tps = if bias { vec![1usize] } else { vec![1usize, 2, 4] };
    (
        prop::sample::select(classes),
        prop::sample::select(tps),
        prop::sample::select(vec![1usize, 2, 4]),
        any::<bool>(),
        1usize..=2,
    )
        .prop_map(move |(class, tp, ep, singleton, edp)| Side {
            layout: with(sized(layout(class, tp, ep, glu, singleton), 4, 8, 8), |c| c.add_bias = bias),
            pp: 1,
            edp,
        })
}

fn arb_pair() -> impl Strategy<Value = (Side, Side)> {
    (any::<bool>(), any::<bool>()).prop_flat_map(|(glu, bias)| (arb_side(glu, bias), arb_side(glu, bias)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any (class, layout, glu, bias, singleton) source loads into any destination of the same
    /// model; shrinking reduces to the smallest failing pair.
    #[test]
    fn any_layout_round_trips_into_any_other((a, b) in arb_pair(), seed in 0u64..1000) {
        reconfigure(&a, &b, seed);
    }
}

#[test]
fn f16_and_f32_checkpoints_round_trip_bit_for_bit() {
    // GroupedMLP runs bf16 only (spec §2), the other classes store any params dtype; the
    // on-disk bytes are the dtype's own, so f16 and f32 must survive resharding unchanged.
    for dt in [Dtype::F16, Dtype::F32] {
        TEST_DTYPE.with(|d| d.set(dt));
        let a = with(layout(Sequential, 1, 2, true, false), |c| c.add_bias = true);
        let b = ExpertLayout {
            singleton: true,
            ..with(a.clone(), |c| {
                c.class = TeGrouped;
                c.parallel.ep_size = 4;
            })
        };
        reconfigure(&Side { layout: a.clone(), pp: 1, edp: 1 }, &Side { layout: b, pp: 1, edp: 1 }, 16);
        let c = with(a, |c| {
            c.add_bias = false;
            c.parallel.tp_size = 4;
        });
        let d = with(c.clone(), |c| {
            c.parallel.tp_size = 1;
            c.parallel.ep_size = 8;
        });
        reconfigure(&Side { layout: c, pp: 2, edp: 1 }, &Side { layout: d, pp: 2, edp: 1 }, 32);
    }
    TEST_DTYPE.with(|d| d.set(DTYPE));
}

#[test]
fn many_experts_reshard_quickly() {
    // DeepSeek-V3's expert count (256) with tiny matrices: opening, planning and overlap checks
    // must stay fast with thousands of shards per key (the overlap check is a sweep, not all
    // pairs).
    let tmp = tempfile::tempdir().unwrap();
    let l = sized(layout(TeGrouped, 2, 8, true, false), 256, 4, 8);
    let g = global_weights(&l, 256);
    let st = rank_states(&l, &l.ranks(), &g);
    let parts: Vec<SavePart> =
        l.ranks().iter().zip(&st).map(|(c, s)| SavePart { layout: &l, rank: *c, state: s }).collect();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let t0 = std::time::Instant::now();
    save(&a, &parts, &SaveOptions::default()).unwrap();
    let opts = ReshardOptions { verify: true, ..Default::default() };
    reshard(&a, &b, ReshardTarget { class: Grouped, tp: 4, ep: 4, singleton: true }, opts).unwrap();
    assert_eq!(Checkpoint::open(&b).unwrap().index.shards.len(), 256 * 4 * 3);
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
}
