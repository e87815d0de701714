//! `moe-verify verify`: the differential harness over random cases.

use super::args::{ClassArg, FormatArg, PropertyArg, RecipeArg, ShapeArg};
use indicatif::{ProgressBar, ProgressStyle};
use moe_harness::properties::{Backend, Property, ReferenceBackend};
use moe_harness::runner::{run_property, PropertyReport};
use moe_harness::shapes::ModelShape;
use moe_harness::strategy::{self, Fp8Cases};

/// Arguments of `moe-verify verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Random cases per (implementation, property).
    #[arg(long, default_value_t = 300)]
    pub cases: u32,
    /// Seed of the case generator (the same seed gives the same cases).
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    /// Largest token count per expert in generated cases.
    #[arg(long, default_value_t = 40)]
    pub max_tokens: i64,
    /// Only these properties (repeatable).
    #[arg(long = "property", value_name = "PROPERTY")]
    pub properties: Vec<PropertyArg>,
    /// FP8 cases: by default a share of the cases get a recipe (all four and both formats);
    /// `none` turns them off, a recipe makes every case use it (GroupedMLP cases are then
    /// declared skips: it has no fp8 path in Megatron). With `--shape`: the layer runs under
    /// this recipe (default and `none`: bf16); the sampled checks cover the row-local recipes
    /// (`blockwise`, DeepSeek-V3's; `mxfp8`, which the GPU runs on Blackwell only) and refuse
    /// the per-tensor ones, saying why.
    #[arg(long, value_name = "RECIPE")]
    pub fp8_recipe: Option<RecipeArg>,
    /// Only this fp8 format in the fp8 cases (default: both). With `--shape`: the format of
    /// `--fp8-recipe` (default: the recipe's, E4M3 for blockwise).
    #[arg(long, value_name = "FORMAT")]
    pub fp8_format: Option<FormatArg>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Require the CUDA implementations (fail instead of skipping when no GPU is found). Without
    /// this flag they run whenever a GPU is present, and a missing GPU prints one SKIP line
    /// (unless `MOE_REQUIRE_CUDA=1`, which also makes it fail).
    #[arg(long)]
    pub gpu: bool,
    /// With `--gpu`: verify one model-sized layer by sampling instead of the random cases
    /// (`moe-verify shapes` lists the shapes).
    #[arg(long, requires = "gpu")]
    pub shape: Option<ShapeArg>,
    /// With `--shape`: token rows (0 = the shape's default).
    #[arg(long, default_value_t = 0, requires = "shape")]
    pub tokens: usize,
    /// With `--shape`: the class to verify.
    #[arg(long, default_value = "te_grouped", requires = "shape")]
    pub class: ClassArg,
    /// How the CUDA implementations issue their per-expert GEMMs: auto, loop, msN, mtN,
    /// graphN, gbatched, persistent, persistent128, persistent256 or hybridN. Every strategy
    /// computes the same function; they differ in speed only.
    #[cfg(feature = "cuda")]
    #[arg(long, value_name = "STRATEGY", default_value = "auto")]
    pub gemm: moe_gpu::Strategy,
    /// How the CUDA layers' cuBLASLt fp8 GEMMs pick their algorithm: 0 = the heuristic's first
    /// (cuBLASLt's default, what TE runs); N > 1 = the fastest of the heuristic's first N,
    /// timed once per GEMM shape on its first call (what `bench layer --fp8-lt-tune` times).
    #[cfg(feature = "cuda")]
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fp8_lt_tune: usize,
    /// Verify the distributed layer on N processes of this host (one GPU each with NCCL):
    /// every (EP, ETP) layout of N ranks against the unsharded f64 oracle.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    #[command(flatten)]
    pub dist: super::distributed::DistArgs,
}

/// Why the CUDA backend is not there.
enum Unavailable {
    /// No GPU here (or no `cuda` feature): the one-line SKIP reason.
    Skip(String),
    /// The GPU layers cannot be built for another reason (a broken CUDA setup the probe did
    /// not catch, ...): a user-facing error, exit 2.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Fatal(String),
}

/// A line for the end of the report on what the CUDA engine did beyond the cases (the
/// `--fp8-lt-tune` timings), or nothing.
type EngineNote = Box<dyn Fn() -> Option<String>>;

