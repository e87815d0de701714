//! `moe-verify`: the command line of the moe-verify harness.
//!
//! * `verify` — the differential harness on an embedded default (the README's command 1).
//! * `compare` — recompute a PyTorch dump with the reference and diff it.
//! * `layout`, `reshard`, `inspect` — Megatron sharded state dicts and checkpoints.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moe-verify",
    version,
    about = "Verify MoE expert-layer implementations against a Megatron-exact reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the differential harness: every implementation against the f64 oracle, plus the
    /// cross-class, parallel, zero-token, padding, deferred-wgrad and probs properties.
    Verify(cli::verify::VerifyArgs),
    /// Compare a moe-expert-dump/1 safetensors file (written by tools/dump_experts.py) with the
    /// reference: one row per expected tensor; exit 0 all pass, 1 any differs, 2 bad input.
    Compare(cli::compare::CompareArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Verify(args) => cli::verify::run(args),
        Command::Compare(args) => cli::compare::run_compare(args),
    };
    std::process::exit(code);
}
