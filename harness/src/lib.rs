//! # moe-harness
//!
//! The differential-testing side of moe-verify: the tolerance model ([`tolerance`]), tensor
//! comparison with worst-element reports ([`compare`]), seeded problem generation and proptest
//! strategies ([`case`], [`strategy`]), the property checks and the differential runner
//! ([`properties`], [`runner`]), and PyTorch dumps ([`dump`]). Megatron sharded state dicts
//! and checkpoints are their own crate, `moe-checkpoint`.
#![deny(missing_docs)]

pub mod case;
pub mod compare;
pub mod dump;
pub mod planted;
pub mod properties;
pub mod runner;
pub mod strategy;
pub mod tolerance;

pub use compare::{compare_runs, compare_tensor, TensorDiff};
pub use tolerance::Tolerance;
