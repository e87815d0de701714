//! Bad input: a clear error naming the file and key, exit 2, nothing written.

use super::*;

/// Runs `diff A B` and `reshard A DST`, expecting exit 2 with `needles` in stderr and no DST.
fn rejected(bad: &Path, needles: &[&str]) {
    let good = fixture("mixtral");
    let out = moe_verify(&["diff".as_ref(), good.as_os_str(), bad.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}{}", String::from_utf8_lossy(&out.stdout));
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr}");
    }
    let dst = bad.parent().unwrap().join("out");
    let out =
        moe_verify(&["reshard".as_ref(), bad.as_os_str(), dst.as_os_str(), "--class".as_ref(), "sequential".as_ref()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!dst.exists(), "reshard of bad input wrote {}", dst.display());
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn an_index_naming_a_missing_shard_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("qwen");
    copy_dir(&fixture("qwen3-moe"), &d);
    std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
    rejected(&d, &["model.safetensors.index.json", "model-00002-of-00003.safetensors", "missing"]);
}

#[test]
fn a_truncated_safetensors_header_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("mixtral");
    copy_dir(&fixture("mixtral"), &d);
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..40]).unwrap();
    rejected(&d, &["model.safetensors", "truncated or malformed header"]);
}

#[test]
fn mismatched_gate_and_up_shapes_or_dtypes_are_rejected_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("shape");
    planted_hf(&d, "mixtral", |t| {
        t.insert(
            "model.layers.0.block_sparse_moe.experts.2.w3.weight".into(),
            (StDtype::BF16, vec![8, 12], vec![0; 8 * 12 * 2]),
        );
    });
    rejected(&d, &["model.layers.0.block_sparse_moe.experts.2.w3.weight", "[8, 12]", "[8, 16]"]);
    let d = tmp.path().join("dtype");
    planted_hf(&d, "mixtral", |t| {
        t.insert(
            "model.layers.1.block_sparse_moe.experts.0.w1.weight".into(),
            (StDtype::F32, vec![8, 16], vec![0; 8 * 16 * 4]),
        );
    });
    rejected(&d, &["model.layers.1.block_sparse_moe.experts.0.w3.weight", "F32", "BF16"]);
}

#[test]
fn an_fp8_weight_without_its_scale_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("fp8");
    planted_hf(&d, "deepseek-v3-fp8", |t| {
        t.remove("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv").unwrap();
    });
    rejected(&d, &["model.layers.1.mlp.experts.3.down_proj.weight", "weight_scale_inv"]);
}

#[test]
fn an_mxfp4_scale_shape_that_does_not_match_its_blocks_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("mx");
    planted_hf(&d, "gpt-oss-mxfp4", |t| {
        t.insert("model.layers.0.mlp.experts.down_proj_scales".into(), (StDtype::U8, vec![4, 32, 2], vec![127; 256]));
    });
    rejected(&d, &["model.layers.0.mlp.experts.down_proj_blocks", "down_proj_scales", "[4, 32, 2]"]);
}

/// Why: a directory with a `.metadata` is routed to the torch_dist reader, whose errors name the
/// file (here a pickle cut after its protocol header).
#[test]
fn a_broken_torch_dist_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("td");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join(".metadata"), b"\x80\x04").unwrap();
    rejected(&d, &[".metadata"]);
}

#[test]
fn a_directory_of_no_known_format_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    rejected(tmp.path(), &["not a known checkpoint", "found none of index.json"]);
}

/// Why: a Hugging Face directory without its weights file is named as a Hugging Face checkpoint
/// that lacks it (the message once said "not a moe-verify checkpoint" for it).
#[test]
fn a_hugging_face_directory_without_weights_names_the_format_it_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("hf");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(fixture("mixtral").join("config.json"), d.join("config.json")).unwrap();
    let err = moe_checkpoint::hf::HfSource::open(&d, None).err().expect("no weights file").to_string();
    assert!(err.contains("not a Hugging Face checkpoint") && err.contains("model.safetensors"), "{err}");
}
