//! Forward, backward and deferred weight gradients of the three expert classes (spec §4, §5).
//!
//! The code follows the canonical per-expert function of spec §0 with each class's rounding
//! points (spec §4.8) and divergences (spec §4.9):
//!
//! ```text
//! a = x·W1ᵀ (+ b1)          SequentialMLP: rounded, then +b1 rounds again; TEGroupedMLP: bias inside the GEMM
//! z = act(a)                GLU: act(min(g, c))·(clamp(l, -c, c) + offset); GroupedMLP ignores c and offset
//! u = z ⊙ p                 product in fp32, cast to the storage dtype
//! y = u·W2ᵀ (+ b2 ⊙ p)      bias product and sum in fp32, one cast
//! ```
//!
//! In [`Numerics::Oracle`] every rounding is the identity, so the same code is the f64 oracle.
//!
//! With `cfg.fp8` set, the emulated GEMMs are TransformerEngine's fp8 GEMMs (the `fp8` module
//! here: quantized operands, GEMM model, explicit delayed-scaling state) and the oracle's error
//! model gains their quantization terms (`fp8_bounds`); the oracle itself stays unquantized.
//!
//! This file runs the forward; `backward` runs the backward pass step by step (and the
//! deferred weight-gradient queue), `bounds` derives the error model's scales from the
//! oracle's values.

mod backward;
mod bounds;
mod fp8;
mod fp8_bounds;

pub use backward::WeightGradStore;
pub use fp8::{
    check_dim_for_fp8_exec, fp8_gemm, fp8_input_store, Fp8Fault, Fp8Operand, Fp8Run, Fp8State, GemmOperand,
    QuantizedOperand,
};
pub use fp8_bounds::fp8_accumulation_factor;

use crate::config::{LayerClass, LayerConfig};
use crate::dtype::Numerics;
use crate::error::ReferenceError;
use crate::weights::{ExpertSet, ExpertWeights};
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Zip};

/// The inputs of one expert-layer call (spec §0 call contract).
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// `permuted_local_hidden_states` `[T, h]`, rows sorted by local expert.
    pub hidden_states: Array2<f64>,
    /// `tokens_per_expert` `[E_l]`; must be non-negative and sum to `T`.
    pub tokens_per_expert: Vec<i64>,
    /// `permuted_probs` `[T]`, the routing weight of each row.
    pub probs: Array1<f64>,
}

impl Inputs {
    /// Number of token rows `T`.
    pub fn num_tokens(&self) -> usize {
        self.hidden_states.nrows()
    }
}

/// When weight gradients are computed (spec §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum WgradTiming {
    /// Weight gradients are computed during backward.
    Immediate,
    /// `delay_wgrad_compute`: backward computes input and probs gradients and queues the
    /// weight-gradient GEMMs; `backward_dw` (fc2 then fc1) computes them later.
    Deferred,
}

/// Checks `x` for NaN or infinity, naming the tensor and the first bad index.
pub fn check_finite<'a, D: ndarray::Dimension>(
    name: &str,
    a: impl Into<ndarray::ArrayView<'a, f64, D>>,
) -> Result<(), ReferenceError> {
    let a = a.into();
    match a.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(flat) => {
            // Row-major multi-index of the first bad element.
            let mut index = vec![0; a.ndim()];
            let mut rest = flat;
            for (axis, &len) in a.shape().iter().enumerate().rev() {
                index[axis] = rest % len;
                rest /= len;
            }
            Err(ReferenceError::NonFinite {
                name: name.to_string(),
                index,
                value: a.iter().nth(flat).copied().unwrap_or(f64::NAN),
            })
        }
    }
}

