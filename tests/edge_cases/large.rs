//! Large inputs: large-magnitude activations and pytorch #172439 at its reported size.

use super::{cfg, grads, problem, run};
use moe_harness::case::Case;
use moe_reference::parallel::EtpReduction;
use moe_reference::{to_state_dict, Activation, Dtype, LayerClass, LayerConfig, Reference, WgradTiming};

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
