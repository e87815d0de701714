//! A segfault in a GPU test names the test it happened in and the library it happened in.
//! libtest runs each test on a thread named after it; a crash in driver, NVRTC, cuBLAS(Lt) or
//! our own `unsafe` code under `--test-threads 4` otherwise leaves only the shell's
//! "Segmentation fault" line.
//!
//! [`install`] (called by the GPU tests' device helpers, after the Rust runtime set up its own
//! stack-overflow handler and the per-thread alternate signal stacks) puts a SIGSEGV/SIGBUS
//! handler in front of the runtime's: on the alternate stack, so it runs even when the thread
//! overflowed its stack, it writes, with `prctl`/`open`/`read`/`write` only, the kernel's name
//! of the thread (the test's name cut to 15 bytes), the fault address, the stack pointer (far
//! apart: a bad pointer; within a few pages: a stack overflow) and the faulting instruction,
//! then the `/proc/self/maps` line holding each of the three (which library faulted, whose
//! memory it touched, which thread stack), then the thread's full Rust name; it puts the
//! previous handler back and returns, and the faulting instruction faults again into the
//! runtime's handler ("has overflowed its stack") or the default action. The Rust name comes
//! last because getting it may allocate (a thread the runtime did not start, e.g. the
//! driver's): everything before it is async-signal-safe.

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

/// Writes `buf` to stderr.
fn emit(buf: &[u8]) {
    // SAFETY: write(2) is async-signal-safe; `buf` is initialized memory of its length.
    unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
}

/// The faulting thread's stack pointer and instruction pointer, from the signal context.
#[cfg(target_arch = "x86_64")]
fn registers(ctx: *mut libc::c_void) -> (usize, usize) {
    // SAFETY: the kernel passes a valid ucontext_t as the third argument of an SA_SIGINFO
    // handler; REG_RSP and REG_RIP index its general registers.
    let gregs = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    (gregs[libc::REG_RSP as usize] as usize, gregs[libc::REG_RIP as usize] as usize)
}

#[cfg(not(target_arch = "x86_64"))]
fn registers(_ctx: *mut libc::c_void) -> (usize, usize) {
    (0, 0)
}

/// The `start-end` range at the head of a `/proc/self/maps` line.
fn map_range(line: &[u8]) -> Option<(usize, usize)> {
    let mut parts = [0usize; 2];
    let mut i = 0;
    for (k, part) in parts.iter_mut().enumerate() {
        let start = i;
        while i < line.len() && line[i].is_ascii_hexdigit() {
            *part = (*part << 4) | (line[i] as char).to_digit(16)? as usize;
            i += 1;
        }
        let sep = if k == 0 { b'-' } else { b' ' };
        if i == start || line.get(i) != Some(&sep) {
            return None;
        }
        i += 1;
    }
    Some((parts[0], parts[1]))
}

