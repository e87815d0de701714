//! When a GPU test, bench or backend may skip for lack of a GPU, and the one line it prints.

use crate::engine::Gpu;
use crate::error::GpuError;

/// The message printed (once) when `test` skips for lack of a GPU; `test` is the full name
/// (`gpu::<test>`, `gpu_grouped::<test>`, `bench layer`).
pub fn skip_message(test: &str, err: &GpuError) -> String {
    let why = match err {
        GpuError::NoDevice(reason) => reason.clone(),
        other => other.to_string(),
    };
    format!("SKIP {test}: no CUDA device ({why}); set MOE_REQUIRE_CUDA=1 to fail instead")
}

/// Prints a SKIP line where a passing test's output still shows: straight to the stderr handle,
/// which libtest does not capture (it captures `print!`/`eprint!` only).
pub fn print_skip(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether `err` means there is no usable GPU on this machine: the one reason a GPU test,
/// bench or backend may skip (and only without `MOE_REQUIRE_CUDA=1`). Every other error must
/// fail instead of skipping.
pub fn is_no_device(err: &GpuError) -> bool {
    matches!(err, GpuError::NoDevice(_))
}

/// Whether a GPU test or bench that could not get the GPU (`err`) may skip: only for a
/// missing GPU ([`is_no_device`]) and only without `MOE_REQUIRE_CUDA=1`
/// ([`moe_harness::cuda_required`]). Otherwise it must fail.
pub fn may_skip(err: &GpuError) -> bool {
    is_no_device(err) && !moe_harness::cuda_required()
}

/// A new engine on device 0 for the GPU test or bench `test` (full name, as in
/// [`skip_message`]), or `None` after printing its SKIP line. Panics where a skip is not
/// allowed ([`may_skip`]): under `MOE_REQUIRE_CUDA=1`, or on any error but a missing GPU.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            assert!(may_skip(&e), "{test}: the GPU is required (MOE_REQUIRE_CUDA=1) or cannot be used: {e}");
            print_skip(&skip_message(test, &e));
            None
        }
    }
}
