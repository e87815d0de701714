//! Criterion benches (style §17): one binary, one module per area. Add a module with a
//! `benches` criterion group and list it in `criterion_main!` below (`checkpoint`, `gpu`, ...).
//!
//! Filter by module prefix: `cargo bench --bench main -- reference`.

use criterion::criterion_main;

mod checkpoint;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_grouped;
mod reference;

criterion::criterion_group!(checkpoint_benches, checkpoint::checkpoint);
#[cfg(feature = "cuda")]
criterion::criterion_group! {
    name = gpu_grouped_benches;
    config = gpu_grouped::config();
    targets = gpu_grouped::bench
}
#[cfg(feature = "cuda")]
criterion_main!(reference::benches, checkpoint_benches, gpu::benches, gpu_grouped_benches);
#[cfg(not(feature = "cuda"))]
criterion_main!(reference::benches, checkpoint_benches);
