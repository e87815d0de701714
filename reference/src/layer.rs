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

use crate::config::{LayerClass, LayerConfig};
use crate::dtype::Numerics;
use crate::error::ReferenceError;
use crate::weights::{ExpertSet, ExpertWeights};
use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis, Zip};
use std::collections::VecDeque;

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

/// Which linear a queued weight-gradient GEMM belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linear {
    Fc1,
    Fc2,
}

#[derive(Clone, Debug)]
struct WgradEntry {
    linear: Linear,
    expert: usize,
    /// The linear's input rows `[n, in]`.
    input: Array2<f64>,
    /// The gradient of the linear's output `[n, out]`.
    grad_output: Array2<f64>,
    /// Whether the bias gradient is computed with the weight gradient (TE's grouped linear).
    with_bias: bool,
}

/// The FIFO of queued weight-gradient GEMMs (TE's `WeightGradStore`).
#[derive(Clone, Debug)]
pub struct WeightGradStore {
    numerics: Numerics,
    queue: VecDeque<WgradEntry>,
}

impl WeightGradStore {
    /// Number of queued GEMMs (one per expert segment and linear).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// `backward_dw()`: computes the queued weight (and, for TE's grouped linear, bias)
    /// gradients, fc2 first then fc1 as `TEGroupedMLP.backward_dw` and `MLP.backward_dw` order
    /// them, and assigns them into `grads` (TE assigns `.grad`, it does not accumulate).
    pub fn backward_dw(mut self, grads: &mut ExpertSet) {
        for linear in [Linear::Fc2, Linear::Fc1] {
            let (now, later): (VecDeque<_>, VecDeque<_>) = self.queue.drain(..).partition(|e| e.linear == linear);
            self.queue = later;
            for entry in now {
                let g = &mut grads.experts[entry.expert];
                let (dw, db) = weight_grad(self.numerics, &entry.grad_output, &entry.input);
                match linear {
                    Linear::Fc2 => {
                        g.fc2_weight = dw;
                        if entry.with_bias {
                            g.fc2_bias = Some(db);
                        }
                    }
                    Linear::Fc1 => {
                        g.fc1_weight = dw;
                        if entry.with_bias {
                            g.fc1_bias = Some(db);
                        }
                    }
                }
            }
        }
    }
}