/// For each `(label, address)`, the line of `maps` (the text of `/proc/self/maps`, read in
/// pieces by `read`) whose range holds the address, as `  <label>: <line>`, or `<label>: not
/// mapped`; each written with `out`. Lines longer than 256 bytes are cut (the range and most
/// paths fit). Allocation-free and about 1.5 KiB of stack, for the signal handler on the
/// runtime's alternate stack (8 KiB, or the kernel's minimum where larger; the signal frame
/// itself takes 1-4 KiB of it).
fn report_mappings(targets: &[(&[u8], usize)], mut read: impl FnMut(&mut [u8]) -> isize, mut out: impl FnMut(&[u8])) {
    let mut found = [false; 4];
    let mut chunk = [0u8; 512];
    let mut line = [0u8; 256];
    let mut len = 0;
    let mut finish_line = |line: &[u8], found: &mut [bool; 4]| {
        let Some((start, end)) = map_range(line) else { return };
        for (i, &(label, addr)) in targets.iter().enumerate().take(found.len()) {
            if start <= addr && addr < end && !found[i] {
                found[i] = true;
                let mut buf = [0u8; 320];
                let mut at = 0;
                put(&mut buf, &mut at, b"  ");
                put(&mut buf, &mut at, label);
                put(&mut buf, &mut at, b": ");
                put(&mut buf, &mut at, line);
                put(&mut buf, &mut at, b"\n");
                out(&buf[..at]);
            }
        }
    };
    loop {
        let n = read(&mut chunk);
        if n <= 0 {
            break;
        }
        for &b in &chunk[..n as usize] {
            if b == b'\n' {
                finish_line(&line[..len], &mut found);
                len = 0;
            } else if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
    }
    if len > 0 {
        finish_line(&line[..len], &mut found);
    }
    for (i, &(label, _)) in targets.iter().enumerate().take(found.len()) {
        if !found[i] {
            let mut buf = [0u8; 64];
            let mut at = 0;
            put(&mut buf, &mut at, b"  ");
            put(&mut buf, &mut at, label);
            put(&mut buf, &mut at, b": not mapped\n");
            out(&buf[..at]);
        }
    }
}

extern "C" fn report_crash(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut buf = [0u8; 256];
    let mut at = 0;
    put(&mut buf, &mut at, b"\nFATAL signal ");
    put(&mut buf, &mut at, if sig == libc::SIGSEGV { b"SIGSEGV" } else { b"SIGBUS" });
    put(&mut buf, &mut at, b" in thread `");
    // The kernel's name of the thread (libtest's thread name, the test's, cut to 15 bytes).
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL-terminated) into `comm`.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    put(&mut buf, &mut at, &comm[..comm_len]);
    put(&mut buf, &mut at, b"`: fault address ");
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (sp, ip) = registers(ctx);
    put_hex(&mut buf, &mut at, addr);
    put(&mut buf, &mut at, b", stack pointer ");
    put_hex(&mut buf, &mut at, sp);
    put(&mut buf, &mut at, b", instruction ");
    put_hex(&mut buf, &mut at, ip);
    put(&mut buf, &mut at, b"\n");
    emit(&buf[..at]);
    // SAFETY: open(2) of a NUL-terminated path is async-signal-safe.
    let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        report_mappings(
            &[(b"instruction", ip), (b"fault address", addr), (b"stack pointer", sp)],
            // SAFETY: read(2) is async-signal-safe and writes at most `chunk.len()` bytes.
            |chunk| unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) },
            emit,
        );
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
    }
    // The name libtest gave the thread (the test's full path): no allocation for a thread the
    // runtime started; last, as a thread it did not start allocates its handle here.
    at = 0;
    put(&mut buf, &mut at, b"  test thread `");
    put(&mut buf, &mut at, std::thread::current().name().unwrap_or("<unnamed>").as_bytes());
    put(&mut buf, &mut at, b"`\n");
    emit(&buf[..at]);
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

/// Runs `test` of this binary alone in a child process with `env` set (the child plants a
/// fault), returning the binary's path and the child's output.
fn run_child(test: &str, env: &str) -> (std::path::PathBuf, std::process::Output) {
    let exe = std::env::current_exe().expect("test binary");
    let out =
        std::process::Command::new(&exe).args([test, "--exact", "--nocapture"]).env(env, "1").output().expect("child");
    (exe, out)
}

/// In a child that faults on purpose: no core file.
fn no_core_file() {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct it is given.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
}

