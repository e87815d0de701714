//! `moe-verify bench`: the GPU benchmarks of `moe_bench`, configured by flags.
//!
//! * `bench layer`: whole layer calls at the model shapes (`moe_bench::layer`).
//! * `bench grouped`: the grouped-GEMM strategies on the layers' GEMM sets
//!   (`moe_bench::grouped`).
//!
//! Lists take commas or repeated flags (`--strategy auto,loop` = `--strategy auto --strategy
//! loop`). Both need a GPU (exit 2 without one).

use super::args::{CaseArg, ClassArg, ModeArg, ShapeArg};
use moe_bench::grouped::{GroupedBench, GroupedCase};
use moe_bench::layer::LayerBench;
use moe_bench::Selection;
use moe_gpu::fp8::LtAlgoChoice;
use moe_gpu::{Engine, Gpu, Strategy};
use moe_harness::shapes::ModelShape;
use std::path::PathBuf;

/// Arguments of `moe-verify bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    bench: Which,
}

#[derive(clap::Subcommand, Debug)]
enum Which {
    /// Forward and forward+backward of the CUDA expert layers at the model shapes, per GEMM
    /// strategy, against the dense 8192³ cuBLAS rate.
    // A flag given again overrides the earlier one: the device script passes its defaults
    // first and the user's extra flags (`LAYER_ARGS`, `GROUPED_ARGS`) after them.
    #[command(args_override_self = true)]
    Layer(LayerArgs),
    /// The grouped-GEMM strategies on the GEMM sets of the layers at the model shapes.
    #[command(args_override_self = true)]
    Grouped(GroupedArgs),
}

/// Which benchmarks criterion times (both benches).
#[derive(clap::Args, Debug)]
struct Timing {
    /// Time only the benchmarks whose id matches this regular expression (criterion's filter;
    /// ids look like gpu_layer/mixtral/uniform/TEGroupedMLP/fwd/auto).
    #[arg(long, value_name = "REGEX", conflicts_with = "untimed")]
    filter: Option<String>,
    /// Time nothing: each row makes its one untimed call (for a profiler such as ncu).
    #[arg(long)]
    untimed: bool,
}

impl Timing {
    fn selection(&self) -> Selection {
        match (&self.filter, self.untimed) {
            (_, true) => Selection::Untimed,
            (Some(regex), false) => Selection::Filter(regex.clone()),
            (None, false) => Selection::All,
        }
    }
}

/// Arguments of `moe-verify bench layer`.
#[derive(clap::Args, Debug)]
struct LayerArgs {
    /// Model shapes (default: all, in registry order).
    #[arg(long, value_delimiter = ',')]
    shape: Vec<ShapeArg>,
    /// Expert classes.
    #[arg(long, value_delimiter = ',', default_value = "grouped,te_grouped")]
    class: Vec<ClassArg>,
    /// Modes.
    #[arg(long, value_delimiter = ',', default_value = "fwd,fwdbwd")]
    mode: Vec<ModeArg>,
    /// GEMM strategies (auto, loop, msN, mtN, graphN, gbatched, persistent, persistent128,
    /// persistent256, hybridN).
    #[arg(long, value_name = "STRATEGY", value_delimiter = ',', default_value = "auto,loop")]
    strategy: Vec<Strategy>,
    /// Interleaved rounds of dense and strategy blocks per (shape, distribution, class, mode);
    /// 0 = none.
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// Write the rows to this CSV (the file scripts/layer_table.py reads).
    #[arg(long, value_name = "PATH")]
    csv: Option<PathBuf>,
    /// Write every interleaved-round block to this CSV (the file scripts/rounds_table.py reads).
    #[arg(long, value_name = "PATH")]
    rounds_csv: Option<PathBuf>,
    /// Add a row per (shape, distribution, class, mode) with the layer in fp8 under this recipe
    /// (tensorwise, delayed, blockwise, mxfp8; TE's defaults): strategy column `fp8-<recipe>`.
    #[arg(long, value_name = "RECIPE", value_parser = parse_fp8_recipe)]
    fp8: Option<moe_reference::Fp8Recipe>,
    /// How the cuBLASLt fp8 GEMMs pick their algorithm: 0 = the heuristic's first (cuBLASLt's
    /// default, what TE runs); N > 1 = the fastest of the heuristic's first N, timed once per
    /// GEMM shape on its first call's operands (needs --fp8).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "fp8")]
    fp8_lt_tune: usize,
    #[command(flatten)]
    timing: Timing,
}

/// `--fp8`'s parser: the reference's recipe names.
fn parse_fp8_recipe(s: &str) -> Result<moe_reference::Fp8Recipe, String> {
    moe_reference::Fp8Recipe::parse(s).map_err(|e| e.to_string())
}

