//! GLU row orders of fc1: the canonical `[gate; linear]` halves and Megatron-Core HEAD's
//! block-interleaved order (`moe_mlp_glu_interleave_size`, spec §4.10).
//!
//! With an interleave size `s`, a TEGroupedMLP rank's fc1 output (and so its fc1 weight rows
//! and bias) of width `N1 = 2·N2` is read as alternating blocks of `s` gate and `s` linear
//! units: `[g_0..g_{s-1}, l_0..l_{s-1}, g_s.., l_s.., ...]`. `TEGroupedMLP._remove_glu_interleaving`
//! (Megatron-LM `megatron/core/transformer/moe/experts.py`, commit d98e8a64dd) restores the
//! halves before the activation:
//!
//! ```text
//! x.reshape(-1, N1 // (2*s), 2, s).transpose(1, 2).contiguous().view(shape)
//! ```
//!
//! so canonical position `j = half·N2 + b·s + i` (half 0 = gate, 1 = linear; block `b`, offset
//! `i < s`) reads interleaved position `b·2s + half·s + i`. The interleaving is per TP-local
//! tensor: each rank interleaves its own `N1 = 2f/t` rows.

use crate::error::ReferenceError;

/// The un-interleaving permutation of a width-`n1` GLU tensor with interleave size `size`:
/// `canonical[j] = interleaved[index[j]]` ([`remove_glu_interleaving`]). `n1` must be a
/// multiple of `2·size` ([`check_interleave`]).
pub fn deinterleave_index(n1: usize, size: usize) -> Vec<usize> {
    let half = n1 / 2;
    (0..n1)
        .map(|j| {
            let (which, rest) = (j / half, j % half);
            let (block, i) = (rest / size, rest % size);
            block * 2 * size + which * size + i
        })
        .collect()
}

/// Checks that a width-`n1` GLU tensor can be interleaved in blocks of `size`: `size > 0` and
/// `n1` a multiple of `2·size` (Megatron's reshape fails otherwise). `what` names the tensor.
pub fn check_interleave(what: &str, n1: usize, size: usize) -> Result<(), ReferenceError> {
    if size == 0 {
        return Err(ReferenceError::Config(format!("{what}: glu_interleave_size must be positive, got 0")));
    }
    if !n1.is_multiple_of(2 * size) {
        return Err(ReferenceError::Config(format!(
            "{what}: the per-rank fc1 width N1 = {n1} is not a multiple of 2·glu_interleave_size = {} \
             (Megatron's _remove_glu_interleaving reshapes N1 into [N1/(2s), 2, s])",
            2 * size
        )));
    }
    Ok(())
}

/// `_remove_glu_interleaving` on the rows of a row-major `[n1, row_len]` matrix given as flat
/// items (`row_len` items a row, any element type: values or storage bytes): interleaved rows
/// in, `[gate; linear]` rows out.
pub fn remove_glu_interleaving<T: Copy>(data: &[T], n1: usize, row_len: usize, size: usize) -> Vec<T> {
    assert_eq!(data.len(), n1 * row_len, "remove_glu_interleaving: {n1} rows of {row_len}");
    deinterleave_index(n1, size)
        .into_iter()
        .flat_map(|src| data[src * row_len..(src + 1) * row_len].iter().copied())
        .collect()
}

/// The inverse of [`remove_glu_interleaving`]: `[gate; linear]` rows in, interleaved rows out
/// (the order a layer built with `moe_mlp_glu_interleave_size = size` holds).
pub fn apply_glu_interleaving<T: Copy + Default>(data: &[T], n1: usize, row_len: usize, size: usize) -> Vec<T> {
    assert_eq!(data.len(), n1 * row_len, "apply_glu_interleaving: {n1} rows of {row_len}");
    let mut out = vec![T::default(); data.len()];
    for (j, src) in deinterleave_index(n1, size).into_iter().enumerate() {
        out[src * row_len..(src + 1) * row_len].copy_from_slice(&data[j * row_len..(j + 1) * row_len]);
    }
    out
}

