//! What a checkpoint of a GLU-interleaved TEGroupedMLP holds (Megatron-Core HEAD's
//! `moe_mlp_glu_interleave_size`, spec §4.10, §7.9), and when it can be loaded elsewhere.
//!
//! `TEGroupedMLP.sharded_state_dict` (Megatron-LM `megatron/core/transformer/moe/experts.py`,
//! commit d98e8a64dd) hands each rank's local fc1 tensor, rows in the module's *interleaved*
//! order, to `apply_swiglu_sharded_factory` (`megatron/core/transformer/mlp.py`), which
//! `torch.chunk`s it into a first and a second half of rows and stores them as the `w` part
//! (chunk `r` of `2t` of the global rows) and the `v` part (chunk `t + r`). Nothing
//! un-interleaves. So the stored global `linear_fc1.weight` of an expert is
//!
//! ```text
//! rows [0, f):   first halves of ranks 0..t  (the "gate" part, `_w`)
//! rows [f, 2f):  second halves of ranks 0..t (the "linear" part, `_v`)
//! ```
//!
//! where each half holds alternating gate and linear blocks: the stored halves are *not* gate
//! and linear. A load at expert-TP `t'` cuts `w` and `v` chunk `r'` and concatenates them into
//! rank `r'`'s module tensor, which `_remove_glu_interleaving` then reads at `t'`. That is the
//! same model only when every canonical unit lands where it was: [`stored_rows`] computes, for
//! a (TP, interleave size) pair, which stored row holds each canonical row; two pairs are
//! interchangeable exactly when those maps agree ([`check_compatible`]).
//!
//! Worked example (`f = 4`, `s = 1`, one expert): saved at `t = 1`, the module rows are
//! `[g0 l0 g1 l1 g2 l2 g3 l3]` and are stored as they are (`w = [g0 l0 g1 l1]`,
//! `v = [g2 l2 g3 l3]`). Loaded at `t = 2`, rank 0 gets `[w0 w1; v0 v1] = [g0 l0 g2 l2]` and
//! rank 1 `[g1 l1 g3 l3]`; un-interleaved, rank 0's units are `(g0, l0), (g2, l2)` and they meet
//! fc2 columns 0 and 1 (fc2 is sharded by plain column blocks): unit 2 now feeds column 1 —
//! a different model. With `s = 2` it is worse: `t = 1` stores `w = [g0 g1 l0 l1]`,
//! `v = [g2 g3 l2 l3]`, and at `t = 2` rank 0 gets `[g0 g1 g2 g3]`, whose "linear" half is gate
//! rows. EP can change freely (the expert axis is not involved), and so can singleton keys.

use crate::CheckpointError;

/// How a layout orders the rows of a GLU fc1: its expert-tensor-parallel size and interleave
/// size (`None`: the halves `[gate; linear]`, the same at every TP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GluOrder {
    /// Expert-tensor-parallel size `t` the rows were (or will be) split over.
    pub tp: usize,
    /// `moe_mlp_glu_interleave_size`, or `None`.
    pub size: Option<usize>,
}

impl GluOrder {
    /// The halves `[gate; linear]` (no interleaving).
    pub const HALVES: GluOrder = GluOrder { tp: 1, size: None };

    fn describe(self) -> String {
        match self.size {
            Some(s) => format!("GLU interleave size {s} at expert-TP {}", self.tp),
            None => "no GLU interleaving".into(),
        }
    }
}

/// For an expert's GLU fc1 with `f` units saved by a layout of `order`: `rows[c]` is the row
/// of the stored global tensor (`2f` rows, `_w` then `_v`) that holds canonical row `c`
/// (gate unit `c` for `c < f`, linear unit `c − f` after). The identity without interleaving.
/// `f` must be a multiple of `order.tp · size` (the layout validated).
pub fn stored_rows(f: usize, order: GluOrder) -> Vec<usize> {
    let Some(s) = order.size else { return (0..2 * f).collect() };
    let n2 = f / order.tp;
    let module = moe_reference::glu::deinterleave_index(2 * n2, s);
    (0..2 * f)
        .map(|c| {
            let (half, u) = (c / f, c % f);
            let (r, k) = (u / n2, u % n2);
            let m = module[half * n2 + k];
            if m < n2 {
                r * n2 + m
            } else {
                f + r * n2 + (m - n2)
            }
        })
        .collect()
}

