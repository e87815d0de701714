//! The single-layout properties: matches-oracle, class equivalence, zero tokens, padding
//! neutrality, deferred wgrad and probs linearity.

use super::{internal, lift, oracle, oracle_paired, verdict, Ctx, PropertyFailure, Verdict};
use crate::case::Case;
use crate::compare::{compare_runs, compare_state_dicts, compare_tensor, Bounds};
use crate::tolerance::Tolerance;
use moe_reference::{to_state_dict, ExpertSet, LayerClass, LayerConfig, LayerError, WgradTiming};
use ndarray::{s, Array1, Array2};

/// The unsharded layer against the oracle.
pub(super) fn matches_oracle(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let global = ctx.cfg().unsharded();
    let o = oracle(&global, &ctx.problem)?;
    match ctx.run(ctx.layer, &global, &ctx.problem, ctx.case.timing) {
        Ok(got) => verdict(compare_runs(&global, &got, &o.run, Some((&o).into()), ctx.tol)),
        Err(e) => lift(e),
    }
}

/// Whether two classes compute the same function for these configurations (spec §4.9):
/// GroupedMLP ignores the clamp and the GLU offset, so it is only equivalent when neither is set.
fn classes_agree(a: &LayerConfig, b: &LayerConfig) -> bool {
    let grouped = a.class == LayerClass::Grouped || b.class == LayerClass::Grouped;
    !(grouped && (a.clamp_value.is_some() || a.glu_linear_offset != 0.0))
}

/// The backend's other classes against its class of the case, on converted weights.
pub(super) fn class_equivalence(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, p) = (ctx.cfg(), &ctx.problem);
    let global = cfg.unsharded();
    let o = oracle(cfg, p)?;
    let first = match ctx.run(ctx.layer, cfg, p, WgradTiming::Immediate) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    let first_grads = moe_reference::from_state_dict(&global, &first.weight_grads).map_err(internal)?;
    // Both sides carry storage-dtype rounding (at different points): twice the tolerance.
    let t2 = ctx.tol.times(2.0);
    let mut diffs = Vec::new();
    // A GLU-interleaved TEGroupedMLP (spec §4.10) is compared with the other classes on its
    // weights un-interleaved: they have no interleaving, and its weight grads come back through
    // the same permutation.
    let size = cfg.glu_interleave_size;
    let canonical = crate::case::Problem { weights: p.weights.glu_deinterleaved(size), ..p.clone() };
    for other in LayerClass::ALL.into_iter().filter(|&c| c != cfg.class) {
        let other_cfg = LayerConfig { class: other, glu_interleave_size: None, ..cfg.clone() };
        if other_cfg.validate().is_err() {
            continue;
        }
        let Some(other_layer) = ctx.backend.layer(other) else {
            continue;
        };
        if other_layer.supports(&other_cfg).is_err() || !classes_agree(cfg, &other_cfg) {
            continue;
        }
        let second = match ctx.run(other_layer, &other_cfg, &canonical, WgradTiming::Immediate) {
            Ok(r) => r,
            Err(LayerError::Unsupported(_)) => continue,
            // TE refuses some fp8 shapes in one class only (SequentialMLP's `Linear` asserts
            // `assert_dim_for_fp8_exec`, `GroupedLinear` does not): no equivalence to check.
            Err(LayerError::Invalid(_)) if other_cfg.fp8.is_some() => continue,
            Err(e) => return Err(internal(e)),
        };
        // The output and the input/probs grads (the first three diffs); the weight grads are
        // in the other class's layout and are compared below, converted.
        let mut d = compare_runs(&global, &first, &second, Some((&o).into()), t2);
        d.truncate(3);
        for x in &mut d {
            x.name = format!("vs {other}: {}", x.name);
        }
        // The other class's grads, converted to this class's layout, against this class's.
        let second_grads = moe_reference::from_state_dict(&other_cfg.unsharded(), &second.weight_grads)
            .map_err(internal)?
            .glu_interleaved(size);
        let to_sd = |s: &ExpertSet| to_state_dict(&global, s).map_err(internal);
        d.extend(compare_state_dicts(
            &format!("vs {other}: grad."),
            &global,
            &to_sd(&second_grads)?,
            &to_sd(&first_grads)?,
            Some((&o.scales.weight_grads, &o.allowance.weight_grads)),
            t2,
        ));
        diffs.extend(d);
    }
    if diffs.is_empty() {
        return Ok(Verdict::Skipped("no other class supports this configuration".into()));
    }
    verdict(diffs)
}

