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
    assert!(msg.contains(".distcp") && msg.contains("linear_fc2.weight") && msg.contains("FloatStorage") && msg.contains("float16"), "{msg}");
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
    assert!(msg.contains("linear_fc2.weight") && msg.contains("[0:1, 1:2, 0:16, 0:8]") && msg.contains("missing expert coverage"), "{msg}");
}

/// A directory with no `.metadata` is not a torch_dist checkpoint.
#[test]
fn not_a_torch_dist_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = TorchDistSource::open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("no .metadata"), "{msg}");
}
