//! Hand-picked edge cases (style §13 "seeds first"), each with the reason it exists and its
//! source: `bugs-shapes-anchors.md` §A (issue/PR numbers), the spec section, or a Megatron unit
//! test. The table runs through every §10 property against the reference; the cases that pin
//! exact numbers or exact errors have their own tests below it.

use moe_harness::case::Case;
use moe_harness::properties::{check, Property, PropertyFailure, ReferenceBackend, Verdict};
use moe_reference::parallel::{run_parallel, EtpReduction};
use moe_reference::state_dict::convert;
use moe_reference::{
    forward, param_specs, to_state_dict, Activation, Dtype, ExpertLayer, ExpertSet, Inputs, LayerClass, LayerConfig,
    LayerError, Numerics, Parallelism, Reference, ReferenceError, WgradTiming,
};
use ndarray::{arr1, arr2, Array1, Array2};

/// One table entry.
struct EdgeCase {
    /// Test-readable name.
    name: &'static str,
    /// Why it exists and where it comes from.
    why: &'static str,
    case: Case,
}

fn cfg(class: LayerClass, e: usize, h: usize, f: usize) -> LayerConfig {
    LayerConfig { class, num_experts: e, hidden_size: h, ffn_hidden_size: f, ..LayerConfig::example() }
}

fn case(cfg: LayerConfig, tokens: &[i64], timing: WgradTiming) -> Case {
    Case { cfg, tokens_per_expert: tokens.to_vec(), seed: 42, timing }
}

fn tp_ep(tp: usize, ep: usize) -> Parallelism {
    Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 }
}