/// The CUDA backend on device 0, issuing its GEMMs with `--gemm`, when the `cuda` feature is
/// on and a GPU is found, and its [`EngineNote`].
#[cfg(feature = "cuda")]
fn cuda_backend(args: &VerifyArgs) -> Result<(Box<dyn Backend>, EngineNote), Unavailable> {
    use moe_gpu::{CudaGrouped, CudaSequential, CudaTeGrouped, Gpu};
    use moe_harness::properties::PerClassBackend;
    let gpu = Gpu::new(0).map_err(|e| {
        if moe_gpu::is_no_device(&e) {
            Unavailable::Skip(moe_gpu::skip_message("gpu::verify", &e))
        } else {
            Unavailable::Fatal(e.to_string())
        }
    })?;
    tune_fp8(&gpu, args).map_err(|e| Unavailable::Fatal(format!("--fp8-lt-tune: {e}")))?;
    let s = args.gemm;
    let backend = Box::new(PerClassBackend::new(
        "cuda",
        Some(Box::new(CudaSequential::new(&gpu).with_poison(true).with_strategy(s))),
        Some(Box::new(CudaGrouped::new(&gpu).with_poison(true).with_strategy(s))),
        Some(Box::new(CudaTeGrouped::new(&gpu).with_poison(true).with_strategy(s))),
    ));
    let n = args.fp8_lt_tune;
    let note: EngineNote = Box::new(move || tuning_note(n, gpu.lock().map(|e| e.fp8_tuning_calls()).unwrap_or(0)));
    Ok((backend, note))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_args: &VerifyArgs) -> Result<(Box<dyn Backend>, EngineNote), Unavailable> {
    Err(Unavailable::Skip("SKIP gpu::verify: built without the `cuda` feature".into()))
}

/// The implementation families `verify` checks, and the CUDA engine's [`EngineNote`].
struct Backends {
    all: Vec<Box<dyn Backend>>,
    engine_note: Option<EngineNote>,
}

/// The implementation families to check: the reference always, CUDA when available (with its
/// [`EngineNote`]). `None` when CUDA is required but missing (the reason is printed).
fn backends(args: &VerifyArgs) -> Option<Backends> {
    let mut out: Vec<Box<dyn Backend>> = vec![Box::new(ReferenceBackend)];
    let mut note = None;
    let required = args.gpu || moe_harness::cuda_required();
    match cuda_backend(args) {
        Ok((b, n)) => {
            out.push(b);
            note = Some(n);
        }
        Err(Unavailable::Fatal(why)) => {
            eprintln!("error: the CUDA implementations cannot be built: {why}");
            return None;
        }
        Err(Unavailable::Skip(why)) if required => {
            eprintln!("error: the CUDA implementations are required but unavailable: {why}");
            return None;
        }
        Err(Unavailable::Skip(why)) => eprintln!("{why}"),
    }
    Some(Backends { all: out, engine_note: note })
}

/// The fp8 configuration of `verify --shape`: `--fp8-recipe` (absent or `none`: bf16) with
/// TE's defaults and `--fp8-format` when given; a format without a recipe is refused, and so
/// is what the sampled checks do not cover (`moe_harness::sampled::sampled_supported`: the
/// per-tensor recipes, GroupedMLP with fp8), before any GPU is looked for.
fn shape_fp8(args: &VerifyArgs, shape: ModelShape) -> Result<Option<moe_reference::Fp8Config>, String> {
    let fp8 = shape_recipe(args)?;
    let cfg = moe_reference::LayerConfig { fp8, ..shape.config(args.class.0) };
    moe_harness::sampled::sampled_supported(&cfg).map_err(|e| e.to_string())?;
    Ok(fp8)
}

/// `--fp8-recipe` and `--fp8-format` as one fp8 configuration (see [`shape_fp8`]).
fn shape_recipe(args: &VerifyArgs) -> Result<Option<moe_reference::Fp8Config>, String> {
    match (args.fp8_recipe, args.fp8_format) {
        (Some(RecipeArg(Some(r))), format) => {
            let f = moe_reference::Fp8Config::new(r);
            Ok(Some(format.map_or(f, |FormatArg(fmt)| f.with_format(fmt))))
        }
        (_, Some(FormatArg(fmt))) => Err(format!(
            "--fp8-format {} with --shape needs an fp8 recipe (--fp8-recipe blockwise, say); without one the \
             shape runs in bf16",
            fmt.name()
        )),
        (_, None) => Ok(None),
    }
}

/// The report line of `--fp8-lt-tune n` after `calls` timed tuning calls (`verify` and `bench
/// layer`); none when the flag asks for no tuning (0 or 1).
#[cfg(feature = "cuda")]
pub(super) fn tuning_note(n: usize, calls: u64) -> Option<String> {
    (n > 1).then(|| format!("fp8 cuBLASLt algorithms tuned (--fp8-lt-tune {n}): {calls} timed calls"))
}

