//! Checkpoints: Megatron-Core's sharded state dict layouts, save -> load under another layout
//! or class, bad input, and the CLI (issue 3; spec §7, §8.1).
//!
//! * [`reconfigure`]: save under one layout or class, load under another (Megatron's tables,
//!   random pairs, other dtypes).
//! * [`layout`]: the sharded state dicts themselves (golden snapshots, the spec's worked
//!   example, tiling invariants).
//! * [`megatron`]: layouts against fixtures written by real Megatron-Core.
//! * [`regressions`]: the checkpoint bugs of `bugs-shapes-anchors.md` §A.
//! * [`bad_input`]: corrupt, incomplete or mismatched checkpoints and destinations.
//! * [`cli`]: `moe-verify layout`, `reshard` and `inspect`.
//! * [`interleave`]: a GLU-interleaved TEGroupedMLP (Megatron HEAD): what its `_w`/`_v` halves
//!   hold, reloads kept consistent, reloads refused, the canonical view.
//! * [`torch_dist`]: Megatron `torch_dist` checkpoints written by megatron-core, read exactly; bad ones rejected.
//! * [`oracle`]: layers loaded from another layout reproduce the f64 oracle (the reference
//!   here; `tests/gpu.rs` runs the same on the CUDA layers).
//!
//! This file holds what they share: the test model, saving every rank of a layout, and the
//! save -> load -> save round trip [`reconfigure`](reconfigure()).

mod bad_input;
mod cli;
mod interleave;
mod layout;
mod megatron;
mod oracle;
mod reconfigure;
mod regressions;
mod torch_dist;

pub(crate) use oracle::checkpoint_load_reproduces_oracle;

use moe_checkpoint::format::INDEX;
use moe_checkpoint::tensor::{f64_state_dict, raw_state_dict};
use moe_checkpoint::{
    reshard, save, Checkpoint, CheckpointError, ExpertLayout, RankCoord, RawStateDict, ReshardOptions, ReshardTarget,
    SaveOptions, SavePart,
};
use moe_reference::{
    forward, from_state_dict, to_state_dict, Dtype, ExpertSet, Inputs, LayerClass, LayerConfig, Numerics, Parallelism,
};
use ndarray::{s, Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

use LayerClass::{Grouped, Sequential};

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

// ---------------------------------------------------------------------------------------------
// A small saved checkpoint and the reshard errors it is given.

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
