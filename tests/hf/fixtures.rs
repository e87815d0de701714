//! The transformers-written fixtures read back as the weights the in-memory model used.

use super::*;
use moe_checkpoint::diff::Verdict;

#[test]
fn every_family_diffs_identical_against_the_same_weights_in_our_format() {
    // The expected weights come from the in-memory model (fused gate_up_proj, GPT-OSS's
    // `[..., ::2]` forward, transformers' own MXFP4 dequantizer), not from the saved files, so
    // this pins each family's name mapping, concatenation, interleaving, transposes and
    // dequantization against the library that wrote them.
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let ours = tmp.path().join("ours");
        let w = expected(name);
        write_ours(&ours, &w, 1, megatron_prefix);
        let r = diff_dirs(&fixture(name), &ours, None);
        assert_eq!(r.rows.len(), w.len(), "{name}: one row per expected tensor");
        let quantized = name.ends_with("fp8") || name.ends_with("mxfp4");
        for row in &r.rows {
            let ok = match &row.verdict {
                Verdict::Identical => true,
                // Dequantized values against the same values stored as F32; the GPT-OSS MXFP4
                // fixture's biases stay BF16 (identical).
                Verdict::EqualValues => quantized,
                _ => false,
            };
            assert!(ok, "{name}: {:?} {:?}", row.key, row.verdict);
        }
        assert!(r.same() && r.findings.is_empty(), "{name}: {:?}", r.findings);
    }
}

#[test]
fn families_and_dense_layers_are_inferred_from_config_and_names() {
    // DeepSeek-V3's layer 0 is dense (first_k_dense_replace = 1) and its shared expert is not a
    // routed one: only layer 1's 4 routed experts are listed.
    let o = SourceOverrides::default();
    let s = open_source(&fixture("deepseek-v3"), &o).unwrap();
    assert_eq!(s.info().family.as_deref(), Some("deepseek-v3"));
    assert!(s.entries().iter().all(|e| e.key.layer == 1 && e.key.expert < 4));
    assert_eq!(s.entries().len(), 8);
    // Without config.json the names decide (fp8 scales: DeepSeek-V3).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("deepseek-v3-fp8").join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let s = open_source(tmp.path(), &o).unwrap();
    assert_eq!(s.info().family.as_deref(), Some("deepseek-v3"));
    assert!(s.info().inferred.iter().any(|l| l.contains("weight_scale_inv")), "{:?}", s.info().inferred);
    // The sharded Qwen3-MoE fixture really is sharded (the index path is exercised).
    assert!(fixture("qwen3-moe").join("model.safetensors.index.json").is_file());
    let s = open_source(&fixture("qwen3-moe"), &o).unwrap();
    assert!(s.info().inferred.iter().any(|l| l.contains("sharded")), "{:?}", s.info().inferred);
}

#[test]
fn cli_diff_reports_what_it_inferred_and_exits_0_on_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    write_ours(&ours, &expected("gpt-oss-mxfp4"), 1, megatron_prefix);
    let out = moe_verify(&[std::ffi::OsStr::new("diff"), fixture("gpt-oss-mxfp4").as_os_str(), ours.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("family: gpt-oss (config.json model_type \"gpt_oss\")"), "{stdout}");
    assert!(stdout.contains("format: moe-verify checkpoint"), "{stdout}");
    assert!(stdout.contains("IDENTICAL"), "{stdout}");
    // A family given on the command line wins over config.json, and says so.
    let out = moe_verify(&[
        "diff".as_ref(),
        fixture("qwen3-moe").as_os_str(),
        fixture("qwen3-moe").as_os_str(),
        "--family-b".as_ref(),
        "deepseek-v3".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("family: qwen3-moe (config.json model_type \"qwen3_moe\")"), "{stdout}");
    assert!(stdout.contains("family: deepseek-v3 (given)"), "{stdout}");
}

#[test]
fn reshard_from_hf_writes_our_format_that_diffs_identical() {
    // Mixtral (no biases) into GroupedMLP with EP 2 and verify-after-write; GPT-OSS (biases)
    // into SequentialMLP. Each result diffs identical against the HF source.
    let tmp = tempfile::tempdir().unwrap();
    for (name, class, ep) in
        [("mixtral", "grouped", "2"), ("gpt-oss", "sequential", "1"), ("gpt-oss-mxfp4", "te_grouped", "2")]
    {
        let dst = tmp.path().join(name);
        let out = moe_verify(&[
            "reshard".as_ref(),
            fixture(name).as_os_str(),
            dst.as_os_str(),
            "--class".as_ref(),
            class.as_ref(),
            "--ep".as_ref(),
            ep.as_ref(),
            "--verify".as_ref(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{name}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("verified"), "{stdout}");
        let r = diff_dirs(&fixture(name), &dst, None);
        assert!(r.same(), "{name}: {:?}", r.counts());
        assert_eq!(r.rows.len(), expected(name).len());
    }
}

#[test]
fn inspect_lists_hf_experts_per_layer() {
    let out = moe_verify(&["inspect".as_ref(), fixture("mixtral").as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("fc1.weight         4 [16, 16]"), "{stdout}");
    assert!(stdout.contains("family: mixtral"), "{stdout}");
    // --verify decodes every tensor (here MXFP4 and its biases: 2 layers x 4 experts x 4).
    let out = moe_verify(&["inspect".as_ref(), fixture("gpt-oss-mxfp4").as_os_str(), "--verify".as_ref()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("verified: all 32 expert tensors read and decoded"), "{stdout}");
}

#[test]
fn reshard_to_hf_writes_each_family_that_diffs_identical() {
    // Each fixture written back in its own family (GPT-OSS: interleaved and transposed again;
    // quantized ones as F32 values), and a moe-verify checkpoint written as GPT-OSS: every
    // result diffs identical or equal-valued against its source and opens in safetensors.
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours");
    write_ours(&ours, &expected("mixtral"), 1, megatron_prefix);
    let mut cases: Vec<(PathBuf, &str)> = FIXTURES
        .iter()
        .map(|n| {
            let fam = match *n {
                "mixtral" | "mixtral-fused" => "mixtral",
                "qwen3-moe" => "qwen3-moe",
                "deepseek-v3" | "deepseek-v3-fp8" => "deepseek-v3",
                _ => "gpt-oss",
            };
            (fixture(n), fam)
        })
        .collect();
    cases.push((ours, "gpt-oss"));
    for (i, (src, fam)) in cases.iter().enumerate() {
        let dst = tmp.path().join(format!("out{i}"));
        let out = moe_verify(&["reshard".as_ref(), src.as_os_str(), dst.as_os_str(), "--hf".as_ref(), fam.as_ref()]);
        assert_eq!(out.status.code(), Some(0), "{}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
        let r = diff_dirs(src, &dst, None);
        assert!(r.same() && !r.rows.is_empty(), "{}: {:?}", src.display(), r.counts());
        let s = open_source(&dst, &SourceOverrides::default()).unwrap();
        assert_eq!(s.info().family.as_deref(), Some(*fam));
        read_st(&dst.join("model.safetensors"));
    }
}

#[test]
fn reshard_to_hf_refuses_biases_a_family_cannot_hold() {
    // GPT-OSS experts have biases; Mixtral's have none: refused, nothing written.
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out");
    let out = moe_verify(&[
        "reshard".as_ref(),
        fixture("gpt-oss").as_os_str(),
        dst.as_os_str(),
        "--hf".as_ref(),
        "mixtral".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mixtral experts have no biases"));
    assert!(!dst.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary directory left behind");
}
