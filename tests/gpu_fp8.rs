//! The fp8 kernels of `moe-gpu` (`kernels/fp8.cu`, issue 13) against the reference quantizers
//! of `moe_reference::fp8` **bit for bit**, and the cuBLASLt fp8 GEMM against the reference's
//! GEMM model on operands whose products and sums are exact (so any accumulation order gives
//! the same bits).
//!
//! Every test skips loudly (one `SKIP gpu_fp8::<test>` line) without CUDA and fails instead under
//! `MOE_REQUIRE_CUDA=1`. No tolerance of their own: codes, scales, E8M0 bytes and the GEMM
//! output bits on exact operands must be equal; the block GEMM on random operands and the fp8
//! layers are held to the harness's error model.

use moe_gpu::fp8::{
    BlockOperand, DeviceDelayedState, DeviceFp8, DeviceScales, Fp8Issue, LtAlgoChoice, QuantSpec, SegmentMap,
    SegmentScales,
};
use moe_gpu::{CudaGrouped, CudaSequential, CudaTeGrouped, DeviceBuffer, Engine, Gpu};
use moe_harness::case::Case;
use moe_harness::properties::{check, PerClassBackend, Property, Verdict};
use moe_harness::tolerance::{self, Tolerance};
use moe_reference::codec::{round, to_bytes};
use moe_reference::fp8::scale::amax;
use moe_reference::fp8::tensor::{Fp8Quantizer, Fp8Tensor, Scales, Usage};
use moe_reference::fp8::{
    AmaxComputeAlgo, BlockQuantizer, BlockTile, CurrentScalingQuantizer, DelayedScalingConfig, Fp8Format, Fp8Recipe,
    MxBlock, Mxfp8Quantizer, ScaleOptions,
};
use moe_reference::layer::{fp8_gemm, Fp8Operand, Fp8Run, Fp8State, GemmOperand};
use moe_reference::{
    oracle_with_scales_fp8, to_state_dict, Activation, Dtype, ExpertLayer, Fp8Config, LayerClass, LayerConfig,
    LayerError, Parallelism, Reference, TeFormat, WgradTiming,
};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu(test: &str) -> Option<Gpu> {
    crate::crash_report::install();
    moe_gpu::gpu_or_skip(&format!("gpu_fp8::{test}"))
}

/// The input families: each exercises a rule of the quantizers (why each exists is in its
/// name): ordinary values, exact zeros mixed in, subnormals of the input dtype, ±inf and NaN
/// (amax ignores NaN, inf amax gives scale 1, inf/NaN encode to ±max/0x7F), a tiny amax (the
/// scale quotient overflows to value_for_inf), a huge amax (scales far below 1), all zeros.
const FAMILIES: [&str; 8] =
    ["normal", "zeros_mixed", "subnormal", "inf_nan", "tiny_amax", "huge_amax", "all_zero", "wide_range"];

fn sample(family: &str, rng: &mut ChaCha8Rng, dtype: Dtype) -> f64 {
    let u: f64 = rng.random_range(-1.0..1.0);
    let v = match family {
        "normal" => 3.0 * u,
        "zeros_mixed" => {
            if rng.random_bool(0.4) {
                if rng.random_bool(0.5) {
                    0.0
                } else {
                    -0.0
                }
            } else {
                u
            }
        }
        "subnormal" => match dtype {
            Dtype::F32 => u * 1e-39,
            Dtype::Bf16 => u * 1e-39,
            Dtype::F16 => u * 5e-6,
        },
        "inf_nan" => match rng.random_range(0..10) {
            0 => f64::INFINITY,
            1 => f64::NEG_INFINITY,
            2 => f64::NAN,
            _ => 100.0 * u,
        },
        "tiny_amax" => match dtype {
            Dtype::F16 => u * 1e-7,
            _ => u * 1e-42,
        },
        "huge_amax" => match dtype {
            Dtype::F16 => u * 60000.0,
            _ => u * 3e38,
        },
        "all_zero" => 0.0,
        _ => u * 2f64.powi(rng.random_range(-30..30)),
    };
    round(dtype, v)
}

/// A `[rows, cols]` tensor of `family` values of `dtype`, as f64 (exact).
fn tensor(family: &str, rows: usize, cols: usize, dtype: Dtype, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((rows, cols), |_| sample(family, &mut rng, dtype))
}

/// `x` uploaded in `dtype` (its values are exact in `dtype`).
fn upload(eng: &mut Engine, x: &Array2<f64>, dtype: Dtype) -> DeviceBuffer {
    eng.upload(&to_bytes(dtype, x.iter().copied())).expect("upload")
}

/// A bf16 GEMM output downloaded as f64 values (row-major).
fn download_bf16(eng: &mut Engine, out: &DeviceBuffer) -> Vec<f64> {
    moe_reference::codec::from_bytes(Dtype::Bf16, &eng.download(out).expect("download"))
}

/// Asserts two quantized tensors are equal bit for bit, naming the first difference.
fn assert_same(what: &str, gpu: &Fp8Tensor, reference: &Fp8Tensor, x: &Array2<f64>, columnwise: bool) {
    assert_eq!(gpu.format, reference.format, "{what}: format");
    assert_eq!(gpu.shape(), reference.shape(), "{what}: shape");
    if let Some(((i, j), _)) =
        gpu.data.indexed_iter().zip(reference.data.iter()).find(|((_, g), r)| g != r).map(|(a, _)| a)
    {
        let input = if columnwise { x[[j, i]] } else { x[[i, j]] };
        panic!(
            "{what}: code [{i}, {j}] = {:#04x} on the GPU, {:#04x} in the reference (input {input:e}, GPU scale_inv {}, \
             reference {})",
            gpu.data[[i, j]],
            reference.data[[i, j]],
            gpu.scales.scale_inv_at(i, j),
            reference.scales.scale_inv_at(i, j)
        );
    }
    match (&gpu.scales, &reference.scales) {
        (Scales::PerTensor { scale_inv: g }, Scales::PerTensor { scale_inv: r }) => {
            assert_eq!(g.to_bits(), r.to_bits(), "{what}: scale_inv {g:e} vs reference {r:e}")
        }
        (Scales::Block { rows: gr, cols: gc, scale_inv: g }, Scales::Block { rows: rr, cols: rc, scale_inv: r }) => {
            assert_eq!((gr, gc), (rr, rc), "{what}: block shape");
            assert_eq!(g.dim(), r.dim(), "{what}: scale grid");
            for ((ij, a), b) in g.indexed_iter().zip(r.iter()) {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: block scale_inv {ij:?} = {a:e}, reference {b:e}");
            }
        }
        (Scales::E8m0 { rows: gr, cols: gc, exponents: g }, Scales::E8m0 { rows: rr, cols: rc, exponents: r }) => {
            assert_eq!((gr, gc), (rr, rc), "{what}: block shape");
            assert_eq!(g, r, "{what}: E8M0 exponents");
        }
        (g, r) => panic!("{what}: scale kinds differ: {g:?} vs {r:?}"),
    }
}

/// Runs `spec` on the GPU and the matching reference quantizer on `x`, both copies, and
/// asserts they are equal bit for bit.
fn check_quantizer(eng: &mut Engine, spec: QuantSpec, x: &Array2<f64>, dtype: Dtype, what: &str) {
    let (rows, cols) = x.dim();
    let x32 = x.mapv(|v| v as f32);
    let reference = match spec {
        QuantSpec::Current { format, options } => {
            CurrentScalingQuantizer { format, options }.quantize(what, x32.view(), dtype, Usage::BOTH)
        }
        QuantSpec::Block { format, tile, options } => {
            BlockQuantizer { format, tile, options }.quantize(what, x32.view(), dtype, Usage::BOTH)
        }
        QuantSpec::Mxfp8 { format, block } => {
            Mxfp8Quantizer { format, block }.quantize(what, x32.view(), dtype, Usage::BOTH)
        }
    }
    .unwrap_or_else(|e| panic!("{what}: reference refused: {e}"));
    let input = upload(eng, x, dtype);
    let q = eng.quantize(spec, &input, dtype, (rows, cols), Usage::BOTH).unwrap_or_else(|e| panic!("{what}: {e}"));
    let rowwise = q.rowwise.expect("rowwise copy").download(eng).expect("download");
    let columnwise = q.columnwise.expect("columnwise copy").download(eng).expect("download");
    assert_same(&format!("{what} rowwise"), &rowwise, reference.rowwise.as_ref().expect("reference rowwise"), x, false);
    assert_same(
        &format!("{what} columnwise"),
        &columnwise,
        reference.columnwise.as_ref().expect("reference columnwise"),
        x,
        true,
    );
}

fn specs() -> Vec<(String, QuantSpec)> {
    let mut out = Vec::new();
    for format in Fp8Format::ALL {
        for (pow2, eps) in [(false, 0.0f32), (true, 0.0), (false, 1e-4)] {
            let options = ScaleOptions { force_pow_2_scales: pow2, amax_epsilon: eps };
            out.push((format!("current/{format}/pow2={pow2}/eps={eps}"), QuantSpec::Current { format, options }));
            for tile in [BlockTile::Row1x128, BlockTile::Square128] {
                out.push((
                    format!("block{}/{format}/pow2={pow2}/eps={eps}", tile.name()),
                    QuantSpec::Block { format, tile, options },
                ));
            }
        }
        for block in [MxBlock::Row1x32, MxBlock::Square32] {
            out.push((format!("mxfp8 {block:?}/{format}"), QuantSpec::Mxfp8 { format, block }));
        }
    }
    out
}

/// Every quantizer, both formats and copies, on f32/bf16/fp16 inputs of every family and of
/// shapes with partial edge tiles (1×128 and 128×128 tiles cut at 200 and 257 columns, 130
/// rows): codes, scales and E8M0 bytes equal the reference's bit for bit.
#[test]
fn quantizers_match_the_reference_bit_for_bit() {
    let Some(gpu) = gpu("quantizers_match_the_reference_bit_for_bit") else { return };
    let mut eng = gpu.lock().expect("engine");
    let mut checked = 0;
    for dtype in Dtype::ALL {
        for (fi, family) in FAMILIES.iter().enumerate() {
            for (si, &(rows, cols)) in [(3usize, 200usize), (130, 257), (64, 96), (256, 128)].iter().enumerate() {
                let x = tensor(family, rows, cols, dtype, (fi * 16 + si) as u64);
                for (name, spec) in specs() {
                    if matches!(spec, QuantSpec::Mxfp8 { .. }) && (rows % 32 != 0 || cols % 32 != 0) {
                        continue;
                    }
                    check_quantizer(&mut eng, spec, &x, dtype, &format!("{name} {dtype} {family} [{rows}, {cols}]"));
                    checked += 1;
                }
            }
        }
    }
    eprintln!("gpu_fp8::quantizers_match_the_reference_bit_for_bit: {checked} (spec, input) pairs equal bit for bit");
}

/// Per-expert current scaling (what the fp8 layers run): each row segment, empty ones included,
/// gets its own amax and scale, and its codes and transposed copy equal the reference quantizer
/// applied to that segment alone, both from the cast then the transpose
/// (`quantize_segments`) and from the one-pass cast into both copies (`cast_both_seg`,
/// `quantize_segments_both_into`, the fp8 backward's output gradients). Layouts: ragged
/// segments (the byte transpose), segments of multiples of 16 rows, 16-row groups past a 32-row
/// tile and columns past a 128-column tile included (the 16-byte transpose, what the layers'
/// padded experts take), segments over one and two 128-row tiles with partial 64-row halves
/// (the one-pass cast's tiles, their columnwise codes stored by each thread), and segments of
/// multiples of 16 rows over whole 128-row tiles (the one-pass cast's staged columnwise
/// stores).
#[test]
fn segmented_current_scaling_matches_the_reference_per_segment() {
    let Some(gpu) = gpu("segmented_current_scaling_matches_the_reference_per_segment") else { return };
    let mut eng = gpu.lock().expect("engine");
    for (lens, cols, by_16_bytes) in [
        (vec![0usize, 5, 17, 0, 48, 1], 80, false),
        (vec![16, 0, 48, 32, 80], 272, true),
        (vec![0, 130, 3, 256], 200, false),
        (vec![16, 256, 0, 144], 208, true),
    ] {
        assert_eq!(moe_gpu::fp8::transposes_by_16_bytes(cols, &lens), by_16_bytes, "the case's kernel");
        segmented_current_scaling_case(&mut eng, &lens, cols);
    }
}

