//! # moe-gpu
//!
//! CUDA implementations, through cudarc, of Megatron-Core's MoE expert layers —
//! [`CudaSequential`] (`SequentialMLP`), [`CudaGrouped`] (legacy `GroupedMLP`) and
//! [`CudaTeGrouped`] (`TEGroupedMLP`, non-fused) — forward, backward and deferred weight
//! gradients in bf16, fp16 and fp32, behind the reference's [`moe_reference::ExpertLayer`]
//! trait so the same differential suite runs against each.
//!
//! Layers, as cudarc layers itself:
//! * [`kernels`]: device probe, context, NVRTC compilation of `kernels/experts.cu` (embedded,
//!   compiled at first use for the device's compute capability), raw launches and the one
//!   row-major cuBLAS helper.
//! * [`grouped`]: the grouped-GEMM executor ([`kernels::Engine::grouped_gemm`]): per-expert
//!   GEMMs as a cuBLAS loop, over several streams, as a replayed CUDA graph, or through
//!   cuBLAS's grouped/strided batched APIs, or on [`persistent`], this crate's own
//!   persistent Hopper grouped GEMM (wgmma) (issue 5).
//! * [`layer`]: the device-resident forward/backward/backward_dw on [`layer::Workspace`]
//!   buffers (the path benches time: weights uploaded once with [`kernels::Engine::prepare`]).
//! * [`implementation`]: the `ExpertLayer` impls (host in, host out).
//! * [`sampled`]: sampled verification of model-sized shapes against the f64 oracle.
//!
//! The crate builds and its tests run without CUDA: [`kernels::probe`] checks for the driver
//! before any context is created and constructors return [`GpuError::NoDevice`].

#![deny(missing_docs)]

pub mod error;
pub mod grouped;
pub mod implementation;
pub mod kernels;
pub mod layer;
pub mod persistent;
pub mod sampled;

pub use error::GpuError;
pub use grouped::{GemmProblem, Strategy};
pub use implementation::{CudaGrouped, CudaSequential, CudaTeGrouped};

/// The message tests print (once) when they skip for lack of a GPU; `test` is the full name
/// (`gpu::<test>`, `gpu_grouped::<test>`, `bench gpu_layer`).
pub fn skip_message(test: &str, err: &GpuError) -> String {
    let why = match err {
        GpuError::NoDevice(reason) => reason.clone(),
        other => other.to_string(),
    };
    format!("SKIP {test}: no CUDA device ({why}); set MOE_REQUIRE_CUDA=1 to fail instead")
}

/// Prints a SKIP line where a passing test's output still shows: straight to the stderr handle,
/// which libtest does not capture (it captures `print!`/`eprint!` only).
pub fn print_skip(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether `err` means there is no usable GPU on this machine: the one reason a GPU test,
/// bench or backend may skip (and only without `MOE_REQUIRE_CUDA=1`). Every other error, such
/// as an invalid `MOE_GPU_GEMM` ([`GpuError::Config`]), must fail instead of skipping.
pub fn is_no_device(err: &GpuError) -> bool {
    matches!(err, GpuError::NoDevice(_))
}

/// Whether a GPU test or bench that could not get the GPU (`err`) may skip: only for a
/// missing GPU ([`is_no_device`]) and only without `MOE_REQUIRE_CUDA=1`. Otherwise it must fail.
pub fn may_skip(err: &GpuError) -> bool {
    is_no_device(err) && !cuda_required()
}

/// True when `MOE_REQUIRE_CUDA=1`: a missing GPU must fail instead of skipping.
pub fn cuda_required() -> bool {
    std::env::var("MOE_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}