/// Validates inputs against `cfg` and returns the row count of each segment the layer
/// processes (for SequentialMLP with one local expert this is `[T]`: Megatron ignores
/// `tokens_per_expert` there, spec §4.1).
pub fn validate_inputs(cfg: &LayerConfig, inputs: &Inputs) -> Result<Vec<usize>, ReferenceError> {
    let t = inputs.hidden_states.nrows();
    let shape = |name: &str, expected: Vec<usize>, got: &[usize]| {
        if got == expected.as_slice() {
            Ok(())
        } else {
            Err(ReferenceError::Shape { name: name.to_string(), expected, got: got.to_vec() })
        }
    };
    shape("input.permuted_local_hidden_states", vec![t, cfg.hidden_size], inputs.hidden_states.shape())?;
    shape("input.permuted_probs", vec![t], inputs.probs.shape())?;
    let el = cfg.num_local_experts();
    if inputs.tokens_per_expert.len() != el {
        return Err(ReferenceError::Shape {
            name: "input.tokens_per_expert".into(),
            expected: vec![el],
            got: vec![inputs.tokens_per_expert.len()],
        });
    }
    if let Some((e, &n)) = inputs.tokens_per_expert.iter().enumerate().find(|(_, &n)| n < 0) {
        return Err(ReferenceError::TokenCounts(format!("expert {e} has a negative count {n}")));
    }
    check_finite("input.permuted_local_hidden_states", &inputs.hidden_states)?;
    check_finite("input.permuted_probs", &inputs.probs)?;
    if cfg.class == LayerClass::Sequential && el == 1 {
        return Ok(vec![t]);
    }
    let sum: i64 = inputs.tokens_per_expert.iter().sum();
    if usize::try_from(sum).ok() != Some(t) {
        return Err(ReferenceError::TokenCounts(format!(
            "counts {:?} sum to {sum}, but permuted_local_hidden_states has {t} rows",
            inputs.tokens_per_expert
        )));
    }
    Ok(inputs.tokens_per_expert.iter().map(|&n| n as usize).collect())
}

/// `a·b` with f32 accumulation of storage-dtype operands (emulated) or in f64 (oracle). The
/// result is not yet rounded to the storage dtype.
pub fn gemm(n: Numerics, a: ArrayView2<f64>, b: ArrayView2<f64>) -> Array2<f64> {
    match n {
        Numerics::Oracle => a.dot(&b),
        Numerics::Emulated(_) => {
            let a32 = a.mapv(|x| x as f32);
            let b32 = b.mapv(|x| x as f32);
            a32.dot(&b32).mapv(f64::from)
        }
    }
}

/// What backward needs from one expert segment's forward.
#[derive(Clone, Debug)]
struct SegmentCache {
    /// fc1 input (after `moe_apply_probs_on_input` scaling) `[n, h]`.
    x: Array2<f64>,
    /// Original input rows (for the probs-on-input gradient) `[n, h]`.
    x_orig: Array2<f64>,
    /// The probs as used after the activation (ones with probs-on-input).
    p: Array1<f64>,
    /// The segment's original probs (zeros on padding rows).
    p_orig: Array1<f64>,
    /// fc1 output, bias included, as stored `[n, N1]`.
    a: Array2<f64>,
    /// Activation output `z` (before the probs) `[n, N2]`.
    z: Array2<f64>,
    /// fc2 input `u = cast(z·p)` `[n, N2]`.
    u: Array2<f64>,
    /// The quantized operands kept for backward (emulated fp8 only).
    fp8: Option<SegmentFp8>,
}

/// The fp8 operands one segment's forward keeps for its backward.
#[derive(Clone, Debug)]
struct SegmentFp8 {
    /// fc1's input, columnwise copy (wgrad).
    x_col: GemmOperand,
    /// fc1's weight, both copies (columnwise for dgrad).
    w1: QuantizedOperand,
    /// fc2's input, columnwise copy (wgrad).
    u_col: GemmOperand,
    /// fc2's weight, both copies.
    w2: QuantizedOperand,
}

/// A completed forward pass, holding what backward needs.
#[derive(Clone, Debug)]
pub struct ForwardPass {
    cfg: LayerConfig,
    numerics: Numerics,
    weights: ExpertSet,
    /// Row count of each processed segment, before padding.
    counts: Vec<usize>,
    /// Row count of each processed segment, after quantization padding.
    padded_counts: Vec<usize>,
    caches: Vec<SegmentCache>,
    output: Array2<f64>,
    /// The fp8 run (configuration, delayed-scaling state, planted fault) when `cfg.fp8` is set;
    /// the backward records its amaxes into the state.
    fp8: Option<std::cell::RefCell<Fp8Run>>,
    /// Which quantizations the oracle's error model counts (fp8 only).
    fp8_channel: Fp8Channel,
}