/// Arguments of `moe-verify bench grouped`.
#[derive(clap::Args, Debug)]
struct GroupedArgs {
    /// Model shapes (default: all, in registry order).
    #[arg(long, value_delimiter = ',')]
    shape: Vec<ShapeArg>,
    /// GEMM sets (default: all).
    #[arg(long, value_delimiter = ',')]
    case: Vec<CaseArg>,
    /// GEMM strategies.
    #[arg(long, value_name = "STRATEGY", value_delimiter = ',', default_value = "loop,ms4,graph4,gbatched,auto")]
    strategy: Vec<Strategy>,
    /// cuBLAS's SM-count target on the side-stream handles (an experiment).
    #[arg(long, value_name = "SMS")]
    lane_sms: Option<usize>,
    /// Write the ROW lines to this CSV (the file scripts/grouped_table.py reads).
    #[arg(long, value_name = "PATH")]
    csv: Option<PathBuf>,
    #[command(flatten)]
    timing: Timing,
}

/// The shapes of `--shape`, or every shape.
fn shapes(given: &[ShapeArg]) -> Vec<ModelShape> {
    if given.is_empty() {
        ModelShape::ALL.to_vec()
    } else {
        given.iter().map(|s| s.0).collect()
    }
}

/// `moe-verify bench ...`; returns the exit code (0 done, 2 no GPU or bad output path).
pub fn run(args: &BenchArgs) -> i32 {
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("error: moe-verify bench needs a GPU: {e}");
            return 2;
        }
    };
    let mut guard = match gpu.lock() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let eng: &mut Engine = &mut guard;
    let tune = match &args.bench {
        Which::Layer(a) => a.fp8_lt_tune,
        Which::Grouped(_) => 0,
    };
    let done = if tune > 1 {
        eng.set_fp8_algo_choice(LtAlgoChoice::Tuned(tune)).map_err(|e| format!("--fp8-lt-tune: {e}"))
    } else {
        Ok(())
    }
    .and_then(|()| match &args.bench {
        Which::Layer(a) => moe_bench::layer::run(
            eng,
            &LayerBench {
                shapes: shapes(&a.shape),
                classes: a.class.iter().map(|c| c.0).collect(),
                modes: a.mode.iter().map(|m| m.0).collect(),
                strategies: a.strategy.clone(),
                rounds: a.rounds,
                csv: a.csv.clone(),
                rounds_csv: a.rounds_csv.clone(),
                selection: a.timing.selection(),
                fp8: a.fp8.map(moe_reference::Fp8Config::new),
            },
        ),
        Which::Grouped(a) => moe_bench::grouped::run(
            eng,
            &GroupedBench {
                shapes: shapes(&a.shape),
                cases: if a.case.is_empty() { GroupedCase::ALL.to_vec() } else { a.case.iter().map(|c| c.0).collect() },
                strategies: a.strategy.clone(),
                lane_sms: a.lane_sms,
                csv: a.csv.clone(),
                selection: a.timing.selection(),
            },
        ),
    });
    if let Some(line) = super::verify::tuning_note(tune, eng.fp8_tuning_calls()) {
        println!("{line}");
    }
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<Which, clap::Error> {
        Cmd::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench.bench)
    }

    /// `gpu-device.sh` passes its defaults (`bench layer --rounds 12 --csv ...`) before the
    /// user's `LAYER_ARGS` / `GROUPED_ARGS`, so a one-value flag given again must override the
    /// earlier one (the README's `LAYER_ARGS='... --rounds 0'` was refused as a repeated
    /// argument); list flags (`--strategy`, `--shape`) still add up, as clap's lists do.
    #[test]
    fn a_repeated_bench_flag_overrides_the_earlier_one() {
        match parse(&["layer", "--rounds", "12", "--csv", "a.csv", "--strategy", "auto", "--rounds", "0"]) {
            Ok(Which::Layer(a)) => {
                assert_eq!(a.rounds, 0);
                assert_eq!(a.csv, Some(PathBuf::from("a.csv")));
                assert_eq!(a.strategy, vec![Strategy::Auto]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["grouped", "--csv", "a.csv", "--strategy", "loop", "--csv", "b.csv", "--strategy", "auto"]) {
            Ok(Which::Grouped(a)) => {
                assert_eq!(a.csv, Some(PathBuf::from("b.csv")));
                assert_eq!(a.strategy, vec![Strategy::Loop, Strategy::Auto]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["layer", "--fp8-lt-tune", "8"]) {
            Err(e) => assert!(e.to_string().contains("--fp8"), "{e}"),
            Ok(w) => panic!("--fp8-lt-tune without --fp8 must be refused: {w:?}"),
        }
    }
}
