//! Subcommands of the `moe-verify` binary.

pub mod args;
pub mod checkpoint;
pub mod compare;
pub mod verify;