/// Columns of `a` (`[n, N1]`, fc1 outputs) in canonical `[gate | linear]` order when `size` is
/// set (un-interleaved as Megatron does before the activation); `a` itself otherwise.
pub fn deinterleave_columns(a: &ndarray::Array2<f64>, size: Option<usize>) -> ndarray::Array2<f64> {
    match size {
        Some(s) => a.select(ndarray::Axis(1), &deinterleave_index(a.ncols(), s)),
        None => a.clone(),
    }
}

/// The inverse of [`deinterleave_columns`]: canonical columns back to the module's interleaved
/// order (the gradient of the un-interleaving is its inverse permutation).
pub fn interleave_columns(a: &ndarray::Array2<f64>, size: Option<usize>) -> ndarray::Array2<f64> {
    match size {
        Some(s) => {
            let mut out = ndarray::Array2::zeros(a.raw_dim());
            for (j, src) in deinterleave_index(a.ncols(), s).into_iter().enumerate() {
                out.column_mut(src).assign(&a.column(j));
            }
            out
        }
        None => a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_megatrons_reshape_transpose() {
        // N1 = 8, s = 2: reshape [2 blocks, 2 halves, 2] → transpose → [2 halves, 2 blocks, 2]:
        // gate rows are 0,1 (block 0) and 4,5 (block 1); linear rows 2,3 and 6,7.
        assert_eq!(deinterleave_index(8, 2), vec![0, 1, 4, 5, 2, 3, 6, 7]);
        // s = 1: gates at even positions, linear at odd.
        assert_eq!(deinterleave_index(8, 1), vec![0, 2, 4, 6, 1, 3, 5, 7]);
        // s = N1/2: one block of each, already canonical.
        assert_eq!(deinterleave_index(8, 4), (0..8).collect::<Vec<_>>());
    }

    /// Megatron HEAD's own test of `_remove_glu_interleaving`
    /// (`tests/unit_tests/transformer/moe/test_grouped_mlp.py::
    /// test_remove_glu_interleaving_restores_contiguous_gate_and_linear_halves`, d98e8a64dd).
    #[test]
    fn megatrons_test_vector() {
        let interleaved = ndarray::arr2(&[[1., 2., 5., 6., 3., 4., 7., 8.], [11., 12., 15., 16., 13., 14., 17., 18.]]);
        let expected = ndarray::arr2(&[[1., 2., 3., 4., 5., 6., 7., 8.], [11., 12., 13., 14., 15., 16., 17., 18.]]);
        assert_eq!(deinterleave_columns(&interleaved, Some(2)), expected);
    }

    #[test]
    fn apply_inverts_remove_on_rows_of_any_item() {
        let data: Vec<u16> = (0..24).collect(); // 6 rows of 4 items (bytes of 2 elements of 2)
                                                // s = 3 = N1/2 is one block of each: the identity.
        for (s, moves) in [(1, true), (3, false)] {
            let canon = remove_glu_interleaving(&data, 6, 4, s);
            assert_eq!(canon != data, moves, "s = {s}");
            assert_eq!(apply_glu_interleaving(&canon, 6, 4, s), data);
        }
        let a = ndarray::Array2::from_shape_fn((2, 8), |(i, j)| (10 * i + j) as f64);
        let c = deinterleave_columns(&a, Some(2));
        assert_eq!(c.row(0).to_vec(), vec![0., 1., 4., 5., 2., 3., 6., 7.]);
        assert_eq!(interleave_columns(&c, Some(2)), a);
    }

    #[test]
    fn sizes_that_do_not_divide_are_refused() {
        assert!(check_interleave("x", 8, 2).is_ok());
        let err = check_interleave("expert fc1", 12, 4).unwrap_err().to_string();
        assert!(err.contains("N1 = 12") && err.contains("2·glu_interleave_size = 8"), "{err}");
        assert!(check_interleave("x", 8, 0).is_err());
    }
}
