//! Raw tensors: row-major little-endian bytes in their storage dtype.
//!
//! The reference keeps values in `f64`; checkpoints keep the bytes of the storage dtype so that
//! save and load are byte copies. [`RawTensor::from_f64`] and [`RawTensor::to_f64`] bridge the
//! two where the reference needs values.

use super::CheckpointError;
use moe_reference::state_dict::transpose;
use moe_reference::{codec, Dtype};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;

/// A dense row-major tensor held as the little-endian bytes of its dtype.
#[derive(Clone, PartialEq, Eq)]
pub struct RawTensor {
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// `numel · dtype.size_bytes()` bytes.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawTensor({}, {:?}, {} bytes)", self.dtype, self.shape, self.data.len())
    }
}

/// Parameters by Megatron state-dict name, as raw tensors (the on-disk counterpart of
/// [`moe_reference::StateDict`]).
pub type RawStateDict = BTreeMap<String, RawTensor>;

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The safetensors dtype name of a storage dtype (`F32`, `BF16`, `F16`).
pub fn safetensors_dtype(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "F32",
        Dtype::Bf16 => "BF16",
        Dtype::F16 => "F16",
    }
}

/// Parses a safetensors dtype name; only the storage dtypes of [`Dtype`] are accepted.
pub fn parse_safetensors_dtype(name: &str) -> Option<Dtype> {
    match name {
        "F32" => Some(Dtype::F32),
        "BF16" => Some(Dtype::Bf16),
        "F16" => Some(Dtype::F16),
        _ => None,
    }
}

impl RawTensor {
    /// A zero-filled tensor.
    pub fn zeros(dtype: Dtype, shape: Vec<usize>) -> RawTensor {
        let n = numel(&shape) * dtype.size_bytes();
        RawTensor { dtype, shape, data: vec![0; n] }
    }

    /// Encodes `f64` values in `dtype` ([`moe_reference::codec`]). Fails (naming `name`) when a
    /// value is not exactly representable, because a checkpoint must round-trip bit for bit.
    pub fn from_f64(name: &str, a: &ArrayD<f64>, dtype: Dtype) -> Result<RawTensor, CheckpointError> {
        if let Some((i, x)) = a.iter().enumerate().find(|(_, &x)| !dtype.represents(x)) {
            return Err(CheckpointError::Value {
                key: name.to_string(),
                msg: format!("element {i} = {x:e} is not exactly representable in {dtype}"),
            });
        }
        Ok(RawTensor { dtype, shape: a.shape().to_vec(), data: codec::to_bytes(dtype, a.iter().copied()) })
    }

    /// Decodes to `f64` (exact: every storage dtype embeds in f64).
    pub fn to_f64(&self) -> ArrayD<f64> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), codec::from_bytes(self.dtype, &self.data))
            .expect("RawTensor bytes match its shape")
    }

    /// Bytes per element.
    pub fn elem(&self) -> usize {
        self.dtype.size_bytes()
    }

    /// Swaps the last two axes of a tensor viewed as `[batch, rows, cols]`.
    pub fn transpose_last2(&self) -> RawTensor {
        let nd = self.shape.len();
        assert!(nd >= 2, "transpose_last2 needs at least 2 axes");
        let (rows, cols) = (self.shape[nd - 2], self.shape[nd - 1]);
        let block = rows * cols * self.elem();
        let data = if block == 0 {
            Vec::new()
        } else {
            self.data.chunks_exact(block).flat_map(|b| transpose(b, rows, cols, self.elem())).collect()
        };
        let mut shape = self.shape.clone();
        shape.swap(nd - 2, nd - 1);
        RawTensor { dtype: self.dtype, shape, data }
    }
}

/// Converts an `f64` state dict to raw tensors of `dtype` (see [`RawTensor::from_f64`]).
pub fn raw_state_dict(sd: &moe_reference::StateDict, dtype: Dtype) -> Result<RawStateDict, CheckpointError> {
    sd.iter().map(|(k, v)| Ok((k.clone(), RawTensor::from_f64(k, v, dtype)?))).collect()
}

