//! Comparing a dump's expectations with the reference under the error model.

use super::{Dump, DumpError, GRAD_OUTPUT};
use crate::compare::{compare_tensor, contraction_length, TensorDiff};
use crate::tolerance::Tolerance;
use moe_reference::implementation::LayerError;
use moe_reference::{oracle_with_scales, param_specs, ExpertLayer, Reference, WgradTiming};

/// One compared tensor: the [`TensorDiff`] plus its verdict.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompareRow {
    /// The comparison (name without the `expected.` prefix: `output`, `grad.<parameter>`, ...).
    #[serde(flatten)]
    pub diff: TensorDiff,
    /// True when every element is within tolerance.
    pub passed: bool,
}

/// The result of [`compare_dump`]: one row per expected tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompareReport {
    /// The dump file.
    pub file: String,
    /// The layer class (`sequential`, `grouped`, `te_grouped`).
    pub layer: String,
    /// The params dtype.
    pub params_dtype: String,
    /// The probs dtype.
    pub probs_dtype: String,
    /// Number of token rows `T`.
    pub tokens: usize,
    /// `tokens_per_expert`.
    pub tokens_per_expert: Vec<i64>,
    /// What the expectations were recomputed with: `reference` (emulating the params dtype) or
    /// `reference-f64` (the oracle).
    pub reference: String,
    /// The fp8 recipe and format (`Fp8Config::label`, e.g. `tensorwise/hybrid`), `None` without
    /// fp8; the reference then runs TE's fp8 GEMMs and the error model has its fp8 channel.
    pub fp8: Option<String>,
    /// The contraction length `K` of the error model.
    pub contraction_length: usize,
    /// The factor applied to [`Tolerance::error_model`] (2 against the emulating reference, 1
    /// against the oracle).
    pub tolerance_factor: f64,
    /// The tolerance applied to every tensor.
    pub tolerance: Tolerance,
    /// One row per expected tensor.
    pub rows: Vec<CompareRow>,
    /// True when every row passed.
    pub passed: bool,
}

impl CompareReport {
    /// The names of the tensors that differ.
    pub fn failures(&self) -> Vec<&str> {
        self.rows.iter().filter(|r| !r.passed).map(|r| r.diff.name.as_str()).collect()
    }
}

/// Recomputes every tensor the dump has an expectation for, with the reference in the dump's
/// dtype (`oracle == false`, [`Reference::EMULATED`]) or the f64 oracle, and compares them.
///
/// # Tolerance
///
/// [`Tolerance::error_model`] with the oracle's running error bounds for `params_dtype` bounds
/// the distance of *one* storage-dtype computation from the f64 oracle. Against the emulating reference both sides carry
/// storage-dtype rounding (PyTorch's and the emulation's, at possibly different points and
/// in a different summation order), so each may be that far from the oracle in its own
/// direction and the bound is doubled. Against the oracle only the dump is rounded, so the
/// bound is applied as is.
pub fn compare_dump(dump: &Dump, file: &str, oracle: bool) -> Result<CompareReport, DumpError> {
    let err = |key: &str, message: String| DumpError { file: file.to_string(), key: key.to_string(), message };
    let cfg = &dump.config;
    let exp = &dump.expected;
    if exp.is_empty() {
        return Err(err(
            "expected.*",
            "nothing to compare: the dump holds no expected.output or expected.grad.* tensor".into(),
        ));
    }
    let reference = if oracle { Reference::ORACLE } else { Reference::EMULATED };
    let k = contraction_length(cfg, &dump.inputs.tokens_per_expert);
    let factor = if oracle { 1.0 } else { 2.0 };
    let tol = Tolerance::error_model().times(factor);
    let run_err = |e: LayerError| err("", format!("the reference rejected the dump: {e}"));
    let mut diffs = Vec::new();
    // The error model's scales and allowances come from the f64 oracle (the output's scales do
    // not depend on the upstream gradient, so a forward-only dump uses zeros there).
    let zeros = ndarray::Array2::zeros(dump.inputs.hidden_states.raw_dim());
    let model = oracle_with_scales(cfg, &dump.params, &dump.inputs, dump.grad_output.as_ref().unwrap_or(&zeros))
        .map_err(run_err)?;
    let bounds = |f: fn(&moe_reference::LayerRun) -> ndarray::ArrayViewD<f64>| crate::compare::Bounds {
        scale: Some(f(&model.scales)),
        allowance: Some(f(&model.allowance)),
    };
    // The reference is the `expected` side of `compare_tensor`; the dump's values are what is
    // being checked.
    let one = |name: &str,
               reference: ndarray::ArrayViewD<f64>,
               dump: ndarray::ArrayViewD<f64>,
               b: crate::compare::Bounds| compare_tensor(name, dump, reference, b, 1, tol);
    match (&dump.grad_output, exp.needs_backward()) {
        (Some(g), true) => {
            let run = reference
                .forward_backward(cfg, &dump.params, &dump.inputs, g, WgradTiming::Immediate)
                .map_err(run_err)?;
            if let Some(e) = &exp.output {
                diffs.push(one(
                    "output",
                    run.output.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.output.view().into_dyn()),
                ));
            }
            if let Some(e) = &exp.grad_input {
                diffs.push(one(
                    "grad.permuted_local_hidden_states",
                    run.grad_input.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.grad_input.view().into_dyn()),
                ));
            }
            if let Some(e) = &exp.grad_probs {
                diffs.push(one(
                    "grad.permuted_probs",
                    run.grad_probs.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.grad_probs.view().into_dyn()),
                ));
            }
            for spec in param_specs(cfg) {
                if let (Some(e), Some(got)) = (exp.weight_grads.get(&spec.name), run.weight_grads.get(&spec.name)) {
                    // Packed GroupedMLP weights get one rms scale per expert block.
                    let name = format!("grad.{}", spec.name);
                    let b = crate::compare::Bounds {
                        scale: model.scales.weight_grads.get(&spec.name).map(|s| s.view()),
                        allowance: model.allowance.weight_grads.get(&spec.name).map(|a| a.view()),
                    };
                    diffs.push(compare_tensor(&name, e.view(), got.view(), b, spec.expert_blocks, tol));
                }
            }
        }
        (None, true) => {
            return Err(err(
                GRAD_OUTPUT,
                "missing tensor; gradients are expected, so the upstream gradient is needed".into(),
            ))
        }
        (_, false) => {
            let out = reference.forward(cfg, &dump.params, &dump.inputs).map_err(run_err)?;
            if let Some(e) = &exp.output {
                diffs.push(one(
                    "output",
                    out.view().into_dyn(),
                    e.view().into_dyn(),
                    bounds(|r| r.output.view().into_dyn()),
                ));
            }
        }
    }
    // The quantized weights the dump holds: bit for bit the reference's quantization.
    for (param, t) in &dump.fp8_weights {
        let name = format!("{}{param}", super::fp8::FP8_PREFIX);
        let w = dump.params.get(param).ok_or_else(|| err(&name, format!("no parameter {param}")))?;
        let w = w.view().into_dimensionality::<ndarray::Ix2>().map_err(|e| err(&name, e.to_string()))?;
        let want = super::fp8::reference_weight(cfg, param, w).map_err(|e| err(&name, e.to_string()))?;
        let (got, exp) = (t.dequantize().into_dyn(), want.dequantize().into_dyn());
        let tol = Tolerance::EXACT;
        diffs.push(compare_tensor(&name, got.view(), exp.view(), crate::compare::Bounds::RELATIVE, 1, tol));
    }
    let rows: Vec<CompareRow> = diffs.into_iter().map(|d| CompareRow { passed: d.passed(), diff: d }).collect();
    Ok(CompareReport {
        file: file.to_string(),
        layer: cfg.class.name().to_string(),
        params_dtype: cfg.params_dtype.torch_name().to_string(),
        probs_dtype: cfg.probs_dtype.torch_name().to_string(),
        tokens: dump.inputs.num_tokens(),
        tokens_per_expert: dump.inputs.tokens_per_expert.clone(),
        reference: reference.name(),
        fp8: cfg.fp8.map(|f| f.label()),
        contraction_length: k,
        tolerance_factor: factor,
        tolerance: tol,
        passed: rows.iter().all(|r| r.passed),
        rows,
    })
}

