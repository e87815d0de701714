//! The elementwise kernels of `kernels/experts.cu` (compiled by NVRTC for the device's compute
//! capability when an engine is created), one typed wrapper per kernel.
//!
//! Each wrapper takes the device buffers the kernel reads and writes, checks that every one
//! holds what the kernel touches for the given sizes, and launches with the shape the `.cu`
//! header's launch contract asks for. The per-row expert indices come from a `RowMap`,
//! which is built from host-side counts only, so they are in range by construction.

use crate::error::GpuError;
use crate::memory::DeviceBuffer;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use moe_reference::fp8::scale::max_finite_of;
use moe_reference::fp8::{BlockTile, Fp8Format, ScaleOptions};
use moe_reference::{Activation, Dtype, LayerClass, LayerConfig};
use std::sync::Arc;

/// The kernel source (after `fp8_common.cuh`, the fp8 encodes the fused activation shares with
/// the quantizers), embedded; compiled by NVRTC when an engine is created.
const EXPERTS_CU: &str = concat!(include_str!("../kernels/fp8_common.cuh"), include_str!("../kernels/experts.cu"));

/// The kernels of `experts.cu`, each instantiated as `<name>_<dtype suffix>`.
#[cfg(test)]
const KERNEL_NAMES: [&str; 10] = [
    "act_fwd",
    "act_fwd_q",
    "act_bwd",
    "act_bwd_q",
    "scale_rows",
    "probs_in_bwd",
    "fill_bias_rows",
    "fc2_bias_fwd",
    "col_sum",
    "init_uniform",
];

/// Blocks of the grid-stride launches (enough to fill an H100 32 blocks per SM deep).
const MAX_BLOCKS: usize = 132 * 32;

/// The kernel-name suffix of a dtype.
fn dtype_suffix(dt: Dtype) -> &'static str {
    match dt {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
    }
}

/// The `probs_dt` code of the kernels: how probs gradients are rounded on store.
fn probs_code(dt: Dtype) -> i32 {
    match dt {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

/// Compiles `kernels/experts.cu` with NVRTC for `arch` (`sm_90`). Needs only libnvrtc, no GPU.
pub fn compile_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    crate::nvrtc::compile(EXPERTS_CU, "experts.cu", arch, &[])
}

/// Parameters of the activation kernels (mirrors `struct ActParams` in `experts.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ActParams {
    /// Gated linear unit.
    glu: i32,
    /// 0 silu, 1 gelu, 2 quick_gelu, 3 squared_relu.
    act: i32,
    /// 1: eager per-op rounding; 0: fp32 chain rounded once (GroupedMLP).
    eager: i32,
    /// Clamp set and honoured.
    has_clamp: i32,
    /// Clamp value.
    clamp: f32,
    /// GLU linear offset.
    offset: f32,
}

// SAFETY: `ActParams` is `repr(C)`, plain old data (four i32 and two f32, no padding), and
// matches the layout of the CUDA struct it is passed as.
unsafe impl DeviceRepr for ActParams {}

impl ActParams {
    /// The activation of `cfg` as its class computes it: GroupedMLP ignores clamp and offset
    /// and keeps the activation chain in fp32 (spec §4.4, §4.9); the others round every op.
    pub(crate) fn of(cfg: &LayerConfig) -> ActParams {
        let grouped = cfg.class == LayerClass::Grouped;
        let clamp = if grouped { None } else { cfg.clamp_value };
        ActParams {
            glu: i32::from(cfg.gated_linear_unit),
            act: match cfg.activation {
                Activation::Silu => 0,
                Activation::Gelu => 1,
                Activation::QuickGelu => 2,
                Activation::SquaredRelu => 3,
            },
            eager: i32::from(!grouped),
            has_clamp: i32::from(clamp.is_some()),
            clamp: clamp.unwrap_or(0.0) as f32,
            offset: if grouped { 0.0 } else { cfg.glu_linear_offset as f32 },
        }
    }
}

/// The rows of an activation launch: `row_expert` (int32 per row), the row count and the
/// segment count ([`RowMap::rows_arg`], or a `SegmentMap`'s).
pub(crate) type RowsArg<'a> = (&'a DeviceBuffer, usize, usize);

/// What [`ExpertKernels::act_fwd_quantized`] writes besides `u`.
pub(crate) struct ActFp8Out<'b> {
    /// One u32 per segment: the f32 bits of the segment's amax of `u` (zeroed by the caller).
    pub(crate) amax: &'b mut DeviceBuffer,
    /// The codes of `u` at known per-segment scales (delayed scaling); `None`: amax only.
    pub(crate) codes: Option<ActCodes<'b>>,
}

/// The fp8 codes [`ExpertKernels::act_fwd_quantized`] writes: `[rows, n2]` bytes of `format`,
/// row `r` at the scale `scale[row_expert[r]·stride]` (f32).
pub(crate) struct ActCodes<'b> {
    /// f32 scales, segment `s` at index `s·stride`.
    pub(crate) scale: &'b DeviceBuffer,
    /// Index stride of the scales.
    pub(crate) stride: usize,
    /// The codes, `[rows, n2]`.
    pub(crate) codes: &'b mut DeviceBuffer,
    /// Their format.
    pub(crate) format: Fp8Format,
}