/// The edge-case table.
fn edge_cases() -> Vec<EdgeCase> {
    use LayerClass::{Grouped, Sequential, TeGrouped};
    use WgradTiming::{Deferred, Immediate};
    let mut out = Vec::new();
    for class in LayerClass::ALL {
        let c = cfg(class, 4, 16, 32);
        let timing = if class == Grouped { Immediate } else { Deferred };
        out.extend([
            EdgeCase {
                name: "single_token",
                why: "tokens = 1: the smallest GEMM, one row in one segment (style §13)",
                case: case(c.clone(), &[0, 1, 0, 0], timing),
            },
            EdgeCase {
                name: "empty_first_expert",
                why: "TE commit 971001394 (test cites PR #1527): empty split handling, first",
                case: case(c.clone(), &[0, 5, 3, 2], timing),
            },
            EdgeCase {
                name: "empty_middle_expert",
                why: "TE commit 971001394 / PR #1527: empty split in the middle",
                case: case(c.clone(), &[5, 0, 3, 2], timing),
            },
            EdgeCase {
                name: "empty_last_expert",
                why: "TE commit 971001394 / PR #1527: GroupedLinear failed when the LAST split was empty",
                case: case(c.clone(), &[5, 3, 2, 0], timing),
            },
            EdgeCase {
                name: "all_tokens_to_one_expert",
                why: "all rows routed to one expert, the others empty (style §13; megablocks #163 many empty groups)",
                case: case(c.clone(), &[0, 0, 40, 0], timing),
            },
            EdgeCase {
                name: "all_zero_tokens",
                why: "T = 0: fanshiqing/grouped_gemm asserts on all-zero batch sizes, TE PR #3019 (cuBLAS hang), \
                      Megatron PR #4851 (skipped fc1/fc2 -> EP hang); spec §4.4 step 3, §10.4",
                case: case(c.clone(), &[0, 0, 0, 0], timing),
            },
            EdgeCase {
                name: "wgrad_with_empty_groups",
                why: "tgale96/grouped_gemm 398709f (cutlass PR #1593): k = 0 wgrad problems must write zeros",
                case: case(c.clone(), &[0, 128, 0, 64], timing),
            },
            EdgeCase {
                name: "hidden_12_misaligned",
                why: "legacy TestParallelGroupedMLP: hidden must be a multiple of 16 for CUTLASS; 12 must work or be rejected",
                case: case(cfg(class, 2, 12, 48), &[3, 5], timing),
            },
            EdgeCase {
                name: "hidden_69_misaligned",
                why: "CUTLASS misaligned address (cutlass #519/#1058): odd hidden size 69",
                case: case(cfg(class, 2, 69, 12), &[7, 4], timing),
            },
        ]);
    }
    out.extend([
        EdgeCase {
            name: "pytorch_172439_zero_groups",
            why: "pytorch #172439: grouped_mm gives non-zero dW for zero-size groups (B200). Sizes \
                  [162,0,2577,446,0,83] kept; hidden 2048 / inter 768 scaled to 24 / 16 for CI",
            case: case(
                LayerConfig {
                    gated_linear_unit: false,
                    activation: Activation::Gelu,
                    ..cfg(TeGrouped, 6, 24, 16)
                },
                &[162, 0, 2577, 446, 0, 83],
                Immediate,
            ),
        },
        EdgeCase {
            name: "swiglu_with_tp2",
            why: "Megatron #360/#985: SwiGLU with TP > 1; each rank must hold [W_r; V_r]",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 1),
                    ..cfg(Sequential, 2, 16, 8)
                },
                &[5, 4],
                Immediate,
            ),
        },
        EdgeCase {
            name: "swiglu_tp2_ep2_grouped",
            why: "Megatron #360 with EP: GroupedMLP packs [W_r; V_r] per expert block; commit d81a037afd (grad scaling under TP x EP)",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 2),
                    ..cfg(Grouped, 4, 16, 8)
                },
                &[3, 0, 6, 2],
                Immediate,
            ),
        },
        EdgeCase {
            name: "square_expert_matrices",
            why: "transformers #47031: 2*ffn == hidden makes fc1 square, so a shape-based transpose cannot tell layouts apart",
            case: case(cfg(TeGrouped, 3, 16, 8), &[4, 2, 5], Immediate),
        },
        EdgeCase {
            name: "single_local_expert_sequential",
            why: "spec §4.1: SequentialMLP with E_l = 1 sends the whole input to expert 0",
            case: case(cfg(Sequential, 1, 16, 8), &[9], Deferred),
        },
        EdgeCase {
            name: "deferred_wgrad_with_bias",
            why: "TE PR #3038 review: backward_dw crashed with biases + delay_wgrad_compute",
            case: case(
                LayerConfig {
                    add_bias: true,
                    ..cfg(TeGrouped, 3, 16, 8)
                },
                &[4, 0, 3],
                Deferred,
            ),
        },
        EdgeCase {
            name: "deferred_wgrad_with_bias_sequential",
            why: "TE PR #3038 for SequentialMLP's TE linears (MLP.backward_dw: fc2 then fc1)",
            case: case(
                LayerConfig {
                    add_bias: true,
                    params_dtype: Dtype::F32,
                    ..cfg(Sequential, 3, 16, 8)
                },
                &[0, 5, 3],
                Deferred,
            ),
        },
        EdgeCase {
            name: "megatron_te_grouped_test_shapes",
            why: "spec §8.2 TestTEGroupedMLP: h=16, E=2, GLU silu, f=64, bf16, no bias",
            case: case(cfg(TeGrouped, 2, 16, 64), &[40, 24], Immediate),
        },
        EdgeCase {
            name: "megatron_sequential_test_config",
            why: "spec §8.3 TestTEParallelSequentialMLP: E=4 over EP=2, TP=2, h=12, counts [2,2] and [0,4]",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 2),
                    ..cfg(Sequential, 4, 12, 48)
                },
                &[2, 2, 0, 4],
                Deferred,
            ),
        },
    ]);
    out
}

