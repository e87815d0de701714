//! `moe-verify verify`: the differential harness over random cases.

use indicatif::{ProgressBar, ProgressStyle};
use moe_harness::properties::{Backend, Property, ReferenceBackend};
use moe_harness::runner::{run_property, PropertyReport};
use moe_harness::strategy;

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
    /// Only these properties (repeatable), by name: matches-oracle, parallel-decomposition,
    /// class-equivalence, zero-tokens, padding-neutrality, deferred-wgrad, probs-linearity.
    #[arg(long = "property")]
    pub properties: Vec<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(ReferenceBackend)]
}

/// Runs the harness; returns the process exit code (0 pass, 1 failure, 2 bad arguments).
pub fn run(args: &VerifyArgs) -> i32 {
    let properties: Vec<Property> = if args.properties.is_empty() {
        Property::ALL.to_vec()
    } else {
        let mut out = Vec::new();
        for name in &args.properties {
            match Property::ALL.iter().find(|p| p.name() == name) {
                Some(p) => out.push(*p),
                None => {
                    eprintln!(
                        "error: unknown property {name:?}; expected one of {}",
                        Property::ALL.map(|p| p.name()).join(", ")
                    );
                    return 2;
                }
            }
        }
        out
    };
    let backends = backends();
    let total = u64::from(args.cases) * (properties.len() * backends.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} cases  {msg}")
            .expect("valid template"),
    );
    let strategy = strategy::case(args.max_tokens);
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
        "{:<18} {:<24} {:>7} {:>7} {:>12}  {:<6}  worst element",
        "implementation", "property", "cases", "skipped", "worst err/tol", "result"
    );
    for r in reports {
        println!(
            "{:<18} {:<24} {:>7} {:>7} {:>12.3e}  {:<6}  {}",
            r.backend,
            r.property.name(),
            r.checked,
            r.skipped,
            r.worst_ratio,
            if r.passed() { "pass" } else { "FAIL" },
            r.worst_where
        );
    }
}
