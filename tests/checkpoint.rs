//! Checkpoints: Megatron-Core's sharded state dict layouts, save -> load under another layout
//! or class, bad input, and the CLI (issue 3; spec §7, §8.1).

use moe_checkpoint::format::{parse_key, INDEX};
use moe_checkpoint::tensor::{f64_state_dict, raw_state_dict};
use moe_checkpoint::{
    layout_json, reshard, save, sharded_state_dict, Checkpoint, CheckpointError, ExpertLayout, RankCoord, RawStateDict,
    ReshardOptions, ReshardTarget, SaveOptions, SavePart, ShardedEntry,
};
use moe_reference::{
    forward, from_state_dict, to_state_dict, Dtype, ExpertSet, Inputs, LayerClass, LayerConfig, Numerics, Parallelism,
};
use ndarray::{s, Array1, Array2};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

use LayerClass::{Grouped, Sequential, TeGrouped};

const DTYPE: Dtype = Dtype::Bf16;

thread_local! {
    /// The params dtype of the current test's round trips (bf16 unless a test changes it).
    static TEST_DTYPE: std::cell::Cell<Dtype> = const { std::cell::Cell::new(DTYPE) };
}

fn dtype() -> Dtype {
    TEST_DTYPE.with(|d| d.get())
}

/// Megatron's test model (spec §8.1): E = 8, hidden 16, f = 4·16 = 64.
fn layout(class: LayerClass, tp: usize, ep: usize, glu: bool, singleton: bool) -> ExpertLayout {
    let config = LayerConfig {
        class,
        num_experts: 8,
        hidden_size: 16,
        ffn_hidden_size: 64,
        gated_linear_unit: glu,
        add_bias: false,
        parallel: Parallelism { tp_size: tp, ep_size: ep, ..Parallelism::SINGLE },
        ..LayerConfig::example()
    };
    ExpertLayout { singleton, ..ExpertLayout::new(config) }
}

/// `l` with its layer changed by `f`.
fn with(mut l: ExpertLayout, f: impl FnOnce(&mut LayerConfig)) -> ExpertLayout {
    f(&mut l.config);
    l
}

/// `l` with `E`, `h` and `f` set.
fn sized(l: ExpertLayout, num_experts: usize, hidden: usize, ffn: usize) -> ExpertLayout {
    with(l, |c| {
        c.num_experts = num_experts;
        c.hidden_size = hidden;
        c.ffn_hidden_size = ffn;
    })
}

/// One side of a save/load: a layout on `pp` pipeline stages (prefix `"{pp_rank}."`) with
/// `edp` expert-data-parallel replicas of every (ep, tp) rank.
#[derive(Clone, Debug)]
struct Side {
    layout: ExpertLayout,
    pp: usize,
    edp: usize,
}

impl Side {
    fn stage(&self, pp_rank: usize) -> ExpertLayout {
        ExpertLayout { prefix: format!("{pp_rank}."), ..self.layout.clone() }
    }

    fn coords(&self) -> Vec<RankCoord> {
        let mut v = Vec::new();
        for r in self.layout.ranks() {
            for d in 0..self.edp {
                v.push(RankCoord { edp_rank: d, ..r });
            }
        }
        v
    }
}

/// Random global (unsharded) experts of one stage, exactly representable in bf16.
fn global_weights(l: &ExpertLayout, seed: u64) -> ExpertSet {
    let cfg = l.layer_config(RankCoord::new(0, 0), dtype()).unsharded();
    ExpertSet::random(&cfg, seed)
}

/// Every rank's class state dict of `l` holding `global`.
fn rank_states(l: &ExpertLayout, coords: &[RankCoord], global: &ExpertSet) -> Vec<RawStateDict> {
    coords
        .iter()
        .map(|&c| {
            let cfg = l.layer_config(c, dtype());
            let sd = to_state_dict(&cfg, &global.shard(&cfg).unwrap()).unwrap();
            raw_state_dict(&sd, dtype()).unwrap()
        })
        .collect()
}

/// Saves every rank of `l` holding `global` into `dir` (default options).
fn save_every_rank(dir: &Path, l: &ExpertLayout, global: &ExpertSet) {
    let states = rank_states(l, &l.ranks(), global);
    let parts: Vec<SavePart> =
        l.ranks().iter().zip(&states).map(|(c, s)| SavePart { layout: l, rank: *c, state: s }).collect();
    save(dir, &parts, &SaveOptions::default()).unwrap();
}

fn save_side(dir: &Path, side: &Side, layouts: &[ExpertLayout], states: &[Vec<RawStateDict>]) {
    let coords = side.coords();
    let mut parts = Vec::new();
    for (l, st) in layouts.iter().zip(states) {
        for (c, s) in coords.iter().zip(st) {
            parts.push(SavePart { layout: l, rank: *c, state: s });
        }
    }
    save(dir, &parts, &SaveOptions::default()).unwrap();
}

/// Forward output of all `E` experts computed rank by rank (f64 oracle), summing ETP ranks.
fn layer_output(l: &ExpertLayout, states: &[(RankCoord, &RawStateDict)], inputs: &Inputs) -> Array2<f64> {
    let el = l.local_experts();
    let mut out = Array2::zeros(inputs.hidden_states.dim());
    for q in 0..l.config.parallel.ep_size {
        let (rows, rank_inputs) = moe_reference::parallel::ep_rank_inputs(inputs, el, q);
        for (c, sd) in states.iter().filter(|(c, _)| c.ep_rank == q && c.edp_rank == 0) {
            let cfg = l.layer_config(*c, dtype());
            let w = from_state_dict(&cfg, &f64_state_dict(sd)).unwrap();
            let y = forward(&cfg, &w, &rank_inputs, Numerics::Oracle).unwrap();
            let mut dst = out.slice_mut(s![rows.clone(), ..]);
            dst += y.output();
        }
    }
    out
}

fn random_inputs(l: &ExpertLayout, seed: u64) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let counts: Vec<i64> = (0..l.config.num_experts).map(|e| (e % 3) as i64 + (e == 1) as i64 * 2).collect();
    let t: usize = counts.iter().map(|&c| c as usize).sum();
    Inputs {
        hidden_states: Array2::from_shape_fn((t, l.config.hidden_size), |_| dtype().round(rng.random_range(-1.0..1.0))),
        tokens_per_expert: counts,
        probs: Array1::from_shape_fn(t, |_| rng.random_range(0.0..1.0f32) as f64),
    }
}

