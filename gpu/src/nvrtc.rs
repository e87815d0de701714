//! NVRTC compilation of the embedded kernel sources, with NVRTC's log in the error.
//!
//! The PTX of a (kernel file, arch) is compiled once per process and reused by every engine
//! created afterwards: a memo of a pure function of the embedded source, not engine state
//! (each engine still loads its own module into its own context).

use crate::error::GpuError;
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Compiles `source` (the kernel file `name`) for `arch` (`sm_90`, `sm_90a`) with the extra
/// NVRTC `options`, or returns the PTX an earlier call compiled for the same file and arch.
/// Needs only libnvrtc, no GPU.
pub(crate) fn compile(
    source: &'static str,
    name: &'static str,
    arch: &'static str,
    options: &[&str],
) -> Result<Ptx, GpuError> {
    type Cache = Mutex<HashMap<(&'static str, &'static str), Ptx>>;
    static COMPILED: OnceLock<Cache> = OnceLock::new();
    let cache = COMPILED.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&(name, arch)) {
        return Ok(ptx.clone());
    }
    let ptx = compile_uncached(source, name, arch, options)?;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert((name, arch), ptx.clone());
    Ok(ptx)
}

fn compile_uncached(source: &str, name: &'static str, arch: &'static str, options: &[&str]) -> Result<Ptx, GpuError> {
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(name.into()),
        options: options.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let log = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        GpuError::Compile { kernel: name, log }
    })
}

/// Whether libnvrtc can be loaded here (the compile tests skip loudly otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen libnvrtc by name and closes it again.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
