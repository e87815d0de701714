//! Megatron-Core's `sharded_state_dict` for the three expert classes (spec §7), reproduced
//! field for field: ShardedTensor key, global shape and offset, local shape, axis
//! fragmentations, replica id and `prepend_axis_num`, and the `_extra_state` ShardedObjects
//! (GroupedMLP's placeholder ones included).
//!
//! The builder also records, for every ShardedTensor, which part of the rank's canonical
//! per-expert weights it holds ([`Source`]); [`build`] and [`merge`] use that to turn a class
//! state dict into shard data and back (Megatron's factory build and merge functions).
//!
//! Submodules: `entries` builds the metadata of each class's layout, `data` converts between
//! a class state dict and the shards' bytes, [`interleave`] says what the GLU `_w`/`_v` halves
//! of a GLU-interleaved TEGroupedMLP (Megatron HEAD) hold and where they can be loaded.
//!
//! A GLU-interleaved TEGroupedMLP needs nothing special to save: the class state dict holds
//! fc1 rows in the module's interleaved order and the `_w`/`_v` parts are its two halves, as
//! Megatron stores them. [`ExpertLayout::glu_order`] names that order, and loading checks it
//! against the order the checkpoint was saved in ([`interleave::check_compatible`]).

mod data;
mod entries;
pub mod interleave;

pub use data::{build, from_canonical, merge, present, shard_pieces, to_canonical, Canonical};

use super::CheckpointError;
use moe_reference::{Dtype, ExpertParam, LayerClass, LayerConfig, ReferenceError};
use serde::Serialize;
use std::ops::Range;

/// The expert layer whose checkpoint layout is described, and the key options. The outer
/// offsets `O` (spec §7.2) are empty for an expert layer on its own, as in Megatron's own tests
/// (pipeline parallelism then only changes `prefix`, `"{pp_rank}."` there); a whole model
/// saved through `TransformerBlock.sharded_state_dict` with homogeneous layers passes the layer
/// axis `O = ((0, layer, num_layers),)` (megatron-core 0.16.1 `transformer_block.py`), which
/// [`ExpertLayout::sharded_offsets`] holds.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ExpertLayout {
    /// The layer: class, `E`, `h`, `f`, GLU, bias and the expert-parallel and
    /// expert-tensor-parallel *sizes*. Its ranks are not used (a rank is a [`RankCoord`]), nor
    /// are its numerics: a checkpoint's tensors keep the dtype they were saved in, and
    /// [`ExpertLayout::layer_config`] sets the one a rank computes in.
    pub config: LayerConfig,
    /// `metadata['singleton_local_shards']`: one key per global expert.
    pub singleton: bool,
    /// Key prefix `P` (ends with a dot unless empty).
    pub prefix: String,
    /// The outer `sharded_offsets` `O`: `(axis, offset, fragmentation)` with axes `0..len(O)`
    /// (the layer axis of a stacked `decoder.layers` block is `(0, layer, num_layers)`). Every
    /// ShardedTensor and ShardedObject gets these axes in front. Empty for a layer on its own.
    #[serde(default)]
    pub sharded_offsets: Vec<(usize, usize, usize)>,
}

/// One process's position: ETP rank, EP rank and expert-data-parallel rank (the third element
/// of every replica id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RankCoord {
    /// Expert-tensor-parallel rank `r`.
    pub tp_rank: usize,
    /// Expert-parallel rank `r_ep`.
    pub ep_rank: usize,
    /// Expert-data-parallel rank.
    pub edp_rank: usize,
}

impl RankCoord {
    /// The rank at (ep_rank, tp_rank) with expert-DP rank 0.
    pub fn new(ep_rank: usize, tp_rank: usize) -> RankCoord {
        RankCoord { tp_rank, ep_rank, edp_rank: 0 }
    }
}

/// Which rows of a GLU fc1 tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Half {
    /// All rows.
    All,
    /// The gate half (`w`, rows `[0, N2)`).
    W,
    /// The linear half (`v`, rows `[N2, 2·N2)`).
    V,
}