/// Applies `--fp8-lt-tune` to the engine of `gpu` (nothing to do at 0 or 1).
#[cfg(feature = "cuda")]
fn tune_fp8(gpu: &moe_gpu::Gpu, args: &VerifyArgs) -> Result<(), moe_gpu::GpuError> {
    if args.fp8_lt_tune > 1 {
        gpu.lock()?.set_fp8_algo_choice(moe_gpu::fp8::LtAlgoChoice::Tuned(args.fp8_lt_tune))?;
    }
    Ok(())
}

/// `verify --gpu --shape NAME`: sampled verification of one model-sized layer.
#[cfg(feature = "cuda")]
fn run_shape(args: &VerifyArgs, shape: ModelShape) -> i32 {
    let fp8 = match shape_fp8(args, shape) {
        Ok(f) => f,
        Err(why) => {
            eprintln!("error: {why}");
            return 2;
        }
    };
    let verified = moe_gpu::Gpu::new(0).and_then(|gpu| {
        tune_fp8(&gpu, args)?;
        let report = moe_gpu::sampled::verify_shape(&gpu, args.gemm, args.class.0, shape, fp8, args.tokens, args.seed)?;
        let tuned = gpu.lock()?.fp8_tuning_calls();
        Ok((report, tuned))
    });
    match verified {
        Ok((report, tuned)) => {
            print!("{report}");
            if let Some(line) = tuning_note(args.fp8_lt_tune, tuned) {
                println!("{line}");
            }
            i32::from(!report.passed())
        }
        Err(moe_gpu::GpuError::NoDevice(why)) => {
            eprintln!("error: --shape needs a GPU: {why}");
            2
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn run_shape(args: &VerifyArgs, shape: ModelShape) -> i32 {
    if let Err(why) = shape_fp8(args, shape) {
        eprintln!("error: {why}");
        return 2;
    }
    eprintln!("error: --shape needs the `cuda` feature");
    2
}

/// Runs the harness; returns the process exit code (0 pass, 1 failure, 2 bad arguments).
pub fn run(args: &VerifyArgs) -> i32 {
    let properties: Vec<Property> =
        if args.properties.is_empty() { Property::ALL.to_vec() } else { args.properties.iter().map(|p| p.0).collect() };
    if let Some(ShapeArg(shape)) = args.shape {
        return run_shape(args, shape);
    }
    if let Some(n) = args.gpus {
        return super::distributed::launch(n, args.seed, &args.dist);
    }
    let Some(Backends { all: backends, engine_note }) = backends(args) else {
        return 2;
    };
    let total = u64::from(args.cases) * (properties.len() * backends.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} cases  {msg}")
            .expect("valid template"),
    );
    let fp8 = match args.fp8_recipe {
        None => Fp8Cases::mixed(),
        Some(RecipeArg(None)) => Fp8Cases::none(),
        Some(RecipeArg(Some(r))) => Fp8Cases::only(r),
    };
    let fp8 = match args.fp8_format {
        Some(FormatArg(f)) => fp8.with_format(f),
        None => fp8,
    };
    let strategy = strategy::case_fp8(args.max_tokens, &fp8);
    let mut reports: Vec<PropertyReport> = Vec::new();
    for backend in &backends {
        for &property in &properties {
            bar.set_message(format!("{} / {}", backend.name(), property.name()));
            let tick = || bar.inc(1);
            reports.push(run_property(backend.as_ref(), property, &strategy, args.cases, args.seed, &tick));
        }
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports).expect("serializable report"));
    } else {
        print_table(&reports);
    }
    match engine_note.and_then(|note| note()) {
        Some(line) if args.json => eprintln!("{line}"),
        Some(line) => println!("{line}"),
        None => {}
    }
    let failed: Vec<&PropertyReport> = reports.iter().filter(|r| !r.passed()).collect();
    for r in &failed {
        let f = r.failure.as_ref().expect("failed report has a failure");
        match &f.case {
            Some(case) => {
                eprintln!("\nFAIL {} / {}: minimal failing case ({}):", r.backend, r.property.name(), case.summary());
                eprintln!("{}", f.message);
                eprintln!("\nPaste into a regression test:\n{}", case.to_rust());
            }
            None => eprintln!("\nFAIL {} / {}: {}", r.backend, r.property.name(), f.message),
        }
    }
    i32::from(!failed.is_empty())
}

