//! FP8 expert layers (issue 12 items 3–5): the reference's emulation of TransformerEngine's fp8
//! GEMMs under every recipe passes every property against the unquantized f64 oracle and its fp8
//! error model; planted fp8 bugs fail; TE's refusals are clear errors naming the tensor.

use moe_harness::case::Case;
use moe_harness::compare::compare_runs;
use moe_harness::properties::{check, Backend, Property, ReferenceBackend, Verdict};
use moe_harness::tolerance::Tolerance;
use moe_reference::layer::{Fp8Fault, Fp8Operand, Fp8Run, Fp8State};
use moe_reference::{
    initial_fp8_run, oracle_with_scales_fp8, to_state_dict, Activation, ExpertLayer, Fp8Config, Fp8Recipe, Inputs,
    LayerClass, LayerConfig, LayerError, LayerRun, Reference, StateDict, TeFormat, WgradTiming,
};
use ndarray::Array2;

/// A small fp8 configuration every recipe accepts (h, N1, N2 multiples of 32).
fn fp8_cfg(class: LayerClass, recipe: Fp8Recipe, format: TeFormat) -> LayerConfig {
    LayerConfig {
        class,
        num_experts: 4,
        hidden_size: 32,
        ffn_hidden_size: 32,
        fp8: Some(Fp8Config::new(recipe).with_format(format)),
        ..LayerConfig::example()
    }
}

/// Unaligned splits (padded to the alignment by the layer) with an empty expert.
fn case(cfg: LayerConfig, timing: WgradTiming) -> Case {
    Case { cfg, tokens_per_expert: vec![5, 0, 19, 8], seed: 7, timing }
}

fn assert_passes(backend: &dyn Backend, c: &Case) {
    for property in Property::ALL {
        match check(backend, property, c) {
            Ok(Verdict::Checked(_)) | Ok(Verdict::Skipped(_)) => {}
            Err(e) => panic!("{} fails {} on {}:\n{e}", backend.name(), property.name(), c.summary()),
        }
    }
}

#[test]
fn every_recipe_and_class_passes_every_property_against_the_oracle() {
    for recipe in Fp8Recipe::ALL {
        for format in TeFormat::ALL {
            for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
                for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
                    assert_passes(&ReferenceBackend, &case(fp8_cfg(class, recipe, format), timing));
                }
            }
        }
    }
}

#[test]
fn options_and_variants_pass_every_property() {
    let base = fp8_cfg(LayerClass::TeGrouped, Fp8Recipe::Blockwise, TeFormat::E4M3);
    let f = base.fp8.unwrap();
    let variants = [
        // f32 block scales, fp8 activation-input store, a non-GLU activation with bias.
        LayerConfig { fp8: Some(Fp8Config { power_2_scales: false, ..f }), ..base.clone() },
        LayerConfig { fp8: Some(Fp8Config { activation_input_store: true, ..f }), ..base.clone() },
        LayerConfig { gated_linear_unit: false, activation: Activation::Gelu, add_bias: true, ..base.clone() },
        // Probs on the input, a clamped GLU, expert parallelism.
        LayerConfig { apply_probs_on_input: true, clamp_value: Some(0.5), ..base.clone() },
        LayerConfig { parallel: moe_reference::Parallelism { ep_size: 2, ..Default::default() }, ..base.clone() },
        // Tensorwise with power-of-2 scales, GroupedLinear without padding (TE accepts it).
        LayerConfig {
            fp8: Some(Fp8Config {
                power_2_scales: true,
                pad_to_alignment: false,
                ..Fp8Config::new(Fp8Recipe::Tensorwise)
            }),
            ..base.clone()
        },
    ];
    for cfg in variants {
        assert_passes(&ReferenceBackend, &case(cfg, WgradTiming::Immediate));
    }
}

#[test]
fn grouped_mlp_has_no_fp8_path() {
    let cfg = fp8_cfg(LayerClass::Grouped, Fp8Recipe::Tensorwise, TeFormat::Hybrid);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("GroupedMLP has no fp8 path"), "{err}");
}

