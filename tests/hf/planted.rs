//! Planted conversion bugs: each verdict of `diff` has a case that only it names, with the
//! exact rows it must flag and every other row identical.

use super::*;
use moe_checkpoint::diff::Verdict;
use moe_reference::GroupedWeight;
use ndarray::{s, Array2};

/// The rows that are not identical, as `(layer, expert, param, verdict)`.
fn flagged(r: &DiffReport) -> Vec<(usize, usize, ExpertParam, Verdict)> {
    r.rows
        .iter()
        .filter(|x| x.verdict != Verdict::Identical)
        .map(|x| (x.key.layer, x.key.expert, x.key.param, x.verdict.clone()))
        .collect()
}

/// Mixtral's weights in our format (A side of most cases).
fn mixtral_ours(tmp: &Path) -> PathBuf {
    std::fs::create_dir_all(tmp).unwrap();
    let d = tmp.join("ours");
    write_ours(&d, &expected("mixtral"), 1, megatron_prefix);
    d
}

fn key(l: usize, e: usize, w: &str) -> String {
    format!("model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight")
}

/// `[rows, cols]` elements of `elem` bytes, transposed.
fn transpose_bytes(b: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    for j in 0..cols {
        for i in 0..rows {
            out.extend_from_slice(&b[(i * cols + j) * elem..(i * cols + j + 1) * elem]);
        }
    }
    out
}

#[test]
fn a_dropped_expert_is_missing_in_b_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    planted_hf(&hf, "mixtral", |t| {
        for w in ["w1", "w2", "w3"] {
            t.remove(&key(1, 2, w)).unwrap();
        }
    });
    let r = diff_dirs(&mixtral_ours(tmp.path()), &hf, None);
    assert_eq!(
        flagged(&r),
        vec![(1, 2, ExpertParam::Fc1Weight, Verdict::MissingInB), (1, 2, ExpertParam::Fc2Weight, Verdict::MissingInB)]
    );
    assert_eq!(r.findings, vec!["layer 1: expert 2 missing in B (every tensor)".to_string()]);
    // The same pair the other way round: missing in A.
    let r = diff_dirs(&hf, &mixtral_ours(&tmp.path().join("again")), None);
    let f = flagged(&r);
    assert_eq!(f.len(), 2);
    assert!(f.iter().all(|x| (x.0, x.1, &x.3) == (1, 2, &Verdict::MissingInA)), "{f:?}");
    assert_eq!(r.findings, vec!["layer 1: expert 2 missing in A (every tensor)".to_string()]);
}

#[test]
fn experts_of_ep_rank_1_missing_are_named_as_a_range() {
    // Megatron-Bridge #1716: an export with EP > 1 that does not gather the experts. Our writer
    // at EP 2, then rank 1's files and shards removed from the index.
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    write_ours(&ours, &expected("qwen3-moe"), 2, megatron_prefix);
    let ipath = ours.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&ipath).unwrap()).unwrap();
    let shards = index["shards"].as_array_mut().unwrap();
    let mut dropped = std::collections::BTreeSet::new();
    shards.retain(|s| {
        let rank1 = s["global_offset"][0].as_u64().unwrap() >= 2;
        if rank1 {
            dropped.insert(s["file"].as_str().unwrap().to_string());
        }
        !rank1
    });
    index["files"].as_array_mut().unwrap().retain(|f| !dropped.contains(f["name"].as_str().unwrap()));
    for f in &dropped {
        std::fs::remove_file(ours.join(f)).unwrap();
    }
    assert_eq!(dropped.len(), 2, "one rank-1 file per layer");
    std::fs::write(&ipath, serde_json::to_vec(&index).unwrap()).unwrap();
    let r = diff_dirs(&fixture("qwen3-moe"), &ours, None);
    let missing: Vec<_> = flagged(&r).into_iter().map(|(l, e, _, v)| (l, e, v)).collect();
    assert_eq!(missing.len(), 2 * 2 * 2);
    assert!(missing.iter().all(|(_, e, v)| *e >= 2 && *v == Verdict::MissingInB), "{missing:?}");
    assert_eq!(
        r.findings,
        vec![
            "layer 0: experts 2..4 missing in B (every tensor)".to_string(),
            "layer 1: experts 2..4 missing in B (every tensor)".to_string()
        ]
    );
}

