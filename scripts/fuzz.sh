#!/usr/bin/env bash
# Fuzzes every file reader of moe-verify (dumps; our checkpoint index and parts; torch_dist
# .metadata pickles and .distcp items; Hugging Face configs, indexes and safetensors shards) with
# a million mutated inputs each, in one run (stable Rust, not part of CI: minutes of CPU).
# Usage: scripts/fuzz.sh [inputs per reader] [seed]
# Prints one line of counts per reader (the table of docs/fuzzing.md); failing inputs go to
# fuzz-out/ (git-ignored); exit 1 on any panic or allocation violation, 3 on a hang.
set -euo pipefail
cd "$(dirname "$0")/.."
inputs="${1:-1000000}"
seed="${2:-1}"
cargo build --release -p moe-fuzz
exec ./target/release/moe-fuzz --inputs "$inputs" --seed "$seed" --out fuzz-out
