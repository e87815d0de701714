//! Criterion benches of the CPU side (style §17): one binary, one module per area (`reference`,
//! `checkpoint`, `diff`), configured by criterion's own command line. Benchmark ids start with the
//! module's name, so a filter selects a module: `cargo bench --bench main -- reference`.
//! Expensive set-up happens inside the benchmark closures, which criterion calls only for ids
//! the filter keeps.
//!
//! The GPU benchmarks are `moe-verify bench layer` and `moe-verify bench grouped` (the
//! `moe-bench` crate): they take typed flags (shapes, classes, strategies, rounds, CSV paths)
//! that criterion's command line has no room for.

use criterion::criterion_main;

mod checkpoint;
mod diff;
mod reference;

criterion::criterion_group!(checkpoint_benches, checkpoint::checkpoint);
criterion::criterion_group!(diff_benches, diff::diff_benches);
criterion_main!(reference::benches, checkpoint_benches, diff_benches);
