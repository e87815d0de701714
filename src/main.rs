//! moe-verify command line (checkpoint subcommands; the lead wires the rest).

mod cli;

use clap::{Parser, Subcommand};

/// Reference-and-verification harness for Megatron-Core MoE expert layers.
#[derive(Parser, Debug)]
#[command(name = "moe-verify", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every rank's Megatron-Core sharded state dict.
    Layout(cli::checkpoint::LayoutArgs),
    /// Convert a checkpoint to another class or parallel layout.
    Reshard(cli::checkpoint::ReshardArgs),
    /// Summarise a checkpoint.
    Inspect(cli::checkpoint::InspectArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match &cli.command {
        Command::Layout(a) => cli::checkpoint::run_layout(a),
        Command::Reshard(a) => cli::checkpoint::run_reshard(a),
        Command::Inspect(a) => cli::checkpoint::run_inspect(a),
    };
    std::process::exit(code);
}
