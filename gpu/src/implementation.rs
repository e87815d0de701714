//! The three CUDA implementations of [`ExpertLayer`], one struct per Megatron class.
//!
//! Each layer is built on a [`Gpu`] (the engine of one device, shared by the layers built on
//! it) and issues its per-expert GEMMs with its own [`Strategy`] (default [`Strategy::Auto`]).
//! Each call uploads the parameters and inputs, runs the device path of [`crate::layer`] and
//! downloads the results; nothing is computed on the host and the reference is never called
//! (its validation and state-dict names are reused). Proof of GPU execution: [`launches`]
//! counts the kernel launches, cuBLAS calls and memsets this implementation issued.
//!
//! [`launches`]: CudaSequential::launches

use crate::engine::{Engine, Gpu};
use crate::error::GpuError;
use crate::fp8::DeviceDelayedState;
use crate::gemm::Strategy;
use crate::layer::{segments, DeviceLayer};
use moe_reference::layer::{validate_inputs, Fp8State};
use moe_reference::{
    Dtype, ExpertLayer, Fp8Recipe, Inputs, LayerClass, LayerConfig, LayerError, LayerRun, StateDict, WgradTiming,
};
use ndarray::{Array1, Array2};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a CUDA implementation shares: its device, class, GEMM strategy, the test option and
/// the launch counter.
#[derive(Debug)]
struct CudaLayer {
    gpu: Gpu,
    class: LayerClass,
    name: &'static str,
    poison: bool,
    strategy: Strategy,
    launches: AtomicU64,
}

/// Result of one device run: output, then (dx, dp, weight grads) when backward ran, then the
/// delayed-scaling state after the call (delayed recipe only).
type DeviceRun = (Array2<f64>, Option<(Array2<f64>, Array1<f64>, StateDict)>, Option<Fp8State>);

impl CudaLayer {
    fn new(gpu: &Gpu, class: LayerClass, name: &'static str) -> CudaLayer {
        CudaLayer {
            gpu: gpu.clone(),
            class,
            name,
            poison: false,
            strategy: Strategy::Auto,
            launches: AtomicU64::new(0),
        }
    }

    fn supports(&self, cfg: &LayerConfig) -> Result<(), GpuError> {
        cfg.validate()?;
        if cfg.fp8.is_some() {
            crate::layer::fp8_support(cfg, None)?;
        }
        if cfg.class != self.class {
            return Err(GpuError::Unsupported(format!(
                "{} implements {}, not {}",
                self.name,
                self.class.megatron_name(),
                cfg.class.megatron_name()
            )));
        }
        if let Some(size) = cfg.glu_interleave_size {
            return Err(GpuError::Unsupported(format!(
                "{} has no GLU interleaving (Megatron HEAD's moe_mlp_glu_interleave_size = {size}): its \
                 activation kernels read fc1's halves [gate; linear]",
                self.name
            )));
        }
        Ok(())
    }

