//! # moe-gpu
//!
//! CUDA implementations, through cudarc, of Megatron-Core's MoE expert layers —
//! [`CudaSequential`] (`SequentialMLP`), [`CudaGrouped`] (legacy `GroupedMLP`) and
//! [`CudaTeGrouped`] (`TEGroupedMLP`, non-fused) — forward, backward and deferred weight
//! gradients in bf16, fp16 and fp32, behind the reference's [`moe_reference::ExpertLayer`]
//! trait so the same differential suite runs against each.
//!
//! Modules, leaves first (each imports only modules listed before it):
//! * [`error`] — [`GpuError`].
//! * [`gemm`] — what a grouped GEMM is ([`GemmProblem`]), the [`Strategy`]s it may be issued
//!   with, and the measured policy of [`Strategy::Auto`]. No device.
//! * [`memory`] — [`DeviceBuffer`] and [`Region`], the device memory the engine hands out.
//! * `nvrtc` — NVRTC compilation of the embedded kernel sources.
//! * [`fp8`] — the fp8 quantization kernels of `kernels/fp8.cu` and the cuBLASLt fp8 GEMM.
//! * [`kernels`] — the elementwise kernels of `kernels/experts.cu`, one typed wrapper each.
//! * [`persistent`] — this crate's persistent Hopper grouped GEMM (`kernels/grouped_gemm.cu`,
//!   wgmma): eligibility, tensor maps, launches.
//! * `grouped` — the grouped-GEMM executor, owning the cuBLAS handles, side streams, graph and
//!   pointer-array caches and the persistent kernels.
//! * [`engine`] — [`Engine`], one device's context, stream, kernels and executor, reached through
//!   [`Gpu`], the cloneable per-device handle layers hold.
//! * [`layer`] — the device-resident forward/backward/backward_dw of a [`layer::DeviceLayer`]
//!   on [`layer::Workspace`] buffers (the path benches time).
//! * [`implementation`] — the `ExpertLayer` impls (host in, host out).
//! * [`nccl`] — [`nccl::NcclTransport`], the NCCL collectives of the distributed expert layer.
//! * [`sampled`] — the device side of the sampled verification of model-sized shapes (the checks
//!   are `moe_harness::sampled`).
//! * `skip` — when a GPU test or bench may skip, and [`gpu_or_skip`], the one way they get a
//!   [`Gpu`].
//!
//! The crate builds and its tests run without CUDA: [`engine::probe`] checks for the driver
//! before any context is created and [`Gpu::new`] returns [`GpuError::NoDevice`].

#![deny(missing_docs)]

pub mod engine;
pub mod error;
pub mod fp8;
pub mod gemm;
mod grouped;
pub mod implementation;
pub mod kernels;
pub mod layer;
pub mod memory;
pub mod nccl;
mod nvrtc;
pub mod persistent;
pub mod sampled;
mod skip;

/// NVRTC's compiled PTX (what the `compile_*` functions return).
pub use cudarc::nvrtc::Ptx;
pub use engine::{Engine, Gpu};
pub use error::GpuError;
pub use gemm::{GemmProblem, Strategy};
pub use implementation::{CudaGrouped, CudaSequential, CudaTeGrouped};
pub use memory::{DeviceBuffer, Region};
pub use nvrtc::nvrtc_present;
pub use skip::{gpu_or_skip, is_no_device, may_skip, print_skip, skip_message};