/// Which quantizations the fp8 channel of the oracle's error model counts (`fp8_bounds` module
/// doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fp8Channel {
    /// Every quantized operand: one fp8 run against the unquantized oracle.
    #[default]
    All,
    /// Only the derived operands (fc2's input, fc1's output gradient): two fp8 runs whose input,
    /// weights and upstream gradient quantize alike (padding-neutrality, probs-linearity).
    Paired,
}

/// Input and probs gradients plus the weight gradients available after backward.
#[derive(Clone, Debug)]
pub struct BackwardPass {
    /// `dL/dx` `[T, h]`.
    pub grad_input: Array2<f64>,
    /// `dL/dp` `[T]`, in the probs dtype.
    pub grad_probs: Array1<f64>,
    /// Weight and bias gradients in canonical form. With [`WgradTiming::Deferred`] the tensors
    /// whose GEMMs were queued hold NaN until [`WeightGradStore::backward_dw`] assigns them.
    pub weight_grads: ExpertSet,
    /// The queued weight-gradient GEMMs (deferred mode only).
    pub pending: Option<WeightGradStore>,
    /// The fc2 input `u = cast(act(a)·p)` of every row `[T, N2]`, as this run computed it (an
    /// emulated run's values are what an implementation holds; the sampled verifier's tests
    /// use them as an implementation's intermediates).
    pub fc2_input: Array2<f64>,
    /// The fc1 output gradient `da` of every row `[T, N1]`, as this run computed it (see
    /// [`BackwardPass::fc2_input`]).
    pub fc1_output_grad: Array2<f64>,
    /// Error scales (oracle only): for every result, the sum of the absolute values of the
    /// terms of its final reduction (`|u|·|W2|ᵀ + |b2|·p` for the output, `|da|·|W1|` for the
    /// input grad, `|G|ᵀ·|u|` for fc2's weight grad, ...). Rounding errors of a storage-dtype
    /// implementation are proportional to these, not to the (possibly cancelled) results.
    pub scales: Option<ErrorScales>,
}

/// Magnitudes of the terms behind each result (see [`BackwardPass::scales`]).
#[derive(Clone, Debug)]
pub struct ErrorScales {
    /// Scale of the output `[T, h]`.
    pub output: Array2<f64>,
    /// Scale of the input grad `[T, h]`.
    pub grad_input: Array2<f64>,
    /// Scale of the probs grad `[T]`.
    pub grad_probs: Array1<f64>,
    /// Scales of the weight and bias grads.
    pub weight_grads: ExpertSet,
    /// Scale of the fc2 input `u = cast(act(a)·p)` `[T, N2]`, an intermediate (GPU checks
    /// that download it compare it on sampled rows, `moe_gpu::sampled`).
    pub fc2_input: Array2<f64>,
    /// Scale of the fc1 output gradient `da` `[T, N1]`, an intermediate (see
    /// [`ErrorScales::fc2_input`]). Without allowances: a clamped GLU's ambiguous masks are not
    /// covered here.
    pub fc1_output_grad: Array2<f64>,
    /// Absolute allowances for branch ambiguity: a GLU clamp mask (`g ≤ c`, `-c ≤ l ≤ c`)
    /// decided on a value within storage-dtype rounding distance of the boundary may go either
    /// way in an implementation, changing the gradient by the masked term. These tensors hold
    /// the largest such change of each gradient (zero without a clamp). The output is
    /// continuous in the clamp and gets no allowance.
    pub allowance_grad_input: Array2<f64>,
    /// Allowance of the probs grad `[T]` (non-zero only with probs on the input).
    pub allowance_grad_probs: Array1<f64>,
    /// Allowances of the weight and bias grads.
    pub allowance_weight_grads: ExpertSet,
}

fn store2(n: Numerics, a: Array2<f64>) -> Array2<f64> {
    a.mapv_into(|v| n.store(v))
}

/// Splits a GLU-width row block `[n, 2k]` into gate `[n, k]` and linear `[n, k]` halves.
fn halves(a: &Array2<f64>) -> (ArrayView2<'_, f64>, ArrayView2<'_, f64>) {
    let k = a.ncols() / 2;
    (a.slice(s![.., ..k]), a.slice(s![.., k..]))
}

impl LayerConfig {
    /// True when this class evaluates the activation with eager per-op rounding (SequentialMLP,
    /// TEGroupedMLP); GroupedMLP's `torch.compile`d helper keeps the chain in fp32 and rounds once.
    fn eager_activation(&self) -> bool {
        self.class != LayerClass::Grouped
    }

