//! Subcommands of the `moe-verify` binary.

pub mod args;
#[cfg(feature = "cuda")]
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod diff;
pub mod distributed;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod shapes;
pub mod verify;
