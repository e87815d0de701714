#!/usr/bin/env bash
# Mutation-fuzzes the Hugging Face reader on the committed fixtures (tests/data/hf/): byte and
# structure mutations of the safetensors files, the index and config.json; every input opened
# and every expert tensor read. Fails on a panic, an input slower than 1 s, or a single
# allocation larger than 64x the input (+1 MiB), keeping the input in ./fuzz-hf-failure-*.
# Not part of CI. Usage: scripts/fuzz-hf.sh [ITERATIONS [SEED]] (default 1000000, 20261130).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -p moe-checkpoint --example fuzz_hf -- "${1:-1000000}" "${2:-20261130}"
