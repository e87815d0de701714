//! Forward, backward and deferred weight gradients of the three expert classes on the GPU
//! (spec §4, §5), mirroring `moe_reference::layer` step for step: cuBLAS GEMMs per expert
//! segment with f32 accumulation (issued by the grouped executor with the [`Strategy`](crate::Strategy) each
//! call passes), and the elementwise work in the fused kernels of `kernels/experts.cu`,
//! rounding to the storage dtype at the same points as the reference.
//!
//! Weights stay in each class's own state-dict layout on the device: SequentialMLP and
//! TEGroupedMLP keep `[out, in]` per expert; GroupedMLP keeps `weight1` as `[E_l, h, N1]` and
//! `weight2` as `[E_l, N2, h]` (`[in, out]` blocks), and its GEMMs use the other transposes.
//!
//! * [`DeviceLayer`]: one rank's layer on the device (configuration and weights), with the
//!   passes (`layer/pass.rs`).
//! * `layer/fp8.rs`: the same passes with fp8 GEMMs (per-expert current scaling, cuBLASLt),
//!   taken when the configuration has fp8; `layer/fp8_block.rs`: the blockwise recipe's
//!   (block-scaled operands and cuBLASLt GEMMs).
//! * [`Workspace`]: the buffers of one call, in the padded row layout (`layer/workspace.rs`).

mod fp8;
mod fp8_block;
mod pass;
mod workspace;

use crate::engine::Engine;
use crate::error::GpuError;
use crate::memory::DeviceBuffer;
use moe_reference::{param_specs, Dtype, LayerClass, LayerConfig, StateDict};
use ndarray::ArrayD;

pub use fp8::fp8_support;
pub use workspace::Workspace;

/// f64 values to and from `dt` bytes: the reference's codec (one rounding, to nearest-even
/// directly from f64), so uploads, downloads, dumps and checkpoints encode alike.
pub use moe_reference::codec::{from_bytes, to_bytes};

fn i32_bytes(v: &[usize]) -> Result<Vec<u8>, GpuError> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for &x in v {
        out.extend_from_slice(&i32::try_from(x)?.to_le_bytes());
    }
    Ok(out)
}

/// One rank's expert weights on the device, in the class's layout.
#[derive(Debug)]
pub struct DeviceWeights {
    /// fc1 weights of all local experts, contiguous, `E_l` blocks of `N1·h`.
    pub w1: DeviceBuffer,
    /// fc2 weights, `E_l` blocks of `h·N2`.
    pub w2: DeviceBuffer,
    /// fc1 biases `[E_l, N1]` (with bias).
    pub b1: Option<DeviceBuffer>,
    /// fc2 biases `[E_l, h]` (with bias).
    pub b2: Option<DeviceBuffer>,
}

/// Weight and bias gradients on the device, same layout as [`DeviceWeights`].
#[derive(Debug)]
pub struct DeviceGrads {
    /// dL/dW1.
    pub w1: DeviceBuffer,
    /// dL/dW2.
    pub w2: DeviceBuffer,
    /// dL/db1.
    pub b1: Option<DeviceBuffer>,
    /// dL/db2.
    pub b2: Option<DeviceBuffer>,
}

/// Shape bookkeeping for one configuration.
#[derive(Clone, Copy, Debug)]
struct Dims {
    h: usize,
    n1: usize,
    n2: usize,
    el: usize,
    dt: Dtype,
    ds: usize,
}

impl Dims {
    fn of(cfg: &LayerConfig) -> Dims {
        Dims {
            h: cfg.hidden_size,
            n1: cfg.n1(),
            n2: cfg.n2(),
            el: cfg.num_local_experts(),
            dt: cfg.params_dtype,
            ds: cfg.params_dtype.size_bytes(),
        }
    }
}

/// Row counts of the segments the class processes: `tokens_per_expert`, or `[T]` for
/// SequentialMLP with one local expert (spec §4.1).
pub fn segments(cfg: &LayerConfig, tokens_per_expert: &[i64], rows: usize) -> Result<Vec<usize>, GpuError> {
    if tokens_per_expert.len() != cfg.num_local_experts() {
        return Err(GpuError::Shape(format!(
            "tokens_per_expert has {} entries, the rank has {} local experts",
            tokens_per_expert.len(),
            cfg.num_local_experts()
        )));
    }
    if cfg.class == LayerClass::Sequential && cfg.num_local_experts() == 1 {
        return Ok(vec![rows]);
    }
    let counts: Vec<usize> = tokens_per_expert
        .iter()
        .map(|&c| usize::try_from(c).map_err(|_| GpuError::Shape(format!("negative token count {c}"))))
        .collect::<Result<_, _>>()?;
    if counts.iter().sum::<usize>() != rows {
        return Err(GpuError::Shape(format!("tokens_per_expert {tokens_per_expert:?} does not sum to {rows} rows")));
    }
    Ok(counts)
}

