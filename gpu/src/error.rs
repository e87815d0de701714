//! The gpu crate's error type and its mapping onto the reference trait's [`LayerError`].

use moe_reference::{LayerError, ReferenceError};

/// Why a CUDA implementation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable CUDA driver or device on this machine (the tests skip on this).
    #[error("no CUDA device ({0})")]
    NoDevice(String),
    /// A CUDA driver call failed (includes asynchronous kernel faults seen at synchronize).
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// A cuBLASLt call failed.
    #[error("cuBLASLt error: {0}")]
    CublasLt(String),
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile {kernel}:\n{log}")]
    Compile {
        /// The kernel file.
        kernel: &'static str,
        /// NVRTC's log, as text.
        log: String,
    },
    /// A configuration this implementation does not handle (a declared skip).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor or count that does not fit the configuration or a cuBLAS dimension.
    #[error("shape error: {0}")]
    Shape(String),
    /// The configuration or inputs are invalid (checked with the reference's validation).
    #[error(transparent)]
    Invalid(#[from] ReferenceError),
}

impl From<GpuError> for LayerError {
    fn from(e: GpuError) -> LayerError {
        match e {
            GpuError::Unsupported(what) => LayerError::Unsupported(what),
            GpuError::Invalid(err) => LayerError::Invalid(err),
            other => LayerError::Backend(other.to_string()),
        }
    }
}

impl From<std::num::TryFromIntError> for GpuError {
    fn from(e: std::num::TryFromIntError) -> GpuError {
        GpuError::Shape(format!("dimension does not fit a 32-bit CUDA/cuBLAS argument: {e}"))
    }
}