#[test]
fn gate_and_up_swapped_in_one_expert_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    planted_hf(&hf, "mixtral", |t| {
        let (w1, w3) = (t.remove(&key(0, 1, "w1")).unwrap(), t.remove(&key(0, 1, "w3")).unwrap());
        t.insert(key(0, 1, "w1"), w3);
        t.insert(key(0, 1, "w3"), w1);
    });
    let r = diff_dirs(&mixtral_ours(tmp.path()), &hf, None);
    assert_eq!(flagged(&r), vec![(0, 1, ExpertParam::Fc1Weight, Verdict::GateUpSwapped)]);
}

#[test]
fn a_transposed_expert_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    planted_hf(&hf, "mixtral", |t| {
        let (d, s, b) = t.remove(&key(1, 3, "w2")).unwrap();
        t.insert(key(1, 3, "w2"), (d, vec![s[1], s[0]], transpose_bytes(&b, s[0], s[1], 2)));
    });
    let r = diff_dirs(&mixtral_ours(tmp.path()), &hf, None);
    assert_eq!(flagged(&r), vec![(1, 3, ExpertParam::Fc2Weight, Verdict::Transposed)]);
}

#[test]
fn grouped_weight1_read_as_column_blocks_is_named_per_layer() {
    // Megatron-LM #909: a converter slicing GroupedMLP's weight1 (declared [h, E*N1]) into
    // column blocks instead of viewing its memory as [E, h, N1]. The wrong checkpoint is made
    // with our writer from DeepSeek-V3's weights (N1 16 != h 136, so no square coincidence).
    let w = expected("deepseek-v3");
    let cfg = layer_config(&w, 1, LayerClass::Grouped, 1);
    let (e_n, n1, h) = (cfg.num_experts, cfg.n1(), cfg.hidden_size);
    let fc1: Vec<&[u8]> = (0..e_n).map(|e| w[&(1, e, ExpertParam::Fc1Weight)].data.as_slice()).collect();
    let packed = GroupedWeight::Weight1.pack(&cfg, fc1, 2);
    let elems: Vec<u16> = packed.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let declared = Array2::from_shape_vec((h, e_n * n1), elems).unwrap();
    let mut wrong = w.clone();
    for e in 0..e_n {
        let block = declared.slice(s![.., e * n1..(e + 1) * n1]).t().as_standard_layout().into_owned();
        let data: Vec<u8> = block.iter().flat_map(|x| x.to_le_bytes()).collect();
        wrong.get_mut(&(1, e, ExpertParam::Fc1Weight)).unwrap().data = data;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    write_ours(&bad, &wrong, 1, megatron_prefix);
    let r = diff_dirs(&fixture("deepseek-v3"), &bad, None);
    let want: Vec<_> =
        (0..e_n).map(|e| (1, e, ExpertParam::Fc1Weight, Verdict::ColumnBlocks { reverse: false })).collect();
    assert_eq!(flagged(&r), want);
    assert_eq!(r.findings.len(), 1);
    assert!(r.findings[0].contains("layer 1: B's fc1 weights are A's GroupedMLP weight1 read as column blocks"));
    // The other direction names A as the misread side.
    let r = diff_dirs(&bad, &fixture("deepseek-v3"), None);
    assert!(flagged(&r).iter().all(|x| x.3 == Verdict::ColumnBlocks { reverse: true }));
}

#[test]
fn a_layer_stored_twice_is_present_twice() {
    // Prefixes `decoder.layers.1.mlp.` and `decoder.layers.01.mlp.` both name layer 1.
    let mut w = expected("mixtral");
    let layer1: Vec<_> = w.iter().filter(|(k, _)| k.0 == 1).map(|(k, v)| ((101, k.1, k.2), v.clone())).collect();
    w.extend(layer1);
    let tmp = tempfile::tempdir().unwrap();
    let twice = tmp.path().join("twice");
    write_ours(&twice, &w, 1, |l| if l == 101 { "decoder.layers.01.mlp.".into() } else { megatron_prefix(l) });
    let r = diff_dirs(&twice, &fixture("mixtral"), None);
    let f = flagged(&r);
    assert_eq!(f.len(), 8, "{f:?}");
    assert!(f.iter().all(|x| x.0 == 1 && x.3 == Verdict::PresentTwice { count_a: 2, count_b: 1 }), "{f:?}");
}

#[test]
fn a_wrong_shape_is_a_shape_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    planted_hf(&hf, "mixtral", |t| {
        t.insert(key(0, 0, "w2"), (StDtype::BF16, vec![16, 6], vec![0; 16 * 6 * 2]));
    });
    let r = diff_dirs(&mixtral_ours(tmp.path()), &hf, None);
    assert_eq!(
        flagged(&r),
        vec![(0, 0, ExpertParam::Fc2Weight, Verdict::ShapeMismatch { a: vec![16, 8], b: vec![16, 6] })]
    );
}