/// Mirrors `struct BlockParams` in `fp8_common.cuh` (the block quantizers of `fp8.cu` and
/// `act_fwd_blk`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BlockParams {
    pub(crate) tile_r: i32,
    pub(crate) tile_c: i32,
    pub(crate) trans: i32,
    pub(crate) mode: i32,
    pub(crate) pow2: i32,
    pub(crate) fp8_max: f32,
    pub(crate) eps: f32,
    pub(crate) vinf: f32,
    pub(crate) max_norm_rcp: f32,
}

impl BlockParams {
    /// The parameters of `block_quant` for f32 block scales (mode 0) of `tile` blocks, `trans`
    /// for the columnwise copy, with `options` and the input dtype's largest finite value for an
    /// infinite scale quotient.
    pub(crate) fn block(
        format: Fp8Format,
        tile: BlockTile,
        options: ScaleOptions,
        dtype: Dtype,
        trans: bool,
    ) -> BlockParams {
        let [tr, tc] = tile.dims();
        BlockParams {
            tile_r: tr as i32,
            tile_c: tc as i32,
            trans: i32::from(trans),
            mode: 0,
            pow2: i32::from(options.force_pow_2_scales),
            fp8_max: format.max_finite(),
            eps: options.amax_epsilon,
            vinf: max_finite_of(dtype),
            max_norm_rcp: 0.0,
        }
    }
}

// SAFETY: `BlockParams` is `repr(C)` plain old data (five i32 then four f32, no padding) and
// matches the layout of the CUDA struct it is passed as.
unsafe impl DeviceRepr for BlockParams {}

/// The segment arguments of the segmented 1×128 block quantizers (mirrors `struct BlockSegs`
/// in `fp8_common.cuh`): device addresses of `row_seg`, `seg_off`, `seg_len`, the 128-row tile table
/// and the per-segment scale offsets (i64).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockSegs {
    pub(crate) row_seg: u64,
    pub(crate) seg_off: u64,
    pub(crate) seg_len: u64,
    pub(crate) tiles: u64,
    pub(crate) scale_off: u64,
}

// SAFETY: `BlockSegs` is `repr(C)` plain old data (five u64 device addresses, no padding) and
// matches the layout of the CUDA struct of five pointers it is passed as.
unsafe impl DeviceRepr for BlockSegs {}

/// What [`ExpertKernels::act_fwd_block_quantized`] writes besides `u`: both 1×128 block
/// operands of `u` for every segment (device addresses the caller checked against the
/// segmented buffers' sizes, as `Engine::block_quantize_segments_into` passes them).
pub(crate) struct ActBlockOut {
    /// The codes' format.
    pub(crate) format: Fp8Format,
    /// The rowwise blocks' parameters (the columnwise ones are the same but for `trans`).
    pub(crate) bp: BlockParams,
    /// The segments, their 128-row tiles and the rowwise scales' offsets.
    pub(crate) seg: BlockSegs,
    /// The tiles in `seg.tiles`: the grid's x.
    pub(crate) n_tiles: usize,
    /// Each segment's first columnwise scale (i64 per segment).
    pub(crate) col_scale_off: u64,
    /// Rowwise codes `[rows, n2]` and scales.
    pub(crate) codes: u64,
    pub(crate) scale_inv: u64,
    /// Columnwise codes (segment by segment) and scales.
    pub(crate) codes_t: u64,
    pub(crate) scale_inv_t: u64,
}

/// The padded row layout of one call on the device: `row_expert[r]`, the local expert of row
/// `r`, and each segment's first row and row count (int32 each). Built from host counts only,
/// so every expert index is below [`RowMap::segments`] and the segments tile the rows.
#[derive(Debug)]
pub(crate) struct RowMap {
    row_expert: DeviceBuffer,
    seg_off: DeviceBuffer,
    seg_len: DeviceBuffer,
    rows: usize,
    segments: usize,
}

impl RowMap {
    /// The host arrays of the layout of segments of `padded` rows each: `row_expert`, the
    /// first row of each segment, and the total row count.
    pub(crate) fn host(padded: &[usize]) -> (Vec<usize>, Vec<usize>, usize) {
        let mut offsets = Vec::with_capacity(padded.len());
        let mut row_expert = Vec::new();
        let mut rows = 0;
        for (e, &pc) in padded.iter().enumerate() {
            offsets.push(rows);
            rows += pc;
            row_expert.extend(std::iter::repeat_n(e, pc));
        }
        (row_expert, offsets, rows)
    }