/// One layout of [`segmented_current_scaling_matches_the_reference_per_segment`].
fn segmented_current_scaling_case(eng: &mut Engine, lens: &[usize], cols: usize) {
    let rows: usize = lens.iter().sum();
    for dtype in [Dtype::Bf16, Dtype::F32] {
        for format in Fp8Format::ALL {
            let mut x = tensor("wide_range", rows, cols, dtype, 7);
            x[[6, 3]] = f64::NAN; // segment 2: NaN ignored by its amax only
            let map = SegmentMap::new(eng, lens).expect("map");
            let input = upload(eng, &x, dtype);
            let options = ScaleOptions::CURRENT_SCALING_DEFAULT;
            for one_pass in [false, true] {
                let q = if one_pass {
                    let mut t = moe_gpu::fp8::SegmentedFp8::alloc(eng, &map, cols, format).expect("alloc");
                    eng.quantize_segments_both_into(&input, dtype, &map, options, &mut t).expect("quantize both");
                    t
                } else {
                    eng.quantize_segments(&input, dtype, &map, cols, format, options, true).expect("quantize")
                };
                let codes = eng.download(&q.codes).expect("codes");
                let codes_t = eng.download(q.codes_t.as_ref().expect("transposed copy")).expect("codes_t");
                let inv = eng.download(&q.scale_inv).expect("scale_inv");
                for (s, &off) in map.offsets().iter().enumerate() {
                    let l = lens[s];
                    let seg = x.slice(ndarray::s![off..off + l, ..]).mapv(|v| v as f32);
                    let r = CurrentScalingQuantizer { format, options }
                        .quantize("segment", seg.view(), dtype, Usage::BOTH)
                        .expect("reference");
                    let (rw, cw) = (r.rowwise.expect("rowwise"), r.columnwise.expect("columnwise"));
                    let what = format!("{dtype} {format} one_pass={one_pass} segment {s} ({l} rows)");
                    let at = 4 * moe_gpu::fp8::SCALE_STRIDE * s;
                    let g_inv = f32::from_le_bytes([inv[at], inv[at + 1], inv[at + 2], inv[at + 3]]);
                    let Scales::PerTensor { scale_inv } = rw.scales else { panic!("per-tensor scales expected") };
                    assert_eq!(g_inv.to_bits(), scale_inv.to_bits(), "{what}: scale_inv");
                    assert_eq!(
                        &codes[off * cols..(off + l) * cols],
                        rw.data.as_slice().expect("contiguous"),
                        "{what}: codes"
                    );
                    assert_eq!(
                        &codes_t[off * cols..(off + l) * cols],
                        cw.data.as_standard_layout().as_slice().expect("contiguous"),
                        "{what}: transposed codes"
                    );
                }
            }
        }
    }
}

/// The largest integer magnitude of the exact-operand GEMM tests in `format`: 16 (e4m3) or 4
/// (e5m2), small enough that with power-of-2 scales and amax pinned to it every quantized value
/// is the integer itself.
fn int_limit(format: Fp8Format) -> i32 {
    if format == Fp8Format::E4M3 {
        16
    } else {
        4
    }
}

/// Asserts the bf16 GEMM output `got` (`[m, n]` row-major) equals the reference GEMM model
/// `model` rounded to bf16, bit for bit, after checking that the model equals the exact product
/// `exact` of the operands (the exact-operand tests build operands for which it must; a model
/// that is not exact would make bit equality with it meaningless).
fn assert_bits_equal_the_exact_model(what: &str, got: &[f64], model: &Array2<f64>, exact: &Array2<f64>) {
    assert_bits_equal_the_exact_model_in(Dtype::Bf16, what, got, model, exact);
}

/// [`assert_bits_equal_the_exact_model`] for an output of `dtype`.
fn assert_bits_equal_the_exact_model_in(
    dtype: Dtype,
    what: &str,
    got: &[f64],
    model: &Array2<f64>,
    exact: &Array2<f64>,
) {
    let n = model.ncols();
    for ((i, j), &want) in model.indexed_iter() {
        assert_eq!(want, exact[[i, j]], "{what}: the reference model is exact here by construction");
        let want = round(dtype, want);
        assert_eq!(
            got[i * n + j].to_bits(),
            want.to_bits(),
            "{what}: C[{i}, {j}] = {} on the GPU, {want} in the model",
            got[i * n + j]
        );
    }
}

/// The one f32 `scale_inv` of a per-tensor quantized operand.
fn per_tensor_scale(q: &DeviceFp8) -> &DeviceBuffer {
    match &q.scales {
        DeviceScales::PerTensor(s) => s,
        _ => unreachable!("per-tensor"),
    }
}

/// Integer-valued operands: with amax 16 (e4m3) or 4 (e5m2) and power-of-2 scales every
/// quantized value is the integer itself, every product and partial sum is an exact f32
/// integer below 2^11, and `s_a·s_b` is a power of two; so the GEMM result before the output
/// rounding is exact in any summation order, with or without fast accumulation, and cuBLASLt's
/// bf16 output must equal the reference GEMM model's bit for bit.
#[test]
fn fp8_gemm_equals_the_reference_model_on_exact_operands() {
    let Some(gpu) = gpu("fp8_gemm_equals_the_reference_model_on_exact_operands") else { return };
    let mut eng = gpu.lock().expect("engine");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let options = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
    for (m, n, k) in [(16usize, 32usize, 16usize), (48, 80, 64), (1, 16, 32), (37, 24, 128)] {
        for (fa, fb) in
            [(Fp8Format::E4M3, Fp8Format::E4M3), (Fp8Format::E5M2, Fp8Format::E4M3), (Fp8Format::E4M3, Fp8Format::E5M2)]
        {
            for fast in [false, true] {
                let (lim_a, lim_b) = (int_limit(fa), int_limit(fb));
                let mut a = Array2::from_shape_fn((m, k), |_| f64::from(rng.random_range(-lim_a..=lim_a)));
                let mut b = Array2::from_shape_fn((n, k), |_| f64::from(rng.random_range(-lim_b..=lim_b)));
                // Only the first 8 entries of each row are non-zero (Σ|a·b| ≤ 2^11), and one
                // entry pins the amax so the pow2 scale keeps the values integers in fp8.
                for x in [&mut a, &mut b] {
                    for mut row in x.rows_mut() {
                        row.iter_mut().skip(8).for_each(|v| *v = 0.0);
                    }
                }
                a[[0, 0]] = f64::from(lim_a);
                b[[0, 0]] = f64::from(lim_b);
                let what = format!("[{m}, {n}, {k}] {fa}x{fb} fast_accum={fast}");
                let (ia, ib) = (upload(&mut eng, &a, Dtype::Bf16), upload(&mut eng, &b, Dtype::Bf16));
                let qa = eng
                    .quantize(QuantSpec::Current { format: fa, options }, &ia, Dtype::Bf16, (m, k), Usage::ROWWISE)
                    .expect("qa");
                let qb = eng
                    .quantize(QuantSpec::Current { format: fb, options }, &ib, Dtype::Bf16, (n, k), Usage::ROWWISE)
                    .expect("qb");
                let (qa, qb) = (qa.rowwise.expect("a"), qb.rowwise.expect("b"));
                let out = eng.alloc(m * n * 2).expect("out");
                eng.fp8_gemm(
                    (m, n, k),
                    (qa.codes.at(0), fa, per_tensor_scale(&qa).at(0)),
                    (qb.codes.at(0), fb, per_tensor_scale(&qb).at(0)),
                    out.at(0),
                    Dtype::Bf16,
                    0.0,
                    fast,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = download_bf16(&mut eng, &out);
                let (ta, tb) = (qa.download(&mut eng).expect("a"), qb.download(&mut eng).expect("b"));
                let model = fp8_gemm(
                    &GemmOperand::from_fp8(&ta, Fp8Recipe::Tensorwise),
                    &GemmOperand::from_fp8(&tb, Fp8Recipe::Tensorwise),
                );
                assert_bits_equal_the_exact_model(&what, &got, &model, &a.dot(&b.t()));
            }
        }
    }
}

/// The fp8 grouped GEMM (`Fp8Issue::Persistent`, one launch for all experts) on exact operands,
/// held to the exact product bit for bit as cuBLASLt is above: ragged experts (an empty one, a
/// single row, rows across the kernel's 128-row tiles, so tiles read the next expert's rows),
/// a second list of 130 experts (over the kernel's 128 problems per launch), a third large
/// enough for 256-wide tiles (fast accumulation), n across the 128-column tiles, K below one 128-wide k-step and with a partial last k-step (the non-zero
/// entries sit at random columns, so every k-step counts), each expert with its own power-of-2
/// scale_inv on A and on B (a scale read from the wrong expert moves results by powers of two),
/// both A formats, bf16 and f16 outputs, fast and split accumulation, beta 0 into a
/// NaN-poisoned output and beta 1 onto an integer output (`C = s·AB + C`, rounded once). Rows
/// past the last expert must keep their bytes. The same list through cuBLASLt
/// (`Fp8Issue::Direct`) must give the same bits under beta 0; under beta 1 cuBLASLt's fp8 GEMM
/// is not held to the single rounding: on the H200 (cuBLASLt 13.1) it returned 137 where the
/// once-rounded exact result is 138 (bf16), as if `s·AB` were rounded to the output dtype
/// before `C` is added (docs/gpu-validation.md).
#[test]
fn fp8_grouped_gemm_equals_the_exact_product_on_exact_operands() {
    let Some(gpu) = gpu("fp8_grouped_gemm_equals_the_exact_product_on_exact_operands") else { return };
    let mut eng = gpu.lock().expect("engine");
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let options = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
    let mut lists: Vec<(Vec<usize>, usize, usize)> = vec![
        (vec![37, 0, 1, 130, 16, 257], 144, 272),
        (vec![64, 3, 200], 32, 48),
        // Enough 128 x 256 tiles to cover 132 SMs: fast accumulation runs the 256-wide tiles.
        (vec![1100, 0, 1037, 1200], 2304, 272),
    ];
    lists.push(((0..130).map(|e| 1 + e % 3).collect(), 16, 128));
    let guard = 8;
    let before = eng.fp8_grouped_kernel_launches();
    let mut launches_expected = 0;
    for (rows, n, k) in lists {
        let experts = rows.len();
        let total: usize = rows.iter().sum();
        let offsets: Vec<usize> = rows
            .iter()
            .scan(0, |acc, &r| {
                let o = *acc;
                *acc += r;
                Some(o)
            })
            .collect();
        for fa in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let (lim_a, lim_b) = (int_limit(fa), int_limit(Fp8Format::E4M3));
            // Each row: 8 integers at random distinct columns, one pinning the amax, times the
            // expert's power of two 2^(e % 3 - 1).
            let mut ints = |rows: usize, lim: i32, e: usize| {
                let mut x = Array2::<f64>::zeros((rows, k));
                for mut row in x.rows_mut() {
                    for _ in 0..8 {
                        row[rng.random_range(0..k)] = f64::from(rng.random_range(-lim..=lim));
                    }
                }
                if rows > 0 {
                    x[[0, rng.random_range(0..k)]] = f64::from(lim);
                }
                x * 2f64.powi(e as i32 % 3 - 1)
            };
            let a_parts: Vec<Array2<f64>> = (0..experts).map(|e| ints(rows[e], lim_a, e)).collect();
            let b_parts: Vec<Array2<f64>> = (0..experts).map(|e| ints(n, lim_b, e + 1)).collect();
            let cat = |parts: &[Array2<f64>]| {
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                ndarray::concatenate(ndarray::Axis(0), &views).expect("concatenate")
            };
            let (a, b) = (cat(&a_parts), cat(&b_parts));
            let prods: Vec<Array2<f64>> = (0..experts).map(|e| a_parts[e].dot(&b_parts[e].t())).collect();
            let (amap, bmap) = (
                SegmentMap::new(&mut eng, &rows).expect("map"),
                SegmentMap::new(&mut eng, &vec![n; experts]).expect("map"),
            );
            let (ia, ib) = (upload(&mut eng, &a, Dtype::Bf16), upload(&mut eng, &b, Dtype::Bf16));
            let qa = eng.quantize_segments(&ia, Dtype::Bf16, &amap, k, fa, options, false).expect("qa");
            let qb = eng.quantize_segments(&ib, Dtype::Bf16, &bmap, k, Fp8Format::E4M3, options, false).expect("qb");
            for out_dt in [Dtype::Bf16, Dtype::F16] {
                for fast in [false, true] {
                    for beta in [0.0f32, 1.0] {
                        // beta 1 adds onto small integers (exact in both dtypes); beta 0 writes
                        // over NaN bytes.
                        let old =
                            Array2::from_shape_fn((total + guard, n), |(i, j)| ((i * 7 + j * 3) % 9) as f64 - 4.0);
                        let mut expected = old.clone();
                        for (e, prod) in prods.iter().enumerate() {
                            let mut dst = expected.slice_mut(ndarray::s![offsets[e]..offsets[e] + rows[e], ..]);
                            if beta == 0.0 {
                                dst.assign(prod);
                            } else {
                                dst += prod;
                            }
                        }
                        let issues: &[Fp8Issue] = if beta == 0.0 {
                            &[Fp8Issue::Persistent, Fp8Issue::Direct]
                        } else {
                            &[Fp8Issue::Persistent]
                        };
                        for &issue in issues {
                            let what = format!(
                                "{issue:?} experts {rows:?} n {n} k {k} {fa}xe4m3 -> {out_dt} fast_accum={fast} beta={beta}"
                            );
                            let mut c = upload(&mut eng, &old, out_dt);
                            if beta == 0.0 {
                                eng.poison(&mut c).expect("poison");
                            }
                            let ops: Vec<_> = (0..experts)
                                .map(|e| {
                                    eng.fp8_gemm_op(
                                        (rows[e], n, k),
                                        (qa.codes.at(offsets[e] * k), fa, qa.scale_inv_at(e)),
                                        (qb.codes.at(e * n * k), Fp8Format::E4M3, qb.scale_inv_at(e)),
                                        c.at(offsets[e] * n * out_dt.size_bytes()),
                                        out_dt,
                                        beta,
                                        fast,
                                    )
                                    .unwrap_or_else(|err| panic!("{what}: {err}"))
                                })
                                .collect();
                            eng.run_fp8_ops(&ops, issue).unwrap_or_else(|err| panic!("{what}: {err}"));
                            if issue == Fp8Issue::Persistent {
                                launches_expected += rows.iter().filter(|&&r| r > 0).count().div_ceil(128);
                            }
                            let bytes = eng.download(&c).expect("download");
                            let got =
                                moe_reference::codec::from_bytes(out_dt, &bytes[..total * n * out_dt.size_bytes()]);
                            let want = expected.slice(ndarray::s![..total, ..]).to_owned();
                            assert_bits_equal_the_exact_model_in(out_dt, &what, &got, &want, &want);
                            let guard_bytes = &bytes[total * n * out_dt.size_bytes()..];
                            let guard_want = if beta == 0.0 {
                                vec![0xFF; guard_bytes.len()]
                            } else {
                                to_bytes(out_dt, old.slice(ndarray::s![total.., ..]).iter().copied())
                            };
                            assert!(
                                guard_bytes == guard_want.as_slice(),
                                "{what}: rows past the last expert were written"
                            );
                        }
                    }
                }
            }
        }
    }
    let launched = eng.fp8_grouped_kernel_launches() - before;
    assert_eq!(
        launched, launches_expected as u64,
        "every Persistent list must run on the kernel, none on the fallback"
    );
}

