//! `moe-verify`: the command-line front end.
//!
//! Minimal entry point carrying the `compare` subcommand; the lead's main.rs wires the rest.

mod cli;

use clap::{Parser, Subcommand};

/// Reference-and-verification harness for Megatron-Core MoE expert layers.
#[derive(Parser)]
#[command(name = "moe-verify", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare a moe-expert-dump/1 safetensors file with the reference (docs/dumps.md).
    Compare(cli::compare::CompareArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Compare(args) => cli::compare::run_compare(args),
    };
    std::process::exit(code);
}
