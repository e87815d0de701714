//! The model-shape registry (`moe_harness::shapes`) and its copy for the PyTorch scripts.

use moe_harness::shapes::registry_json;

/// `scripts/shapes.json`, which the PyTorch bench scripts read, is exactly what
/// `moe-verify shapes --json` prints from the registry: regenerate it with
/// `moe-verify shapes --json > scripts/shapes.json` after changing a shape or distribution.
#[test]
fn the_scripts_shapes_json_is_the_registry() {
    let committed = include_str!("../scripts/shapes.json");
    let registry = serde_json::to_string_pretty(&registry_json()).expect("serializable") + "\n";
    assert!(
        committed == registry,
        "scripts/shapes.json differs from the registry: run `moe-verify shapes --json > scripts/shapes.json`"
    );
    // The command prints the same bytes.
    let bin = crate::moe_verify_bin();
    let out = std::process::Command::new(&bin)
        .args(["shapes", "--json"])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), registry);
}