/// `k = 0` writes exact zeros, `m = 0` writes nothing, and e5m2 × e5m2 (which cuBLASLt does not
/// run) is a declared `Unsupported`, not an error or a wrong result.
#[test]
fn fp8_gemm_edge_shapes_and_refusals() {
    let Some(gpu) = gpu("fp8_gemm_edge_shapes_and_refusals") else { return };
    let mut eng = gpu.lock().expect("engine");
    let codes = eng.alloc(16 * 16).expect("codes");
    let scale = eng.upload(&1f32.to_le_bytes()).expect("scale");
    let mut out = eng.alloc(16 * 16 * 2).expect("out");
    eng.poison(&mut out).expect("poison");
    let a = (codes.at(0), Fp8Format::E4M3, scale.at(0));
    eng.fp8_gemm((16, 16, 0), a, a, out.at(0), Dtype::Bf16, 0.0, false).expect("k = 0");
    assert!(eng.download(&out).expect("download").iter().all(|&b| b == 0), "k = 0 must write exact zeros");
    eng.poison(&mut out).expect("poison");
    eng.fp8_gemm((0, 16, 16), a, a, out.at(0), Dtype::Bf16, 0.0, false).expect("m = 0");
    assert!(eng.download(&out).expect("download").iter().all(|&b| b == 0xFF), "m = 0 must write nothing");
    let e5 = (codes.at(0), Fp8Format::E5M2, scale.at(0));
    let err = eng.fp8_gemm((16, 16, 16), e5, e5, out.at(0), Dtype::Bf16, 0.0, false).expect_err("e5m2 x e5m2");
    assert!(matches!(err, moe_gpu::GpuError::Unsupported(_)), "{err}");
}

/// The block-scaled GEMM's operand pairs the layers issue (TE's blockwise recipe): fprop and
/// dgrad (`A` 1×128, `B` 128×128) and wgrad (both 1×128), with the formats they meet (HYBRID
/// dgrad and wgrad: e5m2 gradients).
const BLOCK_PAIRS: [(BlockTile, Fp8Format, BlockTile, Fp8Format); 4] = [
    (BlockTile::Row1x128, Fp8Format::E4M3, BlockTile::Square128, Fp8Format::E4M3),
    (BlockTile::Row1x128, Fp8Format::E5M2, BlockTile::Square128, Fp8Format::E4M3),
    (BlockTile::Row1x128, Fp8Format::E4M3, BlockTile::Row1x128, Fp8Format::E4M3),
    (BlockTile::Row1x128, Fp8Format::E5M2, BlockTile::Row1x128, Fp8Format::E4M3),
];

/// The reference operand of the `[rows, k]` tensor `x` (rowwise) or of `xᵀ` for a `[k, rows]`
/// tensor (`columnwise`), block-quantized as the GPU's [`Engine::block_operands`] does.
fn block_reference(x: &Array2<f64>, format: Fp8Format, tile: BlockTile, columnwise: bool) -> GemmOperand {
    let mut q = BlockQuantizer { format, tile, options: ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 } };
    let x32 = x.mapv(|v| v as f32);
    let usage = if columnwise { Usage::COLUMNWISE } else { Usage::ROWWISE };
    let t = q.quantize("gemm operand", x32.view(), Dtype::Bf16, usage).expect("reference quantize");
    let t = if columnwise { t.columnwise } else { t.rowwise };
    GemmOperand::from_fp8(&t.expect("copy"), Fp8Recipe::Blockwise)
}

/// The block-scaled GEMM `A·Bᵀ` of `qa` and `qb` into a `[m, n]` bf16 output poisoned with NaN
/// bytes first (an output the GEMM leaves unwritten fails every comparison), downloaded.
fn block_gemm(eng: &mut Engine, qa: &BlockOperand, qb: &BlockOperand, (m, n): (usize, usize), what: &str) -> Vec<f64> {
    let mut out = eng.alloc(m * n * 2).expect("out");
    eng.poison(&mut out).expect("poison");
    eng.fp8_block_gemm(qa, qb, out.at(0), Dtype::Bf16, 0.0).unwrap_or_else(|e| panic!("{what}: {e}"));
    download_bf16(eng, &out)
}

/// Block-scaled operands whose GEMM is exact in any summation order, with a different
/// power-of-2 scale in every block: each block holds integers (at most 8 non-zero per 128-wide K
/// block and row, one pinning the block's amax to the format's limit) times `2^e`, `e` drawn per
/// block in -2..=2. Every code is the integer times a power of two, every tile's
/// partial sum is an exact integer below 2^11 (within the ~14 bits Hopper's fp8 MMA keeps), the
/// dequantization factors are powers of two and the sum over tiles needs under 24 bits; so
/// cuBLASLt's bf16 output must equal the reference's split-accumulation model bit for bit. A
/// scale read from the wrong block (a transposed or unpadded scale layout, the 1×128 and
/// 128×128 layouts swapped) moves results by powers of two and fails.
#[test]
fn fp8_block_gemm_equals_the_reference_model_on_exact_operands() {
    let Some(gpu) = gpu("fp8_block_gemm_equals_the_reference_model_on_exact_operands") else { return };
    let mut eng = gpu.lock().expect("engine");
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let options = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
    // K: one partial tile, whole tiles, and 3 tiles (scale rows padded to 4) with a partial last;
    // rows across 128-row blocks of the 128x128 operand.
    for (m, n, k) in [(16usize, 32usize, 64usize), (136, 256, 256), (40, 144, 272), (264, 24, 400)] {
        for (ta, fa, tb, fb) in BLOCK_PAIRS {
            let make = |rows: usize, tile: BlockTile, f: Fp8Format, rng: &mut ChaCha8Rng| -> Array2<f64> {
                let lim = int_limit(f);
                let br = tile.dims()[0];
                let (gr, gc) = (rows.div_ceil(br), k.div_ceil(128));
                let exps = Array2::from_shape_fn((gr, gc), |_| rng.random_range(-2i32..=2));
                let mut x = Array2::<f64>::zeros((rows, k));
                for i in 0..rows {
                    for t in 0..gc {
                        let e = exps[[i / br, t]];
                        for kk in (t * 128..((t + 1) * 128).min(k)).take(8) {
                            x[[i, kk]] = f64::from(rng.random_range(-lim..=lim)) * 2f64.powi(e);
                        }
                        // The block's first row pins its amax (a 128x128 block: one row for all).
                        if i % br == 0 {
                            x[[i, t * 128]] = f64::from(lim) * 2f64.powi(e);
                        }
                    }
                }
                x
            };
            let a = make(m, ta, fa, &mut rng);
            let b = make(n, tb, fb, &mut rng);
            let what = format!("[{m}, {n}, {k}] {fa} {ta:?} x {fb} {tb:?}");
            let (ia, ib) = (upload(&mut eng, &a, Dtype::Bf16), upload(&mut eng, &b, Dtype::Bf16));
            let (qa, _) = eng.block_operands(ia.at(0), Dtype::Bf16, (m, k), fa, ta, options).expect("qa");
            let (qb, _) = eng.block_operands(ib.at(0), Dtype::Bf16, (n, k), fb, tb, options).expect("qb");
            let got = block_gemm(&mut eng, &qa, &qb, (m, n), &what);
            let model = fp8_gemm(&block_reference(&a, fa, ta, false), &block_reference(&b, fb, tb, false));
            assert_bits_equal_the_exact_model(&what, &got, &model, &a.dot(&b.t()));
        }
    }
}