    fn run(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad: Option<&Array2<f64>>,
        timing: WgradTiming,
        state: Option<&Fp8State>,
    ) -> Result<DeviceRun, GpuError> {
        self.supports(cfg)?;
        let delayed = cfg.fp8.is_some_and(|f| f.recipe == Fp8Recipe::Delayed);
        if state.is_some() && !delayed {
            return Err(GpuError::Invalid(moe_reference::ReferenceError::Config(
                "an fp8 state is given only with the delayed recipe (the other recipes keep no state)".into(),
            )));
        }
        let initial;
        let state = match state {
            Some(s) => Some(s),
            None if delayed => {
                initial = Fp8State::new(cfg)?;
                Some(&initial)
            }
            None => None,
        };
        validate_inputs(cfg, inputs)?;
        if let Some(g) = grad {
            if g.dim() != inputs.hidden_states.dim() {
                return Err(GpuError::Shape(format!(
                    "grad_output is {:?}, output is {:?}",
                    g.dim(),
                    inputs.hidden_states.dim()
                )));
            }
            moe_reference::layer::check_finite("input.grad_output", g)?;
            if timing == WgradTiming::Deferred && cfg.class == LayerClass::Grouped {
                return Err(GpuError::Invalid(moe_reference::ReferenceError::Config(
                    "GroupedMLP does not support delay_wgrad_compute (backward_dw is a no-op there)".into(),
                )));
            }
        }
        let counts = segments(cfg, &inputs.tokens_per_expert, inputs.num_tokens())?;
        let mut guard = self.gpu.lock()?;
        let eng: &mut Engine = &mut guard;
        let strategy = self.strategy;
        let before = eng.launches();
        let h = cfg.hidden_size;
        let layer = DeviceLayer::upload(eng, cfg, params)?;
        let mut ws = layer.workspace(eng, &counts, self.poison)?;
        if let Some(s) = state {
            ws.delayed = Some(DeviceDelayedState::upload(eng, s)?);
        }
        ws.upload_inputs(eng, &inputs.hidden_states, &inputs.probs, grad)?;
        layer.forward(eng, &mut ws, strategy)?;
        let y = ws.download_rows(eng, &ws.y, h, cfg.params_dtype)?;
        let (y, bwd) = match grad {
            None => (y, None),
            Some(_) => {
                let deferred = timing == WgradTiming::Deferred;
                layer.backward(eng, &mut ws, !deferred, strategy)?;
                // In deferred mode dx and dp are complete (downloaded) before backward_dw runs.
                let dx = ws.download_rows(eng, &ws.dx, h, cfg.params_dtype)?;
                let dp = ws.download_rows(eng, &ws.dp, 1, Dtype::F32)?.column(0).to_owned();
                if deferred {
                    layer.backward_dw(eng, &mut ws, strategy)?;
                }
                let grads = layer.download_grads(eng, &ws)?;
                (y, Some((dx, dp, grads)))
            }
        };
        let state_after = ws.delayed.as_ref().map(|d| d.download(eng)).transpose()?;
        eng.synchronize()?;
        let issued = eng.launches() - before;
        self.launches.fetch_add(issued, Ordering::Relaxed);
        Ok((y, bwd, state_after))
    }
}

impl CudaLayer {
    /// [`CudaLayer::run`] with the backward, as a [`LayerRun`] and the delayed-scaling state
    /// after the call (delayed recipe only).
    fn run_backward(
        &self,
        cfg: &LayerConfig,
        params: &StateDict,
        inputs: &Inputs,
        grad_output: &Array2<f64>,
        timing: WgradTiming,
        state: Option<&Fp8State>,
    ) -> Result<(LayerRun, Option<Fp8State>), LayerError> {
        let (output, bwd, after) = self.run(cfg, params, inputs, Some(grad_output), timing, state)?;
        let (grad_input, grad_probs, weight_grads) =
            bwd.ok_or_else(|| LayerError::Backend("backward did not run".into()))?;
        Ok((LayerRun { output, grad_input, grad_probs, weight_grads }, after))
    }
}

