//! Subcommands of the `moe-verify` binary.

pub mod checkpoint;
pub mod compare;
pub mod shapes;
pub mod verify;
