//! Bad input: a clear error naming the file or key, and nothing left behind.

use super::{
    edit_index, expect_reshard_error, global_weights, layout, rank_states, sized, small_checkpoint, target, with, DTYPE,
};
use moe_checkpoint::format::{parse_key, INDEX};
use moe_checkpoint::{
    reshard, save, Checkpoint, CheckpointError, RankCoord, ReshardOptions, ReshardTarget, SaveOptions, SavePart,
};
use moe_reference::{Dtype, LayerClass};
use proptest::prelude::*;

use LayerClass::{Grouped, Sequential};

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
