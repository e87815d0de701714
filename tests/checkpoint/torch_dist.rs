//! Megatron `torch_dist` checkpoints written by megatron-core 0.16.1 itself
//! (`tools/make_torch_dist_fixtures.py`, `tests/data/torch_dist/`), read through
//! [`TorchDistSource`], and the bad inputs the reader must reject with a clear error.

use moe_checkpoint::experts::ExpertValues;
use moe_checkpoint::{CheckpointError, ExpertKey, ExpertSource, TorchDistSource};
use moe_reference::ExpertParam;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch_dist")
}

/// The configurations the generator writes; a missing one fails (regenerate with the command
/// in `docs/checkpoint.md`).
const FIXTURES: &[&str] = &[
    "seq_w1_glu",
    "grouped_w1_singleton",
    "seq_w2_ep2_glu_singleton_bias",
    "seq_w2_etp2_bf16",
    "grouped_w2_ep2_glu",
    "seq_w4_tp2_ep2_etp1_glu",
    "grouped_w4_ep2_etp2_glu_singleton",
];

/// `reference.safetensors`: the canonical per-expert tensors the generator put into the model,
/// by (layer, expert, param): (dtype name, shape, bytes).
fn reference(dir: &Path) -> BTreeMap<ExpertKey, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference parses");
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        // layers.{l}.experts.{g}.{fc1_weight|fc1_bias|fc2_weight|fc2_bias}
        let parts: Vec<&str> = name.split('.').collect();
        let param = match parts[4] {
            "fc1_weight" => ExpertParam::Fc1Weight,
            "fc1_bias" => ExpertParam::Fc1Bias,
            "fc2_weight" => ExpertParam::Fc2Weight,
            "fc2_bias" => ExpertParam::Fc2Bias,
            other => panic!("unexpected reference tensor {other}"),
        };
        let key = ExpertKey { layer: parts[1].parse().unwrap(), expert: parts[3].parse().unwrap(), param };
        out.insert(key, (format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec()));
    }
    out
}

/// Every expert tensor of every fixture (SequentialMLP and GroupedMLP, world sizes 1, 2 and 4,
/// several (TP, EP, ETP), GLU on/off, singleton on/off, two stacked layers, f32 and bf16) reads
/// back bit for bit equal to what the generator put into the model, each exactly once.
#[test]
fn torch_dist_fixtures_read_exactly() {
    for name in FIXTURES {
        let dir = data().join(name);
        assert!(
            dir.join(".metadata").is_file(),
            "{}: fixture missing; regenerate with tools/make_torch_dist_fixtures.py (docs/checkpoint.md)",
            dir.display()
        );
        let src = TorchDistSource::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = reference(&dir);
        let got: Vec<ExpertKey> = src.entries().iter().map(|e| e.key).collect();
        assert_eq!(got, want.keys().copied().collect::<Vec<_>>(), "{name}: expert keys");
        for e in src.entries() {
            let (dtype, shape, bytes) = &want[&e.key];
            // Messages name the stored key (both halves for a singleton GLU fc1).
            let halves = name.contains("glu_singleton") && e.key.param == ExpertParam::Fc1Weight;
            assert!(e.location.starts_with(".metadata: decoder.layers."), "{}", e.location);
            assert_eq!(e.location.contains("weight_w") && e.location.contains("weight_v"), halves, "{}", e.location);
            assert_eq!(&e.shape, shape, "{name} {:?} ({})", e.key, e.location);
            let ExpertValues::Raw(t) = src.read(e).unwrap_or_else(|err| panic!("{name} {}: {err}", e.location)) else {
                panic!("{name}: torch_dist values are stored values")
            };
            assert_eq!(&format!("{:?}", t.dtype).to_uppercase(), dtype, "{name} {}", e.location);
            assert_eq!(&t.shape, shape, "{name} {}", e.location);
            assert!(t.data == *bytes, "{name} {}: values differ from the generator's", e.location);
        }
        // Megatron-Core stacks homogeneous layers on a leading layer axis, but singleton keys
        // force `non_homogeneous_layers` (layer-numbered prefixes; transformer_block.py).
        let stacked = src.info().inferred.iter().any(|l| l.contains("layers 0..2 stacked on a leading layer axis"));
        assert_eq!(stacked, !name.contains("singleton"), "{name}: {:?}", src.info().inferred);
    }
}

/// A copy of `seq_w1_glu` to break.
fn broken_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(data().join("seq_w1_glu")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tmp.path().join(f.file_name())).unwrap();
    }
    tmp
}

fn with_metadata(bad: &str) -> tempfile::TempDir {
    let tmp = broken_copy();
    std::fs::copy(data().join("bad").join(bad), tmp.path().join(".metadata")).unwrap();
    tmp
}

