//! # moe-harness
//!
//! The differential-testing side of moe-verify: the tolerance model ([`tolerance`]), tensor
//! comparison with worst-element reports ([`compare`]), seeded problem generation and proptest
//! strategies ([`case`], [`strategy`]), the property checks and the differential runner
//! ([`properties`], [`runner`]), and PyTorch dumps ([`dump`]). The model shapes ([`shapes`])
//! and the sampled verification of model-sized layers ([`sampled`]) live here too. Megatron
//! sharded state dicts and checkpoints are their own crate, `moe-checkpoint`.
#![deny(missing_docs)]

pub mod case;
pub mod compare;
pub mod distributed;
pub mod dump;
pub mod planted;
pub mod properties;
pub mod runner;
pub mod sampled;
pub mod shapes;
pub mod strategy;
pub mod tolerance;

pub use compare::{compare_runs, compare_tensor, TensorDiff};
pub use tolerance::Tolerance;

/// The environment variable that makes a missing CUDA device a failure instead of a skip:
/// `MOE_REQUIRE_CUDA=1` (device-machine runs set it, so a broken library path cannot pass).
pub const REQUIRE_CUDA_VAR: &str = "MOE_REQUIRE_CUDA";

/// True when `MOE_REQUIRE_CUDA=1`: tests, benches and `moe-verify verify` must fail rather than
/// skip when the CUDA implementations are unavailable. The one place the variable is read.
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_VAR).is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    /// The child half of `cuda_required_reads_the_variable`: asserts `cuda_required()` equals
    /// `MOE_CUDA_REQUIRED_EXPECT` when its parent set that (returns at once otherwise).
    #[test]
    fn cuda_required_child() {
        let Ok(expect) = std::env::var("MOE_CUDA_REQUIRED_EXPECT") else { return };
        assert_eq!(
            super::cuda_required(),
            expect == "true",
            "MOE_REQUIRE_CUDA={:?}",
            std::env::var(super::REQUIRE_CUDA_VAR)
        );
    }

    /// `cuda_required` is true for `MOE_REQUIRE_CUDA=1` only (the switch that turns a GPU
    /// skip into a failure on the device machine), checked in child runs of this test binary
    /// with the variable set each way and unset: a test must not change its own process's
    /// environment, which the other tests share.
    #[test]
    fn cuda_required_reads_the_variable() {
        let exe = std::env::current_exe().expect("test binary");
        for value in [Some("1"), Some("0"), Some(""), Some("true"), None] {
            let mut child = std::process::Command::new(&exe);
            child.args(["--exact", "tests::cuda_required_child", "--test-threads", "1"]);
            child.env("MOE_CUDA_REQUIRED_EXPECT", (value == Some("1")).to_string());
            match value {
                Some(v) => child.env(super::REQUIRE_CUDA_VAR, v),
                None => child.env_remove(super::REQUIRE_CUDA_VAR),
            };
            let out = child.output().expect("child test run");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "MOE_REQUIRE_CUDA={value:?}: {stdout}");
            assert!(stdout.contains("1 passed"), "the child test did not run: {stdout}");
        }
    }
}