/// Megatron's `test_parallel_reconfiguration_e2e` / `test_sequential_grouped_mlp_interchangeable`
/// for one pair: save A, load into B, save B; the plain global tensors of A and B must be equal
/// bit for bit, B's ranks must hold exactly B's shards of A's weights, and B's layer must give
/// A's forward outputs.
fn reconfigure(a: &Side, b: &Side, seed: u64) {
    assert_eq!(a.pp, b.pp, "pp only changes the prefix; the tables keep it");
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_layouts: Vec<ExpertLayout> = (0..a.pp).map(|p| a.stage(p)).collect();
    let b_layouts: Vec<ExpertLayout> = (0..b.pp).map(|p| b.stage(p)).collect();
    let globals: Vec<ExpertSet> =
        a_layouts.iter().enumerate().map(|(p, l)| global_weights(l, seed + p as u64)).collect();
    let a_states: Vec<Vec<RawStateDict>> =
        a_layouts.iter().zip(&globals).map(|(l, g)| rank_states(l, &a.coords(), g)).collect();
    save_side(&da, a, &a_layouts, &a_states);

    let ca = Checkpoint::open(&da).unwrap();
    let b_coords = b.coords();
    let requests: Vec<(ExpertLayout, RankCoord)> =
        b_layouts.iter().flat_map(|l| b_coords.iter().map(move |c| (l.clone(), *c))).collect();
    let loaded = ca.load(&requests, Some(dtype())).unwrap();
    let b_states: Vec<Vec<RawStateDict>> = loaded.chunks(b_coords.len()).map(|c| c.to_vec()).collect();

    // B's ranks hold exactly B's shards of A's weights (no transpose, no swapped GLU halves).
    for ((l, g), st) in b_layouts.iter().zip(&globals).zip(&b_states) {
        let expected = rank_states(l, &b_coords, g);
        for ((c, got), want) in b_coords.iter().zip(st).zip(&expected) {
            assert_eq!(got, want, "{a:?} -> {b:?}: rank {c:?} of {}", l.prefix);
        }
    }
    save_side(&db, b, &b_layouts, &b_states);
    let cb = Checkpoint::open(&db).unwrap();
    // Plain global tensors, bit for bit (logical keys so singleton <-> non-singleton compare).
    assert_eq!(ca.load_global(true).unwrap(), cb.load_global(true).unwrap(), "{a:?} -> {b:?}");
    if a.layout.singleton == b.layout.singleton {
        assert_eq!(ca.load_global(false).unwrap(), cb.load_global(false).unwrap(), "{a:?} -> {b:?}");
    }
    // Forward outputs of stage 0: A's ranks vs B's ranks (ETP partial sums added).
    let inputs = random_inputs(&a.layout, seed);
    let a0: Vec<(RankCoord, &RawStateDict)> = a.coords().into_iter().zip(&a_states[0]).collect();
    let b0: Vec<(RankCoord, &RawStateDict)> = b_coords.iter().copied().zip(&b_states[0]).collect();
    let ya = layer_output(&a_layouts[0], &a0, &inputs);
    let yb = layer_output(&b_layouts[0], &b0, &inputs);
    let scale = ya.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = (&ya - &yb).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(err <= 1e-12 * scale, "{a:?} -> {b:?}: forward differs by {err}");
}

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

// ---------------------------------------------------------------------------------------------
// Layout: golden snapshots and hand-checked cases.

/// The snapshots' `info`: the layout's fields as the goldens record them.
#[derive(serde::Serialize)]
struct LayoutInfo<'a> {
    class: LayerClass,
    num_experts: usize,
    hidden: usize,
    ffn: usize,
    glu: bool,
    bias: bool,
    tp: usize,
    ep: usize,
    singleton: bool,
    prefix: &'a str,
}

fn snapshot(name: &str, l: &ExpertLayout) {
    let v = layout_json(l).unwrap();
    let c = &l.config;
    let info = LayoutInfo {
        class: c.class,
        num_experts: c.num_experts,
        hidden: c.hidden_size,
        ffn: c.ffn_hidden_size,
        glu: c.gated_linear_unit,
        bias: c.add_bias,
        tp: c.parallel.tp_size,
        ep: c.parallel.ep_size,
        singleton: l.singleton,
        prefix: &l.prefix,
    };
    insta::with_settings!({snapshot_path => "../golden", prepend_module_to_snapshot => false, info => &info}, {
        insta::assert_yaml_snapshot!(name, v);
    });
}

#[test]
fn layout_golden_snapshots() {
    // The worked example of spec §7.6: E = 4, p_ep = 2, t = 2, h = 16, f = 8, GLU.
    let ex = |class, singleton| sized(layout(class, 2, 2, true, singleton), 4, 16, 8);
    snapshot("layout__sequential_glu_tp2_ep2", &ex(Sequential, false));
    snapshot("layout__grouped_glu_tp2_ep2", &ex(Grouped, false));
    snapshot("layout__sequential_glu_tp2_ep2_singleton", &ex(Sequential, true));
    snapshot("layout__grouped_glu_tp2_ep2_singleton", &ex(Grouped, true));
    let bias = ExpertLayout {
        prefix: "decoder.layers.3.mlp.".into(),
        ..with(sized(layout(TeGrouped, 1, 2, false, false), 4, 8, 16), |c| c.add_bias = true)
    };
    snapshot("layout__te_grouped_bias_ep2_prefix", &bias);
    snapshot("layout__grouped_tp2_ep1", &sized(layout(Grouped, 2, 1, false, false), 4, 16, 8));
}

#[test]
fn te_grouped_layout_equals_sequential_layout() {
    // spec §7.4: "exactly the key set, shapes, offsets and replica ids of SequentialMLP".
    for (glu, bias, singleton, tp, ep) in
        [(true, false, false, 2, 2), (false, true, true, 1, 4), (true, true, false, 1, 1)]
    {
        let seq = with(layout(Sequential, tp, ep, glu, singleton), |c| c.add_bias = bias);
        let te = with(seq.clone(), |c| c.class = TeGrouped);
        assert_eq!(layout_json(&seq).unwrap(), layout_json(&te).unwrap());
    }
}

