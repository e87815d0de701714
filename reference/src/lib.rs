//! # moe-reference
//!
//! A pure-`ndarray`, obviously correct implementation of Megatron-Core's Mixture-of-Experts
//! expert layers — `SequentialMLP`, `GroupedMLP` (legacy grouped GEMM) and `TEGroupedMLP` —
//! forward, backward and deferred weight gradients (`backward_dw`), with Megatron's exact
//! parameter layouts and rounding points. Every other implementation in moe-verify is diffed
//! against it.
//!
//! The behaviour is specified in `docs/spec/megatron-experts.md`; section numbers (§) in the
//! docs refer to it.
//!
//! * [`config`]: the configuration that matters ([`LayerConfig`]).
//! * [`dtype`]: storage dtypes and [`Numerics`] (f64 oracle or storage-dtype emulation).
//! * [`codec`]: f64 values to and from storage-dtype bytes, with one rounding rule.
//! * [`weights`]: canonical `[out, in]` expert weights and EP/ETP sharding.
//! * [`glu`]: fc1's GLU row orders (canonical halves, Megatron HEAD's block interleaving).
//! * [`state_dict`]: each class's parameter names and layouts, converted losslessly.
//! * [`layer`]: forward, backward and `backward_dw`.
//! * [`parallel`]: expert-parallel and expert-tensor-parallel ranks, simulated.
//! * [`implementation`]: the [`ExpertLayer`] trait every implementation provides.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod activation;
pub mod codec;
pub mod config;
pub mod dtype;
pub mod error;
pub mod fp8;
pub mod glu;
pub mod implementation;
pub mod layer;
pub mod parallel;
pub mod state_dict;
pub mod weights;

pub use config::{Activation, LayerClass, LayerConfig, Parallelism};
pub use dtype::{Dtype, Numerics};
pub use error::ReferenceError;
pub use fp8::{Fp8Config, Fp8Recipe, TeFormat};
pub use implementation::{
    initial_fp8_run, oracle_with_scales, oracle_with_scales_fp8, oracle_with_scales_paired, ExpertLayer, LayerError,
    LayerRun, OracleRun, Reference,
};
pub use layer::{forward, BackwardPass, ErrorScales, ForwardPass, Inputs, WeightGradStore, WgradTiming};
pub use state_dict::{
    from_state_dict, param_specs, single_grouped_specs, to_state_dict, unpack_single_grouped, ExpertParam,
    GroupedWeight, ParamSpec, StateDict,
};
pub use weights::{ExpertSet, ExpertWeights};
