//! The integration-test binary (one binary, style §19): the differential property suite,
//! f64 gradient checks of the oracle, hand-picked edge cases and golden snapshots of the
//! reference.
//!
//! * [`properties`]: `differential_suite!` stamps one proptest per spec §10 property onto a
//!   backend (`reference` here; the CUDA backends stamp it in their own module), plus one test
//!   per token-distribution family.
//! * [`gradcheck`]: central differences of every gradient of the f64 oracle.
//! * [`edge_cases`]: the regression table of `bugs-shapes-anchors.md` §A and Megatron's own unit
//!   test numbers, plus bad inputs that must be rejected with a clear error.
//! * [`golden`]: insta snapshots of the reference's outputs on fixed seeded problems.
//! * [`pins`]: hand-derived and externally sourced values of the activations, the GLU clamp and
//!   every storage-dtype rounding point of the eager path (independent of the snapshots).
//! * [`tight_bounds`]: the error model's bound pinned from both sides (one element at 1.2× its
//!   bound must fail, at 0.8× pass) for every tensor kind, dtype and class.
//! * [`self_test`]: a planted bug per property (`moe_harness::planted`): the verdict matrix, and
//!   how often the generated cases are sharded.
//! * [`fp8_quantizers`]: TransformerEngine's FP8 casts and scaling recipes, bit for bit
//!   (`moe_reference::fp8`, fixtures in `tests/data/fp8/` made by TE's own Python references).
//! * [`fp8_layers`]: fp8 expert layers under every recipe against the oracle's fp8 error model,
//!   planted fp8 bugs, TE's refusals of unaligned splits.
//! * [`distributed`]: the distributed layer over the fake and TCP transports against the rank
//!   simulation and the oracle, planted distributed bugs, the `verify --gpus` launcher with CPU
//!   workers (dead and hung workers), distributed checkpoints, and the 2-GPU NCCL run.
//! * [`dump`]: moe-expert-dump/1 files and `moe-verify compare`.
//! * [`fp8_dumps`]: fp8 dumps (recipe metadata, quantized weights checked against their
//!   parameters), their bad inputs and failures.
//! * [`checkpoint`]: Megatron sharded state dicts, the on-disk format, resharding (spec §7, §8.1).
//! * [`hf`]: Hugging Face checkpoints (transformers-written fixtures) and `moe-verify diff`.
//! * [`gpu`]: the CUDA implementations (`moe-gpu`) against the f64 oracle (skip loudly without a GPU).
//! * [`gpu_fp8`]: the fp8 quantization kernels bit for bit against the reference quantizers,
//!   and the cuBLASLt fp8 GEMM against the reference GEMM model (skip loudly without a GPU).
//! * [`gpu_grouped`]: every grouped-GEMM strategy of `moe-gpu` against the per-expert loop.
//! * [`interleave`]: Megatron HEAD's GLU interleaving through every property, and planted
//!   interleaving bugs (wrong block size, ignored, whole-tensor instead of per-rank).
//! * [`crash_report`]: a segfault in a GPU test names its test (the GPU tests run driver and
//!   cuBLASLt code four threads at a time).
//! * [`shapes`]: the model-shape registry and `scripts/shapes.json`, its copy for the PyTorch
//!   scripts.
//! * [`bench_scripts`]: the Python table scripts and PyTorch peers of the benches pass their own
//!   unit tests (`scripts/test_bench_scripts.py`).

#[macro_use]
mod properties;
mod bench_scripts;
mod checkpoint;
#[cfg(target_os = "linux")]
mod crash_report;
mod distributed;
mod dump;
mod edge_cases;
mod fp8_dumps;
mod fp8_layers;
mod fp8_quantizers;
mod golden;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_fp8;
#[cfg(feature = "cuda")]
mod gpu_grouped;
mod gradcheck;
mod hf;
mod interleave;
mod pins;
mod self_test;
mod shapes;
mod tight_bounds;

/// The `moe-verify` binary: the one cargo built, or on the GPU machine the one staged beside
/// this test binary (`scripts/gpu-run.sh` copies both into `.stage/`, where cargo's path does
/// not exist).
pub(crate) fn moe_verify_bin() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_moe-verify"));
    let staged = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("moe-verify")));
    match staged {
        Some(s) if !built.exists() && s.exists() => s,
        _ => built,
    }
}
