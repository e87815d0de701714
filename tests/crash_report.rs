//! A segfault in the test binary names the test it happened in (libtest runs each test on a
//! thread named after it) and prints that thread's backtrace, then exits with status 139 as the
//! default action would. Without it a crash in a GPU test (driver, cuBLASLt or our own `unsafe`)
//! under `--test-threads 4` leaves only the shell's "Segmentation fault" line, with no test
//! name. The handler is installed when the binary loads (an `.init_array` entry), before any
//! test thread exists.

/// The SIGSEGV/SIGBUS handler: the faulting thread's name and backtrace to stderr, then `_exit`.
/// Capturing a backtrace is not async-signal-safe (it allocates); an alarm bounds a handler that
/// deadlocks on a lock the faulting code held, so a crash never becomes a hang.
extern "C" fn report_crash(sig: libc::c_int) {
    // SAFETY: alarm and signal only set process signal state; SIGALRM's default action
    // terminates the process.
    unsafe {
        libc::alarm(10);
        libc::signal(sig, libc::SIG_DFL);
    }
    let name = std::thread::current().name().unwrap_or("<unnamed thread>").to_string();
    eprintln!("\nFATAL signal {sig} in test thread `{name}`; its backtrace:");
    eprintln!("{}", std::backtrace::Backtrace::force_capture());
    // SAFETY: _exit ends the process without running destructors (the state is corrupt).
    unsafe { libc::_exit(128 + sig) };
}

extern "C" fn install() {
    let handler = report_crash as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: installs a handler for a synchronous fault signal at load time, before any
        // other thread runs.
        unsafe { libc::signal(sig, handler) };
    }
}

// SAFETY: a function pointer in `.init_array` runs once when the binary is loaded (ELF
// initializer, as C's `__attribute__((constructor))`); `install` touches no Rust runtime state.
#[used]
#[unsafe(link_section = ".init_array")]
static INSTALL: extern "C" fn() = install;