/// Converts raw tensors back to an `f64` state dict.
pub fn f64_state_dict(sd: &RawStateDict) -> moe_reference::StateDict {
    sd.iter().map(|(k, v)| (k.clone(), v.to_f64())).collect()
}

/// An axis-aligned box in a tensor's global index space.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region {
    /// First index on each axis.
    pub offset: Vec<usize>,
    /// Extent on each axis.
    pub shape: Vec<usize>,
}

impl Region {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The intersection with `other`, or `None` when empty.
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        if self.offset.len() != other.offset.len() {
            return None;
        }
        let mut offset = Vec::with_capacity(self.offset.len());
        let mut shape = Vec::with_capacity(self.offset.len());
        for d in 0..self.offset.len() {
            let lo = self.offset[d].max(other.offset[d]);
            let hi = (self.offset[d] + self.shape[d]).min(other.offset[d] + other.shape[d]);
            if hi <= lo {
                return None;
            }
            offset.push(lo);
            shape.push(hi - lo);
        }
        Some(Region { offset, shape })
    }

    /// True when `self` lies inside a tensor of `global_shape`.
    pub fn within(&self, global_shape: &[usize]) -> bool {
        self.offset.len() == global_shape.len()
            && (0..global_shape.len()).all(|d| self.offset[d] + self.shape[d] <= global_shape[d])
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.offset.iter().zip(&self.shape).map(|(o, s)| format!("{o}:{}", o + s)).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// Copies the elements of `region` (global coordinates) from `src`, which holds the block
/// `src_box`, into `dst`, which holds the block `dst_box`. Both buffers are row-major with
/// `elem`-byte elements; `region` must lie in both boxes.
pub fn copy_region(src: &[u8], src_box: &Region, dst: &mut [u8], dst_box: &Region, region: &Region, elem: usize) {
    let nd = region.shape.len();
    if region.numel() == 0 {
        return;
    }
    // Trailing axes the region covers completely in both boxes form one contiguous run.
    let mut run = 1usize;
    let mut split = nd;
    while split > 0 {
        let d = split - 1;
        run *= region.shape[d];
        split -= 1;
        if region.shape[d] != src_box.shape[d] || region.shape[d] != dst_box.shape[d] {
            break;
        }
    }
    let strides = |shape: &[usize]| -> Vec<usize> {
        let mut s = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    };
    let (ss, ds) = (strides(&src_box.shape), strides(&dst_box.shape));
    let run_bytes = run * elem;
    let mut idx = vec![0usize; split];
    loop {
        let mut so = 0usize;
        let mut doff = 0usize;
        for d in 0..nd {
            let i = if d < split { idx[d] } else { 0 };
            let g = region.offset[d] + i;
            so += (g - src_box.offset[d]) * ss[d];
            doff += (g - dst_box.offset[d]) * ds[d];
        }
        let (so, doff) = (so * elem, doff * elem);
        dst[doff..doff + run_bytes].copy_from_slice(&src[so..so + run_bytes]);
        // Odometer over the outer axes.
        let mut d = split;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_region_moves_a_sub_block() {
        // A 3x4 source at global (0,0); copy rows 1..3, cols 1..3 into a 2x2 destination.
        let src: Vec<u8> = (0u8..12).collect();
        let sb = Region { offset: vec![0, 0], shape: vec![3, 4] };
        let db = Region { offset: vec![1, 1], shape: vec![2, 2] };
        let mut dst = vec![0u8; 4];
        copy_region(&src, &sb, &mut dst, &db, &db, 1);
        assert_eq!(dst, vec![5, 6, 9, 10]);
    }

    #[test]
    fn transpose_last2_swaps() {
        let t = RawTensor { dtype: Dtype::Bf16, shape: vec![2, 3], data: (0u8..12).collect() };
        let tt = t.transpose_last2();
        assert_eq!(tt.shape, vec![3, 2]);
        // Element (i, j) of the transpose is element (j, i) of the source: 2-byte elements.
        assert_eq!(&tt.data[..4], &[0, 1, 6, 7]);
        assert_eq!(tt.transpose_last2(), t);
    }
}
