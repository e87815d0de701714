//! Cases that pin exact numbers: Megatron's unit-test values and the regressions of §A.

use super::{cfg, grads, run};
use moe_harness::case::Case;
use moe_reference::state_dict::convert;
use moe_reference::{
    forward, param_specs, to_state_dict, Activation, Dtype, ExpertLayer, ExpertSet, Inputs, LayerClass, LayerConfig,
    Numerics, Parallelism, Reference, WgradTiming,
};
use ndarray::{arr1, arr2, Array1, Array2};

// ---------------------------------------------------------------------------------------------
// Exact numbers.

/// spec §4.5.1 step 7, HEAD unit test of `_apply_bias`: fc2 output `[[1,2],[3,4],[5,6]]`, fc2
/// biases `[10,20]` and `[100,200]`, counts `[2,1]`, probs `[.5,.5,1]` give
/// `[[6,12],[8,14],[105,206]]` (`out + b2·p`).
///
/// Built through the layer: h = 2, non-GLU squared ReLU, fc1 = I and zero fc1 bias, so
/// `z = relu(x)²`. Rows x = [1,0], [0,1] (expert 0) and [1,0] (expert 1) give z = I and [1,0].
/// With fc2 weights W2₀ᵀ = [[2,4],[6,8]] and W2₁ᵀ = [[5,6],[0,0]], the fc2 output is
/// `p·z·W2ᵀ` = .5·[2,4], .5·[6,8], 1·[5,6] = [[1,2],[3,4],[5,6]], exactly the test's `out`.
/// Every value is a small integer or a half: exact in bf16, so the storage-dtype emulation
/// must reproduce it exactly too.
#[test]
fn te_grouped_fc2_bias_is_scaled_by_probs_as_in_megatron_apply_bias_test() {
    for class in [LayerClass::TeGrouped, LayerClass::Sequential] {
        let cfg = LayerConfig {
            class,
            num_experts: 2,
            hidden_size: 2,
            ffn_hidden_size: 2,
            gated_linear_unit: false,
            activation: Activation::SquaredRelu,
            add_bias: true,
            ..LayerConfig::example()
        };
        let mut w = ExpertSet::zeros(&cfg);
        for e in &mut w.experts {
            e.fc1_weight = Array2::eye(2);
        }
        w.experts[0].fc2_weight = arr2(&[[2.0, 4.0], [6.0, 8.0]]).t().to_owned();
        w.experts[1].fc2_weight = arr2(&[[5.0, 6.0], [0.0, 0.0]]).t().to_owned();
        w.experts[0].fc2_bias = Some(arr1(&[10.0, 20.0]));
        w.experts[1].fc2_bias = Some(arr1(&[100.0, 200.0]));
        let inputs = Inputs {
            hidden_states: arr2(&[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
            tokens_per_expert: vec![2, 1],
            probs: arr1(&[0.5, 0.5, 1.0]),
        };
        let g = Array2::ones((3, 2));
        for layer in [Reference::ORACLE, Reference::EMULATED] {
            let r = run(layer, &cfg, &w, &inputs, &g, WgradTiming::Immediate);
            assert_eq!(r.output, arr2(&[[6.0, 12.0], [8.0, 14.0], [105.0, 206.0]]), "{class} {}", layer.name());
            // Bias grad = Σ_i p_i·G_i per expert: [1, 1] and [1, 1] here (the probs sum to 1 in
            // both experts). HEAD's packed variant (probs [.25,.5,1.5] -> bias grad .75/1.5)
            // cannot be built exactly through the layer: its row 2 needs z·W2ᵀ = 5/1.5 = 10/3,
            // not a binary fraction.
            let gr = grads(&cfg, &r);
            assert_eq!(gr.experts[0].fc2_bias, Some(arr1(&[1.0, 1.0])));
            assert_eq!(gr.experts[1].fc2_bias, Some(arr1(&[1.0, 1.0])));
        }
    }
}

/// spec §8.2 `test_gpu_fused_path_scales_fc2_bias` (HEAD, commit e4ea85970b made the fused path
/// scale the fc2 bias): all weights zero, fc2 biases 2.0 (expert 0) and 4.0 (expert 1), input
/// zeros `[3,16]`, counts `[2,1]`, bf16 probs `[.25,.5,.125]`, grad_output ones.
///
/// Derivation: z = silu(0)·0 = 0, so y_i = p_i·b2: rows .5, 1.0, .5 (all 16 columns).
/// `dp_i = Σ_j G_ij·b2_j = 16·b`: `[2,2,4]·16 = [32,32,64]`. `db2 = Σ_i p_i·G_i`: expert 0
/// `.25 + .5 = .75`, expert 1 `.125`. Every other gradient is exactly zero.
#[test]
fn fc2_bias_grad_is_sum_of_probs_as_in_megatron_fused_path_test() {
    let cfg = LayerConfig {
        class: LayerClass::TeGrouped,
        num_experts: 2,
        hidden_size: 16,
        ffn_hidden_size: 8,
        add_bias: true,
        probs_dtype: Dtype::Bf16,
        ..LayerConfig::example()
    };
    let mut w = ExpertSet::zeros(&cfg);
    w.experts[0].fc2_bias = Some(Array1::from_elem(16, 2.0));
    w.experts[1].fc2_bias = Some(Array1::from_elem(16, 4.0));
    let inputs = Inputs {
        hidden_states: Array2::zeros((3, 16)),
        tokens_per_expert: vec![2, 1],
        probs: arr1(&[0.25, 0.5, 0.125]),
    };
    let g = Array2::ones((3, 16));
    for layer in [Reference::ORACLE, Reference::EMULATED] {
        for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
            let r = run(layer, &cfg, &w, &inputs, &g, timing);
            for (i, want) in [0.5, 1.0, 0.5].into_iter().enumerate() {
                assert!(r.output.row(i).iter().all(|&v| v == want), "row {i}: {}", r.output);
            }
            assert_eq!(r.grad_probs, arr1(&[32.0, 32.0, 64.0]));
            assert!(r.grad_input.iter().all(|&v| v == 0.0));
            let gr = grads(&cfg, &r);
            assert_eq!(gr.experts[0].fc2_bias, Some(Array1::from_elem(16, 0.75)));
            assert_eq!(gr.experts[1].fc2_bias, Some(Array1::from_elem(16, 0.125)));
            for e in &gr.experts {
                assert!(e.fc1_weight.iter().chain(e.fc2_weight.iter()).all(|&v| v == 0.0));
                assert!(e.fc1_bias.as_ref().unwrap().iter().all(|&v| v == 0.0));
            }
        }
    }
}

/// spec §8.2 TestTEGroupedMLP.test_constructor: h=16, E=2, GLU silu, f=64 gives
/// `linear_fc1.weight{e}` `[128, 16]` and `linear_fc2.weight{e}` `[16, 64]`; the OLD
/// GroupedMLP has `weight1` `[h, E·2f]` = `[16, 256]` and `weight2` `[E·f, h]` = `[128, 16]`;
/// the counts agree across classes (`h·(2f + f)·E` = 6144, router excluded).
#[test]
fn te_grouped_parameter_shapes_match_megatron_constructor_test() {
    let te = cfg(LayerClass::TeGrouped, 2, 16, 64);
    let shape = |c: &LayerConfig, name: &str| {
        param_specs(c).into_iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name}")).shape
    };
    for e in 0..2 {
        assert_eq!(shape(&te, &format!("linear_fc1.weight{e}")), vec![128, 16]);
        assert_eq!(shape(&te, &format!("linear_fc2.weight{e}")), vec![16, 64]);
    }
    let grouped = cfg(LayerClass::Grouped, 2, 16, 64);
    assert_eq!(shape(&grouped, "weight1"), vec![16, 256]);
    assert_eq!(shape(&grouped, "weight2"), vec![128, 16]);
    for class in LayerClass::ALL {
        assert_eq!(numel(&cfg(class, 2, 16, 64)), 16 * (2 * 64 + 64) * 2, "{class}");
    }
}

