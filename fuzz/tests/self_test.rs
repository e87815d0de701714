//! The fuzz runner's own verdicts can fail: each check (panic, largest allocation, peak live
//! memory, hang) is run on a reader with a planted bug that only it catches, and on the real
//! readers for a few hundred inputs, which must come out clean.

use std::process::Command;

fn fuzz(args: &[&str]) -> (Option<i32>, String, String) {
    let out_dir = tempfile::tempdir().expect("a temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_moe-fuzz"))
        .args(args)
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .expect("moe-fuzz runs");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_reader_that_panics_fails_the_run_with_the_panics_counted() {
    let (code, stdout, _) = fuzz(&["--target", "planted-panic", "--inputs", "200"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("planted-panic") && !stdout.contains("panics 0 "), "{stdout}");
    assert!(stdout.contains("allocation violations 0"), "only the panic check may fire: {stdout}");
}

#[test]
fn a_reader_that_trusts_a_length_field_fails_the_allocation_check() {
    let (code, stdout, _) = fuzz(&["--target", "planted-allocation", "--inputs", "200"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("panics 0 ") && !stdout.contains("(largest 0, "), "{stdout}");
    assert!(stdout.contains(", peak 0)"), "the peak check must not be what fired: {stdout}");
}

/// Why: a reader can exhaust memory in pieces that are each small (a node per declared entry);
/// the largest-allocation check cannot see that, only the peak of live memory can.
#[test]
fn a_reader_that_builds_up_memory_in_small_pieces_fails_the_peak_check() {
    let (code, stdout, _) = fuzz(&["--target", "planted-peak", "--inputs", "200"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("panics 0 ") && stdout.contains("(largest 0, "), "{stdout}");
    assert!(!stdout.contains(", peak 0)"), "{stdout}");
}

#[test]
fn a_reader_that_never_returns_is_stopped_by_the_watchdog() {
    let (code, _, stderr) = fuzz(&["--target", "planted-hang", "--inputs", "1", "--timeout-secs", "1"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("HANG: target planted-hang"), "{stderr}");
}

#[test]
fn the_real_readers_survive_a_short_run() {
    let (code, stdout, stderr) = fuzz(&["--inputs", "300"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for reader in ["dump", "checkpoint", "metadata", "distcp", "hf"] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{reader} "))).unwrap_or_default();
        assert!(line.contains("inputs       300 "), "{reader} not run: {stdout}");
        assert!(line.contains("panics 0  hangs 0  allocation violations 0 "), "{line}");
    }
}