/// Block-scaled GEMMs on ordinary (random normal) operands, the wgrad pairs from columnwise
/// copies: cuBLASLt's result and the reference's split-accumulation model each stay within the
/// error model's bound of the exact product of the quantized operands (one output rounding plus
/// the blockwise fp8 GEMM accumulation term `1.5·(√K_acc·2⁻¹³ + 2·u_f32·(⌈K/32⌉ + 1))·Σ|a·b|`,
/// `K_acc` at most one 128-wide scale block, `moe_harness::tolerance::fp8_accumulation`, under
/// `Tolerance::error_model`). Hopper's fp8 tensor cores keep
/// fewer bits than f32 inside a 128-wide tile, so bit equality with the model is not expected
/// here; how many outputs match it bit for bit is printed.
#[test]
fn fp8_block_gemm_stays_within_the_error_model_on_random_operands() {
    let Some(gpu) = gpu("fp8_block_gemm_stays_within_the_error_model_on_random_operands") else { return };
    let mut eng = gpu.lock().expect("engine");
    let options = ScaleOptions { force_pow_2_scales: true, amax_epsilon: 0.0 };
    for (m, n, k) in [(128usize, 256usize, 384usize), (48, 144, 272)] {
        for (ta, fa, tb, fb) in BLOCK_PAIRS {
            // wgrad operands are the columnwise copies of [k, rows] tensors.
            let columnwise = tb == BlockTile::Row1x128;
            let shape = |rows: usize| if columnwise { (k, rows) } else { (rows, k) };
            let a = tensor("normal", shape(m).0, shape(m).1, Dtype::Bf16, (m + k) as u64);
            let b = tensor("wide_range", shape(n).0, shape(n).1, Dtype::Bf16, (n * k) as u64);
            let what = format!("[{m}, {n}, {k}] {fa} {ta:?} x {fb} {tb:?} columnwise={columnwise}");
            let (ia, ib) = (upload(&mut eng, &a, Dtype::Bf16), upload(&mut eng, &b, Dtype::Bf16));
            let pick = |p: (BlockOperand, BlockOperand)| if columnwise { p.1 } else { p.0 };
            let qa = pick(eng.block_operands(ia.at(0), Dtype::Bf16, a.dim(), fa, ta, options).expect("qa"));
            let qb = pick(eng.block_operands(ib.at(0), Dtype::Bf16, b.dim(), fb, tb, options).expect("qb"));
            let got = block_gemm(&mut eng, &qa, &qb, (m, n), &what);
            let (ra, rb) = (block_reference(&a, fa, ta, columnwise), block_reference(&b, fb, tb, columnwise));
            let model = fp8_gemm(&ra, &rb);
            let deq = |o: &GemmOperand| {
                Array2::from_shape_fn(o.data.dim(), |(i, kk)| {
                    f64::from(o.data[[i, kk]]) * f64::from(o.scale_inv[[i, kk / o.tile]])
                })
            };
            let (da, db) = (deq(&ra), deq(&rb));
            let (exact, sum_abs) = (da.dot(&db.t()), da.mapv(f64::abs).dot(&db.mapv(f64::abs).t()));
            let tol = Tolerance::error_model();
            let mut same = 0;
            let mut worst = 0f64;
            for ((i, j), &x) in exact.indexed_iter() {
                // The error model's blockwise fp8 GEMM term (K_acc = one 128-wide scale block).
                let acc = tolerance::fp8_accumulation(k, sum_abs[[i, j]], Fp8Recipe::Blockwise);
                let bound = tol.bound(tolerance::rounding(Dtype::Bf16, x) + acc, 0.0);
                worst = worst.max((got[i * n + j] - x).abs() / bound);
                let (g, w) = (got[i * n + j], round(Dtype::Bf16, model[[i, j]]));
                assert!((g - x).abs() <= bound, "{what}: C[{i}, {j}] = {g} on the GPU, exact {x}, bound {bound}");
                assert!((w - x).abs() <= bound, "{what}: C[{i}, {j}] = {w} in the model, exact {x}, bound {bound}");
                same += usize::from(g.to_bits() == w.to_bits());
            }
            eprintln!(
                "gpu_fp8 block GEMM {what}: {same} of {} outputs equal the split model bit for bit; worst GPU error / bound {worst:.3}",
                m * n
            );
        }
    }
}

/// A small fp8 configuration the GPU path runs (h, N1, N2 multiples of 16).
fn fp8_cfg(class: LayerClass, format: TeFormat) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: 4,
        hidden_size: 32,
        ffn_hidden_size: 48,
        fp8: Some(Fp8Config::new(Fp8Recipe::Tensorwise).with_format(format)),
        ..LayerConfig::example()
    }
}

/// The fp8 CUDA layers (NaN-poisoned buffers) as a harness backend.
fn fp8_backend(gpu: &Gpu) -> PerClassBackend {
    fp8_backend_with(gpu, moe_gpu::Strategy::Auto)
}

/// [`fp8_backend`] issuing its GEMMs with `strategy`.
fn fp8_backend_with(gpu: &Gpu, strategy: moe_gpu::Strategy) -> PerClassBackend {
    PerClassBackend::new(
        "cuda-fp8",
        Some(Box::new(CudaSequential::new(gpu).with_poison(true).with_strategy(strategy))),
        None,
        Some(Box::new(CudaTeGrouped::new(gpu).with_poison(true).with_strategy(strategy))),
    )
}

/// Checks every property of `case` on `backend`, counting the checks and collecting the
/// skips; matches-oracle must be checked, never skipped.
fn check_every_property(backend: &PerClassBackend, case: &Case, checked: &mut usize, skipped: &mut Vec<String>) {
    for property in Property::ALL {
        match check(backend, property, case) {
            Ok(Verdict::Checked(_)) => *checked += 1,
            Ok(Verdict::Skipped(why)) => {
                assert_ne!(property, Property::MatchesOracle, "{}: skipped: {why}", case.summary());
                skipped.push(format!("{} on {}: {why}", property.name(), case.summary()));
            }
            Err(e) => panic!("cuda-fp8 fails {} on {}:\n{e}", property.name(), case.summary()),
        }
    }
}

/// The fp8 recipes the CUDA layers run: per-tensor current scaling, delayed scaling (from TE's
/// initial state in a stateless call: scale 1) and blockwise (1×128 / 128×128 blocks,
/// block-scaled cuBLASLt GEMMs).
const RECIPES: [Fp8Recipe; 3] = [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed, Fp8Recipe::Blockwise];

/// The fp8 CUDA layers of SequentialMLP and TEGroupedMLP under each recipe the GPU runs
/// ([`RECIPES`]), both formats, immediate and deferred wgrad, with bias, probs on the input,
/// expert parallelism and the other power-of-2 setting, on unaligned splits (padded by the
/// layer) with an empty expert, and for blockwise a layer wider than one 128-block: every §10 property against the
/// unquantized f64 oracle under the fp8 error model (`moe_harness::properties::check`; no
/// tolerance here). matches-oracle must be checked, never skipped: a GPU layer that declared
/// the case unsupported fails.
#[test]
fn fp8_layers_pass_every_property_against_the_oracle() {
    let Some(gpu) = gpu("fp8_layers_pass_every_property_against_the_oracle") else { return };
    let backend = fp8_backend(&gpu);
    let mut checked = 0;
    let mut skipped = Vec::new();
    for (recipe, class, format) in RECIPES
        .into_iter()
        .flat_map(|r| [LayerClass::Sequential, LayerClass::TeGrouped].map(move |c| (r, c)))
        .flat_map(|(r, c)| TeFormat::ALL.map(move |f| (r, c, f)))
    {
        {
            let base = LayerConfig { fp8: Some(Fp8Config::new(recipe).with_format(format)), ..fp8_cfg(class, format) };
            let f = base.fp8.expect("fp8");
            let small = [5i64, 0, 19, 8];
            // Blockwise: K and rows past one 128-wide block (several K tiles, a partial last
            // tile, 1×128 columnwise blocks across the 128-row boundary of an expert).
            let wide = [133i64, 0, 19, 260];
            let mut variants = vec![
                (base.clone(), small),
                (
                    LayerConfig {
                        add_bias: true,
                        gated_linear_unit: false,
                        activation: Activation::Gelu,
                        ..base.clone()
                    },
                    small,
                ),
                (LayerConfig { apply_probs_on_input: true, ..base.clone() }, small),
                (LayerConfig { parallel: Parallelism { ep_size: 2, ..Default::default() }, ..base.clone() }, small),
                (
                    LayerConfig { fp8: Some(Fp8Config { power_2_scales: !f.power_2_scales, ..f }), ..base.clone() },
                    small,
                ),
            ];
            if recipe == Fp8Recipe::Blockwise {
                variants.push((
                    LayerConfig { hidden_size: 272, ffn_hidden_size: 144, add_bias: true, ..base.clone() },
                    wide,
                ));
            }
            for (cfg, tokens) in variants {
                for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
                    let case = Case { cfg: cfg.clone(), tokens_per_expert: tokens.to_vec(), seed: 7, timing };
                    check_every_property(&backend, &case, &mut checked, &mut skipped);
                }
            }
        }
    }
    eprintln!(
        "gpu_fp8::fp8_layers_pass_every_property_against_the_oracle: {checked} checks passed, {} skipped:",
        skipped.len()
    );
    for s in &skipped {
        eprintln!("  skipped {s}");
    }
}

/// The fp8 layers on the fp8 grouped GEMM (`Strategy::Persistent`; the per-tensor recipes, the
/// ones it runs), held to every property against the oracle like the cuBLASLt path above: both
/// classes and formats, immediate and deferred wgrad, with TEGroupedMLP's fc1 bias (its GEMM
/// adds onto the bias rows, beta 1) and without, on ragged splits with an empty expert and on a
/// uniform split (equal padded rows: the weight-gradient GEMMs' columnwise operands then form
/// one tensor and run on the kernel too, K = the tokens). The kernel must have launched.
#[test]
fn fp8_layers_on_the_grouped_kernel_pass_every_property_against_the_oracle() {
    let Some(gpu) = gpu("fp8_layers_on_the_grouped_kernel_pass_every_property_against_the_oracle") else { return };
    let backend = fp8_backend_with(&gpu, moe_gpu::Strategy::Persistent(0));
    let before = gpu.lock().expect("engine").fp8_grouped_kernel_launches();
    let (mut checked, mut skipped) = (0, Vec::new());
    for recipe in [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed] {
        for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
            for format in TeFormat::ALL {
                let base =
                    LayerConfig { fp8: Some(Fp8Config::new(recipe).with_format(format)), ..fp8_cfg(class, format) };
                let bias = LayerConfig { add_bias: true, ..base.clone() };
                for (cfg, tokens) in [(base, [5i64, 0, 19, 8]), (bias.clone(), [5, 0, 19, 8]), (bias, [16, 16, 16, 16])]
                {
                    for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
                        let case = Case { cfg: cfg.clone(), tokens_per_expert: tokens.to_vec(), seed: 9, timing };
                        check_every_property(&backend, &case, &mut checked, &mut skipped);
                    }
                }
            }
        }
    }
    let launched = gpu.lock().expect("engine").fp8_grouped_kernel_launches() - before;
    eprintln!(
        "gpu_fp8::fp8_layers_on_the_grouped_kernel_pass_every_property_against_the_oracle: {checked} checks passed, {} skipped, {launched} kernel launches",
        skipped.len()
    );
    assert!(launched > 0, "the fp8 grouped GEMM never ran");
}

/// An expert with no tokens gets exactly zero weight gradients from the fp8 wgrad GEMMs (K = 0
/// writes zeros; the poisoned buffer would show NaN otherwise), immediate and deferred.
#[test]
fn fp8_zero_token_experts_get_exactly_zero_weight_grads() {
    let Some(gpu) = gpu("fp8_zero_token_experts_get_exactly_zero_weight_grads") else { return };
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        let cfg = LayerConfig { add_bias: true, ..fp8_cfg(class, TeFormat::Hybrid) };
        let layer: Box<dyn ExpertLayer> = match class {
            LayerClass::Sequential => Box::new(CudaSequential::new(&gpu).with_poison(true)),
            _ => Box::new(CudaTeGrouped::new(&gpu).with_poison(true)),
        };
        let case =
            Case { cfg: cfg.clone(), tokens_per_expert: vec![0, 21, 0, 11], seed: 3, timing: WgradTiming::Immediate };
        let problem = case.problem();
        let params = to_state_dict(&cfg, &problem.weights).expect("state dict");
        for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
            let run = layer
                .forward_backward(&cfg, &params, &problem.inputs, &problem.grad_output, timing)
                .unwrap_or_else(|e| panic!("{class:?} {timing:?}: {e}"));
            for e in [0usize, 2] {
                let (w1, b1, w2, b2) = moe_reference::state_dict::per_expert_names(class, e);
                for name in [w1, w2, b1, b2] {
                    let g = &run.weight_grads[&name];
                    assert!(
                        g.iter().all(|&v| v == 0.0 && v.is_sign_positive()),
                        "{class:?} {timing:?}: {name} not exactly +0"
                    );
                }
            }
            let (w1, _, _, _) = moe_reference::state_dict::per_expert_names(class, 1);
            assert!(run.weight_grads[&w1].iter().any(|&v| v != 0.0), "{class:?}: expert 1's grads must not be zero");
        }
    }
}