/// One rank's expert layer on the device: its configuration and weights, uploaded once; the
/// forward, backward and deferred weight-gradient passes run on a [`Workspace`].
#[derive(Debug)]
pub struct DeviceLayer {
    cfg: LayerConfig,
    weights: DeviceWeights,
    /// fp8: the weights quantized (with their columnwise copies) on the first call. The weights
    /// never change after upload, so their quantization is the same every call (TE quantizes
    /// a weight once per weight version and reuses it across micro-batches).
    fp8_weights: std::sync::OnceLock<fp8::Fp8Weights>,
    /// The same for the blockwise recipe (per expert, both copies).
    fp8_block_weights: std::sync::OnceLock<fp8_block::BlockWeights>,
}

impl DeviceLayer {
    /// Uploads one rank's parameters (state-dict layout of `cfg.class`).
    pub fn upload(eng: &mut Engine, cfg: &LayerConfig, params: &StateDict) -> Result<DeviceLayer, GpuError> {
        let d = Dims::of(cfg);
        let get = |name: &str| -> Result<&ArrayD<f64>, GpuError> {
            params.get(name).ok_or_else(|| GpuError::Shape(format!("missing parameter {name}")))
        };
        for spec in param_specs(cfg) {
            let t = get(&spec.name)?;
            if t.shape() != spec.shape.as_slice() {
                return Err(GpuError::Shape(format!("{}: expected {:?}, got {:?}", spec.name, spec.shape, t.shape())));
            }
        }
        let (mut w1, mut w2, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match cfg.class {
            LayerClass::Grouped => {
                // Flat memory of weight1 is [E_l, h, N1], of weight2 [E_l, N2, h]: upload as is.
                w1 = to_bytes(d.dt, get("weight1")?.iter().copied());
                w2 = to_bytes(d.dt, get("weight2")?.iter().copied());
            }
            LayerClass::Sequential | LayerClass::TeGrouped => {
                for e in 0..d.el {
                    let (n1w, n1b, n2w, n2b) = names(cfg.class, e);
                    w1.extend(to_bytes(d.dt, get(&n1w)?.iter().copied()));
                    w2.extend(to_bytes(d.dt, get(&n2w)?.iter().copied()));
                    if cfg.add_bias {
                        b1.extend(to_bytes(d.dt, get(&n1b)?.iter().copied()));
                        b2.extend(to_bytes(d.dt, get(&n2b)?.iter().copied()));
                    }
                }
            }
        }
        let weights = DeviceWeights {
            w1: eng.upload(&w1)?,
            w2: eng.upload(&w2)?,
            b1: if cfg.add_bias { Some(eng.upload(&b1)?) } else { None },
            b2: if cfg.add_bias { Some(eng.upload(&b2)?) } else { None },
        };
        Ok(DeviceLayer {
            cfg: cfg.clone(),
            weights,
            fp8_weights: Default::default(),
            fp8_block_weights: Default::default(),
        })
    }

    /// Random weights generated on the device in `cfg.class`'s layout (benches and sampled
    /// verification of model-sized shapes, where a host state dict would not fit): weights
    /// `U(-1, 1)/√fan_in`, biases `U(-0.5, 0.5)`, rounded to the params dtype, deterministic in
    /// `seed`.
    pub fn random(eng: &mut Engine, cfg: &LayerConfig, seed: u64) -> Result<DeviceLayer, GpuError> {
        let d = Dims::of(cfg);
        let n1 = d.el * d.n1 * d.h;
        let n2 = d.el * d.h * d.n2;
        let mut w1 = eng.alloc(n1 * d.ds)?;
        let mut w2 = eng.alloc(n2 * d.ds)?;
        eng.fill_uniform(d.dt, &mut w1, n1, seed, (1.0 / (d.h as f64).sqrt()) as f32)?;
        eng.fill_uniform(d.dt, &mut w2, n2, seed.wrapping_add(1), (1.0 / (cfg.ffn_hidden_size as f64).sqrt()) as f32)?;
        let (b1, b2) = if cfg.add_bias {
            let mut b1 = eng.alloc(d.el * d.n1 * d.ds)?;
            let mut b2 = eng.alloc(d.el * d.h * d.ds)?;
            eng.fill_uniform(d.dt, &mut b1, d.el * d.n1, seed.wrapping_add(2), 0.5)?;
            eng.fill_uniform(d.dt, &mut b2, d.el * d.h, seed.wrapping_add(3), 0.5)?;
            (Some(b1), Some(b2))
        } else {
            (None, None)
        };
        Ok(DeviceLayer {
            cfg: cfg.clone(),
            weights: DeviceWeights { w1, w2, b1, b2 },
            fp8_weights: Default::default(),
            fp8_block_weights: Default::default(),
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// The weights on the device.
    pub fn weights(&self) -> &DeviceWeights {
        &self.weights
    }
}

/// State-dict names of expert `e`'s fc1 weight, fc1 bias, fc2 weight, fc2 bias (the
/// reference's naming, so both sides read the same parameters).
pub use moe_reference::state_dict::per_expert_names as names;
