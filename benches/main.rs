//! Criterion benches: one module per area, one `criterion_main!`.

#[cfg(feature = "cuda")]
mod gpu;

#[cfg(feature = "cuda")]
criterion::criterion_main!(gpu::benches);

#[cfg(not(feature = "cuda"))]
fn main() {}