/// Reads every entry; the first error.
fn read_all(src: &TorchDistSource) -> Result<(), CheckpointError> {
    for e in src.entries() {
        src.read(e)?;
    }
    Ok(())
}

/// A `.distcp` cut short: opening fails naming the file, "truncated" and a key whose chunk lies
/// past the end (checked from the metadata before anything is read).
#[test]
fn truncated_distcp_is_named() {
    let tmp = broken_copy();
    let f = tmp.path().join("__0_1.distcp");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("__0_1.distcp") && msg.contains("truncated") && msg.contains("key decoder."), "{msg}");
}

/// A data file the metadata names is gone: the error names it and a key stored there.
#[test]
fn metadata_naming_a_missing_file_is_named() {
    let tmp = broken_copy();
    std::fs::remove_file(tmp.path().join("__0_0.distcp")).unwrap();
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("__0_0.distcp") && msg.contains("named by .metadata for key"), "{msg}");
}

/// `planner_data = os.system` pickled into `.metadata`: refused by name, never resolved.
#[test]
fn global_outside_the_allowlist_is_named() {
    let tmp = with_metadata("global.metadata");
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains(".metadata") && msg.contains("posix.system") && msg.contains("allowlist"), "{msg}");
}

/// The fc2 weight's metadata says float16 while its chunks hold float32: reading names the
/// file, the key and both dtypes.
#[test]
fn dtype_mismatch_is_named() {
    let tmp = with_metadata("dtype.metadata");
    let src = TorchDistSource::open(tmp.path()).unwrap();
    let msg = read_all(&src).unwrap_err().to_string();
    assert!(
        msg.contains(".distcp")
            && msg.contains("linear_fc2.weight")
            && msg.contains("FloatStorage")
            && msg.contains("float16"),
        "{msg}"
    );
}

/// An fc1 chunk's storage record points at an fc2 chunk's bytes: the shapes disagree and the
/// error names the file, the key and both shapes.
#[test]
fn shape_mismatch_is_named() {
    let tmp = with_metadata("shape.metadata");
    let src = TorchDistSource::open(tmp.path()).unwrap();
    let msg = read_all(&src).unwrap_err().to_string();
    assert!(msg.contains(".distcp") && msg.contains("linear_fc") && msg.contains("shape"), "{msg}");
}

/// One chunk of the fc2 weight removed (layer 0, expert 1): opening reports the key, the
/// uncovered region and "missing expert coverage".
#[test]
fn missing_expert_coverage_is_named() {
    let tmp = with_metadata("coverage.metadata");
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains("linear_fc2.weight")
            && msg.contains("[0:1, 1:2, 0:16, 0:8]")
            && msg.contains("missing expert coverage"),
        "{msg}"
    );
}

/// A directory with no `.metadata` is not a torch_dist checkpoint, and the error says so (not
/// "not a moe-verify checkpoint", which named the wrong format).
#[test]
fn not_a_torch_dist_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("no .metadata") && msg.contains("not a torch_dist checkpoint"), "{msg}");
    assert!(!msg.contains("moe-verify"), "{msg}");
}

