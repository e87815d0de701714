#!/usr/bin/env bash
# Builds the release integration-test binary and the bench binary on this (CPU) machine and
# stages them, with the device-side scripts, in <dest>/.stage/ (git-ignored) for the GPU
# machine, which has no Rust toolchain. Usage: scripts/gpu-run.sh [dest-repo-root]
# The device tool sends the session's main checkout, so pass /work/main when working in a
# worktree, then call the device with carry [".stage"] and the printed command.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root}"
cd "$root"
stage="$dest/.stage"
mkdir -p "$stage"
exe_of() { # $1 = target kind (test|bench), rest = cargo args; prints that artifact's executable
  local kind="$1"; shift
  cargo "$@" --no-run --message-format=json 2>/dev/null |
    KIND="$kind" python3 -c 'import json,os,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==[os.environ["KIND"]]:
        print(m["executable"])' | tail -1
}
test_exe="$(exe_of test test --release --test integration)"
bench_exe="$(exe_of bench bench --bench main)"
[ -n "$test_exe" ] && [ -n "$bench_exe" ] || { echo "build failed" >&2; exit 1; }
cargo build --release --bin moe-verify >/dev/null 2>&1 || { echo "moe-verify build failed" >&2; exit 1; }
cp "$test_exe" "$stage/integration"
cp "$bench_exe" "$stage/bench"
cp target/release/moe-verify "$stage/moe-verify"
mkdir -p "$stage/tools"
cp tools/*.py "$stage/tools/"
# Device-side scripts and the shape registry the torch halves of the benches read
# (scripts/shapes.json: `moe-verify shapes --json`, the registry the Rust benches use).
cp scripts/gpu-device.sh scripts/torch_experts_bench.py scripts/torch_grouped_bench.py scripts/layer_table.py \
  scripts/grouped_table.py scripts/layer_profile.py scripts/rounds_table.py scripts/shapes.json "$stage/"
ls -la "$stage"
echo
echo "device command (carry [\".stage\"]):"
echo "  bash .stage/gpu-device.sh                                  (default steps)"
echo "  STEPS=bench bash .stage/gpu-device.sh                      (issue 5 per-layer table)"
echo "  STEPS=bench MOE_LAYER_STRATEGIES=auto,loop,persistent bash .stage/gpu-device.sh"
echo "  STEPS=grouped bash .stage/gpu-device.sh                    (issue 5 GEMM-set table)"
