//! # moe-harness
//!
//! The differential-testing side of moe-verify: the tolerance model ([`tolerance`]), tensor
//! comparison with worst-element reports ([`compare`]), seeded problem generation and proptest
//! strategies ([`case`], [`strategy`]), the property checks and the differential runner
//! ([`properties`], [`runner`]), and PyTorch dumps ([`dump`]). The model shapes ([`shapes`])
//! and the sampled verification of model-sized layers ([`sampled`]) live here too. Megatron
//! sharded state dicts and checkpoints are their own crate, `moe-checkpoint`.
#![deny(missing_docs)]

pub mod case;
pub mod compare;
pub mod distributed;
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

/// The environment variable that makes a missing CUDA device a failure instead of a skip:
/// `MOE_REQUIRE_CUDA=1` (device-machine runs set it, so a broken library path cannot pass).
pub const REQUIRE_CUDA_VAR: &str = "MOE_REQUIRE_CUDA";

/// True when `MOE_REQUIRE_CUDA=1`: tests, benches and `moe-verify verify` must fail rather than
/// skip when the CUDA implementations are unavailable. The one place the variable is read.
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_VAR).is_ok_and(|v| v == "1")
}