fn numel(c: &LayerConfig) -> usize {
    param_specs(c).iter().map(|s| s.shape.iter().product::<usize>()).sum()
}

/// spec §3.4 / §8.3 TestParallelSequentialMLP: E=2, h=12, GLU silu, f = 4h = 48, no bias has
/// 3480 parameters including the router's 2·12 = 24, so the experts hold 3456
/// (2 × (96·12 + 12·48)), in every class.
#[test]
fn sequential_test_config_has_3480_parameters_minus_router() {
    for class in LayerClass::ALL {
        assert_eq!(numel(&cfg(class, 2, 12, 48)), 3480 - 24, "{class}");
    }
}

/// Megatron #360: with TP > 1 a SwiGLU rank must hold `[W_r; V_r]` (its gate slice and its
/// linear slice), not rows `r·2f/t..(r+1)·2f/t` of the fused `[W; V]` (which would put gate and
/// linear halves on different ranks). Spec §6.2, §10.8: chunks `r` and `t + r` of `2t`.
#[test]
fn swiglu_tp_rank_holds_its_gate_and_linear_slices() {
    let global = cfg(LayerClass::TeGrouped, 2, 4, 6);
    let full = ExpertSet::random(&global, 3);
    let k = 3;
    for r in 0..2 {
        let rank =
            LayerConfig { parallel: Parallelism { tp_size: 2, tp_rank: r, ep_size: 1, ep_rank: 0 }, ..global.clone() };
        let shard = full.shard(&rank).unwrap();
        for (e, w) in shard.experts.iter().enumerate() {
            let f1 = &full.experts[e].fc1_weight;
            assert_eq!(w.fc1_weight.dim(), (2 * k, 4));
            for i in 0..k {
                assert_eq!(w.fc1_weight.row(i), f1.row(r * k + i), "gate row {i}");
                assert_eq!(w.fc1_weight.row(k + i), f1.row(6 + r * k + i), "linear row {i}");
            }
        }
    }
}