impl std::fmt::Display for CompareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "dump      {}", self.file)?;
        writeln!(
            f,
            "layer     {} (params {}, probs {}), T = {}, tokens_per_expert {:?}",
            self.layer, self.params_dtype, self.probs_dtype, self.tokens, self.tokens_per_expert
        )?;
        writeln!(
            f,
            "against   {}; tolerance {} x error model ({} running error bound{}, K = {}) = {}",
            self.reference,
            self.tolerance_factor,
            self.params_dtype,
            if self.fp8.is_some() { " with its fp8 channel" } else { "" },
            self.contraction_length,
            self.tolerance
        )?;
        if let Some(fp8) = &self.fp8 {
            writeln!(
                f,
                "fp8       {fp8}: TransformerEngine's fp8 GEMMs from the initial state; fp8.* rows bit for bit"
            )?;
        }
        let fp8 = self.fp8.is_some();
        let name_w = self.rows.iter().map(|r| r.diff.name.len()).max().unwrap_or(0).max("tensor".len());
        let shape_w =
            self.rows.iter().map(|r| format!("{:?}", r.diff.shape).len()).max().unwrap_or(0).max("shape".len());
        writeln!(
            f,
            "{:<name_w$}  {:<shape_w$}  {:>10}  {:>10}  {:>10}  {:>9}  {:>9}  {}result",
            "tensor",
            "shape",
            "max abs",
            "max rel",
            "rel fro",
            "tol x",
            "err/bound",
            if fp8 { " calc_diff  " } else { "" }
        )?;
        for r in &self.rows {
            let d = &r.diff;
            writeln!(
                f,
                "{:<name_w$}  {:<shape_w$}  {:>10.3e}  {:>10.3e}  {:>10.3e}  {:>9.2e}  {:>9.3}  {}{}",
                d.name,
                format!("{:?}", d.shape),
                d.max_abs,
                d.max_rel,
                d.rel_frobenius,
                d.tolerance.rtol,
                d.worst_ratio,
                if fp8 { format!("{:>10.3e}  ", d.calc_diff) } else { String::new() },
                if r.passed { "pass" } else { "FAIL" }
            )?;
            if !r.passed {
                writeln!(
                    f,
                    "{:name_w$}    {} violation(s); worst at {:?}: dump {:.6e}, reference {:.6e} ({:.2}x the bound)",
                    "", d.violations, d.worst_index, d.worst_got, d.worst_expected, d.worst_ratio
                )?;
            }
        }
        let failures = self.failures();
        if failures.is_empty() {
            write!(f, "PASS: all {} tensor(s) within tolerance", self.rows.len())
        } else {
            write!(f, "FAIL: {} of {} tensor(s) differ: {}", failures.len(), self.rows.len(), failures.join(", "))
        }
    }
}
