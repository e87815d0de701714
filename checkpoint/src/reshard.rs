//! Checkpoint -> checkpoint conversion into another class or parallel layout.

use super::format::{parse_key, Checkpoint, CheckpointWriter, SaveOptions, SavePart};
use super::sharded::{ExpertLayout, RankCoord};
use super::CheckpointError;
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism};
use std::collections::BTreeMap;
use std::path::Path;

/// The expert layer found under one prefix of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// The key prefix `P`.
    pub prefix: String,
    /// `E`.
    pub num_experts: usize,
    /// `h`.
    pub hidden: usize,
    /// `f`.
    pub ffn: usize,
    /// Gated linear unit (fc1 has `2f` rows).
    pub glu: bool,
    /// Biases present.
    pub bias: bool,
    /// Stored with per-expert (singleton) keys.
    pub singleton: bool,
    /// Storage dtype.
    pub dtype: Dtype,
    /// The GLU interleave size it was saved with (Megatron HEAD's
    /// `moe_mlp_glu_interleave_size`, spec §7.9), from the index; `None` for the plain halves.
    pub glu_interleave_size: Option<usize>,
}

impl ModelInfo {
    /// This expert layer in `target`'s class and parallel layout.
    pub fn layout(&self, target: &ReshardTarget) -> ExpertLayout {
        let config = LayerConfig {
            class: target.class,
            num_experts: self.num_experts,
            hidden_size: self.hidden,
            ffn_hidden_size: self.ffn,
            gated_linear_unit: self.glu,
            add_bias: self.bias,
            parallel: Parallelism { tp_size: target.tp, ep_size: target.ep, ..Parallelism::SINGLE },
            // The model keeps its interleaving in a TEGroupedMLP (the only class that has it);
            // loading checks that the stored halves mean the same units there (spec §7.9).
            glu_interleave_size: self.glu_interleave_size.filter(|_| target.class == LayerClass::TeGrouped),
            ..LayerConfig::example()
        };
        ExpertLayout { singleton: target.singleton, prefix: self.prefix.clone(), ..ExpertLayout::new(config) }
    }
}

/// Finds the expert layers of a checkpoint from its keys and global shapes.
pub fn infer_models(ckpt: &Checkpoint) -> Result<Vec<ModelInfo>, CheckpointError> {
    let tensors = ckpt.logical_tensors();
    let mut prefixes: BTreeMap<String, bool> = BTreeMap::new();
    for s in &ckpt.index.shards {
        if let Some(k) = parse_key(&s.key) {
            prefixes.insert(k.prefix, k.expert.is_some());
        }
    }
    if prefixes.is_empty() {
        return Err(CheckpointError::NotACheckpoint {
            path: ckpt.dir.clone(),
            reason: "no expert keys (`…experts.linear_fc1.weight`) in the index".into(),
        });
    }
    let find = |p: &str, name: &str| tensors.iter().find(|(k, _, _)| k == &format!("{p}experts.{name}"));
    let mut out = Vec::new();
    for (prefix, singleton) in prefixes {
        let bad = |msg: String| CheckpointError::Mismatch { key: format!("{prefix}experts.*"), msg };
        let (Some(fc1), Some(fc2)) = (find(&prefix, "linear_fc1.weight"), find(&prefix, "linear_fc2.weight")) else {
            return Err(bad("needs both linear_fc1.weight and linear_fc2.weight".into()));
        };
        let (&[e, r1, h], &[e2, h2, f]) = (fc1.1.as_slice(), fc2.1.as_slice()) else {
            return Err(bad(format!("unexpected global shapes {:?} and {:?}", fc1.1, fc2.1)));
        };
        if e != e2 || h != h2 || !(r1 == f || r1 == 2 * f) {
            return Err(bad(format!("fc1 {:?} and fc2 {:?} do not describe one expert layer", fc1.1, fc2.1)));
        }
        let bias = find(&prefix, "linear_fc1.bias").is_some();
        out.push(ModelInfo {
            prefix: prefix.clone(),
            num_experts: e,
            hidden: h,
            ffn: f,
            glu: r1 == 2 * f,
            bias,
            singleton,
            dtype: fc1.2,
            glu_interleave_size: ckpt.glu_order(&prefix).size,
        });
    }
    Ok(out)
}

/// The destination layout of a conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReshardTarget {
    /// Expert class.
    pub class: LayerClass,
    /// Expert-tensor-parallel size.
    pub tp: usize,
    /// Expert-parallel size.
    pub ep: usize,
    /// Per-expert keys.
    pub singleton: bool,
}