/// Every table entry passes every property that applies to it, and at least one applies.
#[test]
fn every_edge_case_passes_every_property() {
    let mut failures = Vec::new();
    for ec in edge_cases() {
        let mut checked = 0;
        for property in Property::ALL {
            match check(&ReferenceBackend, property, &ec.case) {
                Ok(Verdict::Checked(_)) => checked += 1,
                Ok(Verdict::Skipped(_)) => {}
                Err(f) => {
                    failures.push(format!("{} ({}) / {}: {}\n{f}", ec.name, ec.why, property.name(), ec.case.summary()))
                }
            }
        }
        if checked == 0 {
            failures.push(format!("{}: every property skipped", ec.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------
// Exact numbers.

fn run(
    layer: Reference,
    cfg: &LayerConfig,
    w: &ExpertSet,
    inputs: &Inputs,
    g: &Array2<f64>,
    timing: WgradTiming,
) -> moe_reference::LayerRun {
    layer.forward_backward(cfg, &to_state_dict(cfg, w).unwrap(), inputs, g, timing).unwrap()
}

fn grads(cfg: &LayerConfig, r: &moe_reference::LayerRun) -> ExpertSet {
    moe_reference::from_state_dict(cfg, &r.weight_grads).unwrap()
}

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

// ---------------------------------------------------------------------------------------------
// Bad inputs: a clear error naming the tensor or field, never a panic.

fn problem(c: &LayerConfig, tokens: &[i64]) -> (ExpertSet, Inputs, Array2<f64>) {
    let p =
        Case { cfg: c.clone(), tokens_per_expert: tokens.to_vec(), seed: 5, timing: WgradTiming::Immediate }.problem();
    (p.weights, p.inputs, p.grad_output)
}

/// Runs the reference (both numerics) through the `ExpertLayer` API and returns the error text.
fn layer_error(c: &LayerConfig, w: &ExpertSet, inputs: &Inputs, g: &Array2<f64>) -> String {
    let sd = to_state_dict(&c.unsharded(), w).unwrap();
    let mut msg = None;
    for layer in [Reference::EMULATED, Reference::ORACLE] {
        let err = layer.forward_backward(c, &sd, inputs, g, WgradTiming::Immediate).expect_err("bad input accepted");
        assert!(matches!(err, LayerError::Invalid(_)), "{err:?}");
        // Forward alone fails the same way unless only the upstream gradient is bad.
        if let Err(fwd) = layer.forward(c, &sd, inputs) {
            assert_eq!(fwd.to_string(), err.to_string());
        }
        msg = Some(err.to_string());
    }
    msg.unwrap()
}

fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} does not mention {w:?}");
    }
}

/// `tokens_per_expert` must sum to T (spec §0 call contract).
#[test]
fn tokens_not_summing_to_rows_are_rejected() {
    let c = cfg(LayerClass::TeGrouped, 3, 16, 8);
    let (w, mut inputs, g) = problem(&c, &[2, 3, 1]);
    inputs.tokens_per_expert = vec![2, 3, 2];
    let msg = layer_error(&c, &w, &inputs, &g);
    assert_mentions(&msg, &["tokens_per_expert", "[2, 3, 2]", "sum to 7", "6 rows"]);
    // The same through the harness: an error verdict, not a panic.
    let bad = Case { cfg: c.clone(), tokens_per_expert: vec![2, -3, 1], seed: 0, timing: WgradTiming::Immediate };
    for property in Property::ALL {
        match check(&ReferenceBackend, property, &bad) {
            Err(PropertyFailure::Error(m)) => assert!(m.contains("negative"), "{m}"),
            other => panic!("{}: expected an error, got {other:?}", property.name()),
        }
    }
}

/// Negative counts are rejected, naming the expert.
#[test]
fn negative_token_counts_are_rejected() {
    let c = cfg(LayerClass::Sequential, 3, 16, 8);
    let (w, mut inputs, g) = problem(&c, &[2, 3, 1]);
    inputs.tokens_per_expert = vec![2, 5, -1];
    let msg = layer_error(&c, &w, &inputs, &g);
    assert_mentions(&msg, &["tokens_per_expert", "expert 2", "negative", "-1"]);
}

/// Wrong shapes of every input and of a parameter name the tensor and both shapes.
#[test]
fn wrong_shapes_are_rejected_naming_the_tensor() {
    let c = cfg(LayerClass::TeGrouped, 2, 16, 8);
    let (w, inputs, g) = problem(&c, &[2, 3]);
    let mut x = inputs.clone();
    x.hidden_states = Array2::zeros((5, 17));
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_local_hidden_states", "[5, 16]", "[5, 17]"]);
    let mut x = inputs.clone();
    x.probs = Array1::zeros(4);
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_probs", "[5]", "[4]"]);
    let mut x = inputs.clone();
    x.tokens_per_expert = vec![5];
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.tokens_per_expert", "[2]", "[1]"]);
    assert_mentions(&layer_error(&c, &w, &inputs, &Array2::zeros((5, 3))), &["input.grad_output", "[5, 16]", "[5, 3]"]);
    // A parameter of the wrong shape, a missing one and an unexpected one.
    let mut sd = to_state_dict(&c, &w).unwrap();
    sd.insert("linear_fc2.weight1".into(), ndarray::ArrayD::zeros(vec![8, 16]));
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["linear_fc2.weight1", "[16, 8]", "[8, 16]"]);
    sd.remove("linear_fc2.weight1");
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["missing", "linear_fc2.weight1", "TEGroupedMLP"]);
    let mut sd = to_state_dict(&c, &w).unwrap();
    sd.insert("linear_fc1.weight7".into(), ndarray::ArrayD::zeros(vec![16, 16]));
    let err = Reference::EMULATED.forward(&c, &sd, &inputs).unwrap_err().to_string();
    assert_mentions(&err, &["unexpected", "linear_fc1.weight7"]);
}