/// Megatron #909: a hand-written SequentialMLP -> GroupedMLP conversion (cat + transpose) gave
/// loss 6.x instead of 1.x with EP > 1 and > 8 experts; and transformers #47031: equal dims make
/// a transposed load go unnoticed. The conversion sequential -> grouped -> te_grouped ->
/// sequential is the identity bit for bit (EP = 2 of 16 experts, square fc1 since 2f = h), and
/// the forward outputs of all three classes on converted weights agree (f64 oracle).
#[test]
fn sequential_grouped_round_trip_is_identity_with_equal_forward() {
    let global = LayerConfig { num_experts: 16, hidden_size: 16, ffn_hidden_size: 8, ..LayerConfig::example() };
    let full = ExpertSet::random(&global, 909);
    for ep_rank in 0..2 {
        let seq =
            LayerConfig { parallel: Parallelism { tp_size: 1, tp_rank: 0, ep_size: 2, ep_rank }, ..global.clone() };
        let sd = to_state_dict(&seq, &full.shard(&seq).unwrap()).unwrap();
        let grouped_sd = convert(&seq, &sd, LayerClass::Grouped).unwrap();
        let grouped = LayerConfig { class: LayerClass::Grouped, ..seq.clone() };
        let te_sd = convert(&grouped, &grouped_sd, LayerClass::TeGrouped).unwrap();
        let te = LayerConfig { class: LayerClass::TeGrouped, ..seq.clone() };
        let back = convert(&te, &te_sd, LayerClass::Sequential).unwrap();
        assert_eq!(back, sd, "round trip changed the weights (ep rank {ep_rank})");
        // fc1 of this config is square: a transposed expert would have the right shape.
        assert_eq!(sd["local_experts.0.linear_fc1.weight"].shape(), &[16, 16]);

        let c = Case {
            cfg: seq.unsharded(),
            tokens_per_expert: (0..8).map(|i| (i % 3) as i64 * 2).collect(),
            seed: 9,
            timing: WgradTiming::Immediate,
        };
        let inputs = Inputs { tokens_per_expert: c.tokens_per_expert.clone(), ..c.problem().inputs };
        let local = LayerConfig { num_experts: 8, parallel: Parallelism::SINGLE, ..seq.clone() };
        let y = |class: LayerClass, sd| {
            let c = LayerConfig { class, ..local.clone() };
            Reference::ORACLE.forward(&c, sd, &inputs).unwrap()
        };
        let y_seq = y(LayerClass::Sequential, &sd);
        for (class, sd) in [(LayerClass::Grouped, &grouped_sd), (LayerClass::TeGrouped, &te_sd)] {
            let y_other = y(class, sd);
            let d = (&y_other - &y_seq).mapv(f64::abs).fold(0.0f64, |m, &v| m.max(v));
            assert!(d <= 1e-14, "{class} differs from sequential by {d}");
        }
    }
}