fn run_err(cfg: &LayerConfig, tokens: Vec<i64>) -> String {
    let c = Case { cfg: cfg.clone(), tokens_per_expert: tokens, seed: 1, timing: WgradTiming::Immediate };
    let p = c.problem();
    let params = to_state_dict(cfg, &p.weights).unwrap();
    match Reference::EMULATED.forward_backward(cfg, &params, &p.inputs, &p.grad_output, WgradTiming::Immediate) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unaligned_splits_are_refused_exactly_where_te_refuses_them() {
    let nopad = |class, recipe| {
        let mut cfg = fp8_cfg(class, recipe, TeFormat::E4M3);
        cfg.fp8 = cfg.fp8.map(|f| Fp8Config { pad_to_alignment: false, ..f });
        cfg
    };
    // MXFP8: every quantized tensor needs dims divisible by 32.
    let err = run_err(&nopad(LayerClass::TeGrouped, Fp8Recipe::Mxfp8), vec![32, 0, 5, 32]);
    assert!(err.contains("expert 2 linear_fc1.input") && err.contains("divisible by 32"), "{err}");
    // The same split padded by Megatron runs.
    assert_eq!(run_err(&fp8_cfg(LayerClass::TeGrouped, Fp8Recipe::Mxfp8, TeFormat::E4M3), vec![32, 0, 5, 32]), "");
    // GroupedLinear accepts any split under the per-tensor and block recipes.
    for recipe in [Fp8Recipe::Tensorwise, Fp8Recipe::Delayed, Fp8Recipe::Blockwise] {
        assert_eq!(run_err(&nopad(LayerClass::TeGrouped, recipe), vec![3, 0, 5, 7]), "", "{recipe}");
    }
    // TE's Linear (SequentialMLP) asserts assert_dim_for_fp8_exec under every recipe.
    let err = run_err(&nopad(LayerClass::Sequential, Fp8Recipe::Blockwise), vec![8, 0, 5, 8]);
    assert!(err.contains("expert 2 linear_fc1.input") && err.contains("divisible by 8"), "{err}");
    // MXFP8 also needs the hidden sizes to be multiples of 32.
    let cfg = LayerConfig { hidden_size: 48, ..fp8_cfg(LayerClass::TeGrouped, Fp8Recipe::Mxfp8, TeFormat::E4M3) };
    let err = run_err(&cfg, vec![1, 2, 3, 4]);
    assert!(err.contains("linear_fc1.input") && err.contains("divisible by 32"), "{err}");
}

/// The reference with a planted fp8 fault.
struct Faulty(Fp8Fault);

impl ExpertLayer for Faulty {
    fn name(&self) -> String {
        format!("reference with {:?}", self.0)
    }
    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
        Reference::EMULATED.supports(cfg)
    }
    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
        let g = Array2::zeros((inputs.num_tokens(), cfg.hidden_size));
        Ok(self.forward_backward(cfg, params, inputs, &g, WgradTiming::Immediate)?.output)
    }
    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        let run = initial_fp8_run(cfg)?.map(|r| Fp8Run { fault: Some(self.0), ..r });
        Ok(Reference::EMULATED.forward_backward_fp8(cfg, params, inputs, grad_output, timing, run)?.0)
    }
}

struct FaultyBackend(Faulty);

impl Backend for FaultyBackend {
    fn name(&self) -> String {
        self.0.name()
    }
    fn layer(&self, _class: LayerClass) -> Option<&dyn ExpertLayer> {
        Some(&self.0)
    }
}

/// A scale 16× off in any one operand fails (the worst-case fp8 bound is too wide for 2×: see the
/// tolerance module's FP8 section).
#[test]
fn a_wrong_scale_of_any_operand_fails_matches_oracle() {
    for recipe in Fp8Recipe::ALL {
        for op in Fp8Operand::ALL {
            let backend = FaultyBackend(Faulty(Fp8Fault::WrongScale(op)));
            let c = case(fp8_cfg(LayerClass::TeGrouped, recipe, TeFormat::Hybrid), WgradTiming::Immediate);
            assert!(check(&backend, Property::MatchesOracle, &c).is_err(), "{recipe} {op:?} not seen");
        }
    }
}

