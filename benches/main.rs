//! Criterion benchmarks (`cargo bench`).

mod checkpoint;

criterion::criterion_group!(checkpoint_benches, checkpoint::checkpoint);
criterion::criterion_main!(checkpoint_benches);