/// Where a ShardedTensor's local data comes from: the given rows of one canonical parameter of
/// a range of local experts, stacked along a leading expert axis when `stacked`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The parameter.
    pub param: ExpertParam,
    /// The row half (GLU fc1 only).
    pub half: Half,
    /// Local experts, in order.
    pub experts: Range<usize>,
    /// True when the local data has a leading axis of `experts.len()` (GroupedMLP).
    pub stacked: bool,
}

/// Megatron's `ShardedTensor` (metadata only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardedTensor {
    /// Checkpoint key.
    pub key: String,
    /// Global shape (`prepend_axis_num + local ndim` axes).
    pub global_shape: Vec<usize>,
    /// Global offset of this shard.
    pub global_offset: Vec<usize>,
    /// Shape of the local data (without the prepended axes).
    pub local_shape: Vec<usize>,
    /// Fragmentation of each global axis.
    pub axis_fragmentations: Vec<usize>,
    /// `(pp, tp, dp)`; only the main replica `(0, 0, 0)` writes the shard.
    pub replica_id: [usize; 3],
    /// Number of leading virtual axes of local size 1.
    pub prepend_axis_num: usize,
    /// The local data's origin in the rank's canonical weights.
    #[serde(skip)]
    pub source: Source,
}

impl ShardedTensor {
    /// Megatron's `ShardedTensor.from_rank_offsets`: each `(axis, rank_offset, fragmentation)`
    /// scales the local size of `axis` (1 for a prepended axis).
    pub fn from_rank_offsets(
        key: String,
        local_shape: Vec<usize>,
        rank_offsets: &[(usize, usize, usize)],
        replica_id: [usize; 3],
        prepend_axis_num: usize,
        source: Source,
    ) -> ShardedTensor {
        let nd = prepend_axis_num + local_shape.len();
        let mut global_shape: Vec<usize> = vec![1; prepend_axis_num];
        global_shape.extend(&local_shape);
        let mut global_offset = vec![0; nd];
        let mut axis_fragmentations = vec![1; nd];
        for &(axis, off, frag) in rank_offsets {
            assert!(axis < nd && off < frag, "invalid rank offset ({axis}, {off}, {frag}) for {key}");
            let local = if axis < prepend_axis_num { 1 } else { local_shape[axis - prepend_axis_num] };
            global_shape[axis] = frag * local;
            global_offset[axis] = off * local;
            axis_fragmentations[axis] = frag;
        }
        ShardedTensor {
            key,
            global_shape,
            global_offset,
            local_shape,
            axis_fragmentations,
            replica_id,
            prepend_axis_num,
            source,
        }
    }

    /// True for the main replica, the one that writes the shard.
    pub fn is_main_replica(&self) -> bool {
        self.replica_id == [0, 0, 0]
    }

    /// The local shape with the prepended axes as 1s (the shard's extent in global space).
    pub fn extent(&self) -> Vec<usize> {
        let mut s = vec![1; self.prepend_axis_num];
        s.extend(&self.local_shape);
        s
    }
}

/// Megatron's `ShardedObject` (an atomic, non-reshardable value; here always `_extra_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardedObject {
    /// Checkpoint key (without the `/shard_…` suffix).
    pub key: String,
    /// Global shape (the fragmentations of the offsets, or `(1,)`).
    pub global_shape: Vec<usize>,
    /// Global offset (the rank offsets, or `(0,)`).
    pub global_offset: Vec<usize>,
    /// `(pp, tp, dp)`.
    pub replica_id: [usize; 3],
}