/// The recipes the GPU does not run are declared skips with their reason (counted as skips in
/// reports), never a bf16 run under an fp8 name nor an error: MXFP8 GEMMs are Blackwell-only in
/// cuBLASLt. GroupedMLP with fp8 is an invalid
/// configuration (no fp8 path), refused as such.
#[test]
fn unsupported_fp8_recipes_are_declared_skips() {
    let Some(gpu) = gpu("unsupported_fp8_recipes_are_declared_skips") else { return };
    let te = CudaTeGrouped::new(&gpu);
    let cfg =
        LayerConfig { fp8: Some(Fp8Config::new(Fp8Recipe::Mxfp8)), ..fp8_cfg(LayerClass::TeGrouped, TeFormat::E4M3) };
    match te.supports(&cfg) {
        Err(LayerError::Unsupported(why)) => assert!(why.contains("Blackwell"), "mxfp8: {why}"),
        other => panic!("mxfp8: expected a declared skip, got {other:?}"),
    }
    // GroupedMLP with fp8 is an invalid configuration (the reference's validation: it has no
    // fp8 path), refused as such rather than skipped.
    let grouped = CudaGrouped::new(&gpu);
    let cfg = LayerConfig { class: LayerClass::Grouped, ..fp8_cfg(LayerClass::Grouped, TeFormat::E4M3) };
    assert!(matches!(grouped.supports(&cfg), Err(LayerError::Invalid(_))), "GroupedMLP fp8 must be refused as invalid");
}

/// `bench layer --fp8` takes the reference's recipe names: an unknown one is a clear error
/// naming what was expected, exit 2, before any GPU is touched (runs on every machine).
#[test]
fn bench_layer_refuses_an_unknown_fp8_recipe() {
    let bin = crate::moe_verify_bin();
    let out = std::process::Command::new(&bin)
        .args(["bench", "layer", "--fp8", "fp9"])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("fp9") && stderr.contains("tensorwise, delayed, blockwise or mxfp8"), "stderr: {stderr}");
}

/// The bit-exact comparison the GPU tests use fails on one flipped code, one scale off by an
/// ulp, and one E8M0 exponent off by one (planted on reference output; runs on every machine):
/// the GPU checks above cannot pass by comparing loosely.
#[test]
fn the_bit_exact_comparison_fails_on_one_wrong_code_or_scale() {
    let x = tensor("normal", 64, 128, Dtype::Bf16, 5);
    let x32 = x.mapv(|v| v as f32);
    let quantize = |q: &mut dyn Fp8Quantizer| {
        q.quantize("x", x32.view(), Dtype::Bf16, Usage::ROWWISE).expect("quantize").rowwise.expect("rowwise")
    };
    let current = quantize(&mut CurrentScalingQuantizer::new(Fp8Format::E4M3));
    let block = quantize(&mut BlockQuantizer::new(Fp8Format::E4M3, BlockTile::Row1x128));
    let mx = quantize(&mut Mxfp8Quantizer::new(Fp8Format::E5M2));
    let fails = |good: &Fp8Tensor, bad: Fp8Tensor| {
        assert_same("identical", good, good, &x, false);
        std::panic::catch_unwind(|| assert_same("planted", &bad, good, &x, false)).is_err()
    };
    let mut code = current.clone();
    code.data[[3, 7]] ^= 1;
    assert!(fails(&current, code), "a flipped code must fail");
    let mut scale = current.clone();
    if let Scales::PerTensor { scale_inv } = &mut scale.scales {
        *scale_inv = f32::from_bits(scale_inv.to_bits() + 1);
    }
    assert!(fails(&current, scale), "a scale_inv one ulp off must fail");
    let mut bscale = block.clone();
    if let Scales::Block { scale_inv, .. } = &mut bscale.scales {
        scale_inv[[5, 0]] *= 2.0;
    }
    assert!(fails(&block, bscale), "a block scale off by 2x must fail");
    let mut exp = mx.clone();
    if let Scales::E8m0 { exponents, .. } = &mut exp.scales {
        exponents[[1, 2]] += 1;
    }
    assert!(fails(&mx, exp), "an E8M0 exponent off by one must fail");
}

/// The bit-exact comparison of the exact-operand GEMM tests fails on one output off by a bf16
/// ulp and on a reference model that is not the exact product (planted on host values; runs on
/// every machine): those GPU checks cannot pass by comparing loosely.
#[test]
fn the_gemm_bit_comparison_fails_on_one_wrong_output_or_an_inexact_model() {
    let a = Array2::from_shape_fn((3, 8), |(i, k)| f64::from(int_limit(Fp8Format::E4M3)) - (i * 8 + k) as f64);
    let b = Array2::from_shape_fn((5, 8), |(j, k)| f64::from(int_limit(Fp8Format::E5M2)) - (j + k) as f64);
    let exact = a.dot(&b.t());
    let got: Vec<f64> = exact.iter().map(|&v| round(Dtype::Bf16, v)).collect();
    assert_bits_equal_the_exact_model("identical", &got, &exact, &exact);
    let fails = |got: &[f64], model: &Array2<f64>| {
        std::panic::catch_unwind(|| assert_bits_equal_the_exact_model("planted", got, model, &exact)).is_err()
    };
    let mut off = got.clone();
    // v·(1 + 2⁻⁷) is at least one bf16 ulp (2⁻⁷ relative at most) away from v = C[1, 2] = -12.
    off[7] = round(Dtype::Bf16, off[7] * (1.0 + 2f64.powi(-7)));
    assert!(fails(&off, &exact), "one output a bf16 ulp off must fail");
    let mut inexact = exact.clone();
    inexact[[2, 4]] += 0.5;
    assert!(fails(&got, &inexact), "a model that is not the exact product must fail");
}

/// A delayed-scaling layer configuration (history of 3 steps, so the roll is visible).
fn delayed_cfg(class: LayerClass, algo: AmaxComputeAlgo, margin: i32) -> LayerConfig {
    let mut f = Fp8Config::new(Fp8Recipe::Delayed).with_format(TeFormat::Hybrid);
    f.delayed = DelayedScalingConfig { margin, amax_history_len: 3, amax_compute_algo: algo };
    LayerConfig { fp8: Some(f), num_experts: 6, ..fp8_cfg(class, TeFormat::Hybrid) }
}

/// A state whose scales and histories are not TE's initial ones: scales from tiny (the cast
/// saturates nothing) to huge (it saturates everything), histories with zeros, an inf amax and a
/// last amax of 0 (the fused update then neither rolls nor rescales).
fn stirred_state(cfg: &LayerConfig, seed: u64) -> Fp8State {
    let mut state = Fp8State::new(cfg).expect("state");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = cfg.fp8.expect("fp8").delayed.amax_history_len;
    for e in 0..state.experts() {
        for op in Fp8Operand::ALL {
            let scale = match rng.random_range(0..4) {
                0 => 1.0,
                1 => 2f32.powi(rng.random_range(-20..20)),
                2 => 1e30,
                _ => rng.random_range(0.01f32..500.0),
            };
            let history: Vec<f32> = (0..len)
                .map(|i| match (e + i) % 5 {
                    0 => 0.0,
                    1 if op == Fp8Operand::Fc2Weight && e == 2 => f32::INFINITY,
                    _ => rng.random_range(0.0f32..8.0),
                })
                .collect();
            state.set(e, op, scale, &history).expect("set");
        }
    }
    state
}

/// Delayed scaling on the device, bit for bit: per-expert casts with the state's scale (each
/// segment = one local expert, empty ones included; codes, transposed codes and scale_inv
/// against `DelayedScaling::quantize` on that segment alone), the amaxes the casts record, and
/// TE's fused amax-and-scale update (`update_on_device` against `Fp8State::update`) for both
/// amax algorithms and a margin, from stirred states (saturating and tiny scales, zero and
/// infinite amaxes).
#[test]
fn delayed_scaling_casts_records_and_updates_like_the_reference() {
    let Some(gpu) = gpu("delayed_scaling_casts_records_and_updates_like_the_reference") else { return };
    let mut eng = gpu.lock().expect("engine");
    let lens = [0usize, 5, 17, 0, 48, 1];
    let cols = 80;
    let rows: usize = lens.iter().sum();
    let mut checked = 0;
    for (algo, margin) in [(AmaxComputeAlgo::Max, 0), (AmaxComputeAlgo::MostRecent, 2)] {
        let cfg = delayed_cfg(LayerClass::TeGrouped, algo, margin);
        for (k, op) in Fp8Operand::ALL.into_iter().enumerate() {
            let state = stirred_state(&cfg, 40 + k as u64);
            let dtype = if k % 2 == 0 { Dtype::Bf16 } else { Dtype::F32 };
            let x = tensor("wide_range", rows, cols, dtype, 9 + k as u64);
            let device_state = DeviceDelayedState::upload(&mut eng, &state).expect("upload state");
            let map = SegmentMap::new(&mut eng, &lens).expect("map");
            let input = upload(&mut eng, &x, dtype);
            let format = state.get(0, op).expect("state").format();
            let mut q = moe_gpu::fp8::SegmentedFp8::alloc(&mut eng, &map, cols, format).expect("alloc");
            eng.quantize_segments_into(&input, dtype, &map, SegmentScales::Delayed(&device_state, op), &mut q)
                .expect("quantize");
            eng.transpose_segments(&mut q, &map).expect("transpose");
            let codes = eng.download(&q.codes).expect("codes");
            let codes_t = eng.download(q.codes_t.as_ref().expect("transposed copy")).expect("codes_t");
            let inv = eng.download(&q.scale_inv).expect("scale_inv");
            let mut expected = state.clone();
            for (s, &off) in map.offsets().iter().enumerate() {
                let l = lens[s];
                let seg = x.slice(ndarray::s![off..off + l, ..]).mapv(|v| v as f32);
                let mut quantizer = expected.get(s, op).expect("state").clone();
                let r = quantizer.quantize("segment", seg.view(), dtype, Usage::BOTH).expect("reference");
                expected.set(s, op, quantizer.scale(), quantizer.amax_history()).expect("record");
                let (rw, cw) = (r.rowwise.expect("rowwise"), r.columnwise.expect("columnwise"));
                let what = format!("{algo:?} {} {dtype} segment {s} ({l} rows)", op.name());
                let at = 4 * moe_gpu::fp8::SCALE_STRIDE * s;
                let g_inv = f32::from_le_bytes([inv[at], inv[at + 1], inv[at + 2], inv[at + 3]]);
                let Scales::PerTensor { scale_inv } = rw.scales else { panic!("per-tensor scales expected") };
                assert_eq!(g_inv.to_bits(), scale_inv.to_bits(), "{what}: scale_inv");
                assert_eq!(&codes[off * cols..(off + l) * cols], rw.data.as_slice().expect("contiguous"), "{what}");
                assert_eq!(
                    &codes_t[off * cols..(off + l) * cols],
                    cw.data.as_standard_layout().as_slice().expect("contiguous"),
                    "{what}: transposed codes"
                );
                checked += 1;
            }
            let recorded = device_state.download(&mut eng).expect("download state");
            assert_eq!(recorded, expected, "{algo:?} {}: the recorded amaxes", op.name());
            let updated = moe_gpu::fp8::update_on_device(&mut eng, &recorded).expect("update");
            let mut host = recorded.clone();
            host.update();
            assert_eq!(updated, host, "{algo:?} margin {margin}: the fused amax-and-scale update");
        }
    }
    eprintln!("gpu_fp8::delayed_scaling_casts_records_and_updates_like_the_reference: {checked} segments equal");
}

