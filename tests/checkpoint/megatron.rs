//! Layouts against real Megatron-Core: tests/data/megatron-layouts/*.json were written by
//! tools/megatron_layouts.py from Megatron-Core's own SequentialMLP/GroupedMLP
//! `sharded_state_dict` (factories built as at save), one file per configuration.

use super::cli::moe_verify;
use moe_checkpoint::ExpertLayout;
use moe_reference::{LayerClass, LayerConfig, Parallelism};
use std::path::Path;

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
        let mut args = vec!["layout", "--class", c["layer"].as_str().unwrap(), "--num-experts", &e, "--hidden", &h];
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