fn print_table(reports: &[PropertyReport]) {
    println!(
        "{:<18} {:<24} {:>7} {:>7} {:>7} {:>12}  {:>5} {:>8} {:>13}  {:<6}  worst element",
        "implementation",
        "property",
        "cases",
        "sharded",
        "skipped",
        "worst err/tol",
        "fp8",
        "fp8 skip",
        "fp8 calc_diff",
        "result"
    );
    for r in reports {
        println!(
            "{:<18} {:<24} {:>7} {:>7} {:>7} {:>12.3e}  {:>5} {:>8} {:>13}  {:<6}  {}",
            r.backend,
            r.property.name(),
            r.checked,
            r.sharded,
            r.skipped,
            r.worst_ratio,
            r.fp8_checked,
            r.fp8_skipped,
            r.worst_calc_diff.map_or("-".to_string(), |d| format!("{d:.3e}")),
            if r.passed() { "pass" } else { "FAIL" },
            r.worst_where
        );
    }
    // The fp8 coverage: checked cases per recipe/format over all properties, and the declared
    // GroupedMLP skips.
    let mut labels = std::collections::BTreeMap::<&str, usize>::new();
    for r in reports {
        for (l, n) in &r.fp8_labels {
            *labels.entry(l).or_default() += n;
        }
    }
    if !labels.is_empty() {
        let list: Vec<String> = labels.iter().map(|(l, n)| format!("{l} {n}")).collect();
        println!("fp8 cases checked (all properties): {}", list.join(", "));
    }
    let grouped: usize = reports.iter().map(|r| r.grouped_fp8_skipped).sum();
    if grouped > 0 {
        println!(
            "fp8 skipped: {grouped} GroupedMLP case(s) over all properties: {}",
            moe_harness::properties::GROUPED_FP8_REASON
        );
    }
    if let Some((r, d)) =
        reports.iter().filter_map(|r| r.worst_calc_diff.map(|d| (r, d))).max_by(|a, b| a.1.total_cmp(&b.1))
    {
        println!("fp8 worst calc_diff {d:.3e}: {}", r.worst_calc_diff_where);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use moe_reference::{Fp8Config, Fp8Recipe, TeFormat};

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        verify: VerifyArgs,
    }

    fn parse(args: &[&str]) -> VerifyArgs {
        Cmd::try_parse_from(std::iter::once("verify").chain(args.iter().copied())).unwrap().verify
    }

    /// `verify --shape` runs bf16 unless `--fp8-recipe` names a recipe (DeepSeek-V3's blockwise
    /// with TE's defaults: E4M3, power-of-2 scales), `--fp8-format` picks its format, and a
    /// format without a recipe is refused rather than silently ignored.
    #[test]
    fn shape_runs_bf16_unless_a_recipe_is_named() {
        let shape = ["--gpu", "--shape", "deepseek-v3"];
        let with = |extra: &[&str]| shape_fp8(&parse(&[&shape[..], extra].concat()), ModelShape::DeepseekV3);
        assert_eq!(with(&[]), Ok(None));
        assert_eq!(with(&["--fp8-recipe", "none"]), Ok(None));
        let blockwise = Fp8Config::new(Fp8Recipe::Blockwise);
        assert!(blockwise.power_2_scales && blockwise.format == TeFormat::E4M3);
        assert_eq!(with(&["--fp8-recipe", "blockwise"]), Ok(Some(blockwise)));
        assert_eq!(
            with(&["--fp8-recipe", "blockwise", "--fp8-format", "hybrid"]),
            Ok(Some(blockwise.with_format(TeFormat::Hybrid)))
        );
        let err = with(&["--fp8-format", "hybrid"]).unwrap_err();
        assert!(err.contains("needs an fp8 recipe"), "{err}");
        // What the sampled checks do not cover is refused here, before a GPU is looked for.
        let err = with(&["--fp8-recipe", "tensorwise"]).unwrap_err();
        assert!(err.contains("per-tensor recipe"), "{err}");
        let err = with(&["--fp8-recipe", "blockwise", "--class", "grouped"]).unwrap_err();
        assert!(err.contains("GroupedMLP has no fp8 path"), "{err}");
    }

    /// A tuned run reports its timed calls (the evidence that tuning happened); an untuned run
    /// (`--fp8-lt-tune` 0 or 1) reports nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn only_a_tuned_run_reports_its_tuning_calls() {
        assert_eq!(tuning_note(0, 0), None);
        assert_eq!(tuning_note(1, 7), None);
        assert_eq!(
            tuning_note(8, 5112).as_deref(),
            Some("fp8 cuBLASLt algorithms tuned (--fp8-lt-tune 8): 5112 timed calls")
        );
    }
}
