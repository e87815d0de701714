#!/usr/bin/env bash
# Mutation fuzzing of the torch_dist readers (.metadata pickles, .distcp tensor items) on stable
# Rust, over the corpus of real files in tests/data/torch_dist/. Not run in CI.
#   scripts/fuzz.sh [ITERATIONS_PER_READER] [SEED] [READERS]
#   (defaults 1000000, 24301 = 0x5eed, metadata,distcp,own)
# Exits 1 on a panic or an allocation over budget (inputs saved as fuzz-*.bin in the current
# directory); a hang aborts the run. The counts go into docs/checkpoint.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -p moe-checkpoint --example fuzz_readers -- "${1:-1000000}" "${2:-24301}" "${3:-metadata,distcp,own}"
