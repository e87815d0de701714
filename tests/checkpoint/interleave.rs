//! Checkpoints of a GLU-interleaved TEGroupedMLP (Megatron HEAD's `moe_mlp_glu_interleave_size`,
//! spec §7.9): what the `_w`/`_v` halves hold, the reloads Megatron's semantics keep consistent
//! (same expert-TP and interleave size, any EP, singleton or not), the ones refused (another
//! expert-TP, another class), and the canonical per-expert view `diff` reads.

use super::{
    dtype, global_weights, layer_output, random_inputs, rank_states, reconfigure, save_every_rank, sized, with, Side,
};
use moe_checkpoint::experts::canonical_fc1;
use moe_checkpoint::sharded::interleave::GluOrder;
use moe_checkpoint::{reshard, Checkpoint, CheckpointError, ExpertLayout, RankCoord, ReshardOptions, ReshardTarget};
use moe_reference::{ExpertSet, LayerClass, LayerConfig, Parallelism};

/// A GLU TEGroupedMLP, `E = 4`, `h = 8`, `f = 16`, interleave size `s`, at (TP, EP).
fn interleaved(tp: usize, ep: usize, s: usize) -> ExpertLayout {
    let l = sized(super::layout(LayerClass::TeGrouped, tp, ep, true, false), 4, 8, 16);
    with(l, |c| c.glu_interleave_size = Some(s))
}

fn side(layout: ExpertLayout) -> Side {
    Side { layout, pp: 1, edp: 1 }
}

/// Save at (TP 2, EP 2), reload at every EP and singleton setting with the same TP and
/// interleave size: the ranks hold exactly that layout's shards (each rank's rows interleaved
/// on their own), the plain global tensors are bit-identical and the forward outputs agree.
#[test]
fn interleaved_checkpoints_reload_at_the_same_tp_under_any_ep() {
    for s in [1, 2] {
        let a = interleaved(2, 2, s);
        for (ep, singleton) in [(1, false), (4, false), (2, true), (4, true)] {
            let b = ExpertLayout { singleton, ..interleaved(2, ep, s) };
            reconfigure(&side(a.clone()), &side(b), 5 + s as u64);
        }
    }
}

/// What the stored `_w`/`_v` halves hold: each rank's interleaved rows cut in two, not the gate
/// and linear halves (so a reader that takes `_w` for the gate is wrong), and [`canonical_fc1`]
/// turns them into the canonical `[gate; linear]` rows of the unsharded experts.
#[test]
fn stored_halves_are_interleaved_rows_and_convert_to_canonical() {
    let tmp = tempfile::tempdir().unwrap();
    for (tp, s) in [(1, 1), (2, 2), (4, 1)] {
        let l = interleaved(tp, 2, s);
        let global = global_weights(&l, 3);
        let dir = tmp.path().join(format!("tp{tp}s{s}"));
        save_every_rank(&dir, &l, &global);
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(ckpt.glu_order(""), GluOrder { tp, size: Some(s) });
        let stored = ckpt.load_logical("experts.linear_fc1.weight").unwrap();
        let (f, h) = (16, 8);
        assert_eq!(stored.shape, vec![4, 2 * f, h]);
        // The canonical experts: the unsharded module rows (interleaved as one t = 1 tensor)
        // un-interleaved.
        let canonical = global.glu_deinterleaved(Some(s));
        let per = 2 * f * h * dtype().size_bytes();
        for (e, want) in canonical.experts.iter().enumerate() {
            let one = moe_checkpoint::RawTensor {
                dtype: stored.dtype,
                shape: vec![2 * f, h],
                data: stored.data[e * per..(e + 1) * per].to_vec(),
            };
            // Read naively, `_w` (rows [0, f)) is not the gate half.
            let naive = one.to_f64().into_dimensionality::<ndarray::Ix2>().unwrap();
            assert_ne!(naive, want.fc1_weight, "tp {tp} s {s} expert {e}: stored rows are not canonical");
            let c = canonical_fc1("experts.linear_fc1.weight", &one, GluOrder { tp, size: Some(s) }).unwrap();
            let got = c.to_f64().into_dimensionality::<ndarray::Ix2>().unwrap();
            assert_eq!(got, want.fc1_weight, "tp {tp} s {s} expert {e}");
        }
    }
    // A stored tensor whose rows cannot be a GLU fc1 of that order is an error naming it.
    let odd =
        moe_checkpoint::RawTensor { dtype: dtype(), shape: vec![6, 2], data: vec![0; 24 * dtype().size_bytes() / 2] };
    let err = canonical_fc1("x.linear_fc1.weight", &odd, GluOrder { tp: 2, size: Some(2) }).unwrap_err().to_string();
    assert!(err.contains("x.linear_fc1.weight") && err.contains("[6, 2]"), "{err}");
}