/// spec §4.1: SequentialMLP with one local expert ignores `tokens_per_expert` (Megatron passes the
/// whole input to `local_experts[0]`): a count that does not even sum to T gives the same result.
/// The grouped classes do not (they split by the counts) and must reject it.
#[test]
fn single_local_expert_sequential_ignores_tokens_per_expert() {
    let c = cfg(LayerClass::Sequential, 1, 16, 8);
    let case = Case { cfg: c.clone(), tokens_per_expert: vec![6], seed: 1, timing: WgradTiming::Immediate };
    let p = case.problem();
    let sd = to_state_dict(&c, &p.weights).unwrap();
    let y = Reference::EMULATED.forward(&c, &sd, &p.inputs).unwrap();
    for bogus in [0i64, 2, 99] {
        let inputs = Inputs { tokens_per_expert: vec![bogus], ..p.inputs.clone() };
        assert_eq!(Reference::EMULATED.forward(&c, &sd, &inputs).unwrap(), y);
        let te = LayerConfig { class: LayerClass::TeGrouped, ..c.clone() };
        let te_sd = to_state_dict(&te, &p.weights).unwrap();
        let err = Reference::EMULATED.forward(&te, &te_sd, &inputs).unwrap_err();
        assert!(err.to_string().contains("tokens_per_expert"), "{err}");
    }
}

/// tgale96/grouped_gemm 398709f, pytorch #172439 / PR #174314, TE #2499: the weight grads of
/// experts with no tokens must be exactly zero (not uninitialized, not NaN), in immediate and
/// deferred mode — the deferred store is pre-filled with NaN, so a skipped empty GEMM shows.
#[test]
fn empty_experts_get_exactly_zero_wgrad_immediate_and_deferred() {
    for class in [LayerClass::Sequential, LayerClass::TeGrouped, LayerClass::Grouped] {
        let c = LayerConfig { add_bias: class != LayerClass::Grouped, ..cfg(class, 4, 16, 32) };
        let case =
            Case { cfg: c.clone(), tokens_per_expert: vec![0, 128, 0, 64], seed: 398, timing: WgradTiming::Immediate };
        let p = case.problem();
        let timings: &[WgradTiming] = if class == LayerClass::Grouped {
            &[WgradTiming::Immediate]
        } else {
            &[WgradTiming::Immediate, WgradTiming::Deferred]
        };
        for &timing in timings {
            for layer in [Reference::EMULATED, Reference::ORACLE] {
                let r = run(layer, &c, &p.weights, &p.inputs, &p.grad_output, timing);
                let g = grads(&c, &r);
                for e in [0, 2] {
                    for (name, _, values) in g.experts[e].tensors() {
                        assert!(
                            values.iter().all(|&v| v == 0.0),
                            "{class} {timing:?} {}: expert {e} {name} not exactly 0",
                            layer.name()
                        );
                    }
                }
                for e in [1, 3] {
                    let w = &g.experts[e].fc1_weight;
                    assert!(w.iter().any(|&v| v != 0.0) && w.iter().all(|v| v.is_finite()));
                }
            }
        }
    }
}