#[test]
fn worked_example_offsets_match_spec() {
    // spec §7.6, rank r_ep = 1, r = 1: SequentialMLP expert e = 0 (g = 2): w at rows 4-7 and
    // v at rows 12-15 of expert 2; GroupedMLP: one shard per half covering experts 2-3.
    let l = sized(layout(Sequential, 2, 2, true, false), 4, 16, 8);
    let fc1 = |l: &ExpertLayout| -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        sharded_state_dict(l, RankCoord::new(1, 1))
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                ShardedEntry::Tensor(t) if t.key == "experts.linear_fc1.weight" => {
                    Some((t.global_offset, t.local_shape, t.axis_fragmentations))
                }
                _ => None,
            })
            .collect()
    };
    let seq = fc1(&l);
    assert_eq!(seq[0], (vec![2, 4, 0], vec![4, 16], vec![4, 4, 1]));
    assert_eq!(seq[1], (vec![2, 12, 0], vec![4, 16], vec![4, 4, 1]));
    let grp = fc1(&with(l.clone(), |c| c.class = Grouped));
    assert_eq!(
        grp,
        vec![(vec![2, 4, 0], vec![2, 4, 16], vec![2, 4, 1]), (vec![2, 12, 0], vec![2, 4, 16], vec![2, 4, 1])]
    );
}

// ---------------------------------------------------------------------------------------------
// Regression cases (shared/spec/bugs-shapes-anchors.md section A).

#[test]
fn swiglu_tp_rank_holds_its_gate_and_linear_slices() {
    // NVIDIA/Megatron-LM #360 (SwiGLU wrong with TP > 1: [gate; up] split by TP put the halves
    // on different ranks) and #985. Each rank must hold [W_gate[r]; W_lin[r]], saved as chunks
    // r and t + r of 2t, and a TP 4 -> TP 2 load must re-pair them.
    let src = layout(Sequential, 4, 1, true, false);
    let global = global_weights(&src, 11);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("c");
    save_every_rank(&d, &src, &global);
    let ck = Checkpoint::open(&d).unwrap();
    for s in ck.index.shards.iter().filter(|s| s.key == "experts.linear_fc1.weight") {
        assert_eq!(s.local_shape, vec![1, 16, 16]);
    }
    let dst = layout(TeGrouped, 2, 1, true, false);
    let got = ck.load(&[(dst.clone(), RankCoord::new(0, 1))], Some(DTYPE)).unwrap();
    let w0 = got[0]["linear_fc1.weight0"].to_f64();
    let full = &global.experts[0].fc1_weight;
    // Rank 1 of 2: gate rows 32..64 then linear rows 64 + 32..64 + 64.
    assert_eq!(w0.slice(s![..32, ..]), full.slice(s![32..64, ..]));
    assert_eq!(w0.slice(s![32.., ..]), full.slice(s![96..128, ..]));
}

#[test]
fn every_etp_shard_is_saved() {
    // NVIDIA/Megatron-LM #1836 / PR #1770: with ETP the replica id missed the TP rank, so only
    // the first ETP shard was saved (checkpoint 1/TP the size). Save with ETP 2 and 4 and
    // assert every shard of every expert is present; then show that replica ids which mark the
    // other ETP ranks as non-main are rejected at save rather than silently dropped.
    for tp in [2, 4] {
        for class in LayerClass::ALL {
            let l = layout(class, tp, 2, true, false);
            let tmp = tempfile::tempdir().unwrap();
            let d = tmp.path().join("c");
            let g = global_weights(&l, 3);
            save_every_rank(&d, &l, &g);
            let ck = Checkpoint::open(&d).unwrap();
            let bytes: u64 = ck.index.shards.iter().map(|s| s.nbytes).sum();
            // E · (2f·h + h·f) bf16 values.
            assert_eq!(bytes, 8 * (2 * 64 * 16 + 16 * 64) * 2, "{class} tp {tp}");
            ck.load_global(false).unwrap();
        }
    }
    // The bug, reproduced: only ETP rank 0 saves (as if ranks 1.. had replica id (0, r, 0)).
    let l = layout(Sequential, 2, 1, false, false);
    let g = global_weights(&l, 3);
    let states = rank_states(&l, &l.ranks(), &g);
    let tmp = tempfile::tempdir().unwrap();
    let parts = [SavePart { layout: &l, rank: RankCoord::new(0, 0), state: &states[0] }];
    let err = save(&tmp.path().join("c"), &parts, &SaveOptions::default()).unwrap_err();
    assert!(matches!(err, CheckpointError::Coverage { .. }), "{err}");
    assert!(err.to_string().contains("experts.linear_fc1.weight"), "{err}");
    assert!(!tmp.path().join("c").exists());
}

#[test]
fn sequential_grouped_sequential_is_identity_with_ep_and_many_experts() {
    // NVIDIA/Megatron-LM #909: a hand-written cat+transpose conversion made GroupedMLP's loss
    // 6.x vs SequentialMLP's 1.x (EP > 1, > 8 experts); grouped weights are [in, out],
    // sequential [out, in] (#756). Round trip sequential -> grouped -> sequential with 16
    // experts on EP 2 must be the identity and keep the forward output.
    let base = |class, ep| with(layout(class, 1, ep, true, false), |c| c.num_experts = 16);
    let a = Side { layout: base(Sequential, 2), pp: 1, edp: 1 };
    let b = Side { layout: base(Grouped, 4), pp: 1, edp: 1 };
    reconfigure(&a, &b, 909);
    reconfigure(&b, &a, 909);
}