/// Megatron's own load at another expert-TP (cut the stored `_w`/`_v` at the new TP,
/// concatenate, un-interleave per rank) computes a different function: the worked example of
/// `moe_checkpoint::sharded::interleave`, run through the oracle. This is why such loads are
/// refused below.
#[test]
fn megatrons_load_at_another_tp_changes_an_interleaved_model() {
    let a = interleaved(1, 1, 1);
    let global = global_weights(&a, 9);
    let inputs = random_inputs(&a, 9);
    let coords_a = a.ranks();
    let states_a = rank_states(&a, &coords_a, &global);
    let ya = layer_output(&a, &coords_a.iter().copied().zip(&states_a).collect::<Vec<_>>(), &inputs);
    // At t = 1 the stored rows are the module rows: `global` itself. Megatron at t = 2 cuts
    // them as plain GLU halves (w chunk r, v chunk t + r) into each rank's module tensor.
    let b = interleaved(2, 1, 1);
    let halves = |l: &ExpertLayout| LayerConfig { glu_interleave_size: None, ..l.config.clone() };
    let states_b: Vec<_> = b
        .ranks()
        .iter()
        .map(|c| {
            let cfg = halves(&b).at_rank(c.ep_rank, c.tp_rank);
            let rank: ExpertSet = global.shard(&cfg).unwrap();
            let sd = moe_reference::to_state_dict(&cfg, &rank).unwrap();
            moe_checkpoint::tensor::raw_state_dict(&sd, dtype()).unwrap()
        })
        .collect();
    let yb = layer_output(&b, &b.ranks().into_iter().zip(&states_b).collect::<Vec<_>>(), &inputs);
    let scale = ya.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = (&ya - &yb).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(diff > 1e-3 * scale, "the naive TP 2 load reproduced the TP 1 model (diff {diff}, scale {scale})");
    // Our load of the same checkpoint at TP 2 refuses instead.
    let tmp = tempfile::tempdir().unwrap();
    save_every_rank(&tmp.path().join("a"), &a, &global);
    let ckpt = Checkpoint::open(&tmp.path().join("a")).unwrap();
    let requests: Vec<(ExpertLayout, RankCoord)> = b.ranks().into_iter().map(|c| (b.clone(), c)).collect();
    let err = ckpt.load(&requests, Some(dtype())).unwrap_err();
    assert!(matches!(err, CheckpointError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    for needle in [
        "experts.linear_fc1.weight",
        "saved with GLU interleave size 1 at expert-TP 1",
        "loaded with GLU interleave size 1 at expert-TP 2",
        "stored row 8 holds gate unit 4 but would be read as gate unit 8",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
}

/// Reshard (the CLI's path) keeps an interleaved model consistent: a new EP works and the
/// destination records the interleaving; another TP, another class and a non-interleaved
/// checkpoint read as interleaved are refused with the reason, leaving nothing behind.
#[test]
fn reshard_of_an_interleaved_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let l = interleaved(2, 2, 2);
    let src = tmp.path().join("src");
    save_every_rank(&src, &l, &global_weights(&l, 4));
    let target = |class, tp, ep| ReshardTarget { class, tp, ep, singleton: false };
    let dst = tmp.path().join("ep4");
    reshard(&src, &dst, target(LayerClass::TeGrouped, 2, 4), ReshardOptions { verify: true, ..Default::default() })
        .unwrap();
    assert_eq!(Checkpoint::open(&dst).unwrap().glu_order(""), GluOrder { tp: 2, size: Some(2) });
    for (class, tp, needle) in [
        (LayerClass::TeGrouped, 1, "loaded with GLU interleave size 2 at expert-TP 1"),
        (LayerClass::TeGrouped, 4, "loaded with GLU interleave size 2 at expert-TP 4"),
        (LayerClass::Sequential, 2, "loaded with no GLU interleaving"),
    ] {
        let dst = tmp.path().join("refused");
        let err = reshard(&src, &dst, target(class, tp, 1), ReshardOptions::default()).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("load at the saved expert-TP"), "{class} tp {tp}: {err}");
        assert!(!dst.exists(), "{class} tp {tp}: destination written");
    }
    // The other direction: a plain (non-interleaved) checkpoint loaded into an interleaved layout.
    let plain = with(interleaved(2, 2, 2), |c| c.glu_interleave_size = None);
    let psrc = tmp.path().join("plain");
    save_every_rank(&psrc, &plain, &global_weights(&plain, 4));
    let ckpt = Checkpoint::open(&psrc).unwrap();
    assert_eq!(ckpt.glu_order(""), GluOrder::HALVES);
    let want = interleaved(2, 2, 2);
    let err = ckpt.load(&[(want, RankCoord::new(0, 0))], None).unwrap_err().to_string();
    assert!(
        err.contains("saved with no GLU interleaving") && err.contains("loaded with GLU interleave size 2"),
        "{err}"
    );
}

/// Where interleaving makes no difference the load is allowed: one interleave block per rank
/// half (`s = f/t`) is the plain halves, so such a checkpoint loads into a non-interleaved
/// SequentialMLP at that TP and computes the same outputs.
#[test]
fn interleaving_that_is_the_plain_halves_loads_anywhere_it_means_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let a = interleaved(2, 1, 8); // f/t = 8: one block of gate rows, one of linear rows per rank
    let src = tmp.path().join("src");
    let global = global_weights(&a, 2);
    save_every_rank(&src, &a, &global);
    let seq = LayerConfig {
        class: LayerClass::Sequential,
        glu_interleave_size: None,
        parallel: Parallelism { tp_size: 2, ep_size: 1, ..Parallelism::SINGLE },
        ..a.config.clone()
    };
    let b = ExpertLayout::new(seq);
    let requests: Vec<(ExpertLayout, RankCoord)> = b.ranks().into_iter().map(|c| (b.clone(), c)).collect();
    let loaded = Checkpoint::open(&src).unwrap().load(&requests, Some(dtype())).unwrap();
    let inputs = random_inputs(&a, 2);
    let states_a = rank_states(&a, &a.ranks(), &global);
    let ya = layer_output(&a, &a.ranks().into_iter().zip(&states_a).collect::<Vec<_>>(), &inputs);
    let yb = layer_output(&b, &b.ranks().into_iter().zip(&loaded).collect::<Vec<_>>(), &inputs);
    let scale = ya.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = (&ya - &yb).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(diff <= 1e-12 * scale, "forward differs by {diff}");
}