macro_rules! cuda_layer {
    ($(#[$doc:meta])* $ty:ident, $class:expr, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $ty(CudaLayer);

        impl $ty {
            /// The layer on `gpu`'s engine, issuing its GEMMs with [`Strategy::Auto`].
            pub fn new(gpu: &Gpu) -> Self {
                $ty(CudaLayer::new(gpu, $class, $name))
            }

            /// Test option: fill every output, intermediate and gradient buffer with NaN before
            /// each launch, so a row a kernel forgets to write fails loudly.
            pub fn with_poison(mut self, poison: bool) -> Self {
                self.0.poison = poison;
                self
            }

            /// Issues each set of per-expert GEMMs (fc1, fc2, the two data gradients, the two
            /// weight gradients) with `strategy`, any [`Strategy`] of the grouped executor
            /// (default [`Strategy::Auto`]). Every strategy computes the same function; they
            /// differ in speed only.
            pub fn with_strategy(mut self, strategy: Strategy) -> Self {
                self.0.strategy = strategy;
                self
            }

            /// The GEMM strategy this layer issues its per-expert GEMMs with.
            pub fn strategy(&self) -> Strategy {
                self.0.strategy
            }

            /// Kernel launches, cuBLAS calls and memsets this implementation has issued (proof
            /// that it ran on the GPU).
            pub fn launches(&self) -> u64 {
                self.0.launches.load(Ordering::Relaxed)
            }

            /// The Megatron class this implements.
            pub fn class(&self) -> LayerClass {
                $class
            }
        }

        impl ExpertLayer for $ty {
            fn name(&self) -> String {
                $name.to_string()
            }

            fn supports(&self, cfg: &LayerConfig) -> Result<(), LayerError> {
                self.0.supports(cfg).map_err(LayerError::from)
            }

            fn forward(&self, cfg: &LayerConfig, params: &StateDict, inputs: &Inputs) -> Result<Array2<f64>, LayerError> {
                Ok(self.0.run(cfg, params, inputs, None, WgradTiming::Immediate, None)?.0)
            }

            fn forward_backward(
                &self,
                cfg: &LayerConfig,
                params: &StateDict,
                inputs: &Inputs,
                grad_output: &Array2<f64>,
                timing: WgradTiming,
            ) -> Result<LayerRun, LayerError> {
                Ok(self.0.run_backward(cfg, params, inputs, grad_output, timing, None)?.0)
            }
        }

        impl $ty {
            /// [`ExpertLayer::forward_backward`] under the fp8 `delayed` recipe from an explicit
            /// delayed-scaling state (what `moe_reference::Reference::forward_backward_fp8`
            /// takes): every operand is cast with `state`'s scale and its amax recorded; returns
            /// the state after the step (run [`crate::fp8::update_on_device`] or
            /// [`Fp8State::update`] before the next). Other recipes keep no state and refuse one.
            pub fn forward_backward_fp8(
                &self,
                cfg: &LayerConfig,
                params: &StateDict,
                inputs: &Inputs,
                grad_output: &Array2<f64>,
                timing: WgradTiming,
                state: &Fp8State,
            ) -> Result<(LayerRun, Fp8State), LayerError> {
                let (run, after) = self.0.run_backward(cfg, params, inputs, grad_output, timing, Some(state))?;
                let after = after.ok_or_else(|| LayerError::Backend("the delayed-scaling state was not read back".into()))?;
                Ok((run, after))
            }
        }
    };
}

cuda_layer!(
    /// `SequentialMLP` on CUDA: the per-expert GEMMs of each linear as one grouped call (the
    /// layer's [`Strategy`], default [`Strategy::Auto`]), fc1 bias added in a separate rounding.
    CudaSequential,
    LayerClass::Sequential,
    "cuda-sequential"
);
cuda_layer!(
    /// Legacy `GroupedMLP` on CUDA: `[in, out]` weight blocks, the per-expert GEMMs of each
    /// linear as one grouped call (the layer's [`Strategy`], default [`Strategy::Auto`]), fp32
    /// activation chain rounded once; bf16 only, no bias, no deferral.
    CudaGrouped,
    LayerClass::Grouped,
    "cuda-grouped"
);
cuda_layer!(
    /// `TEGroupedMLP` (non-fused) on CUDA: the per-expert GEMMs of each linear as one grouped
    /// call (the layer's [`Strategy`], default [`Strategy::Auto`]); with an fc1 bias, fc1 is one
    /// cuBLAS GEMM per expert with beta = 1 on a bias-filled output (the bias inside the GEMM);
    /// eager activation rounding.
    CudaTeGrouped,
    LayerClass::TeGrouped,
    "cuda-te-grouped"
);
