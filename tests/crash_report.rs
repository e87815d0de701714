//! A segfault in a GPU test names the test it happened in. libtest runs each test on a thread
//! named after it; a crash in driver, cuBLAS(Lt) or our own `unsafe` code under
//! `--test-threads 4` otherwise leaves only the shell's "Segmentation fault" line.
//!
//! [`install`] (called by the GPU tests' device helpers, after the Rust runtime set up its own
//! stack-overflow handler and the per-thread alternate signal stacks) puts a SIGSEGV/SIGBUS
//! handler in front of the runtime's: on the alternate stack, so it runs even when the thread
//! overflowed its stack, it writes the thread's name, the fault address and the thread's stack
//! pointer (far apart: a bad pointer; within a few pages: a stack overflow) with `write(2)`
//! only, puts the previous handler back and returns; the faulting instruction then
//! faults again into the runtime's handler ("has overflowed its stack") or the default action.

use std::sync::OnceLock;

/// The handlers [`install`] replaced, for SIGSEGV and SIGBUS.
static PREVIOUS: OnceLock<[libc::sigaction; 2]> = OnceLock::new();

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];

/// Appends `s` to `buf` at `*at` (truncating at its end).
fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *at);
    buf[*at..*at + n].copy_from_slice(&s[..n]);
    *at += n;
}

/// Appends `v` in hex.
fn put_hex(buf: &mut [u8], at: &mut usize, v: usize) {
    let mut digits = [0u8; 18];
    digits[0] = b'0';
    digits[1] = b'x';
    for (i, d) in digits[2..].iter_mut().enumerate() {
        let nibble = (v >> (60 - 4 * i)) & 0xF;
        *d = b"0123456789abcdef"[nibble];
    }
    put(buf, at, &digits);
}

/// The faulting thread's stack pointer, from the signal context.
#[cfg(target_arch = "x86_64")]
fn stack_pointer(ctx: *mut libc::c_void) -> usize {
    // SAFETY: the kernel passes a valid ucontext_t as the third argument of an SA_SIGINFO
    // handler; REG_RSP indexes its general registers.
    unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSP as usize] as usize }
}

#[cfg(not(target_arch = "x86_64"))]
fn stack_pointer(_ctx: *mut libc::c_void) -> usize {
    0
}

extern "C" fn report_crash(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut buf = [0u8; 512];
    let mut at = 0;
    put(&mut buf, &mut at, b"\nFATAL signal ");
    put(&mut buf, &mut at, if sig == libc::SIGSEGV { b"SIGSEGV" } else { b"SIGBUS" });
    put(&mut buf, &mut at, b" in thread `");
    // The name libtest gave the thread (the test's full path; no allocation, no lock).
    let current = std::thread::current();
    put(&mut buf, &mut at, current.name().unwrap_or("<unnamed>").as_bytes());
    put(&mut buf, &mut at, b"`: fault address ");
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    put_hex(&mut buf, &mut at, addr);
    put(&mut buf, &mut at, b", stack pointer ");
    put_hex(&mut buf, &mut at, stack_pointer(ctx));
    put(&mut buf, &mut at, b"\n");
    // SAFETY: write(2) is async-signal-safe; buf[..at] is initialized.
    unsafe { libc::write(2, buf.as_ptr().cast(), at) };
    if let Some(previous) = PREVIOUS.get() {
        let i = usize::from(sig == libc::SIGBUS);
        // SAFETY: restores a handler sigaction(2) returned; the faulting instruction then
        // re-faults into it.
        unsafe { libc::sigaction(sig, &previous[i], std::ptr::null_mut()) };
    }
}

/// Puts [`report_crash`] in front of the current SIGSEGV/SIGBUS handlers, once per process.
pub(crate) fn install() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid value (no handler, empty mask); the fields set
        // below make it an SA_SIGINFO handler on the alternate stack.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction =
            report_crash as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as libc::sighandler_t;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigemptyset initializes the mask in place.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        SIGNALS.map(|sig| {
            // SAFETY: as above, a zeroed sigaction to receive the previous handler.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: installs a handler for a synchronous fault signal; `old` receives the
            // handler it replaces.
            unsafe { libc::sigaction(sig, &new, &mut old) };
            old
        })
    });
}

/// The handler writes the thread's name and fault address and hands the signal to the handler
/// it replaced: a thread of this binary faulting on purpose (a write to address 8, in a child
/// process so the test binary survives; `dangling_mut::<u64>()` is address 8) must print `FATAL signal SIGSEGV in thread
/// `<its name>`` and still die of SIGSEGV.
#[test]
fn a_segfault_names_its_thread_and_still_kills_the_process() {
    if std::env::var_os("MOE_CRASH_REPORT_CHILD").is_some() {
        // No core file from the planted fault.
        let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: setrlimit reads the struct it is given.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        install();
        std::thread::Builder::new()
            .name("crash_report::planted".into())
            .spawn(|| {
                // SAFETY: not safe: the planted fault this test exists to observe.
                unsafe { std::ptr::write_volatile(std::ptr::dangling_mut::<u64>(), 1) };
            })
            .expect("spawn")
            .join()
            .ok();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args(["crash_report::a_segfault_names_its_thread_and_still_kills_the_process", "--exact", "--nocapture"])
        .env("MOE_CRASH_REPORT_CHILD", "1")
        .output()
        .expect("child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FATAL signal SIGSEGV in thread `crash_report::planted`: fault address 0x0000000000000008"),
        "{stderr}"
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
}
