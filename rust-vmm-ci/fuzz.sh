#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (seconds, default 30 each).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-30}"
for t in $(cargo +nightly fuzz list); do
    echo "fuzz: $t for ${secs}s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 4
done
