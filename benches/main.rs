//! The benchmark binary (`harness = false`): one module per area, registered below.

#[cfg(feature = "cuda")]
mod gpu_grouped;

#[cfg(feature = "cuda")]
criterion::criterion_group! {
    name = gpu;
    config = gpu_grouped::config();
    targets = gpu_grouped::bench
}

#[cfg(feature = "cuda")]
criterion::criterion_main!(gpu);

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("SKIP benches: built without the `cuda` feature");
}
