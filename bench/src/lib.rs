//! # moe-bench
//!
//! GPU benchmarks of the CUDA expert layers, run by `moe-verify bench` (flags, no environment
//! variables): [`layer`] times whole layer calls at the model shapes against the card's dense
//! rate, [`grouped`] times the grouped-GEMM strategies on the layers' GEMM sets. Both time with
//! criterion as a library (same settings for every row: [`timing`]) on an engine the caller
//! created, and write the CSVs the `scripts/*_table.py` summaries read.

#![deny(missing_docs)]

pub mod grouped;
pub mod layer;
pub mod timing;

pub use timing::Selection;
