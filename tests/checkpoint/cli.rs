//! The CLI: `moe-verify layout`, `reshard` and `inspect`, their output and exit codes.

use super::{layout, sized, small_checkpoint};
use moe_checkpoint::layout_json;
use moe_reference::LayerClass::Grouped;

pub(super) fn moe_verify(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_moe-verify")).args(args).output().unwrap()
}

#[test]
fn cli_layout_json_matches_library_and_exit_codes() {
    let out = moe_verify(&[
        "layout",
        "--class",
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
    // Table form (and `--layer`, the old spelling of `--class`, still accepted).
    let out = moe_verify(&["layout", "--layer", "sequential", "--num-experts", "2", "--hidden", "4", "--ffn", "4"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("experts.linear_fc2.weight"));
    // Expert-DP rank 1: every replica id ends in 1, so no entry is a main replica.
    let out = moe_verify(&[
        "layout",
        "--class",
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
        moe_verify(&["layout", "--class", "grouped", "--num-experts", "2", "--hidden", "4", "--ffn", "4", "--bias"]);
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
        "--class",
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