/// Empty experts (and an all-empty call) get exactly-zero weight grads.
pub(super) fn zero_tokens(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, case) = (ctx.cfg(), ctx.case);
    // Empty some experts of this case (every other one, and the last) and require exact zeros.
    let mut zeroed = case.clone();
    let e = zeroed.tokens_per_expert.len();
    for (i, n) in zeroed.tokens_per_expert.iter_mut().enumerate() {
        if i % 2 == 1 || i + 1 == e {
            *n = 0;
        }
    }
    let all_empty = Case { tokens_per_expert: vec![0; e], ..case.clone() };
    let global = cfg.unsharded();
    let mut diffs = Vec::new();
    for c in [&zeroed, &all_empty] {
        let p = c.problem();
        let got = match ctx.run(ctx.layer, cfg, &p, c.timing) {
            Ok(r) => r,
            Err(e) => return lift(e),
        };
        let grads = moe_reference::from_state_dict(&global, &got.weight_grads).map_err(internal)?;
        for (g, w) in grads.experts.iter().enumerate() {
            // A SequentialMLP with one local expert ignores tokens_per_expert (spec §4.6).
            if c.tokens_per_expert[g] != 0 || (cfg.class == LayerClass::Sequential && cfg.num_local_experts() == 1) {
                continue;
            }
            for (name, shape, values) in w.tensors() {
                let zeros = vec![0.0; values.len()];
                let got = ndarray::ArrayD::from_shape_vec(shape.clone(), values).map_err(internal)?;
                let want = ndarray::ArrayD::from_shape_vec(shape, zeros).map_err(internal)?;
                diffs.push(compare_tensor(
                    &format!("tokens={:?}: expert {g} grad {name}", c.tokens_per_expert),
                    got.view(),
                    want.view(),
                    Bounds::RELATIVE,
                    1,
                    Tolerance::EXACT,
                ));
            }
        }
        if c.num_tokens() == 0 {
            let want = Array2::<f64>::zeros((0, cfg.hidden_size));
            diffs.push(compare_tensor(
                "all-empty output",
                got.output.view().into_dyn(),
                want.view().into_dyn(),
                Bounds::RELATIVE,
                1,
                Tolerance::EXACT,
            ));
        }
    }
    verdict(diffs)
}

/// Padding every segment to 16 rows (fp8: to twice the recipe's alignment) changes nothing.
pub(super) fn padding_neutrality(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, p) = (ctx.cfg(), &ctx.problem);
    if cfg.class == LayerClass::Grouped || cfg.padding_multiple.is_some() {
        return Ok(Verdict::Skipped("class has no padding or case already padded".into()));
    }
    let unpadded = match ctx.run(ctx.layer, cfg, p, WgradTiming::Immediate) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    // Megatron's 16 rows; with fp8 the segments are already padded to the recipe's alignment
    // (16, or 32 for MXFP8), so pad them further, to twice the alignment.
    let multiple = cfg.fp8.map_or(16, |f| 2 * f.align_size());
    let padded_cfg = LayerConfig { padding_multiple: Some(multiple), ..cfg.clone() };
    let padded = match ctx.run(ctx.layer, &padded_cfg, p, WgradTiming::Immediate) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    // Both runs quantize the input, weights and upstream gradient alike (zero rows change no
    // amax): with fp8 only the derived operands' quantization can differ.
    let o = oracle_paired(cfg, p)?;
    verdict(compare_runs(&cfg.unsharded(), &padded, &unpadded, Some((&o).into()), ctx.tol.times(2.0)))
}

