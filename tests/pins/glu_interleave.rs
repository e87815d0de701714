//! Megatron-Core HEAD's GLU interleaving (`moe_mlp_glu_interleave_size`, spec §4.10), pinned by
//! hand from `TEGroupedMLP._remove_glu_interleaving` (Megatron-LM
//! `megatron/core/transformer/moe/experts.py`, commit d98e8a64dd):
//!
//! ```text
//! x.reshape(-1, N1 // (2*s), 2, s).transpose(1, 2).contiguous().view(shape)
//! ```
//!
//! The probe: one TEGroupedMLP expert, `h = 2`, `f = 4` (`N1 = 8`), squared-ReLU GLU, float32.
//! `W1` column 0 is `[1, 2, …, 8]` and column 1 zero, the token is `x = [1, 0]`, so fc1's output
//! *is* `a = [1, 2, 3, 4, 5, 6, 7, 8]` in the module's row order. `W2 = [[1,0,1,0],[0,1,0,1]]`,
//! `p = 1`, `G = [1, 0]`. Every value below is a small integer, exact in float32 and f64.
//!
//! Working the reshape by hand for `a = [1..8]`:
//!
//! * `s = 1`: `[4 blocks, 2, 1]` = `[[1],[2]], [[3],[4]], [[5],[6]], [[7],[8]]`; transposing
//!   blocks and halves gives gate `[1, 3, 5, 7]`, linear `[2, 4, 6, 8]`.
//!   `z = relu(g)²·l = [2, 36, 150, 392]`, `y = [z0+z2, z1+z3] = [152, 428]`.
//! * `s = 2`: `[2 blocks, 2, 2]` = `[[1,2],[3,4]], [[5,6],[7,8]]`: gate `[1, 2, 5, 6]`, linear
//!   `[3, 4, 7, 8]`. `z = [3, 16, 175, 288]`, `y = [178, 304]`.
//! * `s = 4 = N1/2`: one block of each, gate `[1, 2, 3, 4]`, linear `[5, 6, 7, 8]`, the plain
//!   halves: `z = [5, 24, 63, 128]`, `y = [68, 152]`.
//!
//! Backward with `G = [1, 0]`: `dz = G·W2 = [1, 0, 1, 0]` (units 0 and 2), `dg = dz·l·2g`,
//! `dl = dz·g²`, and the gradient goes back to the module rows each unit came from:
//!
//! * `s = 1`: unit 0 = rows (0, 1): `dg = 1·2·2 = 4`, `dl = 1`; unit 2 = rows (4, 5):
//!   `dg = 6·10 = 60`, `dl = 25`. `dW1[:, 0] = [4, 1, 0, 0, 60, 25, 0, 0]`,
//!   `dx0 = 4·1 + 1·2 + 60·5 + 25·6 = 456`.
//! * `s = 2`: unit 0 = rows (0, 2): `dg = 1·3·2 = 6`, `dl = 1`; unit 2 = rows (4, 6):
//!   `dg = 7·10 = 70`, `dl = 25`. `dW1[:, 0] = [6, 0, 1, 0, 70, 0, 25, 0]`,
//!   `dx0 = 6 + 3 + 350 + 175 = 534`.
//!
//! `dW2` row 0 is `z` (canonical unit order: the order fc2's columns are read in), row 1 zero;
//! `dL/dp = Σ du·z = z0 + z2 = y0`.

use super::{one_expert, run, tokens};
use moe_reference::{Activation, Dtype, ExpertWeights, LayerClass, LayerConfig, LayerRun, Reference};
use ndarray::{arr1, arr2, Array1, Array2};

/// The probe of the module doc at interleave size `size` (`None`: no interleaving), run with
/// `reference` (the f64 oracle or the float32 emulation).
fn probe(size: Option<usize>, clamp: Option<f64>, w1_col0: [f64; 8], reference: Reference) -> LayerRun {
    let cfg = LayerConfig {
        params_dtype: Dtype::F32,
        glu_interleave_size: size,
        clamp_value: clamp,
        ..one_expert(LayerClass::TeGrouped, 2, 4, true, Activation::SquaredRelu)
    };
    let w = ExpertWeights {
        fc1_weight: Array2::from_shape_fn((8, 2), |(i, j)| if j == 0 { w1_col0[i] } else { 0.0 }),
        fc1_bias: None,
        fc2_weight: arr2(&[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]),
        fc2_bias: None,
    };
    let g = arr2(&[[1.0, 0.0]]);
    run(reference, &cfg, &w, &tokens(arr2(&[[1.0, 0.0]]), Array1::ones(1)), &g)
}

const ONE_TO_EIGHT: [f64; 8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];

/// The pinned results: output, `dx`, `dp`, `dW1[:, 0]`, `dW2[0, :]`.
struct Pinned {
    y: [f64; 2],
    dx0: f64,
    dp: f64,
    dw1: [f64; 8],
    dw2: [f64; 4],
}