/// The delayed fp8 layers over three steps, each from the state the previous step recorded and
/// the device update advanced (TE's loop: quantize with the current scales, record amaxes,
/// update after the step). Every step's results pass matches-oracle under the error model of
/// *that* state (`oracle_with_scales_fp8`), and the state the layer hands back is the one its
/// own tensors imply, bit for bit: amaxes of the input, weights and upstream gradient equal the
/// reference's; those of fc2's input and fc1's output gradient equal the amax of the layer's own
/// `u` and `da` of each expert (the reference's differ from them by the GEMMs' last bits).
#[test]
fn delayed_layers_carry_their_state_across_steps() {
    let Some(gpu) = gpu("delayed_layers_carry_their_state_across_steps") else { return };
    let exact_operands =
        [Fp8Operand::Fc1Input, Fp8Operand::Fc1Weight, Fp8Operand::Fc2Weight, Fp8Operand::Fc2GradOutput];
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        let cfg =
            LayerConfig { add_bias: class == LayerClass::TeGrouped, ..delayed_cfg(class, AmaxComputeAlgo::Max, 0) };
        let tokens = vec![5i64, 0, 19, 8, 16, 3];
        let case =
            Case { cfg: cfg.clone(), tokens_per_expert: tokens.clone(), seed: 21, timing: WgradTiming::Immediate };
        let problem = case.problem();
        let (inputs, grad) = (&problem.inputs, &problem.grad_output);
        let params = to_state_dict(&cfg, &problem.weights).expect("state dict");
        let (seq, te) = (CudaSequential::new(&gpu).with_poison(true), CudaTeGrouped::new(&gpu).with_poison(true));
        let mut state = Fp8State::new(&cfg).expect("initial state");
        for step in 0..3 {
            let what = format!("{class:?} step {step}");
            // The public API: results within the error model of this step's state.
            let (run, after) = match class {
                LayerClass::Sequential => {
                    seq.forward_backward_fp8(&cfg, &params, inputs, grad, WgradTiming::Immediate, &state)
                }
                _ => te.forward_backward_fp8(&cfg, &params, inputs, grad, WgradTiming::Immediate, &state),
            }
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let fp8_run = |s: &Fp8State| Some(Fp8Run { config: cfg.fp8.expect("fp8"), state: s.clone(), fault: None });
            let oracle = oracle_with_scales_fp8(&cfg, &params, inputs, grad, fp8_run(&state)).expect("oracle");
            let diffs = moe_harness::compare::compare_runs(
                &cfg,
                &run,
                &oracle.run,
                Some((&oracle).into()),
                Tolerance::error_model(),
            );
            for d in &diffs {
                assert!(d.passed(), "{what}: {d}");
            }
            // The same step on the device layer, to read its own u and da.
            let (u, da, device_after) = {
                let mut eng = gpu.lock().expect("engine");
                let layer = moe_gpu::layer::DeviceLayer::upload(&mut eng, &cfg, &params).expect("upload layer");
                let counts = moe_gpu::layer::segments(&cfg, &tokens, inputs.num_tokens()).expect("segments");
                let mut ws = layer.workspace(&mut eng, &counts, true).expect("workspace");
                ws.set_delayed_state(Some(DeviceDelayedState::upload(&mut eng, &state).expect("state")));
                ws.upload_inputs(&mut eng, &inputs.hidden_states, &inputs.probs, Some(grad)).expect("inputs");
                layer.forward(&mut eng, &mut ws, moe_gpu::Strategy::Auto).expect("forward");
                layer.backward(&mut eng, &mut ws, true, moe_gpu::Strategy::Auto).expect("backward");
                let u = ws.download_rows(&mut eng, &ws.u, cfg.n2(), cfg.params_dtype).expect("u");
                let da = ws.download_rows(&mut eng, &ws.da, cfg.n1(), cfg.params_dtype).expect("da");
                let after = ws.delayed_state().expect("state").download(&mut eng).expect("download state");
                // Every cast used this step's scale of its own tensor (not, say, a current scale).
                for op in Fp8Operand::ALL {
                    let used = layer.fp8_scale_inv(&mut eng, &ws, op).expect("scale_inv");
                    for (e, inv) in used.iter().enumerate() {
                        let want = state.get(e, op).expect("state").scale_inv();
                        assert_eq!(inv.to_bits(), want.to_bits(), "{what}: expert {e} {} scale_inv", op.name());
                    }
                }
                (u, da, after)
            };
            assert_eq!(device_after, after, "{what}: the device layer and the public API record alike");
            let (_, reference_after) = Reference::EMULATED
                .forward_backward_fp8(&cfg, &params, inputs, grad, WgradTiming::Immediate, fp8_run(&state))
                .expect("reference");
            let reference_after = reference_after.expect("reference state");
            let mut start = 0;
            for (e, &n) in tokens.iter().enumerate() {
                let n = n as usize;
                for op in exact_operands {
                    assert_eq!(after.get(e, op), reference_after.get(e, op), "{what}: expert {e} {}", op.name());
                }
                for (op, t) in [(Fp8Operand::Fc2Input, &u), (Fp8Operand::Fc1GradOutput, &da)] {
                    let own = amax(t.slice(ndarray::s![start..start + n, ..]).iter().map(|&v| v as f32));
                    let before = state.get(e, op).expect("state").amax_history()[0];
                    let got = after.get(e, op).expect("state after");
                    assert_eq!(
                        got.amax_history()[0].to_bits(),
                        before.max(own).to_bits(),
                        "{what}: expert {e} {}",
                        op.name()
                    );
                    assert_eq!(got.amax_history()[1..], state.get(e, op).expect("state").amax_history()[1..], "{what}");
                    assert_eq!(got.scale().to_bits(), state.get(e, op).expect("state").scale().to_bits(), "{what}");
                }
                start += n;
            }
            let mut eng = gpu.lock().expect("engine");
            let next = moe_gpu::fp8::update_on_device(&mut eng, &after).expect("update");
            let mut host = after.clone();
            host.update();
            assert_eq!(next, host, "{what}: the device update");
            assert_ne!(next, state, "{what}: the state must move between steps");
            state = next;
        }
    }
}

/// Why the device update is compared with the *fused* rule: TE's unfused Python update differs
/// from it (it rolls the history even when the step recorded no amax, and rounds the scale
/// twice), so an update kernel written after the Python code fails
/// `delayed_scaling_casts_records_and_updates_like_the_reference` on the stirred states, whose
/// zero last amaxes tell the two apart (runs on every machine).
#[test]
fn the_fused_and_unfused_delayed_updates_differ_on_the_stirred_states() {
    let cfg = delayed_cfg(LayerClass::TeGrouped, AmaxComputeAlgo::Max, 0);
    let state = stirred_state(&cfg, 40);
    let mut differ = 0;
    for e in 0..state.experts() {
        for op in Fp8Operand::ALL {
            let mut fused = state.get(e, op).expect("state").clone();
            let mut unfused = fused.clone();
            fused.update();
            unfused.update_unfused();
            differ += usize::from(fused != unfused);
        }
    }
    assert!(differ > 0, "the stirred states must tell the fused update from the unfused one");
}

/// The ways the fp8 layers issue their per-expert cuBLASLt GEMMs compute the same bits: one
/// cuBLASLt call after another (`loop`), one captured graph replayed (`graph1`), a graph of two
/// branches (`graph2`) and of four (`graph4`, `auto`'s graph), each called twice (the second call replays
/// the cached graph), tensorwise and delayed, with an empty expert (its wgrad a captured
/// memset) and deferred wgrad (the weight GEMMs captured in `backward_dw`). Again with the plans'
/// algorithms tuned (`LtAlgoChoice::Tuned`): a plan is tuned once, on its first call (here under
/// `loop`), and every way then runs what was chosen, so tuning must keep the ways' bits equal
/// and must have timed candidates (else this case tests nothing).
#[test]
fn fp8_gemm_issue_ways_compute_the_same_bits() {
    let Some(gpu) = gpu("fp8_gemm_issue_ways_compute_the_same_bits") else { return };
    for (recipe, choice) in [
        (Fp8Recipe::Tensorwise, LtAlgoChoice::Heuristic),
        (Fp8Recipe::Delayed, LtAlgoChoice::Heuristic),
        (Fp8Recipe::Tensorwise, LtAlgoChoice::Tuned(8)),
    ] {
        gpu.lock().expect("engine").set_fp8_algo_choice(choice).expect("algorithm choice");
        let cfg = LayerConfig {
            fp8: Some(Fp8Config::new(recipe).with_format(TeFormat::Hybrid)),
            num_experts: 6,
            ..fp8_cfg(LayerClass::TeGrouped, TeFormat::Hybrid)
        };
        let case = Case {
            cfg: cfg.clone(),
            tokens_per_expert: vec![5, 0, 19, 8, 16, 3],
            seed: 5,
            timing: WgradTiming::Deferred,
        };
        let problem = case.problem();
        let params = to_state_dict(&cfg, &problem.weights).expect("state dict");
        let run = |strategy: moe_gpu::Strategy| {
            let layer = CudaTeGrouped::new(&gpu).with_poison(true).with_strategy(strategy);
            let mut runs = Vec::new();
            for _ in 0..2 {
                let r = layer
                    .forward_backward(&cfg, &params, &problem.inputs, &problem.grad_output, WgradTiming::Deferred)
                    .unwrap_or_else(|e| panic!("{recipe} {strategy:?}: {e}"));
                runs.push(r);
            }
            runs
        };
        let base = run(moe_gpu::Strategy::Loop).remove(0);
        for strategy in [
            moe_gpu::Strategy::Loop,
            moe_gpu::Strategy::Graph(1),
            moe_gpu::Strategy::Graph(2),
            moe_gpu::Strategy::Graph(4),
        ] {
            for (call, r) in run(strategy).iter().enumerate() {
                for d in moe_harness::compare::compare_runs(&cfg, r, &base, None, Tolerance::EXACT) {
                    assert!(d.passed(), "{recipe} {choice:?} {strategy:?} call {call} differs from loop: {d}");
                }
            }
        }
        let tuned = gpu.lock().expect("engine").fp8_tuning_calls();
        assert_eq!(tuned > 0, choice != LtAlgoChoice::Heuristic, "{choice:?}: {tuned} timed tuning calls");
    }
}

/// What the fused activation quantization leaves on the device, downloaded: `u`, the codes,
/// the per-segment scale, scale_inv and amax (every scale on its own `SCALE_STRIDE` line), and
/// under delayed scaling the state's fc2-input scale and amax history per expert (f32 bits).
#[derive(Debug, Clone)]
struct ActQuantOutputs {
    u: Vec<u8>,
    codes: Vec<u8>,
    scale: Vec<u8>,
    scale_inv: Vec<u8>,
    amax: Vec<u8>,
    state: Vec<u32>,
}

/// Downloads what a fused activation quantization left: the activation output `u`, `t`'s codes,
/// scales, scale_invs and amaxes, and under delayed scaling (`delayed`: the state and the
/// operand) each of the `experts`' scale and amax history of that operand.
fn act_quant_outputs(
    eng: &mut Engine,
    u: &DeviceBuffer,
    t: &moe_gpu::fp8::SegmentedFp8,
    delayed: Option<(&DeviceDelayedState, Fp8Operand)>,
    experts: usize,
) -> ActQuantOutputs {
    let state = delayed.map_or_else(Vec::new, |(device_state, operand)| {
        let downloaded = device_state.download(eng).expect("state");
        (0..experts)
            .flat_map(|e| {
                let q = downloaded.get(e, operand).expect("state");
                std::iter::once(q.scale().to_bits())
                    .chain(q.amax_history().iter().map(|v| v.to_bits()))
                    .collect::<Vec<u32>>()
            })
            .collect()
    });
    ActQuantOutputs {
        u: eng.download(u).expect("u"),
        codes: eng.download(&t.codes).expect("codes"),
        scale: eng.download(&t.scale).expect("scale"),
        scale_inv: eng.download(&t.scale_inv).expect("scale_inv"),
        amax: eng.download(&t.amax).expect("amax"),
        state,
    }
}

/// The first byte at which `a` and `b` differ (0 when only their lengths do), or `None`.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(0))
}

/// The first field and byte at which `fused` differs from `unfused`, located as (row, column)
/// of `[rows, cols]` for `u` (`elem` bytes per element) and the codes, as a segment for the
/// scales: `Err` names it; `Ok` only when every byte is equal.
fn compare_act_quant(
    fused: &ActQuantOutputs,
    unfused: &ActQuantOutputs,
    cols: usize,
    elem: usize,
) -> Result<(), String> {
    let per_seg = 4 * moe_gpu::fp8::SCALE_STRIDE;
    let fields: [(&str, &[u8], &[u8], usize); 5] = [
        ("u", &fused.u, &unfused.u, elem),
        ("codes", &fused.codes, &unfused.codes, 1),
        ("scale", &fused.scale, &unfused.scale, 0),
        ("scale_inv", &fused.scale_inv, &unfused.scale_inv, 0),
        ("amax", &fused.amax, &unfused.amax, 0),
    ];
    for (name, a, b, elem) in fields {
        if let Some(i) = first_difference(a, b) {
            return Err(match (name, elem) {
                ("amax", _) => format!("amax of segment {} differs", i / 4),
                (_, 0) => format!("{name} of segment {} differs", i / per_seg),
                _ => format!("{name} [{}, {}] differs", i / elem / cols, i / elem % cols),
            });
        }
    }
    if let Some(i) = fused.state.iter().zip(&unfused.state).position(|(a, b)| a != b) {
        return Err(format!("delayed state word {i} (expert-major: scale then history) differs"));
    }
    Ok(())
}

