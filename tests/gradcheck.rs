//! Central-difference checks of every gradient of the f64 oracle (`Numerics::Oracle`).
//!
//! Everything else is diffed against the oracle, so its backward must be right on its own: the
//! loss `L = Σ G ⊙ y` is differentiated numerically with respect to every element of the input,
//! the probs and every weight and bias of every expert, and compared with `backward`. The sweep
//! covers every class × activation × GLU × bias × clamp × offset × probs-on-input combination the
//! classes accept, on tiny shapes with an empty expert.
//!
//! Elements whose perturbation could cross a kink — a pre-activation within 1e-4 of a clamp
//! boundary (`g = c`, `l = ±c`) or of the ReLU kink at 0 — are excluded (the one-sided
//! derivatives differ there, so a central difference means nothing).

use moe_harness::case::Case;
use moe_reference::{forward, Activation, Dtype, ExpertSet, Inputs, LayerClass, LayerConfig, Numerics, WgradTiming};
use ndarray::{s, Array2};

/// Finite-difference step.
const STEP: f64 = 1e-6;
/// Relative tolerance on the scale (max |·|) of each gradient tensor.
const RTOL: f64 = 1e-6;
/// Distance from a kink below which an element is not checked.
const KINK: f64 = 1e-4;

fn loss(cfg: &LayerConfig, w: &ExpertSet, inputs: &Inputs, g: &Array2<f64>) -> f64 {
    let y = forward(cfg, w, inputs, Numerics::Oracle).expect("valid case");
    (y.output() * g).sum()
}

/// Which rows of the input and which (expert, fc1 output) pre-activations are near a kink.
struct Kinks {
    rows: Vec<bool>,
    /// `[expert][fc1 output index]`.
    fc1: Vec<Vec<bool>>,
}

/// Finds pre-activations `a = x'·W1ᵀ + b1` (x' = p·x with probs on the input) within
/// [`KINK`] of a kink of the activation or of the GLU clamp.
fn kinks(cfg: &LayerConfig, w: &ExpertSet, inputs: &Inputs) -> Kinks {
    let t = inputs.num_tokens();
    let mut rows = vec![false; t];
    let mut fc1 = vec![vec![false; cfg.n1()]; w.experts.len()];
    let k = cfg.n2();
    let clamp = if cfg.class == LayerClass::Grouped { None } else { cfg.clamp_value };
    let mut start = 0;
    for (e, &n) in inputs.tokens_per_expert.iter().enumerate() {
        let n = n as usize;
        let mut x = inputs.hidden_states.slice(s![start..start + n, ..]).to_owned();
        if cfg.apply_probs_on_input {
            for (mut row, &p) in x.rows_mut().into_iter().zip(inputs.probs.slice(s![start..])) {
                row *= p;
            }
        }
        let mut a = x.dot(&w.experts[e].fc1_weight.t());
        if let Some(b1) = &w.experts[e].fc1_bias {
            a += b1;
        }
        for i in 0..n {
            for j in 0..cfg.n1() {
                let v = a[[i, j]];
                // Interleaved (spec §4.10): blocks of s gate rows, then s linear rows.
                let gate =
                    !cfg.gated_linear_unit || cfg.glu_interleave_size.map_or(j < k, |s| (j / s).is_multiple_of(2));
                let mut near = cfg.activation == Activation::SquaredRelu && gate && v.abs() < KINK;
                if let (Some(c), true) = (clamp, cfg.gated_linear_unit) {
                    near |= if gate { (v - c).abs() < KINK } else { (v.abs() - c).abs() < KINK };
                }
                if near {
                    rows[start + i] = true;
                    fc1[e][j] = true;
                }
            }
        }
        start += n;
    }
    Kinks { rows, fc1 }
}

/// Elements compared and elements skipped near a kink, over a whole check.
#[derive(Default)]
struct Tally {
    compared: usize,
    skipped: usize,
}

/// Compares one gradient tensor with its central differences; returns a description of every
/// mismatch. `perturb(i, h)` returns the loss with element `i` moved by `h`.
fn compare(
    what: &str,
    analytic: &[f64],
    skip: &dyn Fn(usize) -> bool,
    perturb: &mut dyn FnMut(usize, f64) -> f64,
    tally: &mut Tally,
) -> Vec<String> {
    let scale = analytic.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
    let mut bad = Vec::new();
    for (i, &want) in analytic.iter().enumerate() {
        if skip(i) {
            tally.skipped += 1;
            continue;
        }
        tally.compared += 1;
        let fd = (perturb(i, STEP) - perturb(i, -STEP)) / (2.0 * STEP);
        if (fd - want).abs() > RTOL * scale {
            bad.push(format!("{what}[{i}]: backward {want:.12e}, central difference {fd:.12e} (scale {scale:.3e})"));
        }
    }
    bad
}

