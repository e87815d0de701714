#!/usr/bin/env bash
# Mutation score of the verification code (issue 11): cargo-mutants over reference/, harness/
# and src/cli/, every mutant tested against the whole workspace's tests (the integration tests
# in tests/ are what exercise the reference and the harness). Not part of CI: a full run is
# ~2,200 mutants, hours on two cores.
#
#   scripts/mutants.sh                                          # everything
#   scripts/mutants.sh --sharding round-robin --shard 0/16      # a uniform 1/16 sample
#   (any cargo-mutants flag can be added; `--shard` alone takes consecutive slices, not a sample)
#
# Installs the pinned cargo-mutants (and cargo-nextest, which stops a mutant's test run at the
# first failure) with `cargo install --locked` when missing. Results: mutants.out/ (outcomes.json,
# caught.txt, missed.txt, unviable.txt, timeout.txt); scripts/mutants_table.py turns them into the
# per-crate table of docs/mutation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTANTS_VERSION=27.1.0
NEXTEST_VERSION=0.9.143
if ! cargo mutants --version 2>/dev/null | grep -q "$MUTANTS_VERSION"; then
  cargo install --locked "cargo-mutants@$MUTANTS_VERSION"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked "cargo-nextest@$NEXTEST_VERSION"
fi
# The property suites' case count is the stamped default (1024 for the reference); the
# generated cases are the same on every run (fixed seed), so a mutant's outcome is repeatable.
exec cargo mutants \
  --package moe-reference --package moe-harness --package moe-verify \
  --exclude 'src/main.rs' --exclude 'benches/**' --exclude 'tests/**' --exclude 'gpu/**' \
  --test-package moe-verify --test-package moe-reference --test-package moe-harness --test-tool nextest \
  --minimum-test-timeout 120 \
  "$@"
