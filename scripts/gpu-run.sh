#!/usr/bin/env bash
# Builds the release integration-test binary and `moe-verify` (whose `bench layer` and
# `bench grouped` are the GPU benchmarks) on this (CPU) machine and stages them, with the
# device-side scripts, in <dest>/.stage/ (git-ignored) for the GPU machine, which has no Rust
# toolchain. Usage: [BASE=<rev>] scripts/gpu-run.sh [dest-repo-root]
# With BASE, the layer bench of commit <rev> is built too (in a temporary worktree, with its
# own target directory target/base) and staged in .stage/base/ for the device script's `ab`
# step: .stage/base/moe-verify when <rev> has `moe-verify bench`, else its criterion bench
# binary as .stage/base/bench.
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
[ -n "$test_exe" ] || { echo "build failed" >&2; exit 1; }
cargo build --release --bin moe-verify >/dev/null 2>&1 || { echo "moe-verify build failed" >&2; exit 1; }
cp "$test_exe" "$stage/integration"
cp target/release/moe-verify "$stage/moe-verify"
rm -f "$stage/bench"  # the GPU benches are `moe-verify bench` now
mkdir -p "$stage/tools"
cp tools/*.py "$stage/tools/"
# Device-side scripts (bench_timing.py: the timer the torch_*experts_bench.py scripts import and
# the warning printer of layer_table.py and fp8_table.py)
# and the shape registry the torch halves of the benches read (scripts/shapes.json: `moe-verify
# shapes --json`, the registry the Rust benches use).
cp scripts/gpu-device.sh scripts/torch_experts_bench.py scripts/torch_fp8_experts_bench.py scripts/torch_grouped_bench.py scripts/layer_table.py \
  scripts/grouped_table.py scripts/layer_profile.py scripts/rounds_table.py scripts/layer_ab.py scripts/shapes.json \
  scripts/torch_a2a_bench.py scripts/bench_timing.py scripts/fp8_table.py \
  "$stage/"
if [ -n "${BASE:-}" ]; then
  base_tree="$(mktemp -d /tmp/moe-base.XXXXXX)"
  git worktree add --detach "$base_tree" "$BASE" >/dev/null
  mkdir -p "$stage/base"; rm -f "$stage/base/moe-verify" "$stage/base/bench"
  if grep -q "Bench(" "$base_tree/src/main.rs"; then
    (cd "$base_tree" && CARGO_TARGET_DIR="$root/target/base" cargo build --release --bin moe-verify >/dev/null 2>&1) ||
      { echo "base moe-verify build failed" >&2; exit 1; }
    cp "$root/target/base/release/moe-verify" "$stage/base/moe-verify"
  else
    base_exe="$(cd "$base_tree" && CARGO_TARGET_DIR="$root/target/base" exe_of bench bench --bench main)"
    [ -n "$base_exe" ] || { echo "base bench build failed" >&2; exit 1; }
    cp "$base_exe" "$stage/base/bench"
  fi
  git worktree remove --force "$base_tree"
  echo "base $BASE ($(git rev-parse --short "$BASE")) staged in $stage/base/"
fi
ls -la "$stage"
echo
echo "device command (carry [\".stage\"]):"
echo "  bash .stage/gpu-device.sh                                  (default steps: tests sampled bench sanitize)"
echo "  STEPS=bench bash .stage/gpu-device.sh                      (per-layer table)"
echo "  STEPS=bench LAYER_ARGS='--strategy auto,loop,persistent' bash .stage/gpu-device.sh"
echo "  STEPS=fp8 bash .stage/gpu-device.sh                        (fp8 table: ours bf16/tensorwise/blockwise, PyTorch peers)"
echo "  STEPS=grouped bash .stage/gpu-device.sh                    (GEMM-set table)"
echo "  STEPS=ab bash .stage/gpu-device.sh                         (with BASE=<rev>: layer bench, base vs this build)"