    /// The map as the activation kernels take it.
    pub(crate) fn rows_arg(&self) -> RowsArg<'_> {
        (&self.row_expert, self.rows, self.segments)
    }

    /// Wraps the uploads of [`RowMap::host`]'s arrays for `padded` (int32 each).
    pub(crate) fn new(
        padded: &[usize],
        row_expert: DeviceBuffer,
        seg_off: DeviceBuffer,
        seg_len: DeviceBuffer,
    ) -> Result<RowMap, GpuError> {
        let rows: usize = padded.iter().sum();
        let segments = padded.len();
        let fits = row_expert.bytes() == rows * 4 && seg_off.bytes() == segments * 4 && seg_len.bytes() == segments * 4;
        if !fits {
            return Err(GpuError::Shape("row map uploads do not match the segment counts".into()));
        }
        Ok(RowMap { row_expert, seg_off, seg_len, rows, segments })
    }
}

/// One dtype's instantiation of every kernel.
struct KernelSet {
    act_fwd: CudaFunction,
    act_fwd_q: CudaFunction,
    /// `act_fwd_blk`, e4m3 and e5m2.
    act_fwd_blk: [CudaFunction; 2],
    act_bwd: CudaFunction,
    act_bwd_q: CudaFunction,
    scale_rows: CudaFunction,
    probs_in_bwd: CudaFunction,
    fill_bias_rows: CudaFunction,
    fc2_bias_fwd: CudaFunction,
    col_sum: CudaFunction,
    init_uniform: CudaFunction,
}

/// The compiled kernels of `experts.cu` for every dtype, and the count of launches issued.
pub(crate) struct ExpertKernels {
    sets: [KernelSet; 3],
    launches: u64,
}

impl std::fmt::Debug for ExpertKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertKernels").field("launches", &self.launches).finish()
    }
}

/// A pointer argument: the address of `buf`, after checking it holds `len` bytes.
fn arg(buf: &DeviceBuffer, len: usize, what: &str) -> Result<u64, GpuError> {
    buf.addr(0, len, what)
}

/// A nullable pointer argument (0 when absent).
fn opt_arg(buf: Option<&DeviceBuffer>, len: usize, what: &str) -> Result<u64, GpuError> {
    buf.map_or(Ok(0), |b| arg(b, len, what))
}

/// The checked pointers `a`, `b1`, `p`, `row_expert`, `u` of both forward activation kernels.
fn act_fwd_args(
    dt: Dtype,
    ap: ActParams,
    (a, b1, p, u): (&DeviceBuffer, Option<&DeviceBuffer>, &DeviceBuffer, &DeviceBuffer),
    (row_expert, rows, segments): RowsArg<'_>,
    n2: usize,
    kernel: &str,
) -> Result<[u64; 5], GpuError> {
    let ds = dt.size_bytes();
    let n1 = if ap.glu != 0 { 2 * n2 } else { n2 };
    Ok([
        arg(a, rows * n1 * ds, &format!("{kernel} a"))?,
        opt_arg(b1, segments * n1 * ds, &format!("{kernel} b1"))?,
        arg(p, probs_bytes(rows), &format!("{kernel} p"))?,
        arg(row_expert, rows * 4, "row_expert")?,
        arg(u, rows * n2 * ds, &format!("{kernel} u"))?,
    ])
}

/// The fp8 arguments of `act_fwd_q` / `act_bwd_q` for an output of `cols` columns: the mode
/// `q` (1 amax only, 2 / 3 e4m3 / e5m2 codes too) and the addresses of the amax, scales and
/// codes (0 without codes), each checked to hold what the kernel touches.
fn act_fp8_args(
    fp8: ActFp8Out<'_>,
    (_, rows, segments): RowsArg<'_>,
    cols: usize,
    kernel: &str,
) -> Result<(i32, u64, u64, i32, u64), GpuError> {
    let amax = arg(fp8.amax, segments * 4, &format!("{kernel} amax"))?;
    Ok(match fp8.codes {
        None => (1, amax, 0, 0, 0),
        Some(c) => (
            match c.format {
                Fp8Format::E4M3 => 2,
                Fp8Format::E5M2 => 3,
            },
            amax,
            arg(c.scale, (segments.max(1) - 1) * c.stride * 4 + 4, &format!("{kernel} scale"))?,
            i32::try_from(c.stride)?,
            arg(c.codes, rows * cols, &format!("{kernel} codes"))?,
        ),
    })
}

