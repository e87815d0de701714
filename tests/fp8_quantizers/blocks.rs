//! Block scaling (1×128 and 128×128 tiles, partial edges) and MXFP8 (E8M0 rounding, rowwise/columnwise).

use super::{pow2, q, E4M3, E5M2};

use half::bf16;
use moe_reference::fp8::{
    blockwise::BlockTile,
    codec::encode,
    mxfp8::{self, block_exponent, e8m0_to_f32, exp2f_rcp, float_to_e8m0, MxBlock, Mxfp8Quantizer},
    BlockQuantizer, ColumnwiseCopy, Fp8Format, Fp8Quantizer, Scales, Usage,
};
use moe_reference::{Dtype, ReferenceError};
use ndarray::{arr2, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Block scaling.
// ---------------------------------------------------------------------------------------------

#[test]
fn blockwise_1x128_partial_tiles_hand_case() {
    // Row 0: 1.0 except x[0][5] = 3; the partial tile (columns 128, 129) holds 0.25 and -0.125.
    // Row 1: zeros.
    let mut x = Array2::<f32>::zeros((2, 130));
    x.row_mut(0).fill(1.0);
    x[[0, 5]] = 3.0;
    x[[0, 128]] = 0.25;
    x[[0, 129]] = -0.125;
    let mut quant = BlockQuantizer::new(E4M3, BlockTile::Row1x128);
    let (row, col) = q(&mut quant, &x, Dtype::Bf16, Usage::BOTH);
    let row = row.unwrap();
    // Tile (0,0): amax 3 → 149.33 → power of 2: 128. 1·128 = 0x70, 3·128 = 384 = 1.5·2^8 = 0x7C.
    // Tile (0,1): amax 0.25 → 1792 → 1024. 0.25·1024 = 256 = 0x78, -0.125·1024 = 0xF0.
    // Row 1: amax 0 → scale 1, codes 0.
    let Scales::Block { rows: 1, cols: 128, scale_inv } = &row.scales else { panic!("{:?}", row.scales) };
    assert_eq!(scale_inv, &arr2(&[[1.0 / 128.0, 1.0 / 1024.0], [1.0, 1.0]]));
    assert_eq!(row.data[[0, 0]], 0x70);
    assert_eq!(row.data[[0, 5]], 0x7C);
    assert_eq!((row.data[[0, 128]], row.data[[0, 129]]), (0x78, 0xF0));
    assert!(row.data.row(1).iter().all(|&c| c == 0));
    // Columnwise: re-quantized per column (128×1 tiles of x, partial: 2 rows), shape [130, 2].
    let col = col.unwrap();
    assert_eq!(col.shape(), [130, 2]);
    let Scales::Block { rows: 1, cols: 128, scale_inv } = &col.scales else { panic!("{:?}", col.scales) };
    assert_eq!(scale_inv.shape(), &[130, 1]);
    // Column 0: [1, 0] → 448 → 256; column 5: [3, 0] → 128; column 129: [-0.125, 0] → 3584 → 2048.
    assert_eq!((scale_inv[[0, 0]], scale_inv[[5, 0]], scale_inv[[129, 0]]), (1.0 / 256.0, 1.0 / 128.0, 1.0 / 2048.0));
    assert_eq!(col.data[[0, 0]], 0x78, "1·256 = 2^8");
    assert_eq!(col.data[[129, 0]], 0xF8, "-0.125·2048 = -256");
    assert_ne!(col.data.t(), row.data, "1×128: the columnwise copy is a re-quantization");
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::Requantized);
    // f32 scales (NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1): tile (0,0) scale 448/3.
    quant.options.force_pow_2_scales = false;
    let (row, _) = q(&mut quant, &x, Dtype::Bf16, Usage::ROWWISE);
    assert_eq!(row.unwrap().scales.scale_inv_at(0, 0), 1.0 / f32::from_bits(0x4315_5555));
}

