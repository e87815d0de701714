//! `moe-verify kernels`: compiles every NVRTC kernel module of `moe-gpu` for the architectures
//! the GPU layers load it for and writes the PTX, one file per module and architecture (needs
//! only libnvrtc, no GPU). `scripts/kernel-check.sh` assembles them with ptxas and fails on an
//! assembly error or a register spill, so kernel changes can be checked before device time.

use moe_gpu::GpuError;
use std::path::{Path, PathBuf};

/// Arguments of `moe-verify kernels`.
#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Directory the `<module>.<arch>.ptx` files are written to (created when missing; files of
    /// the same names are replaced whole).
    #[arg(long, value_name = "DIR")]
    pub ptx_dir: PathBuf,
}

/// One NVRTC module as the GPU layers load it.
struct Module {
    /// File stem: the kernel file's name.
    name: &'static str,
    /// The target it is compiled for.
    arch: &'static str,
    compile: fn() -> Result<moe_gpu::Ptx, GpuError>,
}

/// Every module the engines load on a Hopper GPU (the expert kernels also for sm_80, the
/// oldest target they support).
const MODULES: [Module; 4] = [
    Module { name: "experts", arch: "sm_90", compile: || moe_gpu::kernels::compile_kernels("sm_90") },
    Module { name: "experts", arch: "sm_80", compile: || moe_gpu::kernels::compile_kernels("sm_80") },
    Module { name: "fp8", arch: "sm_90", compile: || moe_gpu::fp8::compile_fp8_kernels("sm_90") },
    Module { name: "grouped_gemm", arch: "sm_90a", compile: moe_gpu::persistent::compile_persistent },
];

/// Writes `text` to `path` through a temporary file in the same directory, renamed over it: a
/// failed write leaves no half-written file.
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("ptx.part");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Compiles and writes every module; returns the exit code (0 written, 2 no libnvrtc or a
/// directory that cannot be written, 1 a kernel that does not compile).
pub fn run(args: &KernelsArgs) -> i32 {
    if !moe_gpu::nvrtc_present() {
        eprintln!(
            "error: libnvrtc (libnvrtc.so.13) not found: put its directory on LD_LIBRARY_PATH \
             (scripts/kernel-check.sh installs it from PyPI)"
        );
        return 2;
    }
    if let Err(e) = std::fs::create_dir_all(&args.ptx_dir) {
        eprintln!("error: cannot create {}: {e}", args.ptx_dir.display());
        return 2;
    }
    for m in &MODULES {
        let path = args.ptx_dir.join(format!("{}.{}.ptx", m.name, m.arch));
        match (m.compile)() {
            Ok(ptx) => {
                if let Err(e) = write_whole(&path, &ptx.to_src()) {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return 2;
                }
                println!("{} {} {}", m.name, m.arch, path.display());
            }
            Err(e) => {
                eprintln!("error: {}.cu for {} does not compile: {e}", m.name, m.arch);
                return 1;
            }
        }
    }
    0
}