/// The handler names the thread and the fault and hands the signal to the handler it replaced:
/// a thread of this binary faulting on purpose (a write to address 8, in a child process so the
/// test binary survives; `dangling_mut::<u64>()` is address 8) must print `FATAL signal SIGSEGV
/// in thread `<its name, 15 bytes>``, the fault address, the mapping of the faulting
/// instruction (this binary), "fault address: not mapped", the stack pointer's mapping, its
/// full test-thread name, and still die of SIGSEGV.
#[test]
fn a_segfault_names_its_thread_and_still_kills_the_process() {
    if std::env::var_os("MOE_CRASH_REPORT_CHILD").is_some() {
        no_core_file();
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
    let (exe, out) =
        run_child("crash_report::a_segfault_names_its_thread_and_still_kills_the_process", "MOE_CRASH_REPORT_CHILD");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FATAL signal SIGSEGV in thread `crash_report::p`: fault address 0x0000000000000008"),
        "{stderr}"
    );
    let line = |label: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(&format!("  {label}: ")))
            .unwrap_or_else(|| panic!("no {label} line: {stderr}"))
    };
    let name = exe.file_name().expect("name").to_string_lossy().into_owned();
    assert!(line("instruction").ends_with(&name), "the fault is in this binary's code: {stderr}");
    assert_eq!(line("fault address"), "  fault address: not mapped", "{stderr}");
    assert_ne!(line("stack pointer"), "  stack pointer: not mapped", "{stderr}");
    assert!(stderr.contains("  test thread `crash_report::planted`"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
}

/// A stack overflow is reported too (the handler runs on the alternate stack): a thread that
/// recurses past its 256 KiB stack (in a child process) must print its name, a fault address
/// in the guard page below its stack (a `---p` mapping, within a page or two of the stack
/// pointer), and then still reach the runtime's "has overflowed its stack" abort.
#[test]
fn a_stack_overflow_is_reported_with_the_guard_page() {
    fn recurse(depth: u64) -> u64 {
        let pad = std::hint::black_box([depth; 64]);
        if depth == u64::MAX {
            return 0;
        }
        recurse(depth + 1) + pad[0]
    }
    if std::env::var_os("MOE_CRASH_REPORT_OVERFLOW_CHILD").is_some() {
        no_core_file();
        install();
        std::thread::Builder::new()
            .name("crash_report::overflow".into())
            .stack_size(256 << 10)
            .spawn(|| std::hint::black_box(recurse(std::hint::black_box(0))))
            .expect("spawn")
            .join()
            .ok();
        return;
    }
    let (_, out) =
        run_child("crash_report::a_stack_overflow_is_reported_with_the_guard_page", "MOE_CRASH_REPORT_OVERFLOW_CHILD");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FATAL signal SIGSEGV in thread `crash_report::o`: fault address "), "{stderr}");
    let fault = stderr.lines().find(|l| l.starts_with("  fault address: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(fault.contains(" ---p "), "the fault is in the guard page: {stderr}");
    assert!(stderr.contains("  test thread `crash_report::overflow`"), "{stderr}");
    assert!(stderr.contains("has overflowed its stack"), "the runtime's handler still runs: {stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}

/// The maps lookup finds the line of each address, whatever the read sizes (lines split
/// across reads, a last line without a newline, a line past the 255-byte cut), and says "not
/// mapped" for an address in no line; a range is the line's `start-end` head only.
#[test]
fn each_address_gets_the_maps_line_that_holds_it() {
    let long_path = format!("/usr/lib/{}libcuda.so.1", "x".repeat(300));
    let maps = format!(
        "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/integration\n\
         7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n\
         7f1000000000-7f1000100000 r-xp 00000000 08:02 42 {long_path}\n\
         7ffc0000a000-7ffc0002b000 rw-p 00000000 00:00 0 [stack]"
    );
    let targets: [(&[u8], usize); 4] = [
        (b"instruction", 0x7f1000000010),
        (b"fault address", 8),
        (b"stack pointer", 0x7ffc0002aff8),
        (b"heap", 0x7f00001fffff),
    ];
    for piece in [1, 7, 64, 5000] {
        let mut at = 0;
        let bytes = maps.as_bytes();
        let mut lines = Vec::new();
        report_mappings(
            &targets,
            |chunk| {
                let n = piece.min(chunk.len()).min(bytes.len() - at);
                chunk[..n].copy_from_slice(&bytes[at..at + n]);
                at += n;
                n as isize
            },
            |l| lines.push(String::from_utf8_lossy(l).into_owned()),
        );
        let cut = format!("7f1000000000-7f1000100000 r-xp 00000000 08:02 42 {long_path}");
        assert_eq!(
            lines,
            [
                "  heap: 7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n".to_string(),
                format!("  instruction: {}\n", &cut[..256]),
                "  stack pointer: 7ffc0000a000-7ffc0002b000 rw-p 00000000 00:00 0 [stack]\n".to_string(),
                "  fault address: not mapped\n".to_string(),
            ],
            "read {piece} bytes at a time"
        );
    }
    assert_eq!(map_range(b"10-20 r-xp"), Some((0x10, 0x20)));
    assert_eq!(map_range(b"10 20 r-xp"), None);
    assert_eq!(map_range(b"-20 r-xp"), None);
}