/// Why: in a distributed save (one writer per rank, `CheckpointWriter::join`), rank 0 writes the
/// index from the records the ranks send; a rank whose layout has another interleave size must
/// be refused there, not recorded under rank 0's order (a checkpoint whose index misstates the
/// stored row order would load wrong weights silently).
#[test]
fn ranks_of_a_distributed_save_that_disagree_on_the_glu_order_are_refused() {
    use moe_checkpoint::{CheckpointWriter, SaveOptions, SavePart};
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (interleaved(1, 2, 1), interleaved(1, 2, 2));
    let global = global_weights(&a, 3);
    let (ranks_a, ranks_b) = (a.ranks(), b.ranks());
    let (states_a, states_b) = (rank_states(&a, &ranks_a, &global), rank_states(&b, &ranks_b, &global));
    let mut root = CheckpointWriter::create(&tmp.path().join("ckpt"), &SaveOptions::default()).unwrap();
    root.write_part(SavePart { layout: &a, rank: ranks_a[0], state: &states_a[0] }).unwrap();
    let mut other = CheckpointWriter::join(root.staging_path(), 1, &SaveOptions::default());
    other.write_part(SavePart { layout: &b, rank: ranks_b[1], state: &states_b[1] }).unwrap();
    let err = root.absorb(other.into_part()).unwrap_err();
    assert!(matches!(err, CheckpointError::Mismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("experts.linear_fc1.weight") && err.to_string().contains("GLU row order"),
        "{err}"
    );
    // The same order on both ranks is accepted and the index records it.
    let mut root = CheckpointWriter::create(&tmp.path().join("ok"), &SaveOptions::default()).unwrap();
    root.write_part(SavePart { layout: &a, rank: ranks_a[0], state: &states_a[0] }).unwrap();
    let mut other = CheckpointWriter::join(root.staging_path(), 1, &SaveOptions::default());
    other.write_part(SavePart { layout: &a, rank: ranks_a[1], state: &states_a[1] }).unwrap();
    root.absorb(other.into_part()).unwrap();
    root.finish().unwrap();
    assert_eq!(Checkpoint::open(&tmp.path().join("ok")).unwrap().glu_order(""), GluOrder { tp: 1, size: Some(1) });
}

/// Why: `diff` reads moe-verify checkpoints through the canonical per-expert orientation (gate
/// rows then linear rows); an interleaved checkpoint stores its fc1 rows interleaved per rank, so
/// without the conversion `diff` would report a correct interleaved checkpoint as differing from
/// the same experts saved plainly (and pass a wrong one that happened to match row for row).
#[test]
fn diff_reads_an_interleaved_checkpoint_in_the_canonical_orientation() {
    use moe_checkpoint::diff::{diff, DiffOptions};
    use moe_checkpoint::{open_source, SourceOverrides};
    let tmp = tempfile::tempdir().unwrap();
    let plain = sized(super::layout(LayerClass::TeGrouped, 2, 2, true, false), 4, 8, 16);
    let global = global_weights(&plain, 9);
    save_every_rank(&tmp.path().join("plain"), &plain, &global);
    for (tp, s) in [(1, 1), (2, 2)] {
        let l = interleaved(tp, 2, s);
        // The same experts: an interleaved layout's unsharded weights are in module row order
        // (the canonical rows interleaved as one tensor), which `shard` re-interleaves per rank.
        let dir = tmp.path().join(format!("tp{tp}s{s}"));
        save_every_rank(&dir, &l, &global.glu_interleaved(Some(s)));
        let a = open_source(&tmp.path().join("plain"), &SourceOverrides::default()).unwrap();
        let b = open_source(&dir, &SourceOverrides::default()).unwrap();
        let report = diff(a.as_ref(), b.as_ref(), &DiffOptions::default()).unwrap();
        assert!(report.same(), "tp {tp} size {s}: {:?}", report.counts());
        assert!(!report.rows.is_empty());
    }
}
