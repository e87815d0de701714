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
            let (gc, lc) = match clamp {
                Some(c) => (n.store(g.min(c)), n.store(l.clamp(-c, c))),
                None => (g, l),
            };
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
    let mut y = store2(n, gemm(n, u.view(), w.fc2_weight.t()));
    if let Some(b2) = &w.fc2_bias {
        Zip::from(y.rows_mut()).and(&p).for_each(|mut row, &pi| {
            Zip::from(&mut row).and(b2).for_each(|y, &b| *y = n.store(n.fp32(*y + n.fp32(b * pi))));
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
            let (gc, lc, gate_mask, lin_mask) = match clamp {
                Some(c) => (n.store(g.min(c)), n.store(l.clamp(-c, c)), g <= c, (-c..=c).contains(&l)),
                None => (g, l, true, true),
            };
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
            grad_input.slice_mut(s![start..start + c, ..]).assign(&dx.slice(s![..c, ..]));
            grad_probs.slice_mut(s![start..start + c]).assign(&dp.slice(s![..c]).mapv(|v| n.to(cfg.probs_dtype, v)));
            start += c;
        }
        Ok(BackwardPass {
            grad_input,
            grad_probs,
            weight_grads: grads,
            pending: deferred.then_some(WeightGradStore { numerics: n, queue }),
        })
    }
}