/// Skipping a quantization makes the layer *more* accurate, so no comparison with the oracle can
/// see it; a comparison with the reference's fp8 emulation (what an fp8 dump is compared with,
/// bit for bit up to the GEMM's summation order) does.
#[test]
fn a_skipped_quantization_is_invisible_to_the_oracle_but_not_to_the_fp8_emulation() {
    let cfg = fp8_cfg(LayerClass::TeGrouped, Fp8Recipe::Tensorwise, TeFormat::Hybrid);
    let c = case(cfg.clone(), WgradTiming::Immediate);
    let p = c.problem();
    let params = to_state_dict(&cfg, &p.weights).unwrap();
    let fwd = |layer: &dyn ExpertLayer| {
        layer.forward_backward(&cfg, &params, &p.inputs, &p.grad_output, WgradTiming::Immediate).unwrap()
    };
    let good = fwd(&Reference::EMULATED);
    for op in Fp8Operand::ALL {
        let bad = fwd(&Faulty(Fp8Fault::SkipQuantization(op)));
        let backend = FaultyBackend(Faulty(Fp8Fault::SkipQuantization(op)));
        assert!(check(&backend, Property::MatchesOracle, &c).is_ok(), "{op:?}");
        let diffs = compare_runs(&cfg, &bad, &good, None, Tolerance::EXACT);
        assert!(diffs.iter().any(|d| !d.passed()), "{op:?}: skipping its quantization changed nothing");
    }
}

/// Delayed scaling over three steps: the state carried from step to step (explicitly), each
/// step within the error model of the oracle for that step's scales.
#[test]
fn delayed_scaling_keeps_its_state_across_steps() {
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        let mut cfg = fp8_cfg(class, Fp8Recipe::Delayed, TeFormat::Hybrid);
        cfg.fp8 = cfg.fp8.map(|f| Fp8Config {
            delayed: moe_reference::fp8::DelayedScalingConfig { amax_history_len: 4, ..f.delayed },
            ..f
        });
        let c = case(cfg.clone(), WgradTiming::Deferred);
        let p = c.problem();
        let params = to_state_dict(&cfg, &p.weights).unwrap();
        let mut state = Fp8State::new(&cfg).unwrap();
        let mut scales = Vec::new();
        for step in 0..3 {
            let run = |s: &Fp8State| Some(Fp8Run { config: cfg.fp8.unwrap(), state: s.clone(), fault: None });
            let (got, after) = Reference::EMULATED
                .forward_backward_fp8(&cfg, &params, &p.inputs, &p.grad_output, WgradTiming::Deferred, run(&state))
                .unwrap();
            let o = oracle_with_scales_fp8(&cfg, &params, &p.inputs, &p.grad_output, run(&state)).unwrap();
            for d in compare_runs(&cfg, &got, &o.run, Some((&o).into()), Tolerance::error_model()) {
                assert!(d.passed(), "step {step}: {d}");
            }
            state = after.unwrap();
            state.update();
            let s = state.get(0, Fp8Operand::Fc1Input).unwrap().scale();
            scales.push(s);
        }
        // Step 1 starts at scale 1; the update derives 448/amax from the recorded amaxes.
        assert!(scales.iter().all(|&s| s != 1.0), "{scales:?}");
    }
}

/// The fp8 bound is much wider than bf16's but still tight enough to matter: the worst element's
/// error is a visible fraction of it.
#[test]
fn the_fp8_error_model_is_used_and_not_vacuous() {
    let cfg = fp8_cfg(LayerClass::TeGrouped, Fp8Recipe::Blockwise, TeFormat::E4M3);
    let c = case(cfg.clone(), WgradTiming::Immediate);
    let p = c.problem();
    let params = to_state_dict(&cfg, &p.weights).unwrap();
    let got =
        Reference::EMULATED.forward_backward(&cfg, &params, &p.inputs, &p.grad_output, WgradTiming::Immediate).unwrap();
    let o = oracle_with_scales_fp8(&cfg, &params, &p.inputs, &p.grad_output, initial_fp8_run(&cfg).unwrap()).unwrap();
    let diffs = compare_runs(&cfg, &got, &o.run, Some((&o).into()), Tolerance::error_model());
    let worst = diffs.iter().map(|d| d.worst_ratio).fold(0.0, f64::max);
    assert!(diffs.iter().all(|d| d.passed()));
    assert!(worst > 0.01, "worst error only {worst} of the bound");
    // Without fp8 the bf16 bound is far tighter: the fp8 result fails it.
    let bf16 = LayerConfig { fp8: None, padding_multiple: Some(16), ..cfg.clone() };
    let ob = moe_reference::oracle_with_scales(&bf16, &params, &p.inputs, &p.grad_output).unwrap();
    let diffs = compare_runs(&bf16, &got, &ob.run, Some((&ob).into()), Tolerance::error_model());
    assert!(diffs.iter().any(|d| !d.passed()), "fp8 results pass the bf16 bound");
}