/// `moe-verify layout` with the layer axis (`sharded_offsets = ((0, l, L),)`, `--num-layers`/
/// `--layer-offset`) against what megatron-core actually saved: for every fixture, the union over
/// all ranks of our main-replica ShardedTensors (key, global shape, chunk offset and extent) equals
/// the expert chunks of its `.metadata`, and our `_extra_state` ShardedObjects' unique keys equal
/// its expert bytes entries. Singleton fixtures take the layer from the prefix instead (singleton
/// keys force `non_homogeneous_layers` in `TransformerBlock.sharded_state_dict`).
#[test]
fn layout_with_a_layer_axis_matches_the_saved_metadata() {
    use moe_checkpoint::torch_dist::parse_expert_key;
    use moe_checkpoint::{sharded_state_dict, ExpertLayout, ShardedEntry};
    use moe_reference::{LayerClass, LayerConfig, Parallelism};
    use std::collections::BTreeSet;
    type Chunks = BTreeMap<String, (Vec<usize>, BTreeSet<(Vec<usize>, Vec<usize>)>)>;
    for name in FIXTURES {
        let dir = data().join(name);
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        let c = &fx["config"];
        let u = |k: &str| c[k].as_u64().unwrap() as usize;
        let b = |k: &str| c[k].as_bool().unwrap();
        let config = LayerConfig {
            class: if c["layer"] == "grouped" { LayerClass::Grouped } else { LayerClass::Sequential },
            num_experts: u("num_experts"),
            hidden_size: u("hidden"),
            ffn_hidden_size: u("ffn"),
            gated_linear_unit: b("glu"),
            add_bias: b("bias"),
            parallel: Parallelism { tp_size: u("etp"), ep_size: u("ep"), ..Parallelism::SINGLE },
            ..LayerConfig::example()
        };
        let num_layers = u("num_layers");
        let singleton = b("singleton_local_shards");
        let (mut want, mut want_objects): (Chunks, BTreeSet<String>) = Default::default();
        for l in 0..num_layers {
            let layout = if singleton {
                ExpertLayout {
                    singleton,
                    prefix: format!("decoder.layers.{l}.mlp.experts."),
                    ..ExpertLayout::new(config.clone())
                }
            } else {
                ExpertLayout { prefix: "decoder.layers.mlp.experts.".into(), ..ExpertLayout::new(config.clone()) }
                    .at_layer(l, num_layers)
            };
            for rank in layout.ranks() {
                for e in sharded_state_dict(&layout, rank).unwrap() {
                    match e {
                        ShardedEntry::Tensor(t) if t.is_main_replica() => {
                            let extent = t.extent();
                            let slot = want.entry(t.key.clone()).or_insert((t.global_shape.clone(), BTreeSet::new()));
                            assert_eq!(slot.0, t.global_shape, "{name} {}", t.key);
                            slot.1.insert((t.global_offset.clone(), extent));
                        }
                        ShardedEntry::Object(o) if o.is_main_replica() => {
                            want_objects.insert(o.unique_key());
                        }
                        _ => {}
                    }
                }
            }
        }
        let src = TorchDistSource::open(&dir).unwrap();
        let meta = src.metadata();
        let got: Chunks = meta
            .tensors
            .iter()
            .filter(|(k, _)| parse_expert_key(k).is_some())
            .map(|(k, t)| {
                let chunks = t.chunks.iter().map(|c| (c.offsets.clone(), c.sizes.clone())).collect();
                (k.clone(), (t.size.clone(), chunks))
            })
            .collect();
        assert_eq!(got, want, "{name}: expert ShardedTensors");
        let got_objects: BTreeSet<String> = meta
            .bytes
            .iter()
            .filter(|k| k.contains(".experts.experts.") && k.contains("._extra_state/"))
            .cloned()
            .collect();
        assert_eq!(got_objects, want_objects, "{name}: expert ShardedObjects");
    }
}