/// Options of [`reshard`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ReshardOptions {
    /// Replace an existing destination.
    pub force: bool,
    /// Check everything (layouts, coverage, shapes, dtypes) but write nothing.
    pub dry_run: bool,
    /// After writing, re-open the destination, check every CRC and compare every global
    /// tensor with the source byte for byte.
    pub verify: bool,
}

/// What [`reshard`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReshardReport {
    /// The destination layout of each expert layer.
    pub layouts: Vec<ExpertLayout>,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes of tensor data written (or, for a dry run, that would be).
    pub write_bytes: u64,
    /// Data files written (0 for a dry run).
    pub files: usize,
    /// True when the destination was written.
    pub written: bool,
    /// True when verify-after-write passed.
    pub verified: bool,
    /// Source keys that are not expert keys and were not carried over.
    pub skipped_keys: Vec<String>,
}

/// Converts the checkpoint at `src` into `target`'s layout at `dst`: loads every destination
/// rank with full coverage checks, then saves atomically.
pub fn reshard(
    src: &Path,
    dst: &Path,
    target: ReshardTarget,
    opts: ReshardOptions,
) -> Result<ReshardReport, CheckpointError> {
    let ckpt = Checkpoint::open(src)?;
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize()) {
        if a == b {
            return Err(CheckpointError::Exists { path: dst.to_path_buf() });
        }
    }
    if dst.exists() && !opts.force {
        return Err(CheckpointError::Exists { path: dst.to_path_buf() });
    }
    let models = infer_models(&ckpt)?;
    let mut skipped_keys: Vec<String> =
        ckpt.index.shards.iter().filter(|s| parse_key(&s.key).is_none()).map(|s| s.key.clone()).collect();
    skipped_keys.dedup();
    let layouts: Vec<ExpertLayout> = models.iter().map(|m| m.layout(&target)).collect();
    for l in &layouts {
        l.validate()?;
    }
    let parts: Vec<(ExpertLayout, RankCoord)> =
        layouts.iter().flat_map(|l| l.ranks().into_iter().map(move |r| (l.clone(), r))).collect();
    let plan = ckpt.plan(&parts, None)?;
    let (read_bytes, load_bytes) = (plan.read_bytes, plan.load_bytes);
    if opts.dry_run {
        return Ok(ReshardReport {
            layouts,
            read_bytes,
            write_bytes: load_bytes,
            files: 0,
            written: false,
            verified: false,
            skipped_keys,
        });
    }
    drop(plan);
    // One destination rank in memory at a time: load it, write its file, drop it.
    let mut writer = CheckpointWriter::create(dst, &SaveOptions { force: opts.force, abort_after_files: None })?;
    for (l, r) in &parts {
        let state = ckpt.execute(ckpt.plan(&[(l.clone(), *r)], None)?)?;
        writer.write_part(SavePart { layout: l, rank: *r, state: &state[0] })?;
    }
    // Verify-after-write runs on the complete temporary directory, before the rename, so a
    // failed verification leaves the destination as it was.
    let report = writer.finish_checked(|tmp| {
        if opts.verify {
            verify_same(&ckpt, &Checkpoint::open(tmp)?)?;
        }
        Ok(())
    })?;
    let verified = opts.verify;
    Ok(ReshardReport {
        layouts,
        read_bytes,
        write_bytes: report.bytes,
        files: report.files,
        written: true,
        verified,
        skipped_keys,
    })
}

/// Checks every CRC of `b` and that `a` and `b` hold the same logical global tensors, one
/// tensor in memory at a time.
pub fn verify_same(a: &Checkpoint, b: &Checkpoint) -> Result<(), CheckpointError> {
    b.verify()?;
    let (ka, kb) = (a.logical_tensors(), b.logical_tensors());
    let names = |v: &[(String, Vec<usize>, Dtype)]| v.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
    if let Some(k) = names(&kb).into_iter().find(|k| !ka.iter().any(|t| &t.0 == k)) {
        return Err(CheckpointError::VerifyFailed { key: k, msg: "not in the source".into() });
    }
    for (k, _, _) in &ka {
        if !kb.iter().any(|t| &t.0 == k) {
            return Err(CheckpointError::VerifyFailed { key: k.clone(), msg: "missing after write".into() });
        }
        let (ta, tb) = (a.load_logical(k)?, b.load_logical(k)?);
        if ta != tb {
            let first = ta.data.iter().zip(&tb.data).position(|(x, y)| x != y);
            return Err(CheckpointError::VerifyFailed {
                key: k.clone(),
                msg: format!(
                    "{:?} {:?} vs {:?} {:?}; first differing byte {first:?}",
                    ta.dtype, ta.shape, tb.dtype, tb.shape
                ),
            });
        }
    }
    Ok(())
}