#[test]
fn square_expert_matrices_keep_their_orientation() {
    // huggingface/transformers #47031: shape-based "transpose if needed" silently loads
    // transposed weights when the two dims are equal. Here fc1 is [f, h] = [16, 16] (non-GLU)
    // and [2f, h] = [16, 16] (GLU, f = 8): a wrong transpose would still fit every shape check,
    // so the comparison must be on values.
    for (glu, ffn) in [(false, 16), (true, 8)] {
        for (ca, cb) in [(Sequential, Grouped), (Grouped, TeGrouped)] {
            let mk = |class, tp, ep| sized(layout(class, tp, ep, glu, false), 4, 16, ffn);
            let a = Side { layout: mk(ca, 2, 2), pp: 1, edp: 1 };
            let b = Side { layout: mk(cb, 1, 1), pp: 1, edp: 1 };
            reconfigure(&a, &b, 47031);
            // And the stored fc1 of expert 0 is the canonical [out, in] matrix, not its transpose.
            let g = global_weights(&a.layout, 5);
            let tmp = tempfile::tempdir().unwrap();
            let d = tmp.path().join("c");
            let st = rank_states(&b.layout, &b.layout.ranks(), &g);
            let parts = [SavePart { layout: &b.layout, rank: RankCoord::new(0, 0), state: &st[0] }];
            save(&d, &parts, &SaveOptions::default()).unwrap();
            let glob = Checkpoint::open(&d).unwrap().load_global(false).unwrap();
            let w = glob["experts.linear_fc1.weight"].to_f64();
            assert_eq!(w.slice(s![0, .., ..]), g.experts[0].fc1_weight.view());
            assert_ne!(g.experts[0].fc1_weight, g.experts[0].fc1_weight.t());
        }
    }
}

#[test]
fn ep_save_keeps_every_ranks_experts() {
    // KempnerInstitute/KempnerForge #202: an EP checkpoint saved only one rank's experts (local
    // renumbering from 0). Save EP 2, load EP 1: every global expert must be present and equal
    // to its own weights (not rank 0's experts twice).
    let a = layout(TeGrouped, 1, 2, false, false);
    let g = global_weights(&a, 202);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("c");
    save_every_rank(&d, &a, &g);
    let b = layout(Sequential, 1, 1, false, false);
    let got = Checkpoint::open(&d).unwrap().load(&[(b.clone(), RankCoord::new(0, 0))], Some(DTYPE)).unwrap();
    let w = from_state_dict(&b.layer_config(RankCoord::new(0, 0), DTYPE), &f64_state_dict(&got[0])).unwrap();
    assert_eq!(w, g);
    assert_ne!(g.experts[0], g.experts[4]);
}

#[test]
fn te_grouped_reshards_across_tp_and_ep() {
    // NVIDIA/Megatron-LM PR #3944: resharding TEGroupedMLP TP 2, EP 2 <-> TP 1, EP 1 failed
    // (size 128 vs 64). Both directions, through the reshard entry point with verification.
    let a = layout(TeGrouped, 2, 2, true, false);
    let g = global_weights(&a, 3944);
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dc) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    save_every_rank(&da, &a, &g);
    let verify = ReshardOptions { verify: true, ..Default::default() };
    let r = reshard(&da, &db, ReshardTarget { class: TeGrouped, tp: 1, ep: 1, singleton: false }, verify).unwrap();
    assert!(r.written && r.verified);
    reshard(&db, &dc, ReshardTarget { class: TeGrouped, tp: 2, ep: 2, singleton: true }, verify).unwrap();
    let (ga, gc) = (Checkpoint::open(&da).unwrap(), Checkpoint::open(&dc).unwrap());
    assert_eq!(ga.load_global(true).unwrap(), gc.load_global(true).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Bad input: a clear error naming the file or key, and nothing left behind.

/// A small saved checkpoint (Sequential, GLU, TP 2, EP 2) in `dir/src`.
fn small_checkpoint(dir: &Path) -> std::path::PathBuf {
    let l = sized(layout(Sequential, 2, 2, true, false), 4, 8, 8);
    let g = global_weights(&l, 1);
    let d = dir.join("src");
    save_every_rank(&d, &l, &g);
    d
}

fn target() -> ReshardTarget {
    ReshardTarget { class: Grouped, tp: 1, ep: 1, singleton: false }
}

/// Reshards `src` into `dir/dst`, expects an error containing every `needles`, and checks that
/// neither the destination nor any temporary directory was left behind.
fn expect_reshard_error(dir: &Path, src: &Path, needles: &[&str]) -> CheckpointError {
    let dst = dir.join("dst");
    let err = reshard(src, &dst, target(), ReshardOptions::default()).unwrap_err();
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    assert!(!dst.exists(), "destination left behind after: {msg}");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    err
}

fn edit_index(src: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = src.join(INDEX);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn truncated_safetensors_is_rejected_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let f = src.join("rank00001.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 10).unwrap();
    let e = expect_reshard_error(tmp.path(), &src, &["rank00001.safetensors", "truncated"]);
    assert!(matches!(e, CheckpointError::Corrupt { .. }));
}

#[test]
fn corrupt_safetensors_data_fails_the_crc_naming_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let f = src.join("rank00002.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    expect_reshard_error(tmp.path(), &src, &["rank00002.safetensors", "CRC-32", "key experts."]);
    // A mangled header is caught at open.
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8] = b'#';
    std::fs::write(&f, bytes).unwrap();
    expect_reshard_error(tmp.path(), &src, &["rank00002.safetensors", "header does not parse"]);
}

#[test]
fn missing_shard_is_rejected_naming_key_and_region() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    edit_index(&src, |v| {
        let shards = v["shards"].as_array_mut().unwrap();
        let i = shards.iter().position(|s| s["key"] == "experts.linear_fc2.weight").unwrap();
        shards.remove(i);
    });
    let e = expect_reshard_error(
        tmp.path(),
        &src,
        &["experts.linear_fc2.weight", "region [0:4, 0:8, 0:8]", "224 of 256", "missing shard"],
    );
    assert!(matches!(e, CheckpointError::Coverage { .. }));
    // A data file that is gone entirely.
    let src2 = tmp.path().join("src2");
    std::fs::rename(&src, &src2).unwrap();
    std::fs::remove_file(src2.join("rank00000.safetensors")).unwrap();
    expect_reshard_error(tmp.path(), &src2, &["rank00000.safetensors", "missing"]);
}