/// Deferred wgrad equals immediate wgrad, bit for bit.
pub(super) fn deferred_wgrad(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, p) = (ctx.cfg(), &ctx.problem);
    if cfg.class == LayerClass::Grouped {
        return Ok(Verdict::Skipped("GroupedMLP never defers weight gradients".into()));
    }
    let (immediate, deferred) =
        match (ctx.run(ctx.layer, cfg, p, WgradTiming::Immediate), ctx.run(ctx.layer, cfg, p, WgradTiming::Deferred)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return lift(e),
        };
    verdict(compare_runs(&cfg.unsharded(), &deferred, &immediate, None, Tolerance::EXACT))
}

/// The output is linear in the probs; the probs grad is the implied `G·y/p`.
pub(super) fn probs_linearity(ctx: &Ctx) -> Result<Verdict, PropertyFailure> {
    let (cfg, p) = (ctx.cfg(), &ctx.problem);
    if cfg.apply_probs_on_input {
        return Ok(Verdict::Skipped("probs on input: the output is not linear in p".into()));
    }
    let base = match ctx.run(ctx.layer, cfg, p, WgradTiming::Immediate) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    let mut doubled = p.clone();
    doubled.inputs.probs.mapv_inplace(|v| 2.0 * v);
    let twice = match ctx.run(ctx.layer, cfg, &doubled, WgradTiming::Immediate) {
        Ok(r) => r,
        Err(e) => return lift(e),
    };
    let o = oracle(cfg, p)?;
    let (expected, scales) = (&o.run, &o.scales);
    // Doubled probs leave the input, weights and upstream gradient alone and double fc2's input
    // (its scale halves exactly): with fp8 only the derived operands' quantization can differ
    // between the two runs. (The probs grad below is held to the oracle's own output: all of it.)
    let paired = if cfg.fp8.is_some() { Some(oracle_paired(cfg, p)?) } else { None };
    let t2 = ctx.tol.times(2.0);
    let scaled = base.output.mapv(|v| 2.0 * v);
    let scaled_scale = paired.as_ref().map_or(&scales.output, |o| &o.scales.output).mapv(|v| 2.0 * v);
    let mut diffs = vec![compare_tensor(
        "y(x, 2p) vs 2 y(x, p)",
        twice.output.view().into_dyn(),
        scaled.view().into_dyn(),
        Bounds { scale: Some(scaled_scale.view().into_dyn()), allowance: None },
        1,
        t2,
    )];
    // dp_i = Σ_j G_ij·y_ij / p_i, over rows with p_i ≠ 0, from the oracle's output.
    let rows: Vec<usize> = (0..p.inputs.num_tokens()).filter(|&i| p.inputs.probs[i] != 0.0).collect();
    let implied = Array1::from_iter(
        rows.iter()
            .map(|&i| (&p.grad_output.slice(s![i, ..]) * &expected.output.slice(s![i, ..])).sum() / p.inputs.probs[i]),
    );
    let implied_scale = Array1::from_iter(rows.iter().map(|&i| {
        (p.grad_output.slice(s![i, ..]).mapv(f64::abs) * scales.output.slice(s![i, ..])).sum() / p.inputs.probs[i]
    }));
    let got = Array1::from_iter(rows.iter().map(|&i| base.grad_probs[i]));
    diffs.push(compare_tensor(
        "dp vs G·y/p",
        got.view().into_dyn(),
        implied.view().into_dyn(),
        Bounds { scale: Some(implied_scale.view().into_dyn()), allowance: None },
        1,
        t2,
    ));
    verdict(diffs)
}