#[test]
fn blockwise_128x128_partial_tiles_and_transpose() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = Array2::from_shape_fn((130, 129), |(i, j)| {
        let tile_mag = pow2(((i / 128) * 2 + j / 128) as i32 * 3 - 4);
        bf16::from_f32(rng.random_range(-1.0f32..1.0) * tile_mag).to_f32()
    });
    let mut quant = BlockQuantizer::new(E4M3, BlockTile::Square128);
    let (row, col) = q(&mut quant, &x, Dtype::Bf16, Usage::BOTH);
    let (row, col) = (row.unwrap(), col.unwrap());
    let Scales::Block { rows: 128, cols: 128, scale_inv } = &row.scales else { panic!() };
    assert_eq!(scale_inv.shape(), &[2, 2]);
    // Each tile's scale from its own amax (the partial tiles 128×1, 2×128 and 2×1 included).
    for (ti, tj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let tile = x.slice(ndarray::s![ti * 128..(ti * 128 + 128).min(130), tj * 128..(tj * 128 + 128).min(129)]);
        let amax = tile.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = f32::from_bits((448.0 / amax).to_bits() & 0xFF80_0000);
        assert_eq!(scale_inv[[ti, tj]], 1.0 / s, "tile ({ti},{tj})");
        for ((i, j), &v) in tile.indexed_iter() {
            assert_eq!(row.data[[ti * 128 + i, tj * 128 + j]], encode(v * s, E4M3));
        }
    }
    assert_eq!(col, row.transposed(), "128×128: the columnwise copy is the same codes transposed");
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::TransposeOfRowwise);
    // Only the columnwise copy requested: still the transpose of the rowwise codes.
    let (none, col_only) = q(&mut quant, &x, Dtype::Bf16, Usage::COLUMNWISE);
    assert!(none.is_none());
    assert_eq!(col_only.unwrap(), col);
}

#[test]
fn block_tiles_and_te_scale_shapes() {
    assert_eq!(BlockTile::parse("1x128").unwrap(), BlockTile::Row1x128);
    assert_eq!(BlockTile::parse("128×128").unwrap(), BlockTile::Square128);
    for bad in ["1x64", "128x1", "32x32"] {
        let err = BlockTile::parse(bad).unwrap_err().to_string();
        assert!(err.contains("1x128") && err.contains("128x128"), "{bad}: {err}");
    }
    assert!(matches!(BlockTile::parse("blocks"), Err(ReferenceError::UnknownName { .. })));
    assert!(BlockTile::from_scaling_dim(3).is_err());
    assert_eq!(BlockTile::from_scaling_dim(2).unwrap(), BlockTile::Square128);
    // Float8BlockQuantizer.get_scale_shape for a [130, 136] tensor.
    assert_eq!(BlockTile::Square128.te_scale_shape([130, 136], false), [2, 4]);
    assert_eq!(BlockTile::Square128.te_scale_shape([130, 136], true), [2, 4]);
    assert_eq!(BlockTile::Row1x128.te_scale_shape([130, 136], false), [2, 132]);
    assert_eq!(BlockTile::Row1x128.te_scale_shape([130, 136], true), [2, 136]);
    // Empty tensors quantize to empty tensors.
    let (r, c) =
        q(&mut BlockQuantizer::new(E4M3, BlockTile::Row1x128), &Array2::zeros((0, 5)), Dtype::F32, Usage::BOTH);
    assert_eq!((r.unwrap().shape(), c.unwrap().shape()), ([0, 5], [5, 0]));
}

// ---------------------------------------------------------------------------------------------
// MXFP8.
// ---------------------------------------------------------------------------------------------