/// T = 0 (fanshiqing/grouped_gemm "Input batch_sizes should not be all zeros!", TE PR #3019,
/// PyTorch PR #192497, MSLK PR #97, Megatron PR #4851; spec §4.4 step 3, §4.5.1): output
/// `[0, h]` and a zero gradient for EVERY parameter (never missing), in every class.
#[test]
fn all_zero_tokens_give_empty_output_and_zero_grads_for_every_parameter() {
    for class in LayerClass::ALL {
        let c = LayerConfig { add_bias: class != LayerClass::Grouped, ..cfg(class, 4, 16, 32) };
        let w = ExpertSet::random(&c, 3019);
        let inputs =
            Inputs { hidden_states: Array2::zeros((0, 16)), tokens_per_expert: vec![0; 4], probs: Array1::zeros(0) };
        let g = Array2::zeros((0, 16));
        for layer in [Reference::EMULATED, Reference::ORACLE] {
            let r = run(layer, &c, &w, &inputs, &g, WgradTiming::Immediate);
            assert_eq!(r.output.dim(), (0, 16));
            assert_eq!(r.grad_input.dim(), (0, 16));
            assert_eq!(r.grad_probs.len(), 0);
            for spec in param_specs(&c) {
                let t = r.weight_grads.get(&spec.name).unwrap_or_else(|| panic!("{class}: no grad for {}", spec.name));
                assert_eq!(t.shape(), spec.shape.as_slice());
                assert!(t.iter().all(|&v| v == 0.0), "{class}: {} not zero", spec.name);
            }
        }
    }
}

/// pytorch #154557 / #193633: a second backward reused uninitialized buffers and produced NaN.
/// Backward twice from the same forward gives identical results.
#[test]
fn backward_twice_gives_identical_results() {
    let c = cfg(LayerClass::TeGrouped, 4, 16, 32);
    let case =
        Case { cfg: c.clone(), tokens_per_expert: vec![3, 0, 5, 1], seed: 193633, timing: WgradTiming::Immediate };
    let p = case.problem();
    let fwd = forward(&c, &p.weights, &p.inputs, Numerics::Emulated(Dtype::Bf16)).unwrap();
    let a = fwd.backward(&p.grad_output, WgradTiming::Immediate).unwrap();
    let b = fwd.backward(&p.grad_output, WgradTiming::Immediate).unwrap();
    assert_eq!(a.grad_input, b.grad_input);
    assert_eq!(a.grad_probs, b.grad_probs);
    assert_eq!(a.weight_grads, b.weight_grads);
}

/// TE PR #3038 (backward_dw crashed with biases and delay_wgrad_compute) and spec §5.3: before
/// `backward_dw` the input and probs grads are final and the queued weight (and TE fc1 bias)
/// grads are pending; after it (fc2 then fc1) every grad equals the immediate backward's bit for
/// bit.
#[test]
fn deferred_wgrad_with_bias_equals_immediate_after_backward_dw() {
    for class in [LayerClass::TeGrouped, LayerClass::Sequential] {
        let c = LayerConfig { add_bias: true, ..cfg(class, 3, 16, 8) };
        let case = Case { cfg: c.clone(), tokens_per_expert: vec![4, 0, 3], seed: 3038, timing: WgradTiming::Deferred };
        let p = case.problem();
        let fwd = forward(&c, &p.weights, &p.inputs, Numerics::Emulated(Dtype::Bf16)).unwrap();
        let now = fwd.backward(&p.grad_output, WgradTiming::Immediate).unwrap();
        let mut later = fwd.backward(&p.grad_output, WgradTiming::Deferred).unwrap();
        assert_eq!(later.grad_input, now.grad_input);
        assert_eq!(later.grad_probs, now.grad_probs);
        let store = later.pending.take().expect("deferred backward queues the wgrad GEMMs");
        // One fc1 and one fc2 GEMM per expert, the empty one included (it must write zeros).
        assert_eq!(store.len(), 6);
        assert!(later.weight_grads.experts[0].fc1_weight.iter().all(|v| v.is_nan()));
        store.backward_dw(&mut later.weight_grads);
        assert_eq!(later.weight_grads, now.weight_grads, "{class}");
    }
}