    /// The clamp value as this class applies it (GroupedMLP ignores it).
    fn effective_clamp(&self) -> Option<f64> {
        if self.class == LayerClass::Grouped {
            None
        } else {
            self.clamp_value
        }
    }

    /// The GLU linear offset as this class applies it (GroupedMLP ignores it).
    fn effective_offset(&self) -> f64 {
        if self.class == LayerClass::Grouped {
            0.0
        } else {
            self.glu_linear_offset
        }
    }
}

/// The GEMM `x·Wᵀ` of a linear's fprop: in fp8 when `q` holds the run (quantizing `x` as
/// `input` and `W` as `weight` of local expert `e`), else in the storage dtype (or f64).
#[allow(clippy::type_complexity)]
fn fprop(
    n: Numerics,
    q: &mut Option<(&mut Fp8Run, usize)>,
    ops: [Fp8Operand; 2],
    x: &Array2<f64>,
    w: &Array2<f64>,
) -> Result<(Array2<f64>, Option<(GemmOperand, QuantizedOperand)>), ReferenceError> {
    match (q.as_mut(), n) {
        (Some((run, e)), Numerics::Emulated(dt)) => {
            let xq = run.quantize(*e, ops[0], x, dt)?;
            let wq = run.quantize(*e, ops[1], w, dt)?;
            Ok((fp8_gemm(&xq.rowwise, &wq.rowwise), Some((xq.columnwise, wq))))
        }
        _ => Ok((gemm(n, x.view(), w.t()), None)),
    }
}

fn expert_forward(
    cfg: &LayerConfig,
    n: Numerics,
    w: &ExpertWeights,
    x_orig: ArrayView2<f64>,
    p_orig: ArrayView1<f64>,
    mut q: Option<(&mut Fp8Run, usize)>,
) -> Result<(Array2<f64>, SegmentCache), ReferenceError> {
    let rows = x_orig.nrows();
    // §4.7: moe_apply_probs_on_input replaces x by cast(p·x) (fp32 product) and p by ones.
    let (x, p) = if cfg.apply_probs_on_input {
        let mut x = x_orig.to_owned();
        Zip::from(x.rows_mut()).and(p_orig).for_each(|mut row, &pi| row.mapv_inplace(|v| n.store(n.fp32(pi * v))));
        (x, Array1::ones(rows))
    } else {
        (x_orig.to_owned(), p_orig.to_owned())
    };

    // fc1 (§4.2): one rounding of the GEMM; SequentialMLP adds the bias in a separate bf16 op,
    // TEGroupedMLP inside the GEMM (fp32 add, one rounding).
    let (xw, fc1_q) = fprop(n, &mut q, [Fp8Operand::Fc1Input, Fp8Operand::Fc1Weight], &x, &w.fc1_weight)?;
    let a = match (&w.fc1_bias, cfg.class) {
        (None, _) => store2(n, xw),
        (Some(b1), LayerClass::TeGrouped) => store2(n, xw + b1),
        (Some(b1), _) => store2(n, store2(n, xw) + b1),
    };

    // Activation (§4.3, §4.8).
    let clamp = cfg.effective_clamp();
    let offset = cfg.effective_offset();
    let act = cfg.activation;
    let z = if cfg.gated_linear_unit {
        // §4.10: an interleaved fc1 output is un-interleaved before the activation (a permutation,
        // no rounding); `a` stays cached in the module's order.
        let a_glu = crate::glu::deinterleave_columns(&a, cfg.glu_interleave_size);
        let (g, l) = halves(&a_glu);
        let mut z = Array2::zeros(g.raw_dim());
        Zip::from(&mut z).and(g).and(l).for_each(|z, &g, &l| {
            let (gc, lc, _, _) = clamp_glu(g, l, clamp);
            let (gc, lc) = (n.store(gc), n.store(lc));
            *z = if cfg.eager_activation() {
                let act_g = n.store(act.apply(gc));
                let lin = if offset != 0.0 { n.store(lc + offset) } else { lc };
                n.store(act_g * lin)
            } else {
                act.apply(gc) * (lc + offset) // fp32 chain, rounded once with the probs below
            };
        });
        z
    } else if cfg.eager_activation() {
        a.mapv(|v| n.store(act.apply(v)))
    } else {
        a.mapv(|v| act.apply(v))
    };

    // u = cast(z·p): fp32 product, one cast.
    let mut u = z.clone();
    Zip::from(u.rows_mut()).and(&p).for_each(|mut row, &pi| row.mapv_inplace(|v| n.store(n.fp32(v * pi))));

    // fc2, then the probs-scaled bias: round(out + b2·p) computed in fp32 (§4.5.1 step 7, §4.6).
    // With probs in the storage dtype (bf16 router), b2·p is itself a storage-dtype op (§4.8).
    let probs_in_storage = cfg.probs_dtype == cfg.params_dtype && cfg.params_dtype != crate::dtype::Dtype::F32;
    let (uw, fc2_q) = fprop(n, &mut q, [Fp8Operand::Fc2Input, Fp8Operand::Fc2Weight], &u, &w.fc2_weight)?;
    let mut y = store2(n, uw);
    if let Some(b2) = &w.fc2_bias {
        Zip::from(y.rows_mut()).and(&p).for_each(|mut row, &pi| {
            Zip::from(&mut row).and(b2).for_each(|y, &b| {
                let bias = if probs_in_storage { n.store(b * pi) } else { n.fp32(b * pi) };
                *y = n.store(n.fp32(*y + bias));
            });
        });
    }
    let fp8 = match (fc1_q, fc2_q) {
        (Some((x_col, w1)), Some((u_col, w2))) => Some(SegmentFp8 { x_col, w1, u_col, w2 }),
        _ => None,
    };
    let cache = SegmentCache { x, x_orig: x_orig.to_owned(), p, p_orig: p_orig.to_owned(), a, z, u, fp8 };
    Ok((y, cache))
}

