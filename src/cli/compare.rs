//! `moe-verify compare DUMP.safetensors`: recompute every tensor a `moe-expert-dump/1` file has
//! an expectation for and report how far the dump is from the reference (docs/dumps.md).
//!
//! Exit status: 0 when every tensor is within tolerance, 1 when any differs, 2 when the dump
//! is not a valid `moe-expert-dump/1` file (the message names the file, the key and what was
//! expected).

use moe_harness::dump::{compare_dump, Dump, DumpError};
use std::path::PathBuf;

/// Arguments of `moe-verify compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct CompareArgs {
    /// The `moe-expert-dump/1` safetensors file.
    pub dump: PathBuf,
    /// Compare with the f64 oracle instead of the reference emulating the dump's dtype.
    #[arg(long)]
    pub oracle: bool,
    /// Print the report (or the error) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Exit status: every expected tensor is within tolerance.
pub const EXIT_PASS: i32 = 0;
/// Exit status: at least one expected tensor differs.
pub const EXIT_DIFFERS: i32 = 1;
/// Exit status: the dump is invalid.
pub const EXIT_BAD_INPUT: i32 = 2;

/// Runs `compare` and returns the process exit status.
pub fn run_compare(args: &CompareArgs) -> i32 {
    let file = args.dump.display().to_string();
    let report = Dump::read(&args.dump).and_then(|dump| compare_dump(&dump, &file, args.oracle));
    match report {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("moe-verify compare: cannot render the report as JSON: {e}");
                        return EXIT_BAD_INPUT;
                    }
                }
            } else {
                println!("{report}");
            }
            if report.passed {
                EXIT_PASS
            } else {
                EXIT_DIFFERS
            }
        }
        Err(e) => {
            report_error(&e, args.json);
            EXIT_BAD_INPUT
        }
    }
}

fn report_error(e: &DumpError, json: bool) {
    eprintln!("moe-verify compare: invalid dump: {e}");
    if json {
        let v = serde_json::json!({ "error": e.to_string(), "file": e.file, "key": e.key, "message": e.message });
        println!("{v}");
    }
}