#[test]
fn e8m0_rounding_cases() {
    // float_to_e8m0: the biased exponent, +1 unless a power of two.
    assert_eq!(float_to_e8m0(1.0), 127);
    assert_eq!(float_to_e8m0(f32::from_bits(0x3F80_0001)), 128, "just above 1 rounds up");
    assert_eq!(float_to_e8m0(0.75), 127, "2^-1·1.5 → 2^0");
    assert_eq!(float_to_e8m0(0.5), 126);
    assert_eq!(float_to_e8m0(0.0), 0);
    assert_eq!(float_to_e8m0(f32::from_bits(0x0040_0000)), 0, "2^-127 (subnormal) is e8m0 0");
    assert_eq!(float_to_e8m0(f32::from_bits(0x0040_0001)), 1, "above 2^-127 → 2^-126");
    assert_eq!(float_to_e8m0(f32::from_bits(1)), 0, "smallest subnormal");
    assert_eq!(float_to_e8m0(pow2(127)), 254);
    assert_eq!(float_to_e8m0(f32::MAX), 254, "satfinite at exponent 0xFE");
    assert_eq!(float_to_e8m0(f32::INFINITY), 254);
    assert_eq!(float_to_e8m0(f32::NAN), 255);
    // Block exponents: amax · (1/448 as f32); 448·2^k is exactly 2^k (no round-up).
    assert_eq!(mxfp8::max_norm_rcp(E4M3).to_bits(), 0x3B12_4925);
    for k in -20..=20 {
        assert_eq!(block_exponent(448.0 * pow2(k), E4M3), (127 + k) as u8, "448·2^{k}");
        assert_eq!(block_exponent(57344.0 * pow2(k), E5M2), (127 + k) as u8, "57344·2^{k}");
    }
    assert_eq!(block_exponent(449.0, E4M3), 128);
    assert_eq!(block_exponent(447.0, E4M3), 127);
    assert_eq!(block_exponent(0.0, E4M3), 0);
    // The multiplier 2^(127-e) and the dequantization factor 2^(e-127).
    assert_eq!(exp2f_rcp(127), 1.0);
    assert_eq!(exp2f_rcp(0), pow2(127));
    assert_eq!(exp2f_rcp(254), f32::from_bits(0x0040_0000));
    assert!(exp2f_rcp(255).is_nan() && e8m0_to_f32(255).is_nan());
    assert_eq!(e8m0_to_f32(0), f32::from_bits(0x0040_0000));
    assert_eq!(e8m0_to_f32(254), pow2(127));
    for e in 1..=253u8 {
        assert_eq!(e8m0_to_f32(e) * exp2f_rcp(e), 1.0, "e8m0 {e}");
    }
}

#[test]
fn e8m0_multiply_equals_divide_for_every_bf16_amax() {
    // TE's kernel multiplies by (float)(1/max); TE's Python reference (test_mxfp8_2d_quantize.py,
    // `_float_to_e8m0`) divides by max. They agree on every bf16 amax and on 10^6 random f32 ones.
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    for fmt in Fp8Format::ALL {
        let max = fmt.max_finite();
        let bf16_amaxes = (0u16..0x7F80).map(|b| bf16::from_bits(b).to_f32());
        let f32_amaxes = (0..1_000_000).map(|_| f32::from_bits(rng.random_range(0u32..0x7F80_0000)));
        for amax in bf16_amaxes.chain(f32_amaxes) {
            assert_eq!(block_exponent(amax, fmt), float_to_e8m0(amax / max), "{fmt}: amax {amax:e}");
        }
    }
}