/// The GLU clamp (spec §4.3): `(min(g, c), clamp(l, -c, c), g ≤ c, -c ≤ l ≤ c)`, the last two
/// being the (inclusive) masks of the gradient; without a clamp the values pass unchanged.
fn clamp_glu(g: f64, l: f64, clamp: Option<f64>) -> (f64, f64, bool, bool) {
    match clamp {
        Some(c) => (g.min(c), l.clamp(-c, c), g <= c, (-c..=c).contains(&l)),
        None => (g, l, true, true),
    }
}

/// Runs the forward of `cfg`'s class on this rank's canonical weights.
///
/// With `cfg.fp8` set this is [`forward_fp8`] from TE's initial delayed-scaling state
/// ([`Fp8State::new`]) without a fault.
pub fn forward(
    cfg: &LayerConfig,
    weights: &ExpertSet,
    inputs: &Inputs,
    numerics: Numerics,
) -> Result<ForwardPass, ReferenceError> {
    let run = match cfg.fp8 {
        Some(config) => Some(Fp8Run { config, state: Fp8State::new(cfg)?, fault: None }),
        None => None,
    };
    forward_fp8(cfg, weights, inputs, numerics, run)
}

/// [`forward`] with an explicit fp8 run: its delayed-scaling state supplies the scales (and, for
/// the oracle, the error model's scales); amaxes are recorded into it (read it back with
/// [`ForwardPass::fp8_state`] after the backward, then [`Fp8State::update`] for the next step).
/// `run` must be `Some` exactly when `cfg.fp8` is.
pub fn forward_fp8(
    cfg: &LayerConfig,
    weights: &ExpertSet,
    inputs: &Inputs,
    numerics: Numerics,
    mut run: Option<Fp8Run>,
) -> Result<ForwardPass, ReferenceError> {
    cfg.validate()?;
    weights.check_shapes(cfg)?;
    if run.is_some() != cfg.fp8.is_some() {
        return Err(ReferenceError::Config("an fp8 run is given exactly when the configuration has fp8".into()));
    }
    let counts = validate_inputs(cfg, inputs)?;
    let h = cfg.hidden_size;
    let pad = |c: usize| match cfg.row_padding() {
        Some(m) => c.div_ceil(m) * m,
        None => c,
    };
    let padded_counts: Vec<usize> = counts.iter().map(|&c| pad(c)).collect();
    if let Some(f) = &cfg.fp8 {
        check_fp8_shapes(cfg, f.recipe, &padded_counts)?;
    }
    let mut output = Array2::zeros((inputs.num_tokens(), h));
    let mut caches = Vec::with_capacity(counts.len());
    let mut start = 0;
    for (e, (&c, &pc)) in counts.iter().zip(&padded_counts).enumerate() {
        // Quantization padding: zero rows with zero probs appended to the segment (§4.5.1).
        let mut x = Array2::zeros((pc, h));
        let mut p = Array1::zeros(pc);
        x.slice_mut(s![..c, ..]).assign(&inputs.hidden_states.slice(s![start..start + c, ..]));
        p.slice_mut(s![..c]).assign(&inputs.probs.slice(s![start..start + c]));
        let q = run.as_mut().map(|r| (r, e));
        let (y, cache) = expert_forward(cfg, numerics, &weights.experts[e], x.view(), p.view(), q)?;
        output.slice_mut(s![start..start + c, ..]).assign(&y.slice(s![..c, ..]));
        caches.push(cache);
        start += c;
    }
    Ok(ForwardPass {
        cfg: cfg.clone(),
        numerics,
        weights: weights.clone(),
        counts,
        padded_counts,
        caches,
        output,
        fp8: run.map(std::cell::RefCell::new),
        fp8_channel: Fp8Channel::All,
    })
}

