//! The one trait every expert-layer implementation provides — the reference here, the CUDA
//! variants in `moe-gpu` — so a single differential suite runs against all of them.

use crate::config::LayerConfig;
use crate::dtype::Numerics;
use crate::error::ReferenceError;
use crate::layer::{forward_fp8, Fp8Channel, Fp8Run, Fp8State, Inputs, WgradTiming};
use crate::state_dict::{from_state_dict, to_state_dict, StateDict};
use ndarray::{Array1, Array2};

/// Why an implementation could not run a case.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The implementation declares it does not handle this configuration (a declared skip,
    /// reported as such, never a silent pass).
    #[error("unsupported by this implementation: {0}")]
    Unsupported(String),
    /// The configuration, parameters or inputs are invalid.
    #[error(transparent)]
    Invalid(#[from] ReferenceError),
    /// The implementation's backend failed (a CUDA error, a kernel compile error, ...).
    #[error("backend failure: {0}")]
    Backend(String),
}

/// Everything one forward + backward call produces, host-side, values in f64.
#[derive(Clone, Debug)]
pub struct LayerRun {
    /// Layer output `[T, h]`.
    pub output: Array2<f64>,
    /// `dL/dx` `[T, h]`.
    pub grad_input: Array2<f64>,
    /// `dL/dp` `[T]`.
    pub grad_probs: Array1<f64>,
    /// Parameter gradients by state-dict name, in the class's own layout.
    pub weight_grads: StateDict,
}

/// An implementation of the expert layers.
///
/// Parameters and gradients are exchanged in the class's Megatron state-dict layout
/// ([`crate::state_dict`]); tensors are host `f64` arrays whose values are exactly
/// representable in the configured dtypes. An implementation computes in
/// `cfg.params_dtype` (or, for the oracle, in f64).
pub trait ExpertLayer: Send + Sync {
    /// A short name that says what the implementation is (`reference`, `cuda-grouped`, ...).
    fn name(&self) -> String;

    /// `Ok` when this implementation handles `cfg`, else [`LayerError::Unsupported`] saying why.
    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError>;

    /// The layer's forward output `[T, h]`.
    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError>;

    /// Forward, then backward from `grad_output`. With [`WgradTiming::Deferred`] the
    /// implementation must produce the input and probs grads first and compute the weight
    /// grads in a separate `backward_dw` step, as Megatron's deferred-wgrad mode does.
    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError>;
}

/// The f64 oracle's results together with what the tolerance model needs.
#[derive(Clone, Debug)]
pub struct OracleRun {
    /// The exact results.
    pub run: LayerRun,
    /// Error scales: the magnitudes of the terms of each result's final reduction (see
    /// [`crate::layer::ErrorScales`]); tolerances are relative to these.
    pub scales: LayerRun,
    /// Absolute allowances for rounding-ambiguous branches (clamp masks at the boundary).
    pub allowance: LayerRun,
}

/// Runs the f64 oracle and returns its results, error scales and allowances, all in the
/// [`LayerRun`] layout of `cfg`'s class.
///
/// With `cfg.fp8` set the results are the unquantized f64 ones and the error model includes the
/// fp8 quantization terms, for TE's initial delayed-scaling state (see [`oracle_with_scales_fp8`]).
pub fn oracle_with_scales(
    cfg: &LayerConfig,
    params: &StateDict,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
) -> Result<OracleRun, LayerError> {
    oracle_with_scales_fp8(cfg, params, inputs, grad_output, initial_fp8_run(cfg)?)
}

/// The fp8 run a stateless call starts from: TE's initial delayed-scaling state, no fault
/// (`None` without fp8).
pub fn initial_fp8_run(cfg: &LayerConfig) -> Result<Option<Fp8Run>, ReferenceError> {
    Ok(match cfg.fp8 {
        Some(config) => Some(Fp8Run { config, state: Fp8State::new(cfg)?, fault: None }),
        None => None,
    })
}

/// [`oracle_with_scales`] for an explicit fp8 run (a delayed-scaling state from earlier steps:
/// the bounds use its scales). `run` must be `Some` exactly when `cfg.fp8` is.
pub fn oracle_with_scales_fp8(
    cfg: &LayerConfig,
    params: &StateDict,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
    run: Option<Fp8Run>,
) -> Result<OracleRun, LayerError> {
    oracle_with_channel(cfg, params, inputs, grad_output, run, Fp8Channel::All)
}