/// Checks every gradient of one configuration; returns the mismatches.
fn gradcheck(cfg: &LayerConfig, tokens: &[i64], seed: u64, tally: &mut Tally) -> Vec<String> {
    let case = Case { cfg: cfg.clone(), tokens_per_expert: tokens.to_vec(), seed, timing: WgradTiming::Immediate };
    let p = case.problem();
    let (w, inputs, g) = (p.weights, p.inputs, p.grad_output);
    let bwd = forward(cfg, &w, &inputs, Numerics::Oracle)
        .and_then(|f| f.backward(&g, WgradTiming::Immediate))
        .expect("valid case");
    let near = kinks(cfg, &w, &inputs);
    let h = cfg.hidden_size;
    let mut bad = Vec::new();

    // dx: rows near a kink skipped.
    let dx: Vec<f64> = bwd.grad_input.iter().copied().collect();
    bad.extend(compare(
        "grad_input",
        &dx,
        &|i| near.rows[i / h],
        &mut |i, d| {
            let mut x = inputs.clone();
            x.hidden_states[[i / h, i % h]] += d;
            loss(cfg, &w, &x, &g)
        },
        tally,
    ));
    // dprobs.
    bad.extend(compare(
        "grad_probs",
        &bwd.grad_probs.to_vec(),
        &|i| near.rows[i],
        &mut |i, d| {
            let mut x = inputs.clone();
            x.probs[i] += d;
            loss(cfg, &w, &x, &g)
        },
        tally,
    ));
    // Every weight and bias of every expert.
    for (e, grads) in bwd.weight_grads.experts.iter().enumerate() {
        for (name, shape, values) in grads.tensors() {
            let cols = shape.get(1).copied().unwrap_or(1);
            let fc1_row = |i: usize| if shape.len() == 2 { i / cols } else { i };
            let skip = |i: usize| name.starts_with("fc1") && near.fc1[e][fc1_row(i)];
            bad.extend(compare(
                &format!("expert {e} {name}"),
                &values,
                &skip,
                &mut |i, d| {
                    let mut w2 = w.clone();
                    let x = &mut w2.experts[e];
                    match name {
                        "fc1_weight" => x.fc1_weight[[i / cols, i % cols]] += d,
                        "fc2_weight" => x.fc2_weight[[i / cols, i % cols]] += d,
                        "fc1_bias" => x.fc1_bias.as_mut().unwrap()[i] += d,
                        "fc2_bias" => x.fc2_bias.as_mut().unwrap()[i] += d,
                        other => unreachable!("unknown tensor {other}"),
                    }
                    loss(cfg, &w2, &inputs, &g)
                },
                tally,
            ));
        }
    }
    bad
}

/// Every valid combination of class × activation × GLU × bias × clamp × offset × probs-on-input
/// (clamp and offset only with GLU, as Megatron's config validation requires), and the GLU
/// TEGroupedMLP ones again with Megatron HEAD's GLU interleaving (block size 1).
fn sweep() -> Vec<LayerConfig> {
    let mut out = Vec::new();
    for class in LayerClass::ALL {
        for activation in Activation::ALL {
            for glu in [false, true] {
                for bias in [false, true] {
                    for clamp in [None, Some(0.5)] {
                        for offset in [0.0, 1.0] {
                            for (probs_on_input, interleave) in
                                [(false, None), (true, None), (false, Some(1)), (true, Some(1))]
                            {
                                if !glu && (clamp.is_some() || offset != 0.0) {
                                    continue;
                                }
                                // GLU interleaving (spec §4.10) exists in a GLU TEGroupedMLP only.
                                if interleave.is_some() && !(glu && class == LayerClass::TeGrouped) {
                                    continue;
                                }
                                let cfg = LayerConfig {
                                    class,
                                    num_experts: 3,
                                    hidden_size: 4,
                                    ffn_hidden_size: 3,
                                    gated_linear_unit: glu,
                                    activation,
                                    add_bias: bias,
                                    clamp_value: clamp,
                                    glu_linear_offset: offset,
                                    apply_probs_on_input: probs_on_input,
                                    params_dtype: if class == LayerClass::Grouped { Dtype::Bf16 } else { Dtype::F32 },
                                    probs_dtype: Dtype::F32,
                                    padding_multiple: None,
                                    parallel: Default::default(),
                                    fp8: None,
                                    glu_interleave_size: interleave,
                                };
                                if cfg.validate().is_ok() {
                                    out.push(cfg);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Every gradient of the oracle equals its central difference, for every configuration of the
/// sweep, with an empty middle expert (its grads must come out exactly zero, which the central
/// difference confirms).
#[test]
fn oracle_gradients_match_central_differences() {
    let configs = sweep();
    // Every class contributes, and the sweep is not silently emptied by validation.
    for class in LayerClass::ALL {
        assert!(configs.iter().any(|c| c.class == class), "no {class} config");
    }
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    for (i, cfg) in configs.iter().enumerate() {
        let bad = gradcheck(cfg, &[3, 0, 2], 77 + i as u64, &mut tally);
        if !bad.is_empty() {
            failures.push(format!("{cfg:?}\n  {}", bad.into_iter().take(6).collect::<Vec<_>>().join("\n  ")));
        }
    }
    // The kink exclusion must stay rare, or the check would be vacuous.
    assert!(
        tally.skipped * 100 < tally.compared,
        "{} elements skipped near kinks, {} compared",
        tally.skipped,
        tally.compared
    );
    assert!(
        failures.is_empty(),
        "{} of {} configurations have wrong gradients:\n{}",
        failures.len(),
        configs.len(),
        failures.join("\n")
    );
}

/// A clamp small enough that most pre-activations are clamped exercises the masked branches
/// (the sweep's 0.5 clamps only some): with c = 0.05 the gate and linear masks are mostly 0.
#[test]
fn oracle_gradients_match_central_differences_when_mostly_clamped() {
    for class in [LayerClass::Sequential, LayerClass::TeGrouped] {
        let cfg = LayerConfig {
            class,
            num_experts: 2,
            hidden_size: 4,
            ffn_hidden_size: 3,
            clamp_value: Some(0.05),
            glu_linear_offset: 1.0,
            add_bias: true,
            params_dtype: Dtype::F32,
            ..LayerConfig::example()
        };
        let bad = gradcheck(&cfg, &[4, 3], 5, &mut Tally::default());
        assert!(bad.is_empty(), "{class}:\n{}", bad.join("\n"));
    }
}
