//! The three CUDA implementations of [`ExpertLayer`], one struct per Megatron class.
//!
//! Each call uploads the parameters and inputs, runs the device path of [`crate::layer`] and
//! downloads the results; nothing is computed on the host and the reference is never called
//! (its validation and state-dict names are reused). Proof of GPU execution: [`launches`]
//! counts the kernel launches, cuBLAS calls and memsets this implementation issued.
//!
//! [`launches`]: CudaSequential::launches

use crate::error::GpuError;
use crate::grouped::Strategy;
use crate::kernels::engine;
use crate::layer::segments;
use moe_reference::layer::validate_inputs;
use moe_reference::{
    Dtype, ExpertLayer, Inputs, LayerClass, LayerConfig, LayerError, LayerRun, StateDict, WgradTiming,
};
use ndarray::{Array1, Array2};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a CUDA implementation shares: its class, the test option and the launch counter.
#[derive(Debug)]
struct CudaLayer {
    class: LayerClass,
    name: &'static str,
    poison: bool,
    strategy: Option<Strategy>,
    launches: AtomicU64,
}

/// Result of one device run: output, then (dx, dp, weight grads) when backward ran.
type DeviceRun = (Array2<f64>, Option<(Array2<f64>, Array1<f64>, StateDict)>);

impl CudaLayer {
    fn new(class: LayerClass, name: &'static str) -> Result<CudaLayer, GpuError> {
        // Checks the settings, probes for the GPU, creates the context and compiles the
        // kernels now (see `engine`), so a bad setting or a broken setup fails here.
        drop(engine()?);
        Ok(CudaLayer { class, name, poison: false, strategy: None, launches: AtomicU64::new(0) })
    }

    fn supports(&self, cfg: &LayerConfig) -> Result<(), GpuError> {
        cfg.validate()?;
        if cfg.class != self.class {
            return Err(GpuError::Unsupported(format!(
                "{} implements {}, not {}",
                self.name,
                self.class.megatron_name(),
                cfg.class.megatron_name()
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
    ) -> Result<DeviceRun, GpuError> {
        self.supports(cfg)?;
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
        let mut eng = engine()?;
        let strategy = self.strategy.unwrap_or(eng.default_gemm_strategy());
        eng.set_gemm_strategy(strategy);
        let before = eng.launches();
        let h = cfg.hidden_size;
        let w = eng.prepare(cfg, params)?;
        let mut ws = eng.workspace(cfg, &counts, self.poison)?;
        eng.upload_inputs(cfg, &mut ws, &inputs.hidden_states, &inputs.probs, grad)?;
        eng.forward(cfg, &w, &mut ws)?;
        let y = eng.download_rows(&ws, &ws.y, h, cfg.params_dtype)?;
        let result = match grad {
            None => (y, None),
            Some(_) => {
                let deferred = timing == WgradTiming::Deferred;
                eng.backward(cfg, &w, &mut ws, !deferred)?;
                // In deferred mode dx and dp are complete (downloaded) before backward_dw runs.
                let dx = eng.download_rows(&ws, &ws.dx, h, cfg.params_dtype)?;
                let dp = eng.download_rows(&ws, &ws.dp, 1, Dtype::F32)?.column(0).to_owned();
                if deferred {
                    eng.backward_dw(cfg, &mut ws)?;
                }
                let grads = eng.download_grads(cfg, &ws)?;
                (y, Some((dx, dp, grads)))
            }
        };
        eng.synchronize()?;
        let issued = eng.launches() - before;
        self.launches.fetch_add(issued, Ordering::Relaxed);
        Ok(result)
    }
}

macro_rules! cuda_layer {
    ($(#[$doc:meta])* $ty:ident, $class:expr, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $ty(CudaLayer);

        impl $ty {
            /// Probes for a CUDA device, creates the shared context and compiles the kernels.
            /// [`GpuError::NoDevice`] when there is no usable GPU.
            pub fn new() -> Result<Self, GpuError> {
                Ok($ty(CudaLayer::new($class, $name)?))
            }

            /// Test option: fill every output, intermediate and gradient buffer with NaN before
            /// each launch, so a row a kernel forgets to write fails loudly.
            pub fn with_poison(mut self, poison: bool) -> Self {
                self.0.poison = poison;
                self
            }

            /// Issues each set of per-expert GEMMs with `strategy` (see
            /// [`crate::kernels::Engine::set_gemm_strategy`]); default `MOE_GPU_GEMM` or
            /// [`Strategy::Auto`].
            pub fn with_strategy(mut self, strategy: Strategy) -> Self {
                self.0.strategy = Some(strategy);
                self
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
                Ok(self.0.run(cfg, params, inputs, None, WgradTiming::Immediate)?.0)
            }

            fn forward_backward(
                &self,
                cfg: &LayerConfig,
                params: &StateDict,
                inputs: &Inputs,
                grad_output: &Array2<f64>,
                timing: WgradTiming,
            ) -> Result<LayerRun, LayerError> {
                let (output, bwd) = self.0.run(cfg, params, inputs, Some(grad_output), timing)?;
                let (grad_input, grad_probs, weight_grads) = bwd.ok_or_else(|| LayerError::Backend("backward did not run".into()))?;
                Ok(LayerRun { output, grad_input, grad_probs, weight_grads })
            }
        }
    };
}

cuda_layer!(
    /// `SequentialMLP` on CUDA: per-expert cuBLAS GEMMs, fc1 bias added in a separate rounding.
    CudaSequential,
    LayerClass::Sequential,
    "cuda-sequential"
);
cuda_layer!(
    /// Legacy `GroupedMLP` on CUDA: `[in, out]` weight blocks, a loop of cuBLAS GEMMs over
    /// experts, fp32 activation chain rounded once; bf16 only, no bias, no deferral.
    CudaGrouped,
    LayerClass::Grouped,
    "cuda-grouped"
);
cuda_layer!(
    /// `TEGroupedMLP` (non-fused) on CUDA: a loop of cuBLAS GEMMs over experts, fc1 bias inside
    /// the GEMM (beta = 1 on a bias-filled output), eager activation rounding.
    CudaTeGrouped,
    LayerClass::TeGrouped,
    "cuda-te-grouped"
);