/// Unknown dtype, activation and class names are rejected, quoting the name and the choices.
#[test]
fn unknown_names_are_rejected_with_the_accepted_names() {
    let e = Dtype::parse("float8_e4m3").unwrap_err().to_string();
    assert_mentions(&e, &["dtype", "float8_e4m3", "bfloat16"]);
    let e = Activation::parse("relu").unwrap_err().to_string();
    assert_mentions(&e, &["activation", "relu", "squared_relu"]);
    let e = LayerClass::parse("InferenceGroupedMLP").unwrap_err().to_string();
    assert_mentions(&e, &["layer", "InferenceGroupedMLP", "te_grouped"]);
}

/// NaN/Inf in the inputs, the probs or the upstream gradient: the error names the tensor and
/// the index of the first bad element (huggingface/transformers PR #45621: NaN rows defeat zero
/// routing weights, so they must never be silently accepted).
#[test]
fn non_finite_inputs_are_rejected_naming_tensor_and_index() {
    let c = cfg(LayerClass::Sequential, 2, 16, 8);
    let (w, inputs, g) = problem(&c, &[2, 3]);
    let mut x = inputs.clone();
    x.hidden_states[[3, 7]] = f64::NAN;
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_local_hidden_states", "[3, 7]", "NaN"]);
    let mut x = inputs.clone();
    x.probs[1] = f64::INFINITY;
    assert_mentions(&layer_error(&c, &w, &x, &g), &["input.permuted_probs", "[1]", "inf"]);
    let mut bad_g = g.clone();
    bad_g[[4, 0]] = f64::NEG_INFINITY;
    assert_mentions(&layer_error(&c, &w, &inputs, &bad_g), &["input.grad_output", "[4, 0]", "-inf"]);
}

/// Configurations Megatron rejects are rejected here with the field in the message: ffn not
/// divisible by the ETP size, experts not divisible by the EP size, bias with ETP > 1 (spec
/// §6.3), GroupedMLP with bias or outside bf16 (spec §4.4), GroupedMLP GLU with quick_gelu.
#[test]
fn invalid_configurations_are_rejected_naming_the_field() {
    let base = cfg(LayerClass::TeGrouped, 4, 16, 8);
    let cases: Vec<(LayerConfig, &[&str])> = vec![
        (
            LayerConfig { ffn_hidden_size: 9, parallel: tp_ep(2, 1), ..base.clone() },
            &["ffn_hidden_size (9)", "expert-tensor-parallel size (2)"],
        ),
        (
            LayerConfig { num_experts: 6, parallel: tp_ep(1, 4), ..base.clone() },
            &["num_experts (6)", "expert-parallel size (4)"],
        ),
        (
            LayerConfig { add_bias: true, parallel: tp_ep(2, 1), ..base.clone() },
            &["add_bias_linear", "expert_tensor_parallel_size 2"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, add_bias: true, ..base.clone() },
            &["GroupedMLP", "add_bias_linear"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, params_dtype: Dtype::F32, ..base.clone() },
            &["GroupedMLP", "bfloat16", "float32"],
        ),
        (
            LayerConfig { class: LayerClass::Grouped, activation: Activation::QuickGelu, ..base.clone() },
            &["GroupedMLP", "quick_gelu"],
        ),
        (LayerConfig { clamp_value: Some(f64::INFINITY), ..base.clone() }, &["activation_func_clamp_value", "inf"]),
    ];
    for (c, words) in cases {
        let msg = c.validate().unwrap_err().to_string();
        assert_mentions(&msg, words);
        // Through every entry point: the trait, the parallel simulation and the harness.
        let err = Reference::EMULATED.supports(&c).unwrap_err();
        assert!(matches!(err, LayerError::Invalid(ReferenceError::Config(_))));
        let case =
            Case { cfg: c.clone(), tokens_per_expert: vec![1; c.num_experts], seed: 0, timing: WgradTiming::Immediate };
        let p = Case { cfg: c.unsharded(), ..case.clone() };
        if c.unsharded().validate().is_ok() {
            let pr = p.problem();
            let e = run_parallel(
                &Reference::EMULATED,
                &c,
                &pr.weights,
                &pr.inputs,
                &pr.grad_output,
                WgradTiming::Immediate,
                EtpReduction::megatron(&c),
            )
            .unwrap_err();
            assert_mentions(&e.to_string(), words);
        }
        for property in Property::ALL {
            assert!(
                matches!(check(&ReferenceBackend, property, &case), Err(PropertyFailure::Error(m)) if m.contains(words[0])),
                "{}: {}",
                property.name(),
                case.summary()
            );
        }
    }
}