/// The comparison of the fused-activation test fails on one wrong byte of any field it
/// compares (a `u` element, a code, a scale, a scale_inv, an amax, a state word), and names
/// it; it runs without a GPU.
#[test]
fn the_fused_activation_comparison_fails_on_one_wrong_byte() {
    const COLS: usize = 5;
    const ELEM: usize = 2;
    let rows = 3;
    let base = ActQuantOutputs {
        u: vec![1; rows * COLS * ELEM],
        codes: vec![2; rows * COLS],
        scale: vec![3; 2 * 4 * moe_gpu::fp8::SCALE_STRIDE],
        scale_inv: vec![4; 2 * 4 * moe_gpu::fp8::SCALE_STRIDE],
        amax: vec![5; 8],
        state: vec![6; 4],
    };
    assert_eq!(compare_act_quant(&base, &base.clone(), COLS, ELEM), Ok(()));
    type Plant = fn(&mut ActQuantOutputs);
    let planted: [(&str, Plant, &str); 6] = [
        ("u", |o| o.u[ELEM * (COLS + 3) + 1] ^= 1, "u [1, 3]"),
        ("codes", |o| o.codes[2 * COLS + 4] ^= 0x80, "codes [2, 4]"),
        ("scale", |o| o.scale[4 * moe_gpu::fp8::SCALE_STRIDE] ^= 1, "scale of segment 1"),
        ("scale_inv", |o| o.scale_inv[0] ^= 1, "scale_inv of segment 0"),
        ("amax", |o| o.amax[5] ^= 1, "amax of segment 1"),
        ("state", |o| o.state[3] ^= 1, "state word 3"),
    ];
    for (field, plant, named) in planted {
        let mut bad = base.clone();
        plant(&mut bad);
        let err = compare_act_quant(&bad, &base, COLS, ELEM).expect_err(field);
        assert!(err.contains(named), "{field}: {err}");
    }
}

