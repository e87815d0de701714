//! Criterion benches (style §17): one binary, one module per area. Add a module with a
//! `benches` criterion group and list it in `criterion_main!` below (`checkpoint`, `gpu`, ...).
//!
//! Filter by module prefix: `cargo bench --bench main -- reference`. Benchmark ids start with
//! `reference/`, `checkpoint/`, `gpu_layer/` (`gpu.rs`) or `gpu_grouped/` (`gpu_grouped.rs`,
//! its dense reference included); a module whose set-up is expensive returns early (see [`selected`]) when
//! every filter names another module's prefix, so `-- gpu_layer` runs the layer bench alone.

use criterion::criterion_main;

mod checkpoint;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_common;
#[cfg(feature = "cuda")]
mod gpu_grouped;
mod reference;

/// The top-level benchmark-id prefixes of all modules.
const MODULE_PREFIXES: [&str; 4] = ["reference", "checkpoint", "gpu_layer", "gpu_grouped"];

/// Criterion options that take a value (the value is not a filter).
const VALUE_OPTIONS: [&str; 19] = [
    "-c",
    "--color",
    "-s",
    "--save-baseline",
    "-b",
    "--baseline",
    "--baseline-lenient",
    "--format",
    "--profile-time",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

/// Whether a module whose benchmark ids start with one of `own` can match the command line's
/// criterion filter: false only when a filter is given and it starts with (after an optional
/// `^`) another module's prefix from [`MODULE_PREFIXES`]. Conservative: any other filter
/// (`gpu`, `mixtral`, a regex) keeps the module, and criterion itself then skips the ids that
/// do not match.
pub fn selected(own: &[&str]) -> bool {
    let mut args = std::env::args().skip(1);
    let mut filters = Vec::new();
    while let Some(a) = args.next() {
        if VALUE_OPTIONS.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    filters.iter().all(|f| {
        let f = f.trim_start_matches('^');
        !MODULE_PREFIXES.iter().any(|p| !own.contains(p) && f.starts_with(p))
    })
}

criterion::criterion_group!(checkpoint_benches, checkpoint::checkpoint);
#[cfg(feature = "cuda")]
criterion::criterion_group! {
    name = gpu_layer_benches;
    config = gpu_common::config();
    targets = gpu::bench
}
#[cfg(feature = "cuda")]
criterion::criterion_group! {
    name = gpu_grouped_benches;
    config = gpu_common::config();
    targets = gpu_grouped::bench
}
#[cfg(feature = "cuda")]
criterion_main!(reference::benches, checkpoint_benches, gpu_layer_benches, gpu_grouped_benches);
#[cfg(not(feature = "cuda"))]
criterion_main!(reference::benches, checkpoint_benches);