/// The device addresses and integer arguments of `act_bwd` / `act_bwd_q`, each buffer checked
/// to hold what the kernel touches: `[a, du, p, g, b2, row_expert, da, dp]` and
/// `[write_dp, rows, n2, h, probs_dt]`.
#[allow(clippy::too_many_arguments)]
fn act_bwd_args(
    dt: Dtype,
    ap: ActParams,
    (a, du, p, gout): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    b2: Option<&DeviceBuffer>,
    (row_expert, rows, segments): RowsArg<'_>,
    (da, dp): (&mut DeviceBuffer, &mut DeviceBuffer),
    write_dp: bool,
    (n2, h): (usize, usize),
    probs_dt: Dtype,
) -> Result<([u64; 8], [i32; 5]), GpuError> {
    let ds = dt.size_bytes();
    let n1 = if ap.glu != 0 { 2 * n2 } else { n2 };
    Ok((
        [
            arg(a, rows * n1 * ds, "act_bwd a")?,
            arg(du, rows * n2 * ds, "act_bwd du")?,
            arg(p, probs_bytes(rows), "act_bwd p")?,
            arg(gout, rows * h * ds, "act_bwd g")?,
            opt_arg(b2, segments * h * ds, "act_bwd b2")?,
            arg(row_expert, rows * 4, "row_expert")?,
            arg(da, rows * n1 * ds, "act_bwd da")?,
            arg(dp, probs_bytes(rows), "act_bwd dp")?,
        ],
        [i32::from(write_dp), i32::try_from(rows)?, i32::try_from(n2)?, i32::try_from(h)?, probs_code(probs_dt)],
    ))
}

/// The dynamic shared memory of the one-pass 1×128 block quantizers (`block_tile_quant` in
/// `fp8_common.cuh`: `act_fwd_blk`, `block_quant_both128_seg`, `cast_both_seg`) for `dt`
/// (`BLOCK_TILE_SMEM`): a 128 x 128 tile of stored values, rows padded by 16 bytes, then the
/// columnwise codes' tile, 128 columns of 144 bytes.
pub(crate) fn block_tile_smem(dt: Dtype) -> usize {
    let e = dt.size_bytes();
    128 * (128 + 16 / e) * e + 128 * 144
}

/// `<base>_<dtype>_<format>`, a `block_tile_quant` kernel, allowed its dynamic shared memory
/// (over the default 48 KiB for f32).
pub(crate) fn block_tile_function(
    module: &Arc<CudaModule>,
    base: &str,
    dt: Dtype,
    format: &str,
) -> Result<CudaFunction, GpuError> {
    let f = module.load_function(&format!("{base}_{}_{format}", dtype_suffix(dt)))?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        i32::try_from(block_tile_smem(dt))?,
    )?;
    Ok(f)
}

/// Whether the one-pass block quantizers (`act_fwd_blk`, `block_quant_both128_seg`) take a
/// tensor of `cols` columns (four per lane, each lane's accesses aligned).
pub(crate) fn block_tile_takes(cols: usize) -> bool {
    cols.is_multiple_of(4)
}

