//! Regression cases (docs/spec/bugs-shapes-anchors.md section A): checkpoint bugs seen in
//! Megatron-LM and elsewhere, each reproduced and shown fixed.

use super::{global_weights, layout, rank_states, reconfigure, save_every_rank, sized, with, Side, DTYPE};
use moe_checkpoint::tensor::f64_state_dict;
use moe_checkpoint::{
    reshard, save, Checkpoint, CheckpointError, RankCoord, ReshardOptions, ReshardTarget, SaveOptions, SavePart,
};
use moe_reference::{from_state_dict, LayerClass};
use ndarray::s;

use LayerClass::{Grouped, Sequential, TeGrouped};

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