/// `dW = Gᵀ·X` rounded to the storage dtype, and the bias gradient `Σ_i G_i` (fp32 sum, cast).
fn weight_grad(n: Numerics, grad_output: &Array2<f64>, input: &Array2<f64>) -> (Array2<f64>, Array1<f64>) {
    let dw = gemm(n, grad_output.t(), input.view()).mapv(|v| n.store(v));
    let db = grad_output.sum_axis(Axis(0)).mapv(|v| n.store(n.fp32(v)));
    (dw, db)
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

fn expert_forward(
    cfg: &LayerConfig,
    n: Numerics,
    w: &ExpertWeights,
    x_orig: ArrayView2<f64>,
    p_orig: ArrayView1<f64>,
) -> (Array2<f64>, SegmentCache) {
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
    let xw = gemm(n, x.view(), w.fc1_weight.t());
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
        let (g, l) = halves(&a);
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
    let mut y = store2(n, gemm(n, u.view(), w.fc2_weight.t()));
    if let Some(b2) = &w.fc2_bias {
        Zip::from(y.rows_mut()).and(&p).for_each(|mut row, &pi| {
            Zip::from(&mut row).and(b2).for_each(|y, &b| {
                let bias = if probs_in_storage { n.store(b * pi) } else { n.fp32(b * pi) };
                *y = n.store(n.fp32(*y + bias));
            });
        });
    }
    let cache = SegmentCache { x, x_orig: x_orig.to_owned(), p, p_orig: p_orig.to_owned(), a, z, u };
    (y, cache)
}

/// The gradient of the activation block: returns `da` `[n, N1]` from `dz` (eager) or from
/// `du·p` (compiled, unrounded).
fn activation_backward(cfg: &LayerConfig, n: Numerics, a: &Array2<f64>, dz: &Array2<f64>) -> Array2<f64> {
    let act = cfg.activation;
    let eager = cfg.eager_activation();
    if !cfg.gated_linear_unit {
        let mut da = dz.clone();
        Zip::from(&mut da).and(a).for_each(|d, &a| *d = n.store(*d * act.derivative(a)));
        return da;
    }
    let clamp = cfg.effective_clamp();
    let offset = cfg.effective_offset();
    let k = a.ncols() / 2;
    let (g, l) = halves(a);
    let mut da = Array2::zeros(a.raw_dim());
    {
        let (mut dg, mut dl) = da.view_mut().split_at(Axis(1), k);
        Zip::from(&mut dg).and(&mut dl).and(g).and(l).and(dz).for_each(|dg, dl, &g, &l, &dz| {
            let (gc, lc, gate_mask, lin_mask) = clamp_glu(g, l, clamp);
            let (gc, lc) = (n.store(gc), n.store(lc));
            if eager {
                let act_g = n.store(act.apply(gc));
                let lin = if offset != 0.0 { n.store(lc + offset) } else { lc };
                let d_act_g = n.store(dz * lin);
                let d_lin = n.store(dz * act_g);
                *dg = if gate_mask { n.store(d_act_g * act.derivative(gc)) } else { 0.0 };
                *dl = if lin_mask { d_lin } else { 0.0 };
            } else {
                *dg = n.store(dz * (lc + offset) * act.derivative(gc));
                *dl = n.store(dz * act.apply(gc));
            }
        });
    }
    da
}

/// Runs the forward of `cfg`'s class on this rank's canonical weights.
pub fn forward(
    cfg: &LayerConfig,
    weights: &ExpertSet,
    inputs: &Inputs,
    numerics: Numerics,
) -> Result<ForwardPass, ReferenceError> {
    cfg.validate()?;
    weights.check_shapes(cfg)?;
    let counts = validate_inputs(cfg, inputs)?;
    let h = cfg.hidden_size;
    let pad = |c: usize| match cfg.padding_multiple {
        Some(m) => c.div_ceil(m) * m,
        None => c,
    };
    let padded_counts: Vec<usize> = counts.iter().map(|&c| pad(c)).collect();
    let mut output = Array2::zeros((inputs.num_tokens(), h));
    let mut caches = Vec::with_capacity(counts.len());
    let mut start = 0;
    for (e, (&c, &pc)) in counts.iter().zip(&padded_counts).enumerate() {
        // Quantization padding: zero rows with zero probs appended to the segment (§4.5.1).
        let mut x = Array2::zeros((pc, h));
        let mut p = Array1::zeros(pc);
        x.slice_mut(s![..c, ..]).assign(&inputs.hidden_states.slice(s![start..start + c, ..]));
        p.slice_mut(s![..c]).assign(&inputs.probs.slice(s![start..start + c]));
        let (y, cache) = expert_forward(cfg, numerics, &weights.experts[e], x.view(), p.view());
        output.slice_mut(s![start..start + c, ..]).assign(&y.slice(s![..c, ..]));
        caches.push(cache);
        start += c;
    }
    Ok(ForwardPass { cfg: cfg.clone(), numerics, weights: weights.clone(), counts, padded_counts, caches, output })
}

impl ForwardPass {
    /// The layer output `[T, h]`.
    pub fn output(&self) -> &Array2<f64> {
        &self.output
    }

    /// Backward from `grad_output` `[T, h]`: input grad, probs grad and weight grads (or, with
    /// [`WgradTiming::Deferred`], the queue of weight-gradient GEMMs).
    ///
    /// Deferral follows Megatron: the weight GEMMs of both linears are queued; TE's grouped
    /// linear also queues fc1's bias (it is part of its GEMM), while the fc2 bias of both
    /// classes and SequentialMLP's fc1 bias are eager ops outside the linears and get their
    /// gradients immediately. GroupedMLP rejects deferral (Megatron asserts
    /// `delay_wgrad_compute` is incompatible with the legacy grouped GEMM).
    pub fn backward(&self, grad_output: &Array2<f64>, timing: WgradTiming) -> Result<BackwardPass, ReferenceError> {
        let cfg = &self.cfg;
        let n = self.numerics;
        let (t, h) = self.output.dim();
        if grad_output.dim() != (t, h) {
            return Err(ReferenceError::Shape {
                name: "input.grad_output".into(),
                expected: vec![t, h],
                got: grad_output.shape().to_vec(),
            });
        }
        check_finite("input.grad_output", grad_output)?;
        if timing == WgradTiming::Deferred && cfg.class == LayerClass::Grouped {
            return Err(ReferenceError::Config(
                "GroupedMLP does not support delay_wgrad_compute (backward_dw is a no-op there)".into(),
            ));
        }
        let deferred = timing == WgradTiming::Deferred;
        let mut grad_input = Array2::zeros((t, h));
        let mut grad_probs = Array1::zeros(t);
        let mut grads = ExpertSet::zeros(cfg);
        let mut queue = VecDeque::new();
        let oracle = n == Numerics::Oracle;
        let mut scales = oracle.then(|| ErrorScales {
            output: Array2::zeros((t, h)),
            grad_input: Array2::zeros((t, h)),
            grad_probs: Array1::zeros(t),
            weight_grads: ExpertSet::zeros(cfg),
            fc2_input: Array2::zeros((t, cfg.n2())),
            fc1_output_grad: Array2::zeros((t, cfg.n1())),
            allowance_grad_input: Array2::zeros((t, h)),
            allowance_grad_probs: Array1::zeros(t),
            allowance_weight_grads: ExpertSet::zeros(cfg),
        });
        let mut start = 0;
        for (e, ((&c, &pc), cache)) in self.counts.iter().zip(&self.padded_counts).zip(&self.caches).enumerate() {
            let w = &self.weights.experts[e];
            let mut g = Array2::zeros((pc, h));
            g.slice_mut(s![..c, ..]).assign(&grad_output.slice(s![start..start + c, ..]));
            let out = &mut grads.experts[e];

            // fc2 bias: y = cast(o + b2·p) ⇒ db2 = Σ_i p_i·G_i, dp_i += Σ_j G_ij·b2_j (fp32).
            let mut dp = Array1::<f64>::zeros(pc);
            if let Some(b2) = &w.fc2_bias {
                let mut db2 = Array1::zeros(h);
                for (gi, &pi) in g.rows().into_iter().zip(&cache.p) {
                    db2.scaled_add(pi, &gi);
                }
                out.fc2_bias = Some(db2.mapv(|v| n.store(n.fp32(v))));
                dp += &g.dot(b2).mapv(|v| n.fp32(v));
            }
            // fc2: dW2 = Gᵀ·u, du = G·W2.
            let du = store2(n, gemm(n, g.view(), w.fc2_weight.view()));
            // u = cast(z·p): dz = cast(du·p), dp_i += Σ_j du_ij·z_ij (fp32).
            let mut dz = du.clone();
            Zip::from(dz.rows_mut()).and(&cache.p).for_each(|mut row, &pi| {
                row.mapv_inplace(|v| if cfg.eager_activation() { n.store(n.fp32(v * pi)) } else { v * pi })
            });
            let dp_act = (&du * &cache.z).sum_axis(Axis(1)).mapv(|v| n.fp32(v));
            if !cfg.apply_probs_on_input {
                dp = (dp + dp_act).mapv(|v| n.fp32(v));
            }
            let da = activation_backward(cfg, n, &cache.a, &dz);
            // fc1: dx = da·W1, dW1 = daᵀ·x, db1 = Σ_i da_i.
            let mut dx = store2(n, gemm(n, da.view(), w.fc1_weight.view()));
            if cfg.apply_probs_on_input {
                // x' = cast(p·x): dx = cast(dx'·p), dp_i = Σ_j x_ij·dx'_ij (fp32).
                dp = (&dx * &cache.x_orig).sum_axis(Axis(1)).mapv(|v| n.fp32(v));
                Zip::from(dx.rows_mut())
                    .and(&cache.p_orig)
                    .for_each(|mut row, &pi| row.mapv_inplace(|v| n.store(n.fp32(v * pi))));
            }
            let te = cfg.class == LayerClass::TeGrouped;
            if deferred {
                queue.push_back(WgradEntry {
                    linear: Linear::Fc2,
                    expert: e,
                    input: cache.u.clone(),
                    grad_output: g.clone(),
                    with_bias: false,
                });
                queue.push_back(WgradEntry {
                    linear: Linear::Fc1,
                    expert: e,
                    input: cache.x.clone(),
                    grad_output: da.clone(),
                    with_bias: te && w.fc1_bias.is_some(),
                });
                out.fc2_weight.fill(f64::NAN);
                out.fc1_weight.fill(f64::NAN);
                if te {
                    if let Some(b) = out.fc1_bias.as_mut() {
                        b.fill(f64::NAN);
                    }
                }
            } else {
                out.fc2_weight = weight_grad(n, &g, &cache.u).0;
                out.fc1_weight = weight_grad(n, &da, &cache.x).0;
            }
            if w.fc1_bias.is_some() && !(deferred && te) {
                out.fc1_bias = Some(weight_grad(n, &da, &cache.x).1);
            }
            if let Some(sc) = scales.as_mut() {
                let abs = |a: &Array2<f64>| a.mapv(f64::abs);
                let b = error_bounds(cfg, w, cache, &g, &du, &dz, &da);
                let ws = &mut sc.weight_grads.experts[e];
                ws.fc1_weight = b.fc1_weight;
                ws.fc2_weight = b.fc2_weight;
                if ws.fc1_bias.is_some() {
                    ws.fc1_bias = Some(b.fc1_bias);
                    ws.fc2_bias = Some(b.fc2_bias);
                }
                let (y_scale, dx_scale, dp_scale) = (b.output, b.grad_input, b.grad_probs);
                if let (Some(clamp), true) = (cfg.effective_clamp(), cfg.gated_linear_unit) {
                    let jump = clamp_ambiguity(cfg, &cache.a, &abs(&cache.x), w, &dz, clamp);
                    let mut dx_allow = jump.dot(&abs(&w.fc1_weight));
                    if cfg.apply_probs_on_input {
                        let dp_allow = (&dx_allow * &abs(&cache.x_orig)).sum_axis(Axis(1));
                        sc.allowance_grad_probs.slice_mut(s![start..start + c]).assign(&dp_allow.slice(s![..c]));
                        Zip::from(dx_allow.rows_mut())
                            .and(&cache.p_orig)
                            .for_each(|mut row, &pi| row.mapv_inplace(|v| v * pi.abs()));
                    }
                    sc.allowance_grad_input.slice_mut(s![start..start + c, ..]).assign(&dx_allow.slice(s![..c, ..]));
                    let wa = &mut sc.allowance_weight_grads.experts[e];
                    wa.fc1_weight = jump.t().dot(&abs(&cache.x));
                    if wa.fc1_bias.is_some() {
                        wa.fc1_bias = Some(jump.sum_axis(Axis(0)));
                    }
                }
                sc.output.slice_mut(s![start..start + c, ..]).assign(&y_scale.slice(s![..c, ..]));
                sc.grad_input.slice_mut(s![start..start + c, ..]).assign(&dx_scale.slice(s![..c, ..]));
                sc.grad_probs.slice_mut(s![start..start + c]).assign(&dp_scale.slice(s![..c]));
                sc.fc2_input.slice_mut(s![start..start + c, ..]).assign(&b.fc2_input.slice(s![..c, ..]));
                sc.fc1_output_grad.slice_mut(s![start..start + c, ..]).assign(&b.fc1_output_grad.slice(s![..c, ..]));
            }
            grad_input.slice_mut(s![start..start + c, ..]).assign(&dx.slice(s![..c, ..]));
            grad_probs.slice_mut(s![start..start + c]).assign(&dp.slice(s![..c]).mapv(|v| n.to(cfg.probs_dtype, v)));
            start += c;
        }
        Ok(BackwardPass {
            grad_input,
            grad_probs,
            weight_grads: grads,
            pending: deferred.then_some(WeightGradStore { numerics: n, queue }),
            scales,
        })
    }
}

/// For a clamped GLU: the size of the gradient term a clamp mask would switch on or off, for
/// every fc1 output element whose pre-activation lies within storage rounding distance of the
/// clamp boundary (`8·u·(|x|·|W1|ᵀ + |b1|)`, the rounding error bound of `a`, plus `u·c`);
/// zero elsewhere. `[n, N1]`, gate half then linear half.
fn clamp_ambiguity(
    cfg: &LayerConfig,
    a: &Array2<f64>,
    x_abs: &Array2<f64>,
    w: &ExpertWeights,
    dz: &Array2<f64>,
    c: f64,
) -> Array2<f64> {
    let u = cfg.params_dtype.unit_roundoff();
    let mut a_mag = x_abs.dot(&w.fc1_weight.mapv(f64::abs).t());
    if let Some(b1) = &w.fc1_bias {
        a_mag += &b1.mapv(f64::abs);
    }
    let act = cfg.activation;
    let offset = cfg.effective_offset();
    let k = a.ncols() / 2;
    let (g, l) = halves(a);
    let mut jump = Array2::zeros(a.raw_dim());
    for i in 0..a.nrows() {
        for j in 0..k {
            let (gv, lv, d) = (g[[i, j]], l[[i, j]], dz[[i, j]]);
            let (gc, lc) = (gv.min(c), lv.clamp(-c, c));
            if (gv - c).abs() <= 8.0 * u * a_mag[[i, j]] + u * c {
                jump[[i, j]] = (d * (lc + offset) * act.derivative(gc)).abs();
            }
            if (lv.abs() - c).abs() <= 8.0 * u * a_mag[[i, k + j]] + u * c {
                jump[[i, k + j]] = (d * act.apply(gc)).abs();
            }
        }
    }
    jump
}

/// The GLU clamp (spec §4.3): `(min(g, c), clamp(l, -c, c), g ≤ c, -c ≤ l ≤ c)`, the last two
/// being the (inclusive) masks of the gradient; without a clamp the values pass unchanged.
fn clamp_glu(g: f64, l: f64, clamp: Option<f64>) -> (f64, f64, bool, bool) {
    match clamp {
        Some(c) => (g.min(c), l.clamp(-c, c), g <= c, (-c..=c).contains(&l)),
        None => (g, l, true, true),
    }
}

/// First-order running error bounds of one expert segment's results (see [`ErrorScales`]).
struct SegmentBounds {
    output: Array2<f64>,
    grad_input: Array2<f64>,
    grad_probs: Array1<f64>,
    fc1_weight: Array2<f64>,
    fc1_bias: Array1<f64>,
    fc2_weight: Array2<f64>,
    fc2_bias: Array1<f64>,
    fc2_input: Array2<f64>,
    fc1_output_grad: Array2<f64>,
}

/// A first-order running error bound of a storage-dtype implementation of one expert segment,
/// in absolute units, propagated through the computation with the oracle's exact values:
///
/// * an operation that rounds its result `v` to the storage dtype adds `u·|v| + η` (unit
///   roundoff `u`, subnormal spacing `η`); one that stays in f32 adds `u_f32·|v|`;
/// * a GEMM or reduction over `K` terms adds `√K·u_f32·Σ|terms|` for f32 accumulation, and
///   propagates its operands' bounds as `err(A)·|B| + |A|·err(B)`;
/// * an elementwise function propagates `|f'(w)|·err(w)` (and `|f''|` for derivatives);
/// * inputs, weights, probs and the upstream gradient are exact (both sides see the same
///   values), so they carry no error.
///
/// The rounding points are those of an eager implementation (spec §4.8); an implementation
/// that fuses the elementwise chain rounds less and stays inside the bound.
#[allow(clippy::too_many_arguments)]
fn error_bounds(
    cfg: &LayerConfig,
    w: &ExpertWeights,
    cache: &SegmentCache,
    g: &Array2<f64>,
    du: &Array2<f64>,
    dz: &Array2<f64>,
    da: &Array2<f64>,
) -> SegmentBounds {
    let us = cfg.params_dtype.unit_roundoff();
    let eta = cfg.params_dtype.subnormal_spacing();
    let ua = crate::dtype::Dtype::F32.unit_roundoff();
    let eager = cfg.eager_activation();
    let abs = |a: &Array2<f64>| a.mapv(f64::abs);
    // Rounding to storage (eager ops) or to f32 (fused chains).
    let rnd = |v: f64| us * v.abs() + eta;
    let rnd_el = |v: f64| if eager { us * v.abs() + eta } else { ua * v.abs() };
    let acc = |k: usize| (k.max(1) as f64).sqrt() * ua;
    let (n, h) = (cache.x.nrows(), cache.x.ncols());
    let p_abs = cache.p.mapv(f64::abs);
    let scale_rows = |a: &Array2<f64>, p: &Array1<f64>| {
        let mut a = a.clone();
        Zip::from(a.rows_mut()).and(p).for_each(|mut row, &pi| row.mapv_inplace(|v| v * pi));
        a
    };
    let x_abs = abs(&cache.x);
    // x' = cast(p·x) with probs on the input, else exact.
    let err_x = if cfg.apply_probs_on_input { cache.x.mapv(rnd) } else { Array2::zeros((n, h)) };
    // fc1: a = round(x·W1ᵀ (+ b1)); SequentialMLP rounds before the bias add too.
    let w1_abs = abs(&w.fc1_weight);
    let mut err_a = err_x.dot(&w1_abs.t()) + x_abs.dot(&w1_abs.t()) * acc(h) + cache.a.mapv(rnd);
    if let (Some(b1), LayerClass::Sequential) = (&w.fc1_bias, cfg.class) {
        err_a += &(&cache.a - b1).mapv(rnd);
    }
    let act = cfg.activation;
    let a = &cache.a;
    let err_z = if cfg.gated_linear_unit {
        let clamp = cfg.effective_clamp();
        let offset = cfg.effective_offset();
        let k = a.ncols() / 2;
        let mut err_z = Array2::zeros((n, k));
        for i in 0..n {
            for j in 0..k {
                let (gc, lc, gate_on, lin_on) = clamp_glu(a[[i, j]], a[[i, k + j]], clamp);
                let (eg, el) =
                    (if gate_on { err_a[[i, j]] } else { 0.0 }, if lin_on { err_a[[i, k + j]] } else { 0.0 });
                let (f, f1) = (act.apply(gc), act.derivative(gc));
                let lin = lc + offset;
                let err_act = f1.abs() * eg + rnd_el(f);
                let err_lin = el + if offset != 0.0 { rnd_el(lin) } else { 0.0 };
                err_z[[i, j]] = lin.abs() * err_act + f.abs() * err_lin + rnd_el(f * lin);
            }
        }
        err_z
    } else {
        Zip::from(a).and(&err_a).map_collect(|&a, &ea| act.derivative(a).abs() * ea + rnd_el(act.apply(a)))
    };
    // u = cast(z·p): product in f32, one storage rounding.
    let err_u = scale_rows(&err_z, &p_abs) + cache.u.mapv(rnd);
    // Output: y = round(u·W2ᵀ) (+ b2·p in f32, one rounding).
    let w2_abs = abs(&w.fc2_weight);
    let n2 = w.fc2_weight.ncols();
    let mut output = err_u.dot(&w2_abs.t()) + abs(&cache.u).dot(&w2_abs.t()) * acc(n2);
    let y_exact = cache.u.dot(&w.fc2_weight.t());
    output += &y_exact.mapv(rnd);
    if let Some(b2) = &w.fc2_bias {
        let mut yb = y_exact.clone();
        Zip::from(yb.rows_mut()).and(&cache.p).for_each(|mut row, &pi| row.scaled_add(pi, b2));
        output += &yb.mapv(rnd);
        // With probs in the storage dtype, b2·p is itself rounded (§4.8).
        if cfg.probs_dtype != crate::dtype::Dtype::F32 {
            let mut bp = Array2::zeros(yb.raw_dim());
            Zip::from(bp.rows_mut()).and(&cache.p).for_each(|mut row, &pi| row.scaled_add(pi, b2));
            output += &bp.mapv(rnd);
        }
    }
    // Backward. du = round(G·W2); dz = cast(du·p) (eager) or du·p in f32 (fused).
    let g_abs = abs(g);
    let err_du = g_abs.dot(&w2_abs) * acc(h) + du.mapv(rnd);
    let err_dz = scale_rows(&err_du, &p_abs) + dz.mapv(rnd_el);
    let err_da = if cfg.gated_linear_unit {
        let clamp = cfg.effective_clamp();
        let offset = cfg.effective_offset();
        let k = a.ncols() / 2;
        let mut e_da = Array2::zeros(a.raw_dim());
        for i in 0..n {
            for j in 0..k {
                let (gc, lc, gate_on, lin_on) = clamp_glu(a[[i, j]], a[[i, k + j]], clamp);
                let (eg, el) =
                    (if gate_on { err_a[[i, j]] } else { 0.0 }, if lin_on { err_a[[i, k + j]] } else { 0.0 });
                let (f, f1, f2) = (act.apply(gc), act.derivative(gc), act.second_derivative(gc).abs());
                let lin = lc + offset;
                let (d, ed) = (dz[[i, j]], err_dz[[i, j]]);
                let err_act = f1.abs() * eg + rnd_el(f);
                let d_act_g = d * lin;
                let err_d_act_g = lin.abs() * ed + d.abs() * el + rnd_el(d_act_g);
                e_da[[i, j]] =
                    if gate_on { f1.abs() * err_d_act_g + d_act_g.abs() * f2 * eg + rnd(da[[i, j]]) } else { 0.0 };
                e_da[[i, k + j]] = if lin_on { f.abs() * ed + d.abs() * err_act + rnd(da[[i, k + j]]) } else { 0.0 };
            }
        }
        e_da
    } else {
        Zip::from(a).and(&err_a).and(&err_dz).and(dz).map_collect(|&a, &ea, &ed, &d| {
            act.derivative(a).abs() * ed + d.abs() * act.second_derivative(a).abs() * ea + rnd(d * act.derivative(a))
        })
    };
    let da_abs = abs(da);
    let n1 = w.fc1_weight.nrows();
    // dx' = round(da·W1); with probs on the input dx = cast(dx'·p), dp = Σ x·dx'.
    let dxp = da.dot(&w.fc1_weight);
    let mut grad_input = err_da.dot(&w1_abs) + da_abs.dot(&w1_abs) * acc(n1) + dxp.mapv(rnd);
    // The probs grad is stored in the probs dtype.
    let round_probs = |v: f64| {
        if cfg.probs_dtype == crate::dtype::Dtype::F32 {
            ua * v.abs()
        } else {
            cfg.probs_dtype.unit_roundoff() * v.abs() + cfg.probs_dtype.subnormal_spacing()
        }
    };
    let grad_probs = if cfg.apply_probs_on_input {
        let x_orig_abs = abs(&cache.x_orig);
        let dp_value = (&dxp * &cache.x_orig).sum_axis(Axis(1));
        let dp = (&grad_input * &x_orig_abs).sum_axis(Axis(1))
            + (abs(&dxp) * &x_orig_abs).sum_axis(Axis(1)) * acc(h)
            + dp_value.mapv(round_probs);
        grad_input = scale_rows(&grad_input, &cache.p_orig.mapv(f64::abs)) + scale_rows(&dxp, &cache.p_orig).mapv(rnd);
        dp
    } else {
        // dp = Σ_j du·z (+ Σ_j G·b2), f32 sums, stored in the probs dtype.
        let z_abs = abs(&cache.z);
        let mut dp_value = (du * &cache.z).sum_axis(Axis(1));
        let mut dp =
            (&err_du * &z_abs + abs(du) * &err_z).sum_axis(Axis(1)) + (abs(du) * &z_abs).sum_axis(Axis(1)) * acc(n2);
        if let Some(b2) = &w.fc2_bias {
            dp += &(g_abs.dot(&b2.mapv(f64::abs)) * acc(h));
            dp_value += &g.dot(b2);
        }
        dp + dp_value.mapv(round_probs)
    };
    let x_err_total = &err_x;
    let fc1_weight = err_da.t().dot(&x_abs)
        + da_abs.t().dot(x_err_total)
        + da_abs.t().dot(&x_abs) * acc(n)
        + da.t().dot(&cache.x).mapv(rnd);
    let fc1_bias = err_da.sum_axis(Axis(0)) + da_abs.sum_axis(Axis(0)) * acc(n) + da.sum_axis(Axis(0)).mapv(rnd);
    let fc2_weight = g_abs.t().dot(&err_u) + g_abs.t().dot(&abs(&cache.u)) * acc(n) + g.t().dot(&cache.u).mapv(rnd);
    let gp = scale_rows(g, &cache.p);
    let fc2_bias = abs(&gp).sum_axis(Axis(0)) * acc(n) + gp.sum_axis(Axis(0)).mapv(rnd);
    SegmentBounds {
        output,
        grad_input,
        grad_probs,
        fc1_weight,
        fc1_bias,
        fc2_weight,
        fc2_bias,
        fc2_input: err_u,
        fc1_output_grad: err_da,
    }
}
