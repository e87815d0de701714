//! moe-verify's own format as an [`ExpertSource`]: each logical expert tensor
//! (`P experts.linear_fcX.{weight,bias}`, `[E, …]`, already canonical per expert) becomes one
//! entry per expert, read as that expert's slice.

use crate::experts::{canonical_fc1, ExpertEntry, ExpertKey, ExpertSource, ExpertValues, SourceFormat, SourceInfo};
use crate::format::{parse_key, Checkpoint, ShardCache};
use crate::reshard::infer_models;
use crate::tensor::Region;
use crate::CheckpointError;
use moe_reference::ExpertParam;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

/// An opened moe-verify checkpoint seen as expert tensors.
pub struct OwnSource {
    ckpt: Checkpoint,
    info: SourceInfo,
    entries: Vec<ExpertEntry>,
    /// Per entry (same order): logical key and the expert's box in it.
    regions: HashMap<(ExpertKey, String), (String, Region)>,
    cache: RefCell<ShardCache>,
}

/// The decoder layer a key prefix names: `…layers.{i}.…` gives `i`.
pub fn layer_of_prefix(prefix: &str) -> Option<usize> {
    let parts: Vec<&str> = prefix.split('.').collect();
    parts.windows(2).find(|w| w[0] == "layers").and_then(|w| w[1].parse().ok())
}

impl OwnSource {
    /// Opens `dir` ([`Checkpoint::open`], [`infer_models`]) and lists one entry per expert and
    /// tensor. Prefixes naming `layers.{i}` map to layer `i`; a single other prefix to layer 0;
    /// several other prefixes to `0, 1, …` in sorted order (said in `info().inferred`).
    pub fn open(dir: &Path) -> Result<OwnSource, CheckpointError> {
        let ckpt = Checkpoint::open(dir)?;
        let models = infer_models(&ckpt)?;
        let mut inferred = vec![format!("format: moe-verify checkpoint (found {})", crate::format::INDEX)];
        let unnumbered: Vec<&str> =
            models.iter().filter(|m| layer_of_prefix(&m.prefix).is_none()).map(|m| m.prefix.as_str()).collect();
        let mut entries = Vec::new();
        let mut regions = HashMap::new();
        let singleton = models.iter().any(|m| m.singleton);
        for m in &models {
            let layer = match layer_of_prefix(&m.prefix) {
                Some(l) => l,
                None => unnumbered.iter().position(|p| *p == m.prefix).unwrap_or(0),
            };
            inferred.push(format!(
                "prefix {:?} -> layer {layer}: {} experts, h {}, f {}, glu {}, bias {}, {}, {} keys",
                m.prefix,
                m.num_experts,
                m.hidden,
                m.ffn,
                m.glu,
                m.bias,
                m.dtype,
                if m.singleton { "singleton" } else { "stacked" }
            ));
            let n1 = if m.glu { 2 * m.ffn } else { m.ffn };
            let params: [(ExpertParam, &str, Vec<usize>); 4] = [
                (ExpertParam::Fc1Weight, "linear_fc1.weight", vec![n1, m.hidden]),
                (ExpertParam::Fc1Bias, "linear_fc1.bias", vec![n1]),
                (ExpertParam::Fc2Weight, "linear_fc2.weight", vec![m.hidden, m.ffn]),
                (ExpertParam::Fc2Bias, "linear_fc2.bias", vec![m.hidden]),
            ];
            let logical = ckpt.logical_tensors();
            for (param, name, shape) in params {
                let lkey = format!("{}experts.{name}", m.prefix);
                let Some((_, gshape, dtype)) = logical.iter().find(|t| t.0 == lkey) else { continue };
                let mut want = vec![m.num_experts];
                want.extend(&shape);
                if *gshape != want {
                    return Err(CheckpointError::Mismatch {
                        key: lkey,
                        msg: format!("global shape {gshape:?}, expected {want:?} for this expert layer"),
                    });
                }
                for e in 0..m.num_experts {
                    let key = ExpertKey { layer, expert: e, param };
                    let location = format!("{}: {lkey}[{e}]", dir.display());
                    let mut offset = vec![e];
                    offset.extend(vec![0; shape.len()]);
                    let mut rshape = vec![1];
                    rshape.extend(&shape);
                    let region = Region { offset, shape: rshape };
                    if !ckpt.logical_covers(&lkey, &region) {
                        // Not stored (e.g. an expert-parallel rank's file left out): `diff`
                        // reports it missing on this side.
                        continue;
                    }
                    regions.insert((key, location.clone()), (lkey.clone(), region));
                    entries.push(ExpertEntry { key, shape: shape.clone(), stored_as: format!("{dtype}"), location });
                }
            }
        }
        let info = SourceInfo {
            path: dir.to_path_buf(),
            format: SourceFormat::MoeVerify,
            family: Some(if singleton { "megatron (singleton keys)".into() } else { "megatron".into() }),
            inferred,
        };
        Ok(OwnSource { ckpt, info, entries, regions, cache: RefCell::new(ShardCache::default()) })
    }
}

impl ExpertSource for OwnSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn entries(&self) -> &[ExpertEntry] {
        &self.entries
    }

    fn read(&self, entry: &ExpertEntry) -> Result<ExpertValues, CheckpointError> {
        let (lkey, region) = self.regions.get(&(entry.key, entry.location.clone())).ok_or_else(|| {
            CheckpointError::Mismatch { key: entry.location.clone(), msg: "not an entry of this source".into() }
        })?;
        let mut t = self.ckpt.load_logical_region(lkey, region, &mut self.cache.borrow_mut())?;
        t.shape.remove(0);
        // A GLU-interleaved layer stores its fc1 rows in the module's interleaved order, per
        // expert-TP rank (spec §7.9): the canonical orientation is gate rows then linear rows.
        if matches!(entry.key.param, ExpertParam::Fc1Weight | ExpertParam::Fc1Bias) {
            let prefix = parse_key(lkey).map(|k| k.prefix).unwrap_or_default();
            let order = self.ckpt.glu_order(&prefix);
            if order.size.is_some() {
                t = canonical_fc1(&entry.location, &t, order)?;
            }
        }
        Ok(ExpertValues::Raw(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers_come_from_the_prefix() {
        assert_eq!(layer_of_prefix("decoder.layers.3.mlp."), Some(3));
        assert_eq!(layer_of_prefix("model.layers.12."), Some(12));
        assert_eq!(layer_of_prefix("decoder.mlp."), None);
        assert_eq!(layer_of_prefix(""), None);
    }
}
