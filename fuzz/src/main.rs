//! `moe-fuzz`: mutation fuzzing of moe-verify's file readers on stable Rust.
//!
//! Each target starts from a corpus of real files of its format, mutates them (bytes and
//! structure, [`mutate`]), and feeds every mutant to the reader. A run fails when an input
//! makes the reader panic, take longer than `--timeout-secs` (a hang: the watchdog stops the
//! process and prints the seed and input number that reproduce it), request a single
//! allocation larger than the target's allowance for that input (a size taken from an untrusted
//! length field), or hold more live heap at its peak than the target's allowance (memory built
//! up in many small pieces). Refusals with an error are the expected outcome for most mutants; the report
//! counts them and shows a few messages. Failing inputs are written to `--out`.
//!
//! Not part of CI (a million inputs per reader take minutes): `scripts/fuzz.sh` runs it and
//! `docs/fuzzing.md` records the counts.

mod alloc;
mod mutate;
mod targets;

use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use targets::{
    CheckpointReader, DistcpReader, DumpReader, HfReader, MetadataReader, Outcome, Planted, PlantedReader, Target,
};

#[global_allocator]
static WATERMARK: alloc::Watermark = alloc::Watermark::new();

/// The readers that can be fuzzed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TargetName {
    /// moe-expert-dump files (`Dump::from_bytes`).
    Dump,
    /// moe-verify checkpoint directories (index and parts: open, verify, load).
    Checkpoint,
    /// Megatron torch_dist `.metadata` pickles (`dcp::parse_metadata`).
    Metadata,
    /// Megatron torch_dist `.distcp` tensor items (`archive::read_tensor`).
    Distcp,
    /// Hugging Face checkpoint directories (config, index, safetensors shards: open, read all).
    Hf,
    /// Self-test: a reader that panics on some inputs.
    #[value(hide = true)]
    PlantedPanic,
    /// Self-test: a reader that sizes a buffer from an untrusted length.
    #[value(hide = true)]
    PlantedAllocation,
    /// Self-test: a reader that builds up memory in many small pieces.
    #[value(hide = true)]
    PlantedPeak,
    /// Self-test: a reader that never returns.
    #[value(hide = true)]
    PlantedHang,
}

#[derive(Parser, Debug)]
#[command(name = "moe-fuzz", about = "Mutation fuzzing of moe-verify's file readers")]
struct Args {
    /// Readers to fuzz (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    target: Vec<TargetName>,
    /// Mutated inputs per reader.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    /// Seed of the mutation stream (input `i` of a target is a function of the seed and `i`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// An input running longer than this is a hang.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Where failing inputs are written.
    #[arg(long, default_value = "fuzz-out")]
    out: PathBuf,
}

/// The counts of one target's run.
#[derive(Default, Debug)]
struct Stats {
    inputs: u64,
    accepted: u64,
    refused: u64,
    panics: u64,
    allocation_violations: u64,
    peak_violations: u64,
    harness_errors: u64,
    slowest: Duration,
    slowest_input: u64,
    largest_allocation_ratio: f64,
    peak_ratio: f64,
    examples: Vec<String>,
}

