//! The single integration-test binary.

#[cfg(feature = "cuda")]
mod gpu;
