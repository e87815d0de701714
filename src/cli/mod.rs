//! Subcommands of the `moe-verify` binary.

#[cfg(feature = "cuda")]
pub mod bench;
pub mod checkpoint;
pub mod compare;
pub mod shapes;
pub mod verify;