#[test]
fn mxfp8_rowwise_columnwise_and_shapes() {
    // A 32×64 tensor: row i holds 2^(i-16) in its first block and 3·2^(i-16) in its second, so
    // the rowwise exponents differ per row and block; every column's 32 rows span all of them.
    let x =
        Array2::from_shape_fn((32, 64), |(i, j)| if j < 32 { pow2(i as i32 - 16) } else { 3.0 * pow2(i as i32 - 16) });
    let mut quant = Mxfp8Quantizer::new(E4M3);
    let (row, col) = q(&mut quant, &x, Dtype::F32, Usage::BOTH);
    let (row, col) = (row.unwrap(), col.unwrap());
    let Scales::E8m0 { rows: 1, cols: 32, exponents } = &row.scales else { panic!() };
    assert_eq!(exponents.shape(), &[32, 2]);
    for i in 0..32 {
        // amax 2^(i-16) → 2^(i-16)/448 → exponent ceil(i-16-log2 448) = i-16-8 → 127+i-24.
        assert_eq!(exponents[[i, 0]], (127 + i - 24) as u8);
        // amax 3·2^(i-16): 3/448 = 2^-7.22 → ceil → i-16-7.
        assert_eq!(exponents[[i, 1]], (127 + i - 23) as u8);
        // Codes: 2^(i-16)·2^(24-i) = 2^8 = 256 (0x78); 3·2^(i-16)·2^(23-i) = 384 (0x7C).
        assert_eq!((row.data[[i, 0]], row.data[[i, 40]]), (0x78, 0x7C));
    }
    // Columnwise: 32×1 blocks, amax of a column = its row 31 value.
    let Scales::E8m0 { rows: 1, cols: 32, exponents } = &col.scales else { panic!() };
    assert_eq!(exponents.shape(), &[64, 1]);
    assert_eq!((exponents[[0, 0]], exponents[[63, 0]]), (127 + 31 - 24, 127 + 31 - 23));
    assert_eq!(col.data[[0, 0]], encode(pow2(-16) * exp2f_rcp(134), E4M3), "row 0 in column 0: 2^-16·2^-7 = 2^-23 → 0");
    assert_eq!(col.data[[0, 31]], 0x78);
    assert_eq!(quant.columnwise_copy(), ColumnwiseCopy::Requantized);
    // 2-D (32×32) blocks: one exponent for both directions, columnwise = transpose.
    let mut q2 = Mxfp8Quantizer { format: E4M3, block: MxBlock::Square32 };
    let (r2, c2) = q(&mut q2, &x, Dtype::F32, Usage::BOTH);
    let (r2, c2) = (r2.unwrap(), c2.unwrap());
    assert_eq!(r2.scales, Scales::E8m0 { rows: 32, cols: 32, exponents: arr2(&[[127 + 31 - 24, 127 + 31 - 23]]) });
    assert_eq!(c2, r2.transposed());
    // Columnwise only (what a wgrad operand asks for): the 2-D block's columnwise copy is still
    // the transpose of the rowwise quantization, which must be computed even though the rowwise
    // copy is not returned (a quantizer that skips it returns no columnwise data at all).
    let (r3, c3) = q(&mut q2, &x, Dtype::F32, Usage::COLUMNWISE);
    assert!(r3.is_none(), "rowwise copy returned although only columnwise was asked for");
    assert_eq!(c3.expect("a columnwise copy for Usage::COLUMNWISE"), r2.transposed());
    // Dims must be multiples of 32 (TE: "MXFP8 requires tensor dims that are divisible by 32").
    for shape in [(33, 32), (32, 48), (16, 64)] {
        let err = quant.quantize("fc2_input", Array2::zeros(shape).view(), Dtype::Bf16, Usage::BOTH).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fc2_input") && msg.contains("divisible by 32"), "{msg}");
    }
    // Non-finite: an inf amax gives e8m0 254 (multiplier 2^-127); inf saturates, NaN → 0x7F.
    let mut y = Array2::<f32>::ones((32, 32));
    y[[0, 0]] = f32::INFINITY;
    y[[1, 0]] = f32::NAN;
    let (r, _) = q(&mut quant, &y, Dtype::F32, Usage::ROWWISE);
    let r = r.unwrap();
    assert_eq!(r.scales.scale_inv_at(0, 0), pow2(127));
    assert_eq!((r.data[[0, 0]], r.data[[0, 1]], r.data[[1, 0]], r.data[[1, 1]]), (0x7E, 0x00, 0x7F, 0x78));
}