/// Checks that fc1 rows stored by a layout of `saved` mean the same units when loaded by a
/// layout of `load` (Megatron's load simply cuts the stored `_w`/`_v` halves at the new TP);
/// `key` names the tensor in the error. Without interleaving on either side this always holds.
pub fn check_compatible(key: &str, f: usize, saved: GluOrder, load: GluOrder) -> Result<(), CheckpointError> {
    let (a, b) = (stored_rows(f, saved), stored_rows(f, load));
    let Some(c) = (0..2 * f).find(|&c| a[c] != b[c]) else { return Ok(()) };
    let unit = |c: usize| if c < f { format!("gate unit {c}") } else { format!("linear unit {}", c - f) };
    let read_as = b.iter().position(|&row| row == a[c]).map_or_else(|| "nothing".into(), unit);
    Err(CheckpointError::Mismatch {
        key: key.into(),
        msg: format!(
            "saved with {}, loaded with {}: stored row {} holds {} but would be read as {}. Megatron's \
             apply_swiglu_sharded_factory stores each rank's interleaved fc1 rows cut in two halves without \
             un-interleaving them, so the halves mean other units at another expert-TP or interleave size; \
             load at the saved expert-TP and interleave size (any EP)",
            saved.describe(),
            load.describe(),
            a[c],
            unit(c),
            read_as
        ),
    })
}

/// The canonical per-expert rows (`[gate; linear]`, [`crate::experts`]'s orientation) of a
/// stored global GLU fc1 tensor of one expert, given as flat row-major items (`row_len` items
/// a row: `h` elements' bytes for the weight, one element's bytes for the bias), saved by a
/// layout of `order`. Stored rows are `2f`.
pub fn stored_to_canonical<T: Copy>(data: &[T], f: usize, row_len: usize, order: GluOrder) -> Vec<T> {
    assert_eq!(data.len(), 2 * f * row_len, "stored_to_canonical: {} rows of {row_len}", 2 * f);
    stored_rows(f, order).into_iter().flat_map(|r| data[r * row_len..(r + 1) * row_len].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module doc's worked example, row by row.
    #[test]
    fn worked_example_f4() {
        let t1 = GluOrder { tp: 1, size: Some(1) };
        // t = 1 stores the module rows [g0 l0 g1 l1 g2 l2 g3 l3] as they are.
        assert_eq!(stored_rows(4, t1), vec![0, 2, 4, 6, 1, 3, 5, 7]);
        // t = 2: rank 0's [g0 l0 | g1 l1] → w chunk 0 = [g0 l0] (rows 0, 1), v chunk 0 =
        // [g1 l1] (rows 4, 5); rank 1's units 2, 3 → rows 2, 3 and 6, 7.
        let t2 = GluOrder { tp: 2, size: Some(1) };
        assert_eq!(stored_rows(4, t2), vec![0, 4, 2, 6, 1, 5, 3, 7]);
        let err = check_compatible("experts.linear_fc1.weight", 4, t1, t2).unwrap_err().to_string();
        assert!(
            err.contains("experts.linear_fc1.weight")
                && err.contains("stored row 2 holds gate unit 1 but would be read as gate unit 2"),
            "{err}"
        );
        // s = 2 at t = 1: [g0 g1 l0 l1 g2 g3 l2 l3] stored as is; at t = 2 each rank's 4 rows
        // are one block of each, the plain halves, so the stored rows are canonical.
        let s2 = |tp| GluOrder { tp, size: Some(2) };
        assert_eq!(stored_rows(4, s2(1)), vec![0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(stored_rows(4, s2(2)), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(check_compatible("k", 4, s2(1), s2(2)).is_err());
    }

    #[test]
    fn same_tp_and_size_or_no_interleaving_is_compatible() {
        for (f, tp, s) in [(8, 1, 2), (8, 2, 1), (16, 4, 2), (12, 2, 3)] {
            let o = GluOrder { tp, size: Some(s) };
            assert!(check_compatible("k", f, o, o).is_ok());
        }
        // No interleaving: every TP stores the halves.
        for tp in [1, 2, 4] {
            assert!(check_compatible("k", 8, GluOrder::HALVES, GluOrder { tp, size: None }).is_ok());
        }
        // One block per rank half (s = f/t) is the plain halves at that TP only: at t = 1 it is
        // compatible with a non-interleaved layout, at t = 2 not.
        assert!(check_compatible("k", 8, GluOrder { tp: 1, size: Some(8) }, GluOrder::HALVES).is_ok());
        assert!(check_compatible("k", 8, GluOrder { tp: 2, size: Some(4) }, GluOrder::HALVES).is_ok());
        assert!(check_compatible("k", 8, GluOrder { tp: 2, size: Some(2) }, GluOrder::HALVES).is_err());
    }

    #[test]
    fn canonical_rows_of_a_stored_tensor() {
        // f = 2, t = 1, s = 1: stored [g0 l0 g1 l1] → canonical [g0 g1 l0 l1]; rows of 2 items.
        let stored = vec![10, 11, 20, 21, 30, 31, 40, 41];
        let c = stored_to_canonical(&stored, 2, 2, GluOrder { tp: 1, size: Some(1) });
        assert_eq!(c, vec![10, 11, 30, 31, 20, 21, 40, 41]);
        assert_eq!(stored_to_canonical(&stored, 2, 2, GluOrder::HALVES), stored);
    }
}