/// A 1-D grid-stride launch for `total` elements.
fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(256).min(MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The grid of the row-looping elementwise kernels (`act_fwd`, `scale_rows`, `fill_bias_rows`,
/// `fc2_bias_fwd`): blocks of 256 threads striding over `rows`.
fn over_rows(rows: usize) -> LaunchConfig {
    let blocks = rows.min(MAX_BLOCKS) as u32; // 0 rows: no launch
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block of 256 threads per row (`act_bwd`, `probs_in_bwd`).
fn per_row(rows: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig { grid_dim: (u32::try_from(rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
}

/// `col_sum`'s grid: (ceil(cols / 256), segments), blocks of 256.
fn col_sum_grid(cols: usize, segments: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(cols.div_ceil(256))?, u32::try_from(segments)?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Bytes of `rows` f32 probs.
fn probs_bytes(rows: usize) -> usize {
    rows * 4
}

/// Launches `$f` on `$stream` with `$cfg` and the arguments, in order, unless the grid is empty;
/// counts the launch. Callers check every buffer argument against the sizes the kernel touches
/// before, and pass the arguments of the kernel's `extern "C"` signature in `experts.cu`.
macro_rules! launch {
    ($self:ident, $stream:expr, $f:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let cfg: LaunchConfig = $cfg;
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 {
            return Ok(());
        }
        let mut builder = $stream.launch_builder($f);
        $(builder.arg($arg);)*
        // SAFETY: the arguments are, in order and type, the parameters of the kernel's
        // `extern "C"` signature in `experts.cu` (pointers as 64-bit device addresses, ints as
        // i32, `ActParams` by value); every pointer is null where the kernel allows it or the
        // address of a live buffer of this engine checked above to hold what the kernel reads
        // or writes at these sizes (expert indices come from a `RowMap`, in range by
        // construction); the launch shape is the one the `.cu` header's contract asks for.
        unsafe { builder.launch(cfg) }?;
        $self.launches += 1;
        Ok(())
    }};
}

impl ExpertKernels {
    /// Compiles `experts.cu` for `arch` and loads every kernel into `ctx`.
    pub(crate) fn load(ctx: &Arc<CudaContext>, arch: &'static str) -> Result<ExpertKernels, GpuError> {
        let module = ctx.load_module(compile_kernels(arch)?)?;
        let set = |dt: Dtype| -> Result<KernelSet, GpuError> {
            let f = |base: &str| module.load_function(&format!("{base}_{}", dtype_suffix(dt)));
            Ok(KernelSet {
                act_fwd: f("act_fwd")?,
                act_fwd_q: f("act_fwd_q")?,
                act_fwd_blk: [
                    block_tile_function(&module, "act_fwd_blk", dt, "e4m3")?,
                    block_tile_function(&module, "act_fwd_blk", dt, "e5m2")?,
                ],
                act_bwd: f("act_bwd")?,
                act_bwd_q: f("act_bwd_q")?,
                scale_rows: f("scale_rows")?,
                probs_in_bwd: f("probs_in_bwd")?,
                fill_bias_rows: f("fill_bias_rows")?,
                fc2_bias_fwd: f("fc2_bias_fwd")?,
                col_sum: f("col_sum")?,
                init_uniform: f("init_uniform")?,
            })
        };
        Ok(ExpertKernels { sets: [set(Dtype::F32)?, set(Dtype::Bf16)?, set(Dtype::F16)?], launches: 0 })
    }

    /// Launches issued so far.
    pub(crate) fn launches(&self) -> u64 {
        self.launches
    }

    fn set(&self, dt: Dtype) -> &KernelSet {
        match dt {
            Dtype::F32 => &self.sets[0],
            Dtype::Bf16 => &self.sets[1],
            Dtype::F16 => &self.sets[2],
        }
    }

    /// `out[r, c] = round(x[r, c]·p[r])` over `[rows, cols]` (probs on the input, spec §4.7).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scale_rows(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        x: &DeviceBuffer,
        p: &DeviceBuffer,
        out: &mut DeviceBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        let mat = rows * cols * dt.size_bytes();
        let (x, p, out) = (
            arg(x, mat, "scale_rows x")?,
            arg(p, probs_bytes(rows), "scale_rows p")?,
            arg(out, mat, "scale_rows out")?,
        );
        let (ri, ci) = (i32::try_from(rows)?, i32::try_from(cols)?);
        launch!(self, stream, &self.set(dt).scale_rows, over_rows(rows), [&x, &p, &out, &ri, &ci])
    }

    /// `a[r, c] = b[row_expert[r], c]` over `[rows, cols]`: TEGroupedMLP's fc1 bias, pre-filled
    /// so that the GEMM with beta = 1 rounds `x·W1ᵀ + b1` once.
    pub(crate) fn fill_bias_rows(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        a: &mut DeviceBuffer,
        b: &DeviceBuffer,
        map: &RowMap,
        cols: usize,
    ) -> Result<(), GpuError> {
        let ds = dt.size_bytes();
        let a = arg(a, map.rows * cols * ds, "fill_bias_rows a")?;
        let b = arg(b, map.segments * cols * ds, "fill_bias_rows b")?;
        let re = arg(&map.row_expert, map.rows * 4, "row_expert")?;
        let (ri, ci) = (i32::try_from(map.rows)?, i32::try_from(cols)?);
        launch!(self, stream, &self.set(dt).fill_bias_rows, over_rows(map.rows), [&a, &b, &re, &ri, &ci])
    }

    /// The forward activation block over `rows` rows in `segments` segments (row `r` in segment
    /// `row_expert[r]`): `a` `[rows, N1]` (`N1 = 2·n2` with a GLU) gets SequentialMLP's fc1 bias
    /// `b1` `[segments, N1]` added in place when given, then `u[r] = round(z(a[r])·p[r])`
    /// `[rows, n2]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_fwd(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        ap: ActParams,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        (row_expert, rows, segments): RowsArg<'_>,
        u: &mut DeviceBuffer,
        n2: usize,
    ) -> Result<(), GpuError> {
        let [a, b1, p, re, u] = act_fwd_args(dt, ap, (a, b1, p, u), (row_expert, rows, segments), n2, "act_fwd")?;
        let (ri, n2i) = (i32::try_from(rows)?, i32::try_from(n2)?);
        launch!(self, stream, &self.set(dt).act_fwd, over_rows(rows), [&a, &b1, &p, &re, &u, &ri, &n2i, &ap])
    }

    /// [`ExpertKernels::act_fwd`] quantizing its own output in the same pass (`act_fwd_q`): besides `u` it
    /// writes `fp8.amax`, the per-segment amax of the stored `u` (f32 bits; the caller zeroes
    /// it), and with `fp8.codes` the codes of `u` at each segment's scale.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_fwd_quantized(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        ap: ActParams,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        (row_expert, rows, segments): RowsArg<'_>,
        u: &mut DeviceBuffer,
        n2: usize,
        fp8: ActFp8Out<'_>,
    ) -> Result<(), GpuError> {
        let [a, b1, p, re, u] = act_fwd_args(dt, ap, (a, b1, p, u), (row_expert, rows, segments), n2, "act_fwd_q")?;
        let (q, amax, scale, stride, codes) = act_fp8_args(fp8, (row_expert, rows, segments), n2, "act_fwd_q")?;
        let (ri, n2i) = (i32::try_from(rows)?, i32::try_from(n2)?);
        launch!(
            self,
            stream,
            &self.set(dt).act_fwd_q,
            over_rows(rows),
            [&a, &b1, &p, &re, &u, &ri, &n2i, &ap, &q, &amax, &scale, &stride, &codes]
        )
    }

    /// [`ExpertKernels::act_fwd`] block-quantizing its own output (`act_fwd_blk`): besides `u`
    /// (and SequentialMLP's biased `a`) it writes both 1×128 block operands of `u` for every
    /// segment into `out`, as the segmented block quantizers would from the stored `u`. Needs
    /// `n2 % 4 == 0` ([`block_tile_takes`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_fwd_block_quantized(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        ap: ActParams,
        a: &mut DeviceBuffer,
        b1: Option<&DeviceBuffer>,
        p: &DeviceBuffer,
        (row_expert, rows, segments): RowsArg<'_>,
        u: &mut DeviceBuffer,
        n2: usize,
        out: ActBlockOut,
    ) -> Result<(), GpuError> {
        if !block_tile_takes(n2) {
            return Err(GpuError::Shape(format!("act_fwd_blk: n2 = {n2} is not a multiple of 4")));
        }
        let [a, b1, p, _, u] = act_fwd_args(dt, ap, (a, b1, p, u), (row_expert, rows, segments), n2, "act_fwd_blk")?;
        let n2i = i32::try_from(n2)?;
        let f = &self.set(dt).act_fwd_blk[match out.format {
            Fp8Format::E4M3 => 0,
            Fp8Format::E5M2 => 1,
        }];
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(out.n_tiles)?, u32::try_from(n2.div_ceil(128))?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: u32::try_from(block_tile_smem(dt))?,
        };
        let ActBlockOut { bp, seg, col_scale_off, codes, scale_inv, codes_t, scale_inv_t, .. } = out;
        launch!(
            self,
            stream,
            f,
            cfg,
            [&a, &b1, &p, &u, &n2i, &ap, &bp, &seg, &col_scale_off, &codes, &scale_inv, &codes_t, &scale_inv_t]
        )
    }

    /// `y[r, c] = round(y[r, c] + b2[row_expert[r], c]·p[r])` over `[rows, cols]`, with `b2·p`
    /// rounded first when the probs are in the storage dtype (spec §4.8).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fc2_bias_fwd(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        y: &mut DeviceBuffer,
        b2: &DeviceBuffer,
        p: &DeviceBuffer,
        map: &RowMap,
        cols: usize,
        probs_in_storage: bool,
    ) -> Result<(), GpuError> {
        let ds = dt.size_bytes();
        let rows = map.rows;
        let y = arg(y, rows * cols * ds, "fc2_bias_fwd y")?;
        let b2 = arg(b2, map.segments * cols * ds, "fc2_bias_fwd b2")?;
        let p = arg(p, probs_bytes(rows), "fc2_bias_fwd p")?;
        let re = arg(&map.row_expert, rows * 4, "row_expert")?;
        let (ri, ci, storage) = (i32::try_from(rows)?, i32::try_from(cols)?, i32::from(probs_in_storage));
        launch!(self, stream, &self.set(dt).fc2_bias_fwd, over_rows(rows), [&y, &b2, &p, &re, &ri, &ci, &storage])
    }

    /// The backward activation block, one block per row: from `a` `[rows, N1]` (bias included),
    /// `du` `[rows, n2]`, the probs `p` and, with an fc2 bias `b2` `[segments, h]`, the upstream
    /// gradient `gout` `[rows, h]`: `da` `[rows, N1]`, and `dp[r]` rounded as `probs_dt` when
    /// `write_dp`. With `fp8` it quantizes its own output in the same pass (`act_bwd_q`, fc1's
    /// output gradient for the fp8 dgrad and wgrad GEMMs): it also writes `fp8.amax`, the
    /// per-segment amax of the stored `da` (f32 bits; the caller zeroes it), and with
    /// `fp8.codes` the codes of `da` at each segment's scale.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn act_bwd(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        ap: ActParams,
        inputs: (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
        b2: Option<&DeviceBuffer>,
        rows: RowsArg<'_>,
        outputs: (&mut DeviceBuffer, &mut DeviceBuffer),
        write_dp: bool,
        dims: (usize, usize),
        probs_dt: Dtype,
        fp8: Option<ActFp8Out<'_>>,
    ) -> Result<(), GpuError> {
        let n1 = if ap.glu != 0 { 2 * dims.0 } else { dims.0 };
        let args = act_bwd_args(dt, ap, inputs, b2, rows, outputs, write_dp, dims, probs_dt)?;
        let [a, du, p, gout, b2, re, da, dp] = args.0;
        let [wdp, ri, n2i, hi, pc] = args.1;
        let Some(fp8) = fp8 else {
            return launch!(
                self,
                stream,
                &self.set(dt).act_bwd,
                per_row(rows.1)?,
                [&a, &du, &p, &gout, &b2, &re, &da, &dp, &wdp, &ri, &n2i, &hi, &ap, &pc]
            );
        };
        let (q, amax, scale, stride, codes) = act_fp8_args(fp8, rows, n1, "act_bwd_q")?;
        launch!(
            self,
            stream,
            &self.set(dt).act_bwd_q,
            per_row(rows.1)?,
            [
                &a, &du, &p, &gout, &b2, &re, &da, &dp, &wdp, &ri, &n2i, &hi, &ap, &pc, &q, &amax, &scale, &stride,
                &codes
            ]
        )
    }

    /// Backward of the probs-on-input scaling over `[rows, cols]`, one block per row:
    /// `dp[r] = round_probs(Σ_c dx'_rc·x_rc)`, then `dx_rc = round(dx'_rc·p_r)` in place.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn probs_in_bwd(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        dx: &mut DeviceBuffer,
        x: &DeviceBuffer,
        p: &DeviceBuffer,
        dp: &mut DeviceBuffer,
        (rows, cols): (usize, usize),
        probs_dt: Dtype,
    ) -> Result<(), GpuError> {
        let mat = rows * cols * dt.size_bytes();
        let dx = arg(dx, mat, "probs_in_bwd dx")?;
        let x = arg(x, mat, "probs_in_bwd x")?;
        let p = arg(p, probs_bytes(rows), "probs_in_bwd p")?;
        let dp = arg(dp, probs_bytes(rows), "probs_in_bwd dp")?;
        let (ri, ci, pc) = (i32::try_from(rows)?, i32::try_from(cols)?, probs_code(probs_dt));
        launch!(self, stream, &self.set(dt).probs_in_bwd, per_row(rows)?, [&dx, &x, &p, &dp, &ri, &ci, &pc])
    }

    /// `out[e, c] = round(Σ_{r in segment e} w_r·grad[r, c])` `[segments, cols]` with `w = p`
    /// (`None`: `w = 1`), summed in f32; an empty segment gets exact zeros.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn col_sum(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        grad: &DeviceBuffer,
        p: Option<&DeviceBuffer>,
        map: &RowMap,
        out: &mut DeviceBuffer,
        cols: usize,
    ) -> Result<(), GpuError> {
        let ds = dt.size_bytes();
        let grad = arg(grad, map.rows * cols * ds, "col_sum grad")?;
        let p = opt_arg(p, probs_bytes(map.rows), "col_sum p")?;
        let off = arg(&map.seg_off, map.segments * 4, "seg_off")?;
        let len = arg(&map.seg_len, map.segments * 4, "seg_len")?;
        let out = arg(out, map.segments * cols * ds, "col_sum out")?;
        let ci = i32::try_from(cols)?;
        launch!(
            self,
            stream,
            &self.set(dt).col_sum,
            col_sum_grid(cols, map.segments)?,
            [&grad, &p, &off, &len, &out, &ci]
        )
    }

    /// Fills the first `n` elements of `out` with `round(scale·U(-1, 1))`, deterministic in
    /// `seed`.
    pub(crate) fn init_uniform(
        &mut self,
        stream: &CudaStream,
        dt: Dtype,
        out: &mut DeviceBuffer,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<(), GpuError> {
        let out = arg(out, n * dt.size_bytes(), "init_uniform out")?;
        let ni = i64::try_from(n)?;
        launch!(self, stream, &self.set(dt).init_uniform, elementwise(n), [&out, &ni, &seed, &scale])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles the kernels where libnvrtc is loadable (no GPU needed) and checks every entry
    /// point the engine loads is in the PTX. Skips loudly elsewhere.
    #[test]
    fn kernels_compile_with_nvrtc_for_sm_90() {
        if !crate::nvrtc::nvrtc_present() {
            crate::print_skip("SKIP gpu::kernels_compile_with_nvrtc_for_sm_90: libnvrtc not found");
            return;
        }
        let ptx = compile_kernels("sm_90").unwrap_or_else(|e| panic!("{e}"));
        let src = ptx.to_src();
        for dt in Dtype::ALL {
            let blk = ["e4m3", "e5m2"].map(|f| format!("act_fwd_blk_{}_{f}", dtype_suffix(dt)));
            for name in KERNEL_NAMES.iter().map(|base| format!("{base}_{}", dtype_suffix(dt))).chain(blk) {
                assert!(src.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
            }
        }
    }

    /// `experts.cu` serves the bf16 layers on GPUs from sm_80 on (the bf16 cvt's minimum): the
    /// fp8 encodes it shares with the quantizers (`fp8_common.cuh`, sm_89 instructions) must
    /// compile there too (to a trap no bf16 path reaches), not fail the whole module.
    #[test]
    fn kernels_compile_with_nvrtc_for_sm_80() {
        if !crate::nvrtc::nvrtc_present() {
            crate::print_skip("SKIP gpu::kernels_compile_with_nvrtc_for_sm_80: libnvrtc not found");
            return;
        }
        let ptx = compile_kernels("sm_80").unwrap_or_else(|e| panic!("{e}"));
        let src = ptx.to_src();
        assert!(src.contains(".entry act_fwd_q_bf16("), "act_fwd_q_bf16 missing from the sm_80 PTX");
        assert!(!src.contains("e4m3x2"), "an sm_89 fp8 cvt in the sm_80 PTX");
    }

    /// The wrappers' parameter lists are the kernels' (names and order), as `experts.cu`
    /// declares them: a kernel whose signature changes must change its wrapper too.
    #[test]
    fn kernel_signatures_are_the_ones_the_wrappers_pass() {
        let sig = |name: &str| -> String {
            let decl = if name.contains("##S") { format!(" {name}(") } else { format!("void {name}_##S(") };
            let start = EXPERTS_CU.find(&decl).unwrap_or_else(|| panic!("{name} not declared"));
            let rest = &EXPERTS_CU[start..];
            rest[..rest.find(')').expect("closing parenthesis")].replace(['\\', '\n'], " ")
        };
        let params = |name: &str| -> Vec<String> {
            let s = sig(name);
            s[s.find('(').expect("(") + 1..]
                .split(',')
                .map(|p| p.split_whitespace().last().expect("parameter name").trim_start_matches('*').to_string())
                .collect()
        };
        let bwd =
            ["a", "du", "p", "gout", "b2", "row_expert", "da", "dp", "write_dp", "rows", "n2", "h", "ap", "probs_dt"];
        let bwd_q = [&bwd[..], &["q", "amax", "scale", "stride", "codes"]].concat();
        let expect: [(&str, &[&str]); 10] = [
            ("act_fwd", &["a", "b1", "p", "row_expert", "u", "rows", "n2", "ap"]),
            (
                "act_fwd_q",
                &["a", "b1", "p", "row_expert", "u", "rows", "n2", "ap", "q", "amax", "scale", "stride", "codes"],
            ),
            ("act_bwd", &bwd),
            ("act_bwd_q", &bwd_q),
            ("scale_rows", &["x", "p", "out", "rows", "cols"]),
            ("probs_in_bwd", &["dx", "x", "p", "dp", "rows", "cols", "probs_dt"]),
            ("fill_bias_rows", &["a", "b", "row_expert", "rows", "cols"]),
            ("fc2_bias_fwd", &["y", "b2", "p", "row_expert", "rows", "cols", "probs_in_storage"]),
            ("col_sum", &["grad", "p", "seg_off", "seg_len", "out", "cols"]),
            ("init_uniform", &["out", "n", "seed", "scale"]),
        ];
        for (name, want) in expect {
            assert!(KERNEL_NAMES.contains(&name));
            assert_eq!(params(name), want, "{name}");
        }
        // `act_fwd_blk_<dtype>_<format>`: both formats' parameter lists are the wrapper's.
        let blk = [
            "a",
            "b1",
            "p",
            "u",
            "n2",
            "ap",
            "bp",
            "seg",
            "col_scale_off",
            "codes",
            "scale_inv",
            "codes_t",
            "scale_inv_t",
        ];
        for f in ["e4m3", "e5m2"] {
            let name = format!("act_fwd_blk_##S##_{f}");
            assert_eq!(params(&name), blk, "{name}");
        }
    }

    /// The one-pass block quantizers' shared tile is what `BLOCK_TILE_SMEM` in
    /// `fp8_common.cuh` declares (128 rows of 128 values plus 16 bytes, 16-byte aligned rows)
    /// and fits an SM (227 KiB on sm_90); widths that are not multiples of 4 take the two-step
    /// path.
    #[test]
    fn block_tile_shared_memory_and_widths() {
        assert_eq!(block_tile_smem(Dtype::Bf16), 128 * 136 * 2 + 128 * 144);
        assert_eq!(block_tile_smem(Dtype::F16), 128 * 136 * 2 + 128 * 144);
        assert_eq!(block_tile_smem(Dtype::F32), 128 * 132 * 4 + 128 * 144);
        for dt in Dtype::ALL {
            assert_eq!(block_tile_smem(dt) / 128 % 16, 0, "{dt}: rows 16-byte aligned");
            assert_eq!((block_tile_smem(dt) - 128 * 144) % 16, 0, "{dt}: the codes' tile 16-byte aligned");
            assert!(block_tile_smem(dt) <= 227 * 1024, "{dt}");
        }
        assert!(EXPERTS_CU.contains("#define BLOCK_TILE_PITCH(elem) (128 + 16 / (elem))"));
        assert!(EXPERTS_CU.contains("#define BLOCK_TILE_CODES_PITCH 144"));
        assert!(EXPERTS_CU.contains(
            "#define BLOCK_TILE_SMEM(elem) (128 * BLOCK_TILE_PITCH(elem) * (elem) + 128 * BLOCK_TILE_CODES_PITCH)"
        ));
        assert!(block_tile_takes(200) && block_tile_takes(4) && !block_tile_takes(38) && !block_tile_takes(2));
    }

    #[test]
    fn row_map_tiles_the_rows_by_segment() {
        let (row_expert, offsets, rows) = RowMap::host(&[2, 0, 3]);
        assert_eq!((row_expert, offsets, rows), (vec![0, 0, 2, 2, 2], vec![0, 2, 2], 5));
    }
}