#[test]
fn overlapping_shards_are_rejected_naming_key_and_both_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    // Point a second record at the region of the first one (its data differs).
    edit_index(&src, |v| {
        let shards = v["shards"].as_array_mut().unwrap();
        let (a, b) = {
            let k: Vec<usize> = shards
                .iter()
                .enumerate()
                .filter(|(_, s)| s["key"] == "experts.linear_fc2.weight")
                .map(|(i, _)| i)
                .collect();
            (k[0], k[1])
        };
        shards[b]["global_offset"] = shards[a]["global_offset"].clone();
    });
    let e = expect_reshard_error(tmp.path(), &src, &["experts.linear_fc2.weight", "overlapping", "rank0000"]);
    assert!(matches!(e, CheckpointError::Overlap { .. }));
}

#[test]
fn shape_or_dtype_mismatch_is_rejected_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let ck = Checkpoint::open(&src).unwrap();
    let wrong_h = sized(layout(Sequential, 1, 1, true, false), 4, 16, 8);
    let err = ck.load(&[(wrong_h, RankCoord::new(0, 0))], Some(DTYPE)).unwrap_err();
    assert!(
        matches!(err, CheckpointError::Mismatch { .. }) && err.to_string().contains("experts.linear_fc1.weight"),
        "{err}"
    );
    let ok = sized(layout(Sequential, 1, 1, true, false), 4, 8, 8);
    let err = ck.load(&[(ok.clone(), RankCoord::new(0, 0))], Some(Dtype::F32)).unwrap_err();
    assert!(err.to_string().contains("float32") && err.to_string().contains("bfloat16"), "{err}");
    // Non-GLU request against a GLU checkpoint: global fc1 rows differ.
    let err = ck.load(&[(with(ok, |c| c.gated_linear_unit = false), RankCoord::new(0, 0))], None).unwrap_err();
    assert!(err.to_string().contains("experts.linear_fc1.weight"), "{err}");
    // A reshard into a layout the model cannot take (bias would need tp 1 etc.) is bad input.
    let err = reshard(
        &src,
        &tmp.path().join("dst"),
        ReshardTarget { class: Grouped, tp: 3, ep: 1, singleton: false },
        ReshardOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, CheckpointError::Layout(_)), "{err}");
    assert!(!tmp.path().join("dst").exists());
}

#[test]
fn a_directory_that_is_not_a_checkpoint_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect_reshard_error(tmp.path(), &empty, &["empty", "not a moe-verify checkpoint", "index.json"]);
    std::fs::write(empty.join(INDEX), b"{\"weights\": 1}").unwrap();
    expect_reshard_error(tmp.path(), &empty, &["not a moe-verify checkpoint", "does not parse"]);
    expect_reshard_error(tmp.path(), &tmp.path().join("nope"), &["nope", "not a directory"]);
}

#[test]
fn nothing_is_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("keep.txt"), b"precious").unwrap();
    let err = reshard(&src, &dst, target(), ReshardOptions::default()).unwrap_err();
    assert!(matches!(err, CheckpointError::Exists { .. }) && err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(dst.join("keep.txt")).unwrap(), b"precious");
    // Resharding onto the source itself is refused even with --force.
    let err = reshard(&src, &src, target(), ReshardOptions { force: true, ..Default::default() }).unwrap_err();
    assert!(matches!(err, CheckpointError::Exists { .. }));
    // With --force the destination is replaced by a checkpoint.
    reshard(&src, &dst, target(), ReshardOptions { force: true, verify: true, ..Default::default() }).unwrap();
    assert!(!dst.join("keep.txt").exists());
    Checkpoint::open(&dst).unwrap();
}

