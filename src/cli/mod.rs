//! Subcommands of the `moe-verify` binary.

pub mod compare;
pub mod verify;
