//! Checkpoint keys: `P experts.[{g}.]linear_fcX.NAME`, and the logical key space in which
//! singleton (one key per expert) and non-singleton checkpoints describe the same tensors.

use crate::tensor::Region;

/// A parsed expert key: `P experts.[{g}.]linear_fcX.NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyParts {
    /// The prefix `P`.
    pub prefix: String,
    /// The global expert of a singleton key.
    pub expert: Option<usize>,
    /// `linear_fc1` or `linear_fc2`.
    pub module: String,
    /// `weight`, `weight_w`, `weight_v`, `bias`, `bias_w`, `bias_v` or `_extra_state`.
    pub name: String,
}

/// Parses an expert checkpoint key; `None` for other keys.
pub fn parse_key(key: &str) -> Option<KeyParts> {
    let (head, name) = key.rsplit_once('.')?;
    let (head, module) = head.rsplit_once('.')?;
    if module != "linear_fc1" && module != "linear_fc2" {
        return None;
    }
    let prefix_of = |h: &str| -> Option<String> {
        if h == "experts" {
            Some(String::new())
        } else {
            h.strip_suffix(".experts").map(|p| format!("{p}."))
        }
    };
    if let Some(prefix) = prefix_of(head) {
        return Some(KeyParts { prefix, expert: None, module: module.into(), name: name.into() });
    }
    let (h2, g) = head.rsplit_once('.')?;
    let g: usize = g.parse().ok()?;
    let prefix = prefix_of(h2)?;
    Some(KeyParts { prefix, expert: Some(g), module: module.into(), name: name.into() })
}

/// Maps a shard of `key` (box `region` of a tensor of `global_shape`) to the logical,
/// non-singleton key space `P experts.linear_fcX.{weight,bias}` with shape `[E, …]`, in which
/// singleton and non-singleton checkpoints describe the same tensors. `num_experts` is `E`
/// (needed for singleton keys). Keys that are not expert keys map to themselves.
pub fn to_logical(
    key: &str,
    region: &Region,
    global_shape: &[usize],
    num_experts: usize,
) -> (String, Region, Vec<usize>) {
    let Some(k) = parse_key(key) else {
        return (key.into(), region.clone(), global_shape.to_vec());
    };
    let Some(g) = k.expert else {
        return (key.into(), region.clone(), global_shape.to_vec());
    };
    let (base, row_shift, rows_mult) = match k.name.as_str() {
        "weight" | "bias" => (k.name.clone(), 0, 1),
        "weight_w" | "bias_w" => (k.name[..k.name.len() - 2].to_string(), 0, 2),
        "weight_v" | "bias_v" => (k.name[..k.name.len() - 2].to_string(), global_shape[0], 2),
        _ => return (key.into(), region.clone(), global_shape.to_vec()),
    };
    let lkey = format!("{}experts.{}.{}", k.prefix, k.module, base);
    let mut offset = vec![g];
    offset.extend(&region.offset);
    offset[1] += row_shift;
    let mut shape = vec![1];
    shape.extend(&region.shape);
    let mut gshape = vec![num_experts];
    gshape.extend(global_shape);
    gshape[1] *= rows_mult;
    (lkey, Region { offset, shape }, gshape)
}

/// The logical id of an object: (non-singleton key, global expert).
pub(super) fn object_id(key: &str, offset: &[usize]) -> (String, usize) {
    match parse_key(key) {
        Some(KeyParts { prefix, expert: Some(g), module, name }) => (format!("{prefix}experts.{module}.{name}"), g),
        _ => (key.into(), offset.first().copied().unwrap_or(0)),
    }
}