#[test]
fn interrupted_save_leaves_nothing_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let l = sized(layout(Grouped, 2, 2, true, true), 4, 8, 8);
    let g = global_weights(&l, 1);
    let st = rank_states(&l, &l.ranks(), &g);
    let parts: Vec<SavePart> =
        l.ranks().iter().zip(&st).map(|(c, s)| SavePart { layout: &l, rank: *c, state: s }).collect();
    let d = tmp.path().join("c");
    for after in 0..4 {
        let err = save(&d, &parts, &SaveOptions { abort_after_files: Some(after), ..Default::default() }).unwrap_err();
        assert!(matches!(err, CheckpointError::Injected(_)));
        assert!(!d.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
    // An existing checkpoint survives an interrupted --force save unchanged.
    save(&d, &parts, &SaveOptions::default()).unwrap();
    let before = Checkpoint::open(&d).unwrap().index;
    let err = save(&d, &parts[..2], &SaveOptions { force: true, abort_after_files: Some(1) }).unwrap_err();
    assert!(matches!(err, CheckpointError::Injected(1)));
    assert_eq!(Checkpoint::open(&d).unwrap().index, before);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn dry_run_writes_nothing_and_reports_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let dst = tmp.path().join("dst");
    let r = reshard(&src, &dst, target(), ReshardOptions { dry_run: true, ..Default::default() }).unwrap();
    assert!(!r.written && !dst.exists());
    // E · (2f·h + h·f) bf16 values = 4 · (128 + 64) · 2 bytes.
    assert_eq!(r.write_bytes, 4 * (2 * 8 * 8 + 8 * 8) * 2);
}

#[test]
fn files_are_standard_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let ck = Checkpoint::open(&src).unwrap();
    for f in &ck.index.files {
        let bytes = std::fs::read(src.join(&f.name)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for s in ck.index.shards.iter().filter(|s| s.file == f.name) {
            let t = st.tensor(&s.name).unwrap();
            assert_eq!(t.shape(), s.local_shape.as_slice());
            assert_eq!(t.dtype(), safetensors::Dtype::BF16);
            assert!(parse_key(&s.key).is_some());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLI.

fn moe_verify(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_moe-verify")).args(args).output().unwrap()
}

#[test]
fn cli_layout_json_matches_library_and_exit_codes() {
    let out = moe_verify(&[
        "layout",
        "--layer",
        "grouped",
        "--num-experts",
        "4",
        "--hidden",
        "16",
        "--ffn",
        "8",
        "--tp",
        "2",
        "--ep",
        "2",
        "--glu",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let l = sized(layout(Grouped, 2, 2, true, false), 4, 16, 8);
    assert_eq!(v, layout_json(&l).unwrap());
    let ranks: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ep_rank"].as_u64().unwrap(), r["tp_rank"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranks, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
    // Table form.
    let out = moe_verify(&["layout", "--layer", "sequential", "--num-experts", "2", "--hidden", "4", "--ffn", "4"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("experts.linear_fc2.weight"));
    // Expert-DP rank 1: every replica id ends in 1, so no entry is a main replica.
    let out = moe_verify(&[
        "layout",
        "--layer",
        "te_grouped",
        "--num-experts",
        "2",
        "--hidden",
        "4",
        "--ffn",
        "4",
        "--expert-dp-rank",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for e in v[0]["entries"].as_array().unwrap() {
        assert_eq!(e["replica_id"][2], 1);
    }
    // Bad input: bias on GroupedMLP, unknown class.
    let out =
        moe_verify(&["layout", "--layer", "grouped", "--num-experts", "2", "--hidden", "4", "--ffn", "4", "--bias"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bias"));
    let out = moe_verify(&["layout", "--layer", "mixtral", "--num-experts", "2", "--hidden", "4", "--ffn", "4"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cli_reshard_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    let dst = tmp.path().join("dst");
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let out = moe_verify(&[
        "reshard",
        s,
        d,
        "--layer",
        "te_grouped",
        "--tp",
        "1",
        "--ep",
        "4",
        "--singleton-local-shards",
        "--verify",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    let out = moe_verify(&["reshard", s, d, "--layer", "te_grouped"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = moe_verify(&["inspect", d, "--verify"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("experts.3.linear_fc1.weight_v") && text.contains("E=4") && text.contains("verified"),
        "{text}"
    );
    let out = moe_verify(&["inspect", d, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0]["singleton"], true);
    let out = moe_verify(&["inspect", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a moe-verify checkpoint"));
}

fn arb_layout() -> impl Strategy<Value = ExpertLayout> {
    (
        prop::sample::select(LayerClass::ALL.to_vec()),
        prop::sample::select(vec![1usize, 2, 4]),
        prop::sample::select(vec![1usize, 2, 4]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec!["", "0.", "decoder.layers.7.mlp."]),
    )
        .prop_map(|(class, tp, ep, glu, bias, singleton, prefix)| {
            let bias = bias && tp == 1 && class != Grouped;
            ExpertLayout {
                prefix: prefix.into(),
                ..with(sized(layout(class, tp, ep, glu, singleton), 4, 6, 8), |c| c.add_bias = bias)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Invariants of every sharded state dict, independent of how it was built: offsets are
    /// multiples of the extents and global = fragmentation x extent on every axis; the main
    /// replicas of each key tile its global tensor exactly once over all ranks (and over all
    /// expert-DP ranks only rank 0 writes); every rank emits one `_extra_state` object per local
    /// expert and linear; and the three classes cover the same logical elements.
    #[test]
    fn sharded_state_dicts_tile_their_global_tensors(l in arb_layout(), edp in 1usize..=2) {
        use moe_checkpoint::format::to_logical;
        use moe_checkpoint::Region;
        use std::collections::BTreeMap;
        let mut covered: BTreeMap<String, (Vec<usize>, usize)> = BTreeMap::new();
        let mut logical: BTreeMap<String, Vec<Region>> = BTreeMap::new();
        for rank in l.ranks() {
            for d in 0..edp {
                let entries = sharded_state_dict(&l, RankCoord { edp_rank: d, ..rank }).unwrap();
                let objects = entries.iter().filter(|e| matches!(e, ShardedEntry::Object(_))).count();
                prop_assert_eq!(objects, 2 * l.local_experts());
                for e in entries {
                    if let ShardedEntry::Tensor(t) = e {
                        prop_assert!(t.key.starts_with(&l.prefix));
                        let ext = t.extent();
                        for (a, &x) in ext.iter().enumerate() {
                            prop_assert_eq!(t.global_offset[a] % x, 0);
                            prop_assert_eq!(t.global_shape[a], t.axis_fragmentations[a] * x);
                        }
                        if t.is_main_replica() {
                            prop_assert_eq!(d, 0);
                            let c = covered.entry(t.key.clone()).or_insert((t.global_shape.clone(), 0));
                            prop_assert_eq!(&c.0, &t.global_shape);
                            c.1 += ext.iter().product::<usize>();
                            let region = Region { offset: t.global_offset.clone(), shape: ext };
                            let (k, r, _) = to_logical(&t.key, &region, &t.global_shape, l.config.num_experts);
                            logical.entry(k).or_default().push(r);
                        }
                    }
                }
            }
        }
        for (k, (shape, n)) in &covered {
            prop_assert_eq!(*n, shape.iter().product::<usize>(), "{} not tiled", k);
        }
        // Same logical elements as the SequentialMLP layout of the same model.
        let seq = ExpertLayout { singleton: false, ..with(l.clone(), |c| c.class = Sequential) };
        let mut seq_logical: BTreeMap<String, usize> = BTreeMap::new();
        for rank in seq.ranks() {
            for e in sharded_state_dict(&seq, rank).unwrap() {
                if let ShardedEntry::Tensor(t) = e {
                    if t.is_main_replica() {
                        *seq_logical.entry(t.key.clone()).or_default() += t.extent().iter().product::<usize>();
                    }
                }
            }
        }
        let ours: BTreeMap<String, usize> =
            logical.iter().map(|(k, rs)| (k.clone(), rs.iter().map(Region::numel).sum())).collect();
        prop_assert_eq!(ours, seq_logical);
    }
}

#[test]
fn verify_after_write_detects_different_data() {
    // The check behind `reshard --verify` (exit code 1): two checkpoints of the same layout
    // with different weights must not verify, and the error names the tensor.
    use moe_checkpoint::reshard::verify_same;
    let tmp = tempfile::tempdir().unwrap();
    let l = sized(layout(Sequential, 1, 1, false, false), 4, 8, 8);
    for (name, seed) in [("a", 1), ("b", 2)] {
        let st = rank_states(&l, &l.ranks(), &global_weights(&l, seed));
        let parts = [SavePart { layout: &l, rank: RankCoord::new(0, 0), state: &st[0] }];
        save(&tmp.path().join(name), &parts, &SaveOptions::default()).unwrap();
    }
    let (a, b) = (Checkpoint::open(&tmp.path().join("a")).unwrap(), Checkpoint::open(&tmp.path().join("b")).unwrap());
    verify_same(&a, &a).unwrap();
    let err = verify_same(&a, &b).unwrap_err();
    assert!(err.is_check_failure() && err.to_string().contains("experts.linear_fc1.weight"), "{err}");
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
fn non_expert_keys_are_reported_not_silently_dropped() {
    // A real checkpoint holds more than the experts; reshard converts expert layers only and
    // must say which keys it did not carry over.
    let tmp = tempfile::tempdir().unwrap();
    let src = small_checkpoint(tmp.path());
    edit_index(&src, |v| {
        let shards = v["shards"].as_array_mut().unwrap();
        let mut extra = shards[0].clone();
        extra["key"] = "decoder.final_layernorm.weight".into();
        extra["global_shape"] = extra["local_shape"].clone();
        extra["global_offset"] = serde_json::json!([0, 0, 0]);
        shards.push(extra);
    });
    let r = reshard(&src, &tmp.path().join("dst"), target(), ReshardOptions::default()).unwrap();
    assert_eq!(r.skipped_keys, vec!["decoder.final_layernorm.weight".to_string()]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any single corrupted byte of a data file (header length, JSON header, padding or
    /// tensor bytes) is caught by open or by the CRC check of a full load, with an error that
    /// names the file; it never loads silently.
    #[test]
    fn any_corrupted_byte_is_detected(pos in 0.0f64..1.0, mask in 1u8..=255) {
        let tmp = tempfile::tempdir().unwrap();
        let src = small_checkpoint(tmp.path());
        let f = src.join("rank00003.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let i = ((bytes.len() as f64) * pos) as usize;
        bytes[i] ^= mask;
        std::fs::write(&f, &bytes).unwrap();
        let res = Checkpoint::open(&src).and_then(|c| c.verify().map(|_| ()));
        let err = res.expect_err("corruption went undetected");
        prop_assert!(err.to_string().contains("rank00003.safetensors"), "{}", err);
    }
}

/// Issue 4 ("a GPU layer loaded from a checkpoint of any layout reproduces the reference"):
/// save under one class and (tp, ep) layout, load into another class and layout, run the
/// implementations of `backend` rank by rank on the loaded state dicts (forward and backward,
/// partial sums of ETP ranks added as the dispatcher does), and compare output, input grad,
/// probs grad and every rank's weight grads with the f64 oracle on the unsharded weights under
/// the harness error model. Returns the failures (empty when all pass).
pub(crate) fn checkpoint_load_reproduces_oracle(backend: &dyn moe_harness::properties::Backend) -> Vec<String> {
    use moe_harness::compare::{compare_runs, compare_state_dicts};
    use moe_harness::Tolerance;
    use moe_reference::{oracle_with_scales, LayerRun, Numerics, WgradTiming};
    // (src class, src tp, src ep, dst class, dst tp, dst ep, glu, singleton on load).
    let pairs = [
        (Sequential, 2, 2, TeGrouped, 1, 4, true, false),
        (TeGrouped, 1, 4, Grouped, 2, 1, true, true),
        (Grouped, 2, 1, Sequential, 4, 2, false, false),
        (Sequential, 1, 1, Grouped, 1, 8, true, true),
        (TeGrouped, 4, 2, Sequential, 1, 1, false, false),
    ];
    let mut failures = Vec::new();
    for (i, &(src, stp, sep, dst, dtp, dep, glu, singleton)) in pairs.iter().enumerate() {
        let a = layout(src, stp, sep, glu, false);
        let b = layout(dst, dtp, dep, glu, singleton);
        let global = global_weights(&a, 100 + i as u64);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        save_every_rank(&dir, &a, &global);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let b_coords = b.ranks();
        let requests: Vec<(ExpertLayout, RankCoord)> = b_coords.iter().map(|c| (b.clone(), *c)).collect();
        let loaded = ckpt.load(&requests, Some(dtype())).unwrap();

        // The problem: all 8 experts, some empty, rows sorted by global expert.
        let case = moe_harness::case::Case {
            cfg: b.layer_config(RankCoord::new(0, 0), dtype()),
            tokens_per_expert: vec![5, 0, 17, 3, 0, 9, 1, 12],
            seed: 7 + i as u64,
            timing: WgradTiming::Immediate,
        };
        let mut p = case.problem();
        p.weights = global.clone();
        let global_cfg = case.cfg.unsharded();
        let o =
            oracle_with_scales(&global_cfg, &to_state_dict(&global_cfg, &global).unwrap(), &p.inputs, &p.grad_output)
                .unwrap();
        let Some(layer) = backend.layer(dst) else { continue };
        // Rank by rank on the loaded state dicts (not on freshly sharded weights).
        let el = b.local_experts();
        let (t, h) = p.inputs.hidden_states.dim();
        let reduce = Numerics::Emulated(dtype());
        let (mut y, mut dx, mut dp) = (Array2::<f64>::zeros((t, h)), Array2::<f64>::zeros((t, h)), Array1::zeros(t));
        for q in 0..b.config.parallel.ep_size {
            let (rows, inputs) = moe_reference::parallel::ep_rank_inputs(&p.inputs, el, q);
            let g = p.grad_output.slice(s![rows.clone(), ..]).to_owned();
            for (c, sd) in b_coords.iter().zip(&loaded).filter(|(c, _)| c.ep_rank == q) {
                let cfg = b.layer_config(*c, dtype());
                let params = f64_state_dict(sd);
                let run = match layer.forward_backward(&cfg, &params, &inputs, &g, WgradTiming::Immediate) {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("pair {i}: rank {c:?}: {e}"));
                        continue;
                    }
                };
                // Each rank's weight grads equal the slices of the oracle's unsharded grads.
                let full = from_state_dict(&global_cfg, &o.run.weight_grads).unwrap();
                let full_s = from_state_dict(&global_cfg, &o.scales.weight_grads).unwrap();
                let full_a = from_state_dict(&global_cfg, &o.allowance.weight_grads).unwrap();
                let sd_of = |set: &ExpertSet| to_state_dict(&cfg, &set.shard(&cfg).unwrap()).unwrap();
                for d in compare_state_dicts(
                    &format!("pair {i} rank {c:?} grad."),
                    &cfg,
                    &run.weight_grads,
                    &sd_of(&full),
                    Some((&sd_of(&full_s), &sd_of(&full_a))),
                    Tolerance::error_model(),
                ) {
                    if !d.passed() {
                        failures.push(d.to_string());
                    }
                }
                let mut ys = y.slice_mut(s![rows.clone(), ..]);
                ys += &run.output.mapv(|v| reduce.fp32(v));
                let mut dxs = dx.slice_mut(s![rows.clone(), ..]);
                dxs += &run.grad_input.mapv(|v| reduce.fp32(v));
                let mut dps = dp.slice_mut(s![rows.clone()]);
                dps += &run.grad_probs;
            }
        }
        let got = LayerRun {
            output: y.mapv(|v| reduce.store(v)),
            grad_input: dx.mapv(|v| reduce.store(v)),
            grad_probs: dp,
            weight_grads: Default::default(),
        };
        let expected = LayerRun { weight_grads: Default::default(), ..o.run.clone() };
        for d in compare_runs(&global_cfg, &got, &expected, Some((&o).into()), Tolerance::error_model()) {
            if !d.passed() {
                failures.push(format!("pair {i} ({src} tp{stp} ep{sep} -> {dst} tp{dtp} ep{dep}): {d}"));
            }
        }
    }
    failures
}

/// The reference (storage-dtype emulation) run on state dicts loaded from checkpoints of other
/// classes and layouts reproduces the oracle; `tests/gpu.rs` runs the same on the CUDA layers.
#[test]
fn reference_loaded_from_another_layout_reproduces_the_oracle() {
    let failures = checkpoint_load_reproduces_oracle(&moe_harness::properties::ReferenceBackend);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Layouts against real Megatron-Core: tests/data/megatron-layouts/*.json were written by
// tools/megatron_layouts.py from Megatron-Core's own SequentialMLP/GroupedMLP
// `sharded_state_dict` (factories built as at save), one file per configuration.

/// The first path at which `ours` and `theirs` differ (`None` when equal).
fn json_diff(path: &str, ours: &serde_json::Value, theirs: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (ours, theirs) {
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if let Some(d) = json_diff(&format!("{path}[{i}]"), x, y) {
                    return Some(d);
                }
            }
            (a.len() != b.len())
                .then(|| format!("{path}: length {} (moe-verify) vs {} (Megatron-Core)", a.len(), b.len()))
        }
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let (x, y) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
                if let Some(d) = json_diff(&format!("{path}.{k}"), x, y) {
                    return Some(d);
                }
            }
            None
        }
        _ => (ours != theirs).then(|| format!("{path}: {ours} (moe-verify) vs {theirs} (Megatron-Core)")),
    }
}

/// Every fixture: (file name, configuration, Megatron-Core's layout).
fn megatron_layout_fixtures() -> Vec<(String, serde_json::Value, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/megatron-layouts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, doc["config"].take(), doc["layout"].take())
        })
        .collect()
}

fn fixture_layout(c: &serde_json::Value) -> (ExpertLayout, usize) {
    let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
    let b = |k: &str| c[k].as_bool().unwrap_or_else(|| panic!("config.{k}"));
    let config = LayerConfig {
        class: LayerClass::parse(c["layer"].as_str().unwrap()).unwrap(),
        num_experts: u("num_experts"),
        hidden_size: u("hidden"),
        ffn_hidden_size: u("ffn"),
        gated_linear_unit: b("glu"),
        add_bias: b("bias"),
        parallel: Parallelism { tp_size: u("tp"), ep_size: u("ep"), ..Parallelism::SINGLE },
        ..LayerConfig::example()
    };
    let l = ExpertLayout {
        singleton: b("singleton_local_shards"),
        prefix: c["prefix"].as_str().unwrap().to_string(),
        ..ExpertLayout::new(config)
    };
    (l, u("expert_dp_rank"))
}

/// `layout_json_at` equals, field for field, the sharded state dict real Megatron-Core
/// (tools/megatron_layouts.py) built for the same configuration.
#[test]
fn layout_matches_real_megatron_core() {
    let fixtures = megatron_layout_fixtures();
    assert!(fixtures.len() >= 40, "only {} fixtures in tests/data/megatron-layouts", fixtures.len());
    let mut failures = Vec::new();
    for (name, c, theirs) in &fixtures {
        let (l, edp) = fixture_layout(c);
        let ours = moe_checkpoint::layout_json_at(&l, edp).unwrap();
        if let Some(d) = json_diff("layout", &ours, theirs) {
            failures.push(format!("{name}: {d}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} fixtures differ:\n{}", failures.len(), fixtures.len(), failures.join("\n"));
}

/// The same through the CLI: `moe-verify layout ... --json` prints the fixture's layout.
#[test]
fn layout_cli_json_matches_real_megatron_core() {
    let mut failures = Vec::new();
    for (name, c, theirs) in megatron_layout_fixtures().iter().step_by(5) {
        let (l, edp) = fixture_layout(c);
        let lc = &l.config;
        let (e, h, f, tp, ep, d) = (
            lc.num_experts.to_string(),
            lc.hidden_size.to_string(),
            lc.ffn_hidden_size.to_string(),
            lc.parallel.tp_size.to_string(),
            lc.parallel.ep_size.to_string(),
            edp.to_string(),
        );
        let mut args = vec!["layout", "--layer", c["layer"].as_str().unwrap(), "--num-experts", &e, "--hidden", &h];
        args.extend(["--ffn", &f, "--tp", &tp, "--ep", &ep, "--prefix", &l.prefix, "--expert-dp-rank", &d, "--json"]);
        for (on, flag) in
            [(lc.gated_linear_unit, "--glu"), (lc.add_bias, "--bias"), (l.singleton, "--singleton-local-shards")]
        {
            if on {
                args.push(flag);
            }
        }
        let out = moe_verify(&args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(d) = json_diff("layout", &ours, theirs) {
            failures.push(format!("{name}: {d}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