/// `moe-verify layout --num-layers L --layer-offset l` prints the layer axis in front of every
/// entry (what `layout_with_a_layer_axis_matches_the_saved_metadata` checks against
/// megatron-core), and a layer offset outside the layers is bad input (exit 2).
#[test]
fn cli_layout_prints_the_layer_axis() {
    use super::cli::moe_verify;
    let base = ["layout", "--class", "sequential", "--num-experts", "4", "--hidden", "16", "--ffn", "8", "--glu"];
    let out = moe_verify(&[&base[..], &["--num-layers", "2", "--layer-offset", "1", "--json"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fc1 = v[0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "experts.linear_fc1.weight")
        .expect("fc1 entry")
        .clone();
    assert_eq!(fc1["global_shape"], serde_json::json!([2, 4, 16, 16]));
    assert_eq!(fc1["global_offset"], serde_json::json!([1, 0, 0, 0]));
    assert_eq!(fc1["prepend_axis_num"], serde_json::json!(2));
    let out = moe_verify(&[&base[..], &["--num-layers", "2", "--layer-offset", "2"]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sharded_offsets[0] = (0, 2, 2)"));
}

/// Found by the fuzz runner (`moe-fuzz --target distcp`, docs/fuzzing.md): a `.distcp` item
/// whose zip end-of-central-directory record claims 65 535 entries made the zip crate reserve
/// ~15 MB for a 2 KB item. The reader now checks the directory before the zip crate sees it; the untouched
/// item still reads.
#[test]
fn zip_entry_count_beyond_the_item_is_refused() {
    use moe_checkpoint::torch_dist::archive::read_tensor;
    use std::io::Cursor;
    let dir = data().join("seq_w1_glu");
    let src = TorchDistSource::open(&dir).unwrap();
    let meta = src.metadata();
    let key = "decoder.layers.mlp.experts.experts.linear_fc2.weight";
    let chunk = &meta.tensors[key].chunks[0];
    let si = &meta.storage[&(key.to_string(), chunk.offsets.clone())];
    let file = std::fs::read(dir.join(&si.relative_path)).unwrap();
    let mut item = file[si.offset as usize..(si.offset + si.length) as usize].to_vec();
    let dtype = moe_reference::Dtype::F32;
    read_tensor(Cursor::new(&item), 0, si.length, dtype, &chunk.sizes).expect("the real item reads");
    let eocd = item.len() - 22;
    assert_eq!(&item[eocd..eocd + 4], b"PK\x05\x06");
    item[eocd + 8..eocd + 12].copy_from_slice(&[0xff; 4]);
    let msg = read_tensor(Cursor::new(&item), 0, si.length, dtype, &chunk.sizes).unwrap_err();
    assert!(msg.contains("claims 65535 entries"), "{msg}");
    // Same run: a central-directory entry whose name length (16 bits) runs past the directory
    // made the zip crate allocate 64 KiB per field before reading it.
    item[eocd + 8..eocd + 12].copy_from_slice(&[7, 0, 7, 0]);
    let cd = u32::from_le_bytes(item[eocd + 16..eocd + 20].try_into().unwrap()) as usize;
    assert_eq!(&item[cd..cd + 4], b"PK\x01\x02");
    item[cd + 28..cd + 30].copy_from_slice(&[0xff, 0xff]);
    let msg = read_tensor(Cursor::new(&item), 0, si.length, dtype, &chunk.sizes).unwrap_err();
    assert!(msg.contains("runs past the directory"), "{msg}");
}

/// The canonical weights of a fixture's `reference.safetensors` as raw tensors.
fn reference_raw(dir: &Path) -> BTreeMap<(usize, usize, ExpertParam), moe_checkpoint::RawTensor> {
    reference(dir)
        .into_iter()
        .map(|(k, (dtype, shape, data))| {
            let dtype = match dtype.as_str() {
                "F32" => moe_reference::Dtype::F32,
                "BF16" => moe_reference::Dtype::Bf16,
                "F16" => moe_reference::Dtype::F16,
                other => panic!("reference dtype {other}"),
            };
            ((k.layer, k.expert, k.param), moe_checkpoint::RawTensor { dtype, shape, data })
        })
        .collect()
}

/// Why (issue 14, "the same weights written both ways compare identical through `diff`"): every
/// megatron-core-written `torch_dist` fixture, against the same experts written in moe-verify's
/// format by our own writer (two EP ranks, one prefix per layer), is identical tensor by tensor
/// through `diff`'s format inference; with one expert dropped from our side, `diff` names it.
#[test]
fn torch_dist_fixtures_diff_identical_against_the_same_weights_in_our_format() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let w = reference_raw(&data().join(name));
        let ours = tmp.path().join(name);
        crate::hf::write_ours(&ours, &w, 2, crate::hf::megatron_prefix);
        let report = crate::hf::diff_dirs(&data().join(name), &ours, None);
        assert!(report.same(), "{name}: {:?}", report.counts());
        assert_eq!(report.rows.len(), w.len(), "{name}: every tensor compared once");
        assert!(report.a.inferred.iter().any(|l| l.contains("torch_dist")), "{name}: {:?}", report.a.inferred);
    }
    // Planted: expert 3 of layer 1 lost in the conversion.
    let name = FIXTURES[0];
    let mut w = reference_raw(&data().join(name));
    w.retain(|k, _| !(k.0 == 1 && k.1 == 3));
    let ours = tmp.path().join("dropped");
    crate::hf::write_ours(&ours, &w, 1, crate::hf::megatron_prefix);
    let report = crate::hf::diff_dirs(&data().join(name), &ours, None);
    assert!(!report.same());
    let findings = report.findings.join("\n");
    assert!(findings.contains("layer 1") && findings.contains('3') && findings.contains("missing in B"), "{findings}");
}

/// Why (issue 14: "`inspect` and `reshard` accept `torch_dist` sources"): the CLI path from a
/// megatron-core checkpoint to moe-verify's format — `inspect` names the stacked layer axis,
/// `reshard` writes TEGroupedMLP at EP 2, and `diff` of the result against the source is
/// identical (exit 0) — so the route a user takes is the one tested, not only the library.
#[test]
fn cli_inspects_reshards_and_diffs_a_torch_dist_checkpoint() {
    let src = data().join("seq_w4_tp2_ep2_etp1_glu");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ours");
    let run =
        |args: &[&std::ffi::OsStr]| std::process::Command::new(crate::moe_verify_bin()).args(args).output().unwrap();
    let inspect = run(&["inspect".as_ref(), src.as_os_str()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert_eq!(inspect.status.code(), Some(0), "{text}");
    assert!(text.contains("torch_dist") && text.contains("layer axis"), "{text}");
    let reshard = run(&[
        "reshard".as_ref(),
        src.as_os_str(),
        out.as_os_str(),
        "--class".as_ref(),
        "te_grouped".as_ref(),
        "--ep".as_ref(),
        "2".as_ref(),
    ]);
    assert_eq!(reshard.status.code(), Some(0), "{}", String::from_utf8_lossy(&reshard.stderr));
    let diff = run(&["diff".as_ref(), src.as_os_str(), out.as_os_str()]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(diff.status.code(), Some(0), "{text}");
    assert!(text.contains("16 identical"), "{text}");
}