impl ShardedObject {
    /// `make_sharded_object_for_checkpoint`: offsets sorted by axis become the object's
    /// offset (rank offsets) and shape (fragmentations); none gives `(0,)` / `(1,)`.
    pub fn from_offsets(key: String, offsets: &[(usize, usize, usize)], replica_id: [usize; 3]) -> Self {
        let (global_shape, global_offset) = if offsets.is_empty() {
            (vec![1], vec![0])
        } else {
            let mut o = offsets.to_vec();
            o.sort();
            (o.iter().map(|x| x.2).collect(), o.iter().map(|x| x.1).collect())
        };
        ShardedObject { key, global_shape, global_offset, replica_id }
    }

    /// Megatron's unique key: `"{key}/shard_{offsets joined by '.'}_{shape joined by '.'}"`.
    pub fn unique_key(&self) -> String {
        let j = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(".");
        format!("{}/shard_{}_{}", self.key, j(&self.global_offset), j(&self.global_shape))
    }

    /// True for the main replica.
    pub fn is_main_replica(&self) -> bool {
        self.replica_id == [0, 0, 0]
    }
}

/// One entry of a sharded state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardedEntry {
    /// A ShardedTensor.
    Tensor(ShardedTensor),
    /// A ShardedObject.
    Object(ShardedObject),
}

impl ShardedEntry {
    /// The checkpoint key.
    pub fn key(&self) -> &str {
        match self {
            ShardedEntry::Tensor(t) => &t.key,
            ShardedEntry::Object(o) => &o.key,
        }
    }

    /// The global offset.
    pub fn global_offset(&self) -> &[usize] {
        match self {
            ShardedEntry::Tensor(t) => &t.global_offset,
            ShardedEntry::Object(o) => &o.global_offset,
        }
    }

    /// The JSON form printed by `moe-verify layout --json`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ShardedEntry::Tensor(t) => serde_json::json!({
                "key": t.key,
                "kind": "tensor",
                "global_shape": t.global_shape,
                "global_offset": t.global_offset,
                "local_shape": t.local_shape,
                "axis_fragmentations": t.axis_fragmentations,
                "replica_id": t.replica_id,
                "prepend_axis_num": t.prepend_axis_num,
            }),
            ShardedEntry::Object(o) => serde_json::json!({
                "key": o.key,
                "kind": "object",
                "global_shape": o.global_shape,
                "global_offset": o.global_offset,
                "replica_id": o.replica_id,
            }),
        }
    }
}

impl ExpertLayout {
    /// The layout of `config`'s layer (its ranks set to 0): non-singleton keys, no prefix.
    pub fn new(config: LayerConfig) -> ExpertLayout {
        ExpertLayout {
            config: config.at_rank(0, 0),
            singleton: false,
            prefix: String::new(),
            sharded_offsets: Vec::new(),
        }
    }

    /// `E_l = E / p_ep`.
    pub fn local_experts(&self) -> usize {
        self.config.num_local_experts()
    }

    /// Checks the layer against the rules Megatron enforces ([`LayerConfig::validate`]:
    /// positive sizes, `E % p_ep == 0`, `f % t == 0`, bias only with `t == 1` and not on
    /// GroupedMLP, ...) and the prefix.
    pub fn validate(&self) -> Result<(), CheckpointError> {
        self.config.validate().map_err(|e| match e {
            ReferenceError::Config(msg) => CheckpointError::Layout(msg),
            other => CheckpointError::Layout(other.to_string()),
        })?;
        if !self.prefix.is_empty() && !self.prefix.ends_with('.') {
            return Err(CheckpointError::Layout(format!("prefix {:?} must end with '.'", self.prefix)));
        }
        for (i, &(axis, off, frag)) in self.sharded_offsets.iter().enumerate() {
            if axis != i || off >= frag {
                return Err(CheckpointError::Layout(format!(
                    "sharded_offsets[{i}] = ({axis}, {off}, {frag}): expected axis {i} and offset < fragmentation"
                )));
            }
        }
        Ok(())
    }

    /// The layout of layer `layer` of `num_layers` stacked on a leading layer axis
    /// (`sharded_offsets = ((0, layer, num_layers),)`, Megatron's homogeneous TransformerBlock).
    pub fn at_layer(self, layer: usize, num_layers: usize) -> ExpertLayout {
        ExpertLayout { sharded_offsets: vec![(0, layer, num_layers)], ..self }
    }

