//! The Python helpers behind the published tables (`scripts/*_table.py`, the PyTorch peers'
//! self-checks, the ptxas report) run their own unit tests here, so `cargo test` and CI see a
//! broken table script before a device session spends its time on it.

use std::process::Command;

/// `python3 -m unittest discover -s scripts -p 'test_*.py'` passes (`scripts/test_bench_scripts.py`:
/// synthetic CSVs through every table script, and planted wiring faults the fp8 peer's
/// self-check must catch; the tests that need PyTorch skip without it, each with a SKIP line).
/// Without a `python3` on the PATH this prints one SKIP line and passes.
#[test]
fn the_bench_scripts_pass_their_unit_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = match Command::new("python3")
        .args(["-B", "-m", "unittest", "discover", "-s", "scripts", "-p", "test_*.py"])
        .current_dir(root)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            println!("SKIP bench_scripts::the_bench_scripts_pass_their_unit_tests: no python3 ({e})");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the bench scripts' unit tests failed:\n{stderr}");
    // unittest ends with "OK" or "OK (skipped=N)"; a run that found no tests would say "NO TESTS RAN".
    assert!(stderr.lines().any(|l| l.starts_with("OK")), "no passing unittest summary:\n{stderr}");
    assert!(!stderr.contains("Ran 0 tests"), "no test was found:\n{stderr}");
}
