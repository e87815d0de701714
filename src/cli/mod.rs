//! Subcommands of the `moe-verify` binary.

pub mod checkpoint;
pub mod compare;
pub mod verify;
