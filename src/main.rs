//! `moe-verify`: the command line of the moe-verify harness.
//!
//! * `verify` — the differential harness on an embedded default (the README's command 1).
//! * `compare` — recompute a PyTorch dump with the reference and diff it.
//! * `layout`, `reshard`, `inspect` — Megatron sharded state dicts and checkpoints.
//! * `diff` — two checkpoints of any supported format, expert by expert.
//! * `shapes` — the model-shape registry (`--json`: the file the PyTorch bench scripts read).
//! * `bench layer`, `bench grouped` — the GPU benchmarks (with the `cuda` feature).
//!
//! Exit codes: 0 success, 1 a check failed, 2 bad input or usage.

mod cli;

use clap::{Parser, Subcommand};

/// Verify MoE expert-layer implementations against a Megatron-exact reference.
#[derive(Parser, Debug)]
#[command(name = "moe-verify", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the differential harness: every implementation against the f64 oracle, plus the
    /// cross-class, parallel, zero-token, padding, deferred-wgrad and probs properties.
    Verify(cli::verify::VerifyArgs),
    /// Compare a moe-expert-dump/1 safetensors file (written by tools/dump_experts.py) with the
    /// reference: one row per expected tensor; exit 0 all pass, 1 any differs, 2 bad input.
    Compare(cli::compare::CompareArgs),
    /// Print every rank's Megatron-Core sharded state dict.
    Layout(cli::checkpoint::LayoutArgs),
    /// Convert a checkpoint to another class or parallel layout.
    Reshard(cli::checkpoint::ReshardArgs),
    /// Summarise a checkpoint.
    Inspect(cli::checkpoint::InspectArgs),
    /// Compare two checkpoints expert by expert (moe-verify, torch_dist or Hugging Face; format
    /// and family inferred): exit 0 identical, 1 they differ, 2 bad input.
    Diff(cli::diff::DiffArgs),
    /// List the model shapes (sizes and bench token distributions); `--json` writes the form
    /// the PyTorch bench scripts read (scripts/shapes.json).
    Shapes(cli::shapes::ShapesArgs),
    /// Time the CUDA layers and grouped GEMMs at the model shapes (needs a GPU).
    #[cfg(feature = "cuda")]
    Bench(cli::bench::BenchArgs),
    /// Compile every NVRTC kernel module for its GPU architectures and write the PTX (needs
    /// libnvrtc, no GPU); scripts/kernel-check.sh assembles it and fails on register spills.
    #[cfg(feature = "cuda")]
    Kernels(cli::kernels::KernelsArgs),
    /// One rank of `verify --gpus` (started by it, or by torchrun/Slurm with RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    #[command(hide = true)]
    Worker(cli::distributed::WorkerArgs),
}

/// Restores the default SIGPIPE disposition so `moe-verify layout ... | head` ends quietly, as
/// Unix tools do, instead of panicking on a broken pipe inside `println!`.
fn reset_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called once at start-up on the main thread before any other thread exists;
    // `signal` with SIG_DFL installs no handler code, it only resets the disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    reset_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match &cli.command {
        Command::Verify(args) => cli::verify::run(args),
        Command::Compare(args) => cli::compare::run_compare(args),
        Command::Layout(a) => cli::checkpoint::run_layout(a),
        Command::Reshard(a) => cli::checkpoint::run_reshard(a),
        Command::Inspect(a) => cli::checkpoint::run_inspect(a),
        Command::Diff(a) => cli::diff::run(a),
        Command::Shapes(a) => cli::shapes::run(a),
        Command::Worker(a) => cli::distributed::run_worker(a),
        #[cfg(feature = "cuda")]
        Command::Bench(a) => cli::bench::run(a),
        #[cfg(feature = "cuda")]
        Command::Kernels(a) => cli::kernels::run(a),
    };
    std::process::exit(code);
}
