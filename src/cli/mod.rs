//! Subcommand implementations.

pub mod verify;
