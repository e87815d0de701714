//! # moe-harness
//!
//! The differential-testing side of moe-verify: the tolerance model ([`tolerance`]), tensor
//! comparison with worst-element reports ([`compare`]), seeded problem generation and proptest
//! strategies ([`case`], [`strategy`]), the property checks and the differential runner
//! ([`properties`], [`runner`]), PyTorch dumps ([`dump`]), and Megatron sharded state dicts and checkpoints ([`checkpoint`]).
//! The model shapes ([`shapes`]) and the sampled verification of model-sized layers
//! ([`sampled`]) live here too.
#![deny(missing_docs)]

pub mod case;
pub mod checkpoint;
pub mod compare;
pub mod dump;
pub mod planted;
pub mod properties;
pub mod runner;
pub mod sampled;
pub mod shapes;
pub mod strategy;
pub mod tolerance;

pub use compare::{compare_runs, compare_tensor, TensorDiff};
pub use tolerance::Tolerance;

/// True when `MOE_REQUIRE_CUDA=1`: a GPU test, bench or `verify` run that finds no usable CUDA
/// device must fail instead of skipping (device-machine runs set it, so a broken library path
/// cannot "pass"). The one place the variable is read.
pub fn cuda_required() -> bool {
    std::env::var("MOE_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}
