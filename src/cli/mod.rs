//! Command-line subcommands.

pub mod checkpoint;