/// Large-magnitude activations (style §13, candle's `rms_norm_large_magnitude`): inputs scaled
/// by 256 push silu/gelu into saturation, quick-GELU's sigmoid to 0/1 and squared ReLU to ~1e5;
/// the bf16 and f32 emulations must still match the oracle under the error model (relative
/// error scales, no absolute floor to hide behind). f16 is excluded on purpose: relu(a)² of
/// such inputs overflows f16's 65504, as it would in PyTorch.
#[test]
fn large_magnitude_activations_match_oracle() {
    use moe_harness::compare::compare_runs;
    use moe_harness::properties::run_layout;
    use moe_harness::Tolerance;
    use moe_reference::oracle_with_scales;
    let mut failures = Vec::new();
    for dtype in [Dtype::Bf16, Dtype::F32] {
        for activation in Activation::ALL {
            for glu in [false, true] {
                let c = LayerConfig {
                    activation,
                    gated_linear_unit: glu,
                    params_dtype: dtype,
                    ..cfg(LayerClass::TeGrouped, 3, 16, 8)
                };
                let case = Case {
                    cfg: c.clone(),
                    tokens_per_expert: vec![5, 0, 7],
                    seed: 256,
                    timing: WgradTiming::Immediate,
                };
                let mut p = case.problem();
                p.inputs.hidden_states.mapv_inplace(|v| v * 256.0);
                let sd = to_state_dict(&c, &p.weights).unwrap();
                let o = oracle_with_scales(&c, &sd, &p.inputs, &p.grad_output).unwrap();
                let got = run_layout(&Reference::EMULATED, &c, &p, WgradTiming::Immediate, EtpReduction::megatron(&c))
                    .unwrap();
                let tol = Tolerance::error_model();
                for d in compare_runs(&c, &got, &o.run, Some((&o).into()), tol) {
                    if !d.passed() {
                        failures.push(format!("{}: {d}", case.summary()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// pytorch #172439 at its reported size (hidden 2048, inter 768, sizes [162,0,2577,446,0,83]):
/// the weight grads of the two empty experts are exactly zero and the others are finite (bf16
/// emulation, ~3 s in the dev profile). The table runs the same split scaled down through every
/// property.
#[test]
fn pytorch_172439_full_size_empty_experts_get_zero_wgrad() {
    let c = LayerConfig {
        gated_linear_unit: false,
        activation: Activation::Gelu,
        ..cfg(LayerClass::TeGrouped, 6, 2048, 768)
    };
    let tokens = [162, 0, 2577, 446, 0, 83];
    let (w, inputs, g) = problem(&c, &tokens);
    let r = run(Reference::EMULATED, &c, &w, &inputs, &g, WgradTiming::Immediate);
    let gr = grads(&c, &r);
    for (e, &n) in tokens.iter().enumerate() {
        for (name, _, values) in gr.experts[e].tensors() {
            if n == 0 {
                assert!(values.iter().all(|&v| v == 0.0), "expert {e} {name} not zero");
            } else {
                assert!(values.iter().all(|v| v.is_finite()), "expert {e} {name} not finite");
            }
        }
    }
}
