//! Exact decoders of the quantized expert weights of released Hugging Face checkpoints.
//!
//! * DeepSeek-V3 fp8: `weight` `F8_E4M3` `[rows, cols]` with `weight_scale_inv` `[⌈rows/128⌉,
//!   ⌈cols/128⌉]` (`F32`); value `(i, j)` = `decode(weight[i, j]) · scale_inv[i/128, j/128]`.
//! * GPT-OSS MXFP4: `*_blocks` `U8` `[E, R, G, 16]` and `*_scales` `U8` (E8M0) `[E, R, G]`;
//!   byte `b` of block `g` of row `r` holds element `32g + 2b` in its low nibble and `32g + 2b + 1`
//!   in its high nibble (FP4 E2M1: `[0, .5, 1, 1.5, 2, 3, 4, 6]`, bit 3 the sign), scaled by
//!   `2^(scale − 127)`: transformers' `_convert_moe_packed_tensors` (integrations/mxfp4.py),
//!   before its final `transpose(1, 2)`.
//!
//! Both products are exact in `f64` (an fp8 significand has 4 bits, an f32 scale 24; FP4 values
//! times a power of two).

use moe_reference::fp8::{decode_f64, Fp8Format};

/// The FP4 E2M1 values by code (transformers' `FP4_VALUES`).
pub const FP4_VALUES: [f64; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The E8M0 scale bias.
pub const E8M0_BIAS: i32 = 127;

/// The fp8 block size of DeepSeek-V3's `weight_scale_inv`.
pub const FP8_BLOCK: usize = 128;

/// Dequantizes a row-major `[rows, cols]` `F8_E4M3` tensor with its block scales
/// (`[⌈rows/128⌉, ⌈cols/128⌉]`, row-major `f64`).
pub fn dequantize_fp8_blockwise(codes: &[u8], rows: usize, cols: usize, scale_inv: &[f64]) -> Vec<f64> {
    let sc = cols.div_ceil(FP8_BLOCK);
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let srow = &scale_inv[(i / FP8_BLOCK) * sc..(i / FP8_BLOCK + 1) * sc];
        for (j, &c) in codes[i * cols..(i + 1) * cols].iter().enumerate() {
            out.push(decode_f64(c, Fp8Format::E4M3) * srow[j / FP8_BLOCK]);
        }
    }
    out
}

/// Decodes one expert's MXFP4 matrix: `blocks` `[R, G, 16]` and `scales` `[R, G]` to row-major
/// `[R, 32·G]`.
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], rows: usize, groups: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * groups * 32);
    for r in 0..rows {
        for g in 0..groups {
            let s = 2f64.powi(i32::from(scales[r * groups + g]) - E8M0_BIAS);
            for &b in &blocks[(r * groups + g) * 16..(r * groups + g + 1) * 16] {
                out.push(FP4_VALUES[usize::from(b & 0x0F)] * s);
                out.push(FP4_VALUES[usize::from(b >> 4)] * s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_low_nibble_is_the_even_element() {
        // Byte 0x21: low nibble 1 (0.5) first, high nibble 2 (1.0) second; scale 128 = 2^1.
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x21;
        blocks[15] = 0xF8; // low 8 = -0.0, high 15 = -6
        let out = decode_mxfp4(&blocks, &[128], 1, 1);
        assert_eq!(out.len(), 32);
        assert_eq!((out[0], out[1]), (1.0, 2.0));
        assert_eq!((out[30], out[31]), (-0.0, -12.0));
        assert!(out[30].is_sign_negative());
    }

    #[test]
    fn fp8_blocks_scale_by_their_128_tile() {
        // 1 x 130: columns 0..128 use scale 2, columns 128..130 use scale 0.25. 0x38 = 1.0 in E4M3.
        let codes = vec![0x38u8; 130];
        let out = dequantize_fp8_blockwise(&codes, 1, 130, &[2.0, 0.25]);
        assert_eq!(out[127], 2.0);
        assert_eq!(out[128], 0.25);
    }
}