/// Refuses the splits TE refuses under `cfg.fp8` (nothing without fp8), naming the expert and
/// tensor: `segments` are the rows of each processed segment ([`validate_inputs`]), padded here
/// as the layer pads them (see `check_fp8_shapes`).
pub fn check_fp8_splits(cfg: &LayerConfig, segments: &[usize]) -> Result<(), ReferenceError> {
    let Some(f) = &cfg.fp8 else { return Ok(()) };
    let padded: Vec<usize> = segments
        .iter()
        .map(|&c| match cfg.row_padding() {
            Some(m) => c.div_ceil(m) * m,
            None => c,
        })
        .collect();
    check_fp8_shapes(cfg, f.recipe, &padded)
}

/// Refuses the fp8 shapes TE refuses, naming the tensor: MXFP8 quantizes every operand and needs
/// both dims of each to be multiples of 32 (`MXFP8Quantizer::create_tensor`); SequentialMLP's TE
/// `Linear`s assert `assert_dim_for_fp8_exec` on their input and weight under every recipe.
/// TEGroupedMLP's `GroupedLinear` accepts any split with the per-tensor and block recipes.
fn check_fp8_shapes(cfg: &LayerConfig, recipe: crate::fp8::Fp8Recipe, padded: &[usize]) -> Result<(), ReferenceError> {
    let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
    for (e, &rows) in padded.iter().enumerate() {
        let named = |what: &str| format!("expert {e} {what}");
        if recipe == crate::fp8::Fp8Recipe::Mxfp8 {
            for (what, shape) in [
                ("linear_fc1.input", [rows, h]),
                ("linear_fc1.weight", [n1, h]),
                ("linear_fc2.input", [rows, n2]),
                ("linear_fc2.weight", [h, n2]),
                ("linear_fc2.grad_output", [rows, h]),
                ("linear_fc1.grad_output", [rows, n1]),
            ] {
                crate::fp8::mxfp8::check_mxfp8_shape(&named(what), shape)?;
            }
        }
        if cfg.class == LayerClass::Sequential {
            for (what, shape) in [
                ("linear_fc1.input", [rows, h]),
                ("linear_fc1.weight", [n1, h]),
                ("linear_fc2.input", [rows, n2]),
                ("linear_fc2.weight", [h, n2]),
            ] {
                check_dim_for_fp8_exec(&named(what), shape)?;
            }
        }
    }
    Ok(())
}

impl ForwardPass {
    /// The layer output `[T, h]`.
    pub fn output(&self) -> &Array2<f64> {
        &self.output
    }

    /// The same pass with the oracle's error model counting `channel` (see [`Fp8Channel`]).
    pub fn with_fp8_channel(self, channel: Fp8Channel) -> ForwardPass {
        ForwardPass { fp8_channel: channel, ..self }
    }

    /// The delayed-scaling state after this pass (amaxes of the forward, and of the backward once
    /// it ran, recorded); `None` without fp8.
    pub fn fp8_state(&self) -> Option<Fp8State> {
        self.fp8.as_ref().map(|r| r.borrow().state.clone())
    }
}