/// The activation that quantizes its own output for fc2 (`Engine::act_fwd_quantized`, the
/// fused pass of the fp8 forward) leaves `u`, the codes, scales, amaxes and a delayed state
/// exactly as the activation alone (`Engine::act_fwd`) followed by the segmented quantizer
/// (`quantize_segments_into`, itself bit-exact with the reference quantizers) do: current and delayed scaling, e4m3 and
/// e5m2, the specialized path (TEGroupedMLP GLU silu) and the general one (SequentialMLP gelu,
/// its fc1 bias added in the kernel; eager and GroupedMLP-style fp32 rounding both come from
/// `ActParams`), bf16, fp16 and f32, 16-byte vectors (80 columns) and single elements (36:
/// not a multiple of 8), ragged segments with empty ones, a NaN and infinities in `a`, and
/// stirred delayed states (saturating and tiny scales).
#[test]
fn fused_activation_quantization_equals_the_quantizer_on_its_output() {
    let Some(gpu) = gpu("fused_activation_quantization_equals_the_quantizer_on_its_output") else { return };
    let mut eng = gpu.lock().expect("engine");
    let lens = [0usize, 5, 17, 0, 48, 1];
    let rows: usize = lens.iter().sum();
    let map = SegmentMap::new(&mut eng, &lens).expect("map");
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let probs: Vec<f32> = (0..rows).map(|_| rng.random_range(0.05f32..1.0)).collect();
    let p = eng.upload(&to_bytes(Dtype::F32, probs.iter().map(|&v| f64::from(v)))).expect("probs");
    let mut checked = 0;
    for (class, glu, activation) in
        [(LayerClass::TeGrouped, true, Activation::Silu), (LayerClass::Sequential, false, Activation::Gelu)]
    {
        for recipe in [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed] {
            for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
                for (n2, format) in [(80, Fp8Format::E4M3), (36, Fp8Format::E5M2), (80, Fp8Format::E5M2)] {
                    let cfg = LayerConfig {
                        gated_linear_unit: glu,
                        activation,
                        params_dtype: dtype,
                        ffn_hidden_size: n2,
                        ..delayed_cfg(class, AmaxComputeAlgo::Max, 0)
                    };
                    let n1 = if glu { 2 * n2 } else { n2 };
                    let mut a = tensor("normal", rows, n1, dtype, 40 + n2 as u64);
                    a[[6, 3]] = f64::NAN;
                    a[[30, 1]] = f64::INFINITY;
                    a[[70, 2]] = f64::NEG_INFINITY;
                    let b1 = (class == LayerClass::Sequential).then(|| {
                        let b = tensor("normal", lens.len(), n1, dtype, 7);
                        eng.upload(&to_bytes(dtype, b.iter().copied())).expect("b1")
                    });
                    let state = stirred_state(&cfg, 50 + n2 as u64);
                    let what = format!("{class} {recipe} {dtype} {format} n2={n2}");
                    let mut run = |fused: bool| -> ActQuantOutputs {
                        let mut a_dev = eng.upload(&to_bytes(dtype, a.iter().copied())).expect("a");
                        let mut u = eng.alloc(rows * n2 * dtype.size_bytes()).expect("u");
                        let mut t = moe_gpu::fp8::SegmentedFp8::alloc(&mut eng, &map, n2, format).expect("alloc");
                        let device_state = DeviceDelayedState::upload(&mut eng, &state).expect("state");
                        let scales = match recipe {
                            Fp8Recipe::Delayed => SegmentScales::Delayed(&device_state, Fp8Operand::Fc2Input),
                            _ => SegmentScales::Current(ScaleOptions::CURRENT_SCALING_DEFAULT),
                        };
                        if fused {
                            eng.act_fwd_quantized(
                                &cfg,
                                &mut a_dev,
                                b1.as_ref(),
                                &p,
                                &mut u,
                                dtype,
                                &map,
                                scales,
                                &mut t,
                            )
                            .unwrap_or_else(|e| panic!("{what}: fused: {e}"));
                        } else {
                            eng.act_fwd(&cfg, &mut a_dev, b1.as_ref(), &p, &mut u, dtype, &map, n2)
                                .unwrap_or_else(|e| panic!("{what}: activation: {e}"));
                            eng.quantize_segments_into(&u, dtype, &map, scales, &mut t)
                                .unwrap_or_else(|e| panic!("{what}: quantizer: {e}"));
                        }
                        let delayed = (recipe == Fp8Recipe::Delayed).then_some((&device_state, Fp8Operand::Fc2Input));
                        act_quant_outputs(&mut eng, &u, &t, delayed, lens.len())
                    };
                    let (fused, unfused) = (run(true), run(false));
                    compare_act_quant(&fused, &unfused, n2, dtype.size_bytes())
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let amaxes: Vec<f32> =
                        fused.amax.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    assert!(amaxes.iter().any(|&v| v > 0.0), "{what}: every amax is zero: {amaxes:?}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 36);
}

/// The activation backward that quantizes its own output for fc1's dgrad and wgrad GEMMs
/// (`Engine::act_bwd_quantized`, `act_bwd_q`: the fp8 backward's fused pass, with the columnwise
/// copy) leaves `da`, `dp`, the codes and their columnwise copy, scales, amaxes and a delayed
/// state exactly as the activation backward alone (`Engine::act_bwd`) followed by the segmented
/// quantizer and the transpose do (current scaling: the one-pass cast into both copies, 80
/// columns, and at 36 too; delayed: the kernel's codes, then the transpose). Why these cases: TEGroupedMLP's
/// GLU silu takes the specialised kernel path, SequentialMLP's gelu (no GLU: its unrounded
/// gate gradient must be rounded before its amax) the general one, GroupedMLP's fp32 chain the
/// other rounding; current and delayed scaling (amax only, and codes at stirred scales);
/// bf16, fp16, f32; 16-byte vectors (80 columns) and single elements (36); ragged segments
/// with empty ones; a NaN and infinities in `du`; an fc2 bias (the probs gradient's bias term).
#[test]
fn fused_activation_backward_quantization_equals_the_quantizer_on_its_output() {
    let Some(gpu) = gpu("fused_activation_backward_quantization_equals_the_quantizer_on_its_output") else { return };
    let mut eng = gpu.lock().expect("engine");
    let lens = [0usize, 5, 17, 0, 48, 1];
    let rows: usize = lens.iter().sum();
    let h = 24;
    let map = SegmentMap::new(&mut eng, &lens).expect("map");
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    let probs: Vec<f32> = (0..rows).map(|_| rng.random_range(0.05f32..1.0)).collect();
    let p = eng.upload(&to_bytes(Dtype::F32, probs.iter().map(|&v| f64::from(v)))).expect("probs");
    let mut checked = 0;
    for (class, glu, activation) in [
        (LayerClass::TeGrouped, true, Activation::Silu),
        (LayerClass::Sequential, false, Activation::Gelu),
        (LayerClass::Grouped, true, Activation::Silu),
    ] {
        for recipe in [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed] {
            for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
                for (n2, format) in [(80, Fp8Format::E5M2), (36, Fp8Format::E4M3)] {
                    let cfg = LayerConfig {
                        gated_linear_unit: glu,
                        activation,
                        params_dtype: dtype,
                        hidden_size: h,
                        ffn_hidden_size: n2,
                        add_bias: true,
                        ..delayed_cfg(class, AmaxComputeAlgo::Max, 0)
                    };
                    let n1 = if glu { 2 * n2 } else { n2 };
                    let a = tensor("normal", rows, n1, dtype, 80 + n2 as u64);
                    let mut du = tensor("normal", rows, n2, dtype, 90 + n2 as u64);
                    du[[6, 3]] = f64::NAN;
                    du[[30, 1]] = f64::INFINITY;
                    du[[70, 2]] = f64::NEG_INFINITY;
                    let g = tensor("normal", rows, h, dtype, 11);
                    let b2 = tensor("normal", lens.len(), h, dtype, 12);
                    let [a, du, g, b2] = [&a, &du, &g, &b2].map(|x| upload(&mut eng, x, dtype));
                    let state = stirred_state(&cfg, 60 + n2 as u64);
                    let what = format!("{class} {recipe} {dtype} {format} n2={n2}");
                    let mut run = |fused: bool| -> (ActQuantOutputs, Vec<u8>, Vec<u8>) {
                        let mut da = eng.alloc(rows * n1 * dtype.size_bytes()).expect("da");
                        let mut dp = eng.alloc(rows * 4).expect("dp");
                        let mut t = moe_gpu::fp8::SegmentedFp8::alloc(&mut eng, &map, n1, format).expect("alloc");
                        let device_state = DeviceDelayedState::upload(&mut eng, &state).expect("state");
                        let scales = match recipe {
                            Fp8Recipe::Delayed => SegmentScales::Delayed(&device_state, Fp8Operand::Fc1GradOutput),
                            _ => SegmentScales::Current(ScaleOptions::CURRENT_SCALING_DEFAULT),
                        };
                        let inputs = (&a, &du, &p, &g);
                        if fused {
                            eng.act_bwd_quantized(
                                &cfg,
                                inputs,
                                Some(&b2),
                                (&mut da, &mut dp),
                                dtype,
                                &map,
                                scales,
                                &mut t,
                                true,
                            )
                            .unwrap_or_else(|e| panic!("{what}: fused: {e}"));
                        } else {
                            eng.act_bwd(&cfg, inputs, Some(&b2), (&mut da, &mut dp), dtype, &map)
                                .unwrap_or_else(|e| panic!("{what}: activation backward: {e}"));
                            eng.quantize_segments_into(&da, dtype, &map, scales, &mut t)
                                .unwrap_or_else(|e| panic!("{what}: quantizer: {e}"));
                            eng.transpose_segments(&mut t, &map).unwrap_or_else(|e| panic!("{what}: transpose: {e}"));
                        }
                        let delayed =
                            (recipe == Fp8Recipe::Delayed).then_some((&device_state, Fp8Operand::Fc1GradOutput));
                        let out = act_quant_outputs(&mut eng, &da, &t, delayed, lens.len());
                        let codes_t = eng.download(t.codes_t.as_ref().expect("columnwise copy")).expect("codes_t");
                        (out, eng.download(&dp).expect("dp"), codes_t)
                    };
                    let ((fused, fused_dp, fused_t), (unfused, unfused_dp, unfused_t)) = (run(true), run(false));
                    compare_act_quant(&fused, &unfused, n1, dtype.size_bytes())
                        .map_err(|e| e.replacen("u [", "da [", 1))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    compare_fields(&[("dp", &fused_dp, &unfused_dp), ("columnwise codes", &fused_t, &unfused_t)])
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let amaxes: Vec<f32> =
                        fused.amax.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    assert!(amaxes.iter().any(|&v| v > 0.0), "{what}: every amax is zero: {amaxes:?}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 2 * 3 * 2);
}

/// The first of `fields` (name, got, expected bytes) whose bytes differ, named with the byte
/// index; `Ok` only when every field is equal, lengths included.
fn compare_fields(fields: &[(&str, &[u8], &[u8])]) -> Result<(), String> {
    for (name, got, want) in fields {
        if let Some(i) = first_difference(got, want) {
            return Err(format!("{name} byte {i}: {:?} against {:?}", got.get(i), want.get(i)));
        }
    }
    Ok(())
}

/// `compare_fields` (the blockwise fused activation test's comparison) fails on one wrong byte
/// of any field, or a length, and names the field and byte; it runs without a GPU.
#[test]
fn the_field_comparison_fails_on_one_wrong_byte_or_length() {
    let want: Vec<Vec<u8>> = vec![vec![1; 8], vec![2; 5], vec![3; 12]];
    let fields = |got: &[Vec<u8>]| -> Result<(), String> {
        let named: Vec<(&str, &[u8], &[u8])> =
            ["u", "codes", "scales"].iter().zip(got).zip(&want).map(|((n, g), w)| (*n, &g[..], &w[..])).collect();
        compare_fields(&named)
    };
    assert_eq!(fields(&want), Ok(()));
    for (k, at, name) in [(0, 7, "u byte 7"), (1, 0, "codes byte 0"), (2, 11, "scales byte 11")] {
        let mut bad = want.clone();
        bad[k][at] ^= 0x40;
        let err = fields(&bad).expect_err(name);
        assert!(err.contains(name), "{name}: {err}");
    }
    let mut short = want.clone();
    short[2].pop();
    assert!(fields(&short).expect_err("length").contains("scales"));
}

/// The activation that block-quantizes its own output for fc2 (`Engine::act_fwd_block_quantized`,
/// `act_fwd_blk`: the blockwise forward's fused pass) leaves `u`, `a` (SequentialMLP's fc1 bias
/// added in place) and both 1×128 operands of `u` (codes and scales, rowwise and columnwise,
/// padding included) exactly as the activation alone (`Engine::act_fwd`) followed by the
/// segmented block quantizer (`block_quantize_segments_into`, bit-exact with the reference
/// `BlockQuantizer` per segment) do. Both run `block_tile_quant` (the one-pass tile code in
/// `fp8_common.cuh`), the quantizer from a plain load: that one is held to the independent
/// per-segment quantizer by `segmented_block_quantizer_equals_the_per_segment_quantizer`, so
/// this test holds the activation source. Why these cases: the fused kernel computes the activation
/// by the general per-element code, so TEGroupedMLP's GLU silu (whose unfused kernel is the
/// specialised path), GroupedMLP's fp32 chain and SequentialMLP's gelu with its fc1 bias each
/// check that arithmetic; segments empty, under 4 rows (scale padding), over one and two
/// 128-row tiles and not multiples of 64 (partial row halves, byte stores) next to a map of
/// multiples of 16 (the layers' padded experts: 16-byte columnwise stores); widths 200 (a
/// partial 128-column block, 8-byte vectors of 4), 256 (two whole blocks) and 38 (not a
/// multiple of 4: the two-step fallback); bf16, fp16 and f32; both formats; power-of-2 and
/// exact scales; a NaN and infinities in `a`; and a second call into the same buffers.
#[test]
fn fused_block_activation_quantization_equals_the_block_quantizer_on_its_output() {
    let Some(gpu) = gpu("fused_block_activation_quantization_equals_the_block_quantizer_on_its_output") else {
        return;
    };
    let mut eng = gpu.lock().expect("engine");
    let mut checked = 0;
    for lens in [vec![0usize, 5, 130, 0, 3, 300, 128, 1], vec![16usize, 0, 160, 256, 32]] {
        let rows: usize = lens.iter().sum();
        let map = SegmentMap::new(&mut eng, &lens).expect("map");
        let mut rng = ChaCha8Rng::seed_from_u64(rows as u64);
        let probs: Vec<f32> = (0..rows).map(|_| rng.random_range(0.05f32..1.0)).collect();
        let p = eng.upload(&to_bytes(Dtype::F32, probs.iter().map(|&v| f64::from(v)))).expect("probs");
        for (class, glu, activation) in [
            (LayerClass::TeGrouped, true, Activation::Silu),
            (LayerClass::Grouped, true, Activation::Silu),
            (LayerClass::Sequential, false, Activation::Gelu),
        ] {
            for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
                for (n2, format, pow2) in
                    [(200, Fp8Format::E4M3, true), (256, Fp8Format::E5M2, false), (38, Fp8Format::E4M3, true)]
                {
                    let cfg = LayerConfig {
                        class,
                        gated_linear_unit: glu,
                        activation,
                        params_dtype: dtype,
                        num_experts: lens.len(),
                        ffn_hidden_size: n2,
                        fp8: Some(Fp8Config::new(Fp8Recipe::Blockwise)),
                        ..LayerConfig::example()
                    };
                    let options = ScaleOptions { force_pow_2_scales: pow2, amax_epsilon: 0.0 };
                    let n1 = if glu { 2 * n2 } else { n2 };
                    let b1 = (class == LayerClass::Sequential).then(|| {
                        let b = tensor("normal", lens.len(), n1, dtype, 9);
                        eng.upload(&to_bytes(dtype, b.iter().copied())).expect("b1")
                    });
                    let inputs: Vec<Array2<f64>> = (0..2)
                        .map(|call| {
                            let mut a = tensor("normal", rows, n1, dtype, 70 + n2 as u64 + call);
                            a[[6, 3]] = f64::NAN;
                            a[[140, 1]] = f64::INFINITY;
                            a[[rows - 2, n1 - 1]] = f64::NEG_INFINITY;
                            a
                        })
                        .collect();
                    let what = format!("{class} {dtype} {format} n2={n2} pow2={pow2} lens={lens:?}");
                    let mut run = |fused: bool| -> Vec<Vec<u8>> {
                        let mut u = eng.alloc(rows * n2 * dtype.size_bytes()).expect("u");
                        let mut t = moe_gpu::fp8::SegmentedBlockFp8::alloc(&mut eng, &map, n2, format).expect("alloc");
                        let mut out = Vec::new();
                        for a in &inputs {
                            let mut a_dev = upload(&mut eng, a, dtype);
                            if fused {
                                eng.act_fwd_block_quantized(
                                    &cfg,
                                    &mut a_dev,
                                    b1.as_ref(),
                                    &p,
                                    &mut u,
                                    dtype,
                                    &map,
                                    options,
                                    &mut t,
                                )
                                .unwrap_or_else(|e| panic!("{what}: fused: {e}"));
                            } else {
                                eng.act_fwd(&cfg, &mut a_dev, b1.as_ref(), &p, &mut u, dtype, &map, n2)
                                    .unwrap_or_else(|e| panic!("{what}: activation: {e}"));
                                eng.block_quantize_segments_into(&u, dtype, &map, options, &mut t)
                                    .unwrap_or_else(|e| panic!("{what}: quantizer: {e}"));
                            }
                            for b in [&a_dev, &u, &t.codes, &t.codes_t, &t.scale_inv, &t.scale_inv_t] {
                                out.push(eng.download(b).expect("download"));
                            }
                        }
                        out
                    };
                    let (fused, unfused) = (run(true), run(false));
                    let names = ["a", "u", "codes", "columnwise codes", "scales", "columnwise scales"];
                    let fields: Vec<(String, &[u8], &[u8])> = fused
                        .iter()
                        .zip(&unfused)
                        .enumerate()
                        .map(|(i, (f, u))| (format!("call {} {}", i / 6, names[i % 6]), &f[..], &u[..]))
                        .collect();
                    let named: Vec<(&str, &[u8], &[u8])> =
                        fields.iter().map(|(n, f, u)| (n.as_str(), *f, *u)).collect();
                    compare_fields(&named).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(fused[3].iter().any(|&c| c != 0), "{what}: every code is zero");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 3 * 3 * 3);
}

/// The segmented 1×128 block quantizer (`Engine::block_quantize_segments_into`: every expert
/// of an activation or gradient tensor in one launch each way, the blockwise layers' quantizer)
/// writes, for each segment, exactly what `block_operands` makes of that segment alone (itself
/// bit-exact with the reference `BlockQuantizer`): rowwise and columnwise codes and their
/// scales in cuBLASLt's layout, padding zeros included. Ragged segments: empty ones, fewer
/// than 4 rows (scale padding), not multiples of 128 (partial column blocks), over 256 rows;
/// 200 columns (a partial row block; the one-pass kernel `block_quant_both128_seg`) and 202
/// (not a multiple of 4: the rowwise and columnwise kernels); segments of multiples of 16 rows
/// over whole 128-row tiles at 208 columns (the one-pass kernel's staged columnwise stores); bf16 and f32, e4m3 and e5m2,
/// power-of-2 and exact scales, stirred values (zeros, subnormals, infinities, NaN); and a
/// second call into the same buffers with other values (nothing stale may survive).
#[test]
fn segmented_block_quantizer_equals_the_per_segment_quantizer() {
    let Some(gpu) = gpu("segmented_block_quantizer_equals_the_per_segment_quantizer") else { return };
    let mut eng = gpu.lock().expect("engine");
    let mut checked = 0;
    for (lens, dtype, cols) in [
        (vec![0usize, 3, 130, 0, 16, 300, 128], Dtype::Bf16, 200),
        (vec![0, 3, 130, 0, 16, 300, 128], Dtype::F32, 200),
        (vec![0, 3, 130, 0, 16, 300, 128], Dtype::Bf16, 202),
        (vec![0, 3, 130, 0, 16, 300, 128], Dtype::F32, 202),
        (vec![16, 256, 0, 144, 32], Dtype::Bf16, 208),
    ] {
        let rows: usize = lens.iter().sum();
        let map = SegmentMap::new(&mut eng, &lens).expect("map");
        for format in Fp8Format::ALL {
            for pow2 in [true, false] {
                let options = ScaleOptions { force_pow_2_scales: pow2, amax_epsilon: 0.0 };
                let mut t = moe_gpu::fp8::SegmentedBlockFp8::alloc(&mut eng, &map, cols, format).expect("alloc");
                for (call, family) in ["inf_nan", "wide_range"].into_iter().enumerate() {
                    let x = tensor(family, rows, cols, dtype, 60 + call as u64);
                    let input = upload(&mut eng, &x, dtype);
                    eng.block_quantize_segments_into(&input, dtype, &map, options, &mut t).expect("segmented");
                    let got =
                        [&t.codes, &t.codes_t, &t.scale_inv, &t.scale_inv_t].map(|b| eng.download(b).expect("dl"));
                    for (s, &off) in map.offsets().iter().enumerate() {
                        let l = lens[s];
                        if l == 0 {
                            continue;
                        }
                        let what = format!("{dtype} {cols} cols {format} pow2={pow2} {family} segment {s} ({l} rows)");
                        let region = input.at(off * cols * dtype.size_bytes());
                        let (rw, cw) = eng
                            .block_operands(region, dtype, (l, cols), format, BlockTile::Row1x128, options)
                            .expect("per-segment");
                        let (rs, cs) = (t.rowwise(s).expect("rowwise"), t.columnwise(s).expect("columnwise"));
                        let expected =
                            [&rw.codes, &cw.codes, &rw.scale_inv, &cw.scale_inv].map(|b| eng.download(b).expect("dl"));
                        let starts =
                            [rs.codes.offset(), cs.codes.offset(), rs.scale_inv.offset(), cs.scale_inv.offset()];
                        for (k, name) in ["codes", "columnwise codes", "scales", "columnwise scales"].iter().enumerate()
                        {
                            let part = &got[k][starts[k]..starts[k] + expected[k].len()];
                            if let Some(i) = first_difference(part, &expected[k]) {
                                panic!(
                                    "{what}: {name} byte {i} is {:#04x}, per segment {:#04x}",
                                    part[i], expected[k][i]
                                );
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 4 * 2 * 2 * 2 * 5 + 2 * 2 * 2 * 4);
}