fn assert_pinned(what: &str, r: &LayerRun, want: &Pinned) {
    assert_eq!(r.output, arr2(&[want.y]), "{what}: output");
    assert_eq!(r.grad_input, arr2(&[[want.dx0, 0.0]]), "{what}: dx");
    assert_eq!(r.grad_probs, arr1(&[want.dp]), "{what}: dp");
    let dw1 = r.weight_grads["linear_fc1.weight0"].clone().into_dimensionality::<ndarray::Ix2>().unwrap();
    assert_eq!(dw1.column(0).to_vec(), want.dw1.to_vec(), "{what}: dW1 in the module's (interleaved) row order");
    assert!(dw1.column(1).iter().all(|&v| v == 0.0), "{what}: dW1 column 1");
    let dw2 = r.weight_grads["linear_fc2.weight0"].clone().into_dimensionality::<ndarray::Ix2>().unwrap();
    assert_eq!(dw2.row(0).to_vec(), want.dw2.to_vec(), "{what}: dW2 row 0 (= z)");
}

/// Kills: un-interleaving with the wrong block size (s = 1 and s = 2 give different pairs), not
/// un-interleaving at all (the s = 4 values), interleaving instead of un-interleaving (for
/// N1 = 8, s = 2 the two permutations differ), and a backward that returns dW1 in canonical
/// instead of the module's row order. Both the oracle and the float32 emulation, bit for bit.
#[test]
fn remove_glu_interleaving_pinned_by_hand() {
    let s1 = Pinned {
        y: [152.0, 428.0],
        dx0: 456.0,
        dp: 152.0,
        dw1: [4.0, 1.0, 0.0, 0.0, 60.0, 25.0, 0.0, 0.0],
        dw2: [2.0, 36.0, 150.0, 392.0],
    };
    let s2 = Pinned {
        y: [178.0, 304.0],
        dx0: 534.0,
        dp: 178.0,
        dw1: [6.0, 0.0, 1.0, 0.0, 70.0, 0.0, 25.0, 0.0],
        dw2: [3.0, 16.0, 175.0, 288.0],
    };
    // s = N1/2 and no interleaving are the plain halves: gate rows 0..4, linear rows 4..8,
    // unit 0 = (1, 5): dg = 5·2 = 10, dl = 1; unit 2 = (3, 7): dg = 7·6 = 42, dl = 9.
    let halves = Pinned {
        y: [68.0, 152.0],
        dx0: 10.0 + 3.0 * 42.0 + 5.0 + 9.0 * 7.0,
        dp: 68.0,
        dw1: [10.0, 0.0, 42.0, 0.0, 1.0, 0.0, 9.0, 0.0],
        dw2: [5.0, 24.0, 63.0, 128.0],
    };
    for reference in [Reference::ORACLE, Reference::EMULATED] {
        assert_pinned("s = 1", &probe(Some(1), None, ONE_TO_EIGHT, reference), &s1);
        assert_pinned("s = 2", &probe(Some(2), None, ONE_TO_EIGHT, reference), &s2);
        assert_pinned("s = 4", &probe(Some(4), None, ONE_TO_EIGHT, reference), &halves);
        assert_pinned("none", &probe(None, None, ONE_TO_EIGHT, reference), &halves);
    }
}

/// Megatron un-interleaves *before* the clamp (`glu()`: `_remove_glu_interleaving`, then
/// `chunk`, then `clamp`). With `s = 1`, `c = 3` and `a = [2, −5, 1, 1, 1, 1, 1, 1]`, unit 0 is
/// (gate 2, linear −5): the linear clamp gives −3, `z0 = 2²·(−3) = −12`, `y0 = z0 + z2 = −11`.
/// Clamping the module's halves first would treat row 1 (−5) as a gate (`min(−5, 3) = −5`),
/// giving `z0 = −20`, `y0 = −19`. Gradient: the linear mask is off for −5 (`dl = 0`), the gate
/// gets `dz·lc·2g = 1·(−3)·4 = −12`; unit 2 is (1, 1): `dg = 2`, `dl = 1`.
/// Kills: un-interleaving after the clamp, and a clamp mask taken in the module's order.
#[test]
fn interleaving_is_removed_before_the_clamp() {
    let a = [2.0, -5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    for reference in [Reference::ORACLE, Reference::EMULATED] {
        let r = probe(Some(1), Some(3.0), a, reference);
        assert_eq!(r.output, arr2(&[[-11.0, 2.0]]));
        let dw1 = r.weight_grads["linear_fc1.weight0"].clone().into_dimensionality::<ndarray::Ix2>().unwrap();
        assert_eq!(dw1.column(0).to_vec(), vec![-12.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0]);
    }
}