#[test]
fn one_changed_value_differs_exactly_and_passes_within_atol() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    // Element [3, 5] of layer 1 expert 0's w2 (BF16 [16, 8]) one unit in the last place up.
    let (i, j) = (3, 5);
    let mut before = 0u16;
    planted_hf(&hf, "mixtral", |t| {
        let b = &mut t.get_mut(&key(1, 0, "w2")).unwrap().2;
        let o = (i * 8 + j) * 2;
        before = u16::from_le_bytes([b[o], b[o + 1]]);
        b[o..o + 2].copy_from_slice(&(before + 1).to_le_bytes());
    });
    let ours = mixtral_ours(tmp.path());
    let r = diff_dirs(&ours, &hf, None);
    let f = flagged(&r);
    assert_eq!(f.len(), 1);
    let bf = |bits: u16| f64::from(f32::from_bits(u32::from(bits) << 16));
    let (a, b) = (bf(before), bf(before + 1));
    assert_eq!(f[0].3, Verdict::Differ { max_abs_diff: (a - b).abs(), at: vec![i, j], a, b, differing: 1 });
    // Within an atol of that difference: same, exit 0; below it: exit 1, JSON names the row.
    let atol = format!("{}", (a - b).abs());
    let out = moe_verify(&["diff".as_ref(), ours.as_os_str(), hf.as_os_str(), "--atol".as_ref(), atol.as_ref()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = moe_verify(&["diff".as_ref(), ours.as_os_str(), hf.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identical"], false);
    let rows: Vec<&serde_json::Value> =
        v["rows"].as_array().unwrap().iter().filter(|r| r["verdict"]["verdict"] != "identical").collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["verdict"]["verdict"], "differ");
    assert_eq!(rows[0]["key"]["expert"], 0);
}

#[test]
fn cli_names_the_planted_bug_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    planted_hf(&hf, "mixtral", |t| {
        let (w1, w3) = (t.remove(&key(1, 0, "w1")).unwrap(), t.remove(&key(1, 0, "w3")).unwrap());
        t.insert(key(1, 0, "w1"), w3);
        t.insert(key(1, 0, "w3"), w1);
    });
    let ours = mixtral_ours(tmp.path());
    let out = moe_verify(&["diff".as_ref(), ours.as_os_str(), hf.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("layer 1 expert 0 fc1.weight: GATE/UP SWAPPED"), "{stdout}");
    assert!(stdout.contains("DIFFERENT"), "{stdout}");
    // --layers 0 leaves the swapped layer out: identical.
    let out = moe_verify(&["diff".as_ref(), ours.as_os_str(), hf.as_os_str(), "--layers".as_ref(), "0".as_ref()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    // A range that selects nothing compares nothing: bad input, not a pass.
    let out = moe_verify(&["diff".as_ref(), ours.as_os_str(), hf.as_os_str(), "--layers".as_ref(), "5..9".as_ref()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no expert tensors to compare"));
}