    /// Refuses a layout with outer offsets where the operation (the moe-verify format's save,
    /// load and reshard) handles one expert layer per key prefix only.
    pub fn require_no_outer_offsets(&self, what: &str) -> Result<(), CheckpointError> {
        if self.sharded_offsets.is_empty() {
            return Ok(());
        }
        Err(CheckpointError::Layout(format!(
            "{what}: the moe-verify format stores one expert layer per key prefix; a layout with outer \
             sharded_offsets {:?} (a stacked layer axis) is read from torch_dist checkpoints and printed \
             by `layout`, not saved or loaded",
            self.sharded_offsets
        )))
    }

    /// Every (ep_rank, tp_rank) of this layout, ep-major, expert-DP rank 0.
    pub fn ranks(&self) -> Vec<RankCoord> {
        let p = self.config.parallel;
        (0..p.ep_size).flat_map(|q| (0..p.tp_size).map(move |r| RankCoord::new(q, r))).collect()
    }

    /// How this layout orders its GLU fc1 rows (expert-TP size and interleave size); `None`
    /// without GLU.
    pub fn glu_order(&self) -> Option<interleave::GluOrder> {
        let c = &self.config;
        c.gated_linear_unit.then_some(interleave::GluOrder { tp: c.parallel.tp_size, size: c.glu_interleave_size })
    }

    /// The reference `LayerConfig` of this layout at `rank`, computing in `dtype`.
    pub fn layer_config(&self, rank: RankCoord, dtype: Dtype) -> LayerConfig {
        LayerConfig { params_dtype: dtype, ..self.config.at_rank(rank.ep_rank, rank.tp_rank) }
    }
}

/// The sharded state dict Megatron-Core builds for `layout` on `rank` (spec §7.3–§7.5), sorted
/// by key, then global offset.
pub fn sharded_state_dict(layout: &ExpertLayout, rank: RankCoord) -> Result<Vec<ShardedEntry>, CheckpointError> {
    layout.validate()?;
    let p = layout.config.parallel;
    if rank.tp_rank >= p.tp_size || rank.ep_rank >= p.ep_size {
        return Err(CheckpointError::Layout(format!(
            "rank (ep {}, tp {}) outside ep {} x tp {}",
            rank.ep_rank, rank.tp_rank, p.ep_size, p.tp_size
        )));
    }
    let mut out = match layout.config.class {
        LayerClass::Sequential | LayerClass::TeGrouped => entries::per_expert_entries(layout, rank),
        LayerClass::Grouped => entries::grouped_entries(layout, rank),
    };
    out.sort_by(|a, b| (a.key(), a.global_offset()).cmp(&(b.key(), b.global_offset())));
    Ok(out)
}

/// Every rank's sharded state dict as printed by `moe-verify layout --json`: ranks in ep-major
/// then tp order (expert-DP rank 0), entries sorted by key, then global offset.
pub fn layout_json(l: &ExpertLayout) -> Result<serde_json::Value, CheckpointError> {
    layout_json_at(l, 0)
}

/// As [`layout_json`], on expert-data-parallel rank `edp_rank` (the third replica-id element).
pub fn layout_json_at(l: &ExpertLayout, edp_rank: usize) -> Result<serde_json::Value, CheckpointError> {
    let mut ranks = Vec::new();
    for rank in l.ranks() {
        let rank = RankCoord { edp_rank, ..rank };
        let entries: Vec<serde_json::Value> = sharded_state_dict(l, rank)?.iter().map(ShardedEntry::to_json).collect();
        ranks.push(serde_json::json!({
            "tp_rank": rank.tp_rank,
            "ep_rank": rank.ep_rank,
            "entries": entries,
        }));
    }
    Ok(serde_json::Value::Array(ranks))
}