/// [`oracle_with_scales`] for comparing two fp8 runs of one implementation that quantize their
/// input, weights and upstream gradient alike (padding-neutrality, probs-linearity): the fp8
/// channel counts only the derived operands ([`Fp8Channel::Paired`]). Without fp8 it is
/// [`oracle_with_scales`].
pub fn oracle_with_scales_paired(
    cfg: &LayerConfig,
    params: &StateDict,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
) -> Result<OracleRun, LayerError> {
    oracle_with_channel(cfg, params, inputs, grad_output, initial_fp8_run(cfg)?, Fp8Channel::Paired)
}

fn oracle_with_channel(
    cfg: &LayerConfig,
    params: &StateDict,
    inputs: &Inputs,
    grad_output: &Array2<f64>,
    run: Option<Fp8Run>,
    channel: Fp8Channel,
) -> Result<OracleRun, LayerError> {
    let weights = from_state_dict(cfg, params)?;
    let fwd = forward_fp8(cfg, &weights, inputs, Numerics::Oracle, run)?.with_fp8_channel(channel);
    let bwd = fwd.backward(grad_output, WgradTiming::Immediate)?;
    let scales = bwd.scales.expect("the oracle computes error scales");
    Ok(OracleRun {
        run: LayerRun {
            output: fwd.output().clone(),
            grad_input: bwd.grad_input,
            grad_probs: bwd.grad_probs,
            weight_grads: to_state_dict(cfg, &bwd.weight_grads)?,
        },
        allowance: LayerRun {
            output: Array2::zeros(scales.output.raw_dim()),
            grad_input: scales.allowance_grad_input,
            grad_probs: scales.allowance_grad_probs,
            weight_grads: to_state_dict(cfg, &scales.allowance_weight_grads)?,
        },
        scales: LayerRun {
            output: scales.output,
            grad_input: scales.grad_input,
            grad_probs: scales.grad_probs,
            weight_grads: to_state_dict(cfg, &scales.weight_grads)?,
        },
    })
}

/// The reference implementation: [`Numerics::Oracle`] (f64, no rounding) or the emulation of
/// `cfg.params_dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    /// True for the f64 oracle, false to emulate the storage dtype.
    pub oracle: bool,
}

impl Reference {
    /// The f64 oracle.
    pub const ORACLE: Reference = Reference { oracle: true };
    /// The storage-dtype emulation.
    pub const EMULATED: Reference = Reference { oracle: false };

    /// The numerics this reference uses for `cfg`.
    pub fn numerics(&self, cfg: &LayerConfig) -> Numerics {
        if self.oracle {
            Numerics::Oracle
        } else {
            Numerics::Emulated(cfg.params_dtype)
        }
    }
}

impl ExpertLayer for Reference {
    fn name(&self) -> String {
        if self.oracle { "reference-f64" } else { "reference" }.to_string()
    }

    fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
        cfg.validate().map_err(LayerError::from)
    }

    fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
        let weights = from_state_dict(cfg, params)?;
        Ok(forward_fp8(cfg, &weights, inputs, self.numerics(cfg), initial_fp8_run(cfg)?)?.output().clone())
    }

    fn forward_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
    ) -> Result<LayerRun, LayerError> {
        Ok(self.forward_backward_fp8(cfg, params, inputs, grad_output, timing, initial_fp8_run(cfg)?)?.0)
    }
}

impl Reference {
    /// [`ExpertLayer::forward_backward`] with an explicit fp8 run (delayed-scaling state in, the
    /// state with this step's amaxes recorded out; call [`Fp8State::update`] before the next
    /// step). `run` must be `Some` exactly when `cfg.fp8` is.
    pub fn forward_backward_fp8(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
        run: Option<Fp8Run>,
    ) -> Result<(LayerRun, Option<Fp8State>), LayerError> {
        let weights = from_state_dict(cfg, params)?;
        let fwd = forward_fp8(cfg, &weights, inputs, self.numerics(cfg), run)?;
        let mut bwd = fwd.backward(grad_output, timing)?;
        if let Some(store) = bwd.pending.take() {
            store.backward_dw(&mut bwd.weight_grads);
        }
        let run = LayerRun {
            output: fwd.output().clone(),
            grad_input: bwd.grad_input,
            grad_probs: bwd.grad_probs,
            weight_grads: to_state_dict(cfg, &bwd.weight_grads)?,
        };
        Ok((run, fwd.fp8_state()))
    }
}