fn fuzz(target: &dyn Target, args: &Args, busy_since: &AtomicU64, busy: &AtomicBool, epoch: Instant) -> Stats {
    let mut stats = Stats::default();
    let corpus = target.corpus();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let started = Instant::now();
    for i in 0..args.inputs {
        let origin = rng.random_range(0..corpus.len());
        let input = target.mutate(&mut rng, origin);
        WATERMARK.reset();
        busy_since.store(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        busy.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| target.run(origin, &input)));
        let took = t0.elapsed();
        busy.store(false, Ordering::SeqCst);
        let largest = WATERMARK.largest();
        let peak = WATERMARK.peak();
        let panicked = result.is_err();
        stats.inputs += 1;
        if took > stats.slowest {
            stats.slowest = took;
            stats.slowest_input = i;
        }
        let allowance = target.allowance(origin, input.len());
        if !panicked {
            stats.largest_allocation_ratio =
                stats.largest_allocation_ratio.max(largest as f64 / allowance.largest as f64);
            stats.peak_ratio = stats.peak_ratio.max(peak as f64 / allowance.peak as f64);
        }
        let save = |what: &str| {
            let path = args.out.join(format!("{}-{what}-seed{}-input{i}.bin", target.name(), args.seed));
            if std::fs::create_dir_all(&args.out).and_then(|_| std::fs::write(&path, &input)).is_ok() {
                eprintln!("{}: input {i}: {what}, saved as {}", target.name(), path.display());
            }
        };
        match result {
            Err(_) => {
                stats.panics += 1;
                save("panic");
            }
            Ok(Err(e)) => {
                stats.harness_errors += 1;
                eprintln!("{}: input {i}: the fuzz harness itself failed: {e:#}", target.name());
            }
            Ok(Ok(Outcome::Accepted)) => stats.accepted += 1,
            Ok(Ok(Outcome::Refused(msg))) => {
                stats.refused += 1;
                if stats.examples.len() < 5
                    && !stats.examples.iter().any(|m| m[..m.len().min(40)] == msg[..msg.len().min(40)])
                {
                    stats.examples.push(msg);
                }
            }
        }
        // A panic's own machinery (message, backtrace) allocates: only inputs the reader
        // returned from are held to the allowance; a panic is a failure anyway.
        if !panicked && largest > allowance.largest {
            stats.allocation_violations += 1;
            save(&format!("alloc{largest}"));
        }
        if !panicked && peak > allowance.peak {
            stats.peak_violations += 1;
            save(&format!("peak{peak}"));
        }
        if (i + 1) % 100_000 == 0 {
            eprintln!(
                "{}: {} inputs, {:.0}/s, {} panics, {} allocation violations",
                target.name(),
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64(),
                stats.panics,
                stats.allocation_violations + stats.peak_violations
            );
        }
    }
    stats
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names = if args.target.is_empty() {
        vec![TargetName::Dump, TargetName::Checkpoint, TargetName::Metadata, TargetName::Distcp, TargetName::Hf]
    } else {
        args.target.clone()
    };
    // Panics are expected findings, counted and saved; print the first few messages only.
    let printed = Arc::new(AtomicU64::new(0));
    let hook_printed = printed.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if hook_printed.fetch_add(1, Ordering::SeqCst) < 5 {
            default_hook(info);
        }
    }));
    // The watchdog: an input busy for longer than the timeout is a hang; the process stops
    // with the seed and the input number (the inputs are a deterministic stream).
    let epoch = Instant::now();
    let busy_since = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicBool::new(false));
    let current = Arc::new(std::sync::Mutex::new(String::new()));
    {
        let (busy_since, busy, current) = (busy_since.clone(), busy.clone(), current.clone());
        let timeout = args.timeout_secs * 1000;
        let seed = args.seed;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let since = busy_since.load(Ordering::SeqCst);
            if busy.load(Ordering::SeqCst) && (epoch.elapsed().as_millis() as u64).saturating_sub(since) > timeout {
                let name = current.lock().map(|s| s.clone()).unwrap_or_default();
                eprintln!("HANG: target {name}: an input ran longer than {timeout} ms (seed {seed}); rerun with --target {name} --seed {seed} to reproduce");
                std::process::exit(3);
            }
        });
    }
    let mut failed = false;
    for name in names {
        let target: Box<dyn Target> = match name {
            TargetName::Dump => Box::new(DumpReader::new()?),
            TargetName::Checkpoint => Box::new(CheckpointReader::new()?),
            TargetName::Metadata => Box::new(MetadataReader::new()?),
            TargetName::Distcp => Box::new(DistcpReader::new()?),
            TargetName::Hf => Box::new(HfReader::new()?),
            TargetName::PlantedPeak => Box::new(PlantedReader::new(Planted::Peak)),
            TargetName::PlantedPanic => Box::new(PlantedReader::new(Planted::Panic)),
            TargetName::PlantedAllocation => Box::new(PlantedReader::new(Planted::Allocation)),
            TargetName::PlantedHang => Box::new(PlantedReader::new(Planted::Hang)),
        };
        *current.lock().expect("not poisoned") = target.name().to_string();
        let t0 = Instant::now();
        let s = fuzz(target.as_ref(), &args, &busy_since, &busy, epoch);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{:<12} corpus {:>3}  inputs {:>9}  accepted {:>8}  refused {:>9}  panics {}  hangs 0  allocation violations {} (largest {}, peak {})  harness errors {}  slowest {:.1} ms (input {})  largest allocation {:.3} of allowance  peak {:.3} of allowance  {:.0} s",
            target.name(),
            target.corpus().len(),
            s.inputs,
            s.accepted,
            s.refused,
            s.panics,
            s.allocation_violations + s.peak_violations,
            s.allocation_violations,
            s.peak_violations,
            s.harness_errors,
            s.slowest.as_secs_f64() * 1e3,
            s.slowest_input,
            s.largest_allocation_ratio,
            s.peak_ratio,
            secs
        );
        for m in &s.examples {
            println!("    refused, e.g.: {}", m.chars().take(160).collect::<String>());
        }
        failed |= s.panics > 0 || s.allocation_violations > 0 || s.peak_violations > 0 || s.harness_errors > 0;
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
