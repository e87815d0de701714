//! The device side of the sampled verification of model-sized shapes: runs one layer of a
//! [`ModelShape`] with random weights and inputs generated on the GPU, in bf16 or under a
//! row-local fp8 recipe (blockwise, DeepSeek-V3's), downloads what the checks read, and hands
//! it to [`moe_harness::sampled::check_layer`] (which holds the checks and derives their
//! bounds from the harness's error model, fp8 included).

use crate::engine::{Engine, Gpu};
use crate::error::GpuError;
use crate::gemm::Strategy;
use crate::layer::{from_bytes, segments, DeviceLayer};
use moe_harness::sampled::{
    check_layer, sampled_supported, skewed_counts, ExpertSource, ExpertTensors, SampledError, SampledLayer,
    SampledReport,
};
use moe_harness::shapes::ModelShape;
use moe_reference::{Dtype, Fp8Config, LayerClass, LayerConfig};
use std::time::Instant;

impl From<SampledError> for GpuError {
    fn from(e: SampledError) -> GpuError {
        match e {
            SampledError::Unsupported(what) => GpuError::Unsupported(what),
            SampledError::Reference(err) => GpuError::Invalid(err),
            other => GpuError::Shape(other.to_string()),
        }
    }
}

/// One expert's downloaded data as raw storage-dtype bytes, converted to f64 when its checks
/// run.
struct DeviceExpert {
    dt: Dtype,
    e: usize,
    start: usize,
    n: usize,
    w1: Vec<u8>,
    w2: Vec<u8>,
    dw1: Vec<u8>,
    dw2: Vec<u8>,
    u: Vec<u8>,
    da: Vec<u8>,
}

impl ExpertSource for DeviceExpert {
    fn tensors(&self) -> ExpertTensors {
        let dt = self.dt;
        ExpertTensors {
            e: self.e,
            start: self.start,
            n: self.n,
            w1: from_bytes(dt, &self.w1),
            w2: from_bytes(dt, &self.w2),
            dw1: from_bytes(dt, &self.dw1),
            dw2: from_bytes(dt, &self.dw2),
            u: from_bytes(dt, &self.u),
            da: from_bytes(dt, &self.da),
        }
    }
}

/// Sampled verification of `shape` with `tokens` rows (0: the shape's default), split over the
/// experts by [`skewed_counts`] of `seed`, on `gpu` for `class`, in bf16 (`fp8 = None`) or
/// under the fp8 configuration `fp8`, its per-expert GEMMs issued with `strategy` (the bf16
/// path's; the fp8 paths issue one cuBLASLt GEMM per expert): forward and backward with
/// immediate weight gradients, timed, then the checks of [`moe_harness::sampled`].
///
/// A configuration the checks do not cover (per-tensor fp8 recipes, GroupedMLP with fp8:
/// [`sampled_supported`]) or the GPU does not run ([`crate::layer::fp8_support`]) is refused before
/// anything runs, with [`GpuError::Unsupported`] saying why.
pub fn verify_shape(
    gpu: &Gpu,
    strategy: Strategy,
    class: LayerClass,
    shape: ModelShape,
    fp8: Option<Fp8Config>,
    tokens: usize,
    seed: u64,
) -> Result<SampledReport, GpuError> {
    let dims = shape.dims();
    let cfg = LayerConfig { fp8, ..shape.config(class) };
    // What the checks cover first: GroupedMLP with fp8 is also an invalid configuration, and
    // the refusal must say why it is not verified (a declared skip), not only that it is invalid.
    sampled_supported(&cfg)?;
    cfg.validate()?;
    let t = if tokens == 0 { dims.tokens } else { tokens };
    let counts_i = skewed_counts(t, dims.experts, seed);
    let counts = segments(&cfg, &counts_i, t)?;
    if cfg.fp8.is_some() {
        let padded: Vec<usize> = counts.iter().map(|&c| cfg.row_padding().map_or(c, |m| c.div_ceil(m) * m)).collect();
        crate::layer::fp8_support(&cfg, Some(&padded))?;
    }
    let (h, n1, n2, dt) = (cfg.hidden_size, cfg.n1(), cfg.n2(), cfg.params_dtype);
    let ds = dt.size_bytes();

    let mut guard = gpu.lock()?;
    let eng: &mut Engine = &mut guard;
    let device = eng.device_name().to_string();
    let layer = DeviceLayer::random(eng, &cfg, seed)?;
    let w = layer.weights();
    let mut ws = layer.workspace(eng, &counts, false)?;
    ws.random_inputs(eng, seed)?;
    eng.synchronize()?;
    let t0 = Instant::now();
    layer.forward(eng, &mut ws, strategy)?;
    layer.backward(eng, &mut ws, true, strategy)?;
    eng.synchronize()?;
    let gpu_ms = t0.elapsed().as_secs_f64() * 1e3;

    let x = from_bytes(dt, &eng.download(&ws.x)?);
    let g = from_bytes(dt, &eng.download(&ws.g)?);
    let y = from_bytes(dt, &eng.download(&ws.y)?);
    let dx = from_bytes(dt, &eng.download(&ws.dx)?);
    let p = from_bytes(Dtype::F32, &eng.download(&ws.p)?);
    let dp = from_bytes(Dtype::F32, &eng.download(&ws.dp)?);
    let mut experts = Vec::with_capacity(dims.experts);
    for (e, &n) in counts.iter().enumerate() {
        let start = ws.offsets[e];
        let wb1 = e * n1 * h * ds;
        let wb2 = e * h * n2 * ds;
        experts.push(DeviceExpert {
            dt,
            e,
            start,
            n,
            w1: eng.download_range(&w.w1, wb1, n1 * h * ds)?,
            w2: eng.download_range(&w.w2, wb2, h * n2 * ds)?,
            dw1: eng.download_range(&ws.grads.w1, wb1, n1 * h * ds)?,
            dw2: eng.download_range(&ws.grads.w2, wb2, h * n2 * ds)?,
            u: eng.download_range(&ws.u, start * n2 * ds, n * n2 * ds)?,
            da: eng.download_range(&ws.da, start * n1 * ds, n * n1 * ds)?,
        });
    }
    drop(guard);

    let sampled = SampledLayer { cfg: &cfg, x: &x, g: &g, y: &y, dx: &dx, p: &p, dp: &dp, seed };
    let (checks, rows_checked) = check_layer(&sampled, experts)?;
    Ok(SampledReport {
        shape: shape.name().into(),
        class,
        device,
        tokens: t,
        experts: dims.experts,
        empty_experts: counts.iter().filter(|&&c| c == 0).count(),
        rows_checked,
        gpu_ms,
        fp8,
        checks,
    })
}
