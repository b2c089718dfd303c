#!/usr/bin/env bash
# The whole test suite, in rust-vmm-ci's spirit: format, lints, docs, unit + integration tests
# (protocol, blkio frontend, QEMU guests), a bounded fuzz run, and coverage held against
# coverage_config_x86_64.json. Installs what it needs first (deps.sh).
#
#   bash rust-vmm-ci/run_tests.sh            # everything
#   DRBLK_SKIP_VM=1 ...                       # skip the QEMU guest tests
#   DRBLK_SKIP_COVERAGE=1 / DRBLK_SKIP_FUZZ=1 # skip those stages
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

stage() { echo; echo "=== $* ==="; date -u +%T; }

stage "installing dependencies"
bash rust-vmm-ci/deps.sh

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

stage "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps --quiet

# With the features the tests use: the test stage then reuses this build instead of
# compiling the crate a second time (the fault-injection hooks do nothing unless their
# environment variables are set).
stage "build (release binaries used by guest tests and benchmarks)"
cargo build --locked --release --workspace --bins --features drblk/fault-injection

stage "tests"
cargo test --locked --release --workspace --all-targets --features drblk/fault-injection

stage "loom models of the consistency-group synchronisation"
# A feature of this crate alone: the dependencies built for the tests above are reused.
cargo test --locked --release -p drblk --lib --features loom cg::loom_tests

if [ "${DRBLK_SKIP_FUZZ:-0}" != 1 ] && command -v cargo-fuzz >/dev/null 2>&1; then
    stage "fuzz every parser of untrusted bytes (bounded)"
    bash rust-vmm-ci/fuzz.sh "${DRBLK_FUZZ_SECONDS:-30}"
fi

if [ "${DRBLK_SKIP_COVERAGE:-0}" != 1 ]; then
    stage "coverage"
    bash rust-vmm-ci/coverage.sh
fi

stage "all checks passed"
