//! `moe-verify shapes`: the model-shape registry (`moe_harness::shapes`), as a table or as the
//! JSON the PyTorch bench scripts read (`scripts/shapes.json` is this command's output).

use moe_harness::shapes::{registry_json, ModelShape};

/// Arguments of `moe-verify shapes`.
#[derive(clap::Args, Debug)]
pub struct ShapesArgs {
    /// Print the registry as JSON (the content of `scripts/shapes.json`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the registry; returns the exit code.
pub fn run(args: &ShapesArgs) -> i32 {
    if args.json {
        println!("{}", serde_json::to_string_pretty(&registry_json()).expect("serializable registry"));
        return 0;
    }
    println!("{:<14} {:>6} {:>6} {:>8} {:>7}  bench distributions", "shape", "h", "f", "experts", "rows");
    for s in ModelShape::ALL {
        let d = s.dims();
        let dists: Vec<String> = s.bench_distributions().into_keys().collect();
        println!(
            "{:<14} {:>6} {:>6} {:>8} {:>7}  {}",
            s.name(),
            d.hidden,
            d.ffn,
            d.experts,
            d.tokens,
            dists.join(", ")
        );
    }
    0
}
