#!/usr/bin/env bash
# Line coverage with cargo-tarpaulin (llvm-tools are not available here, so no
# cargo-llvm-cov), compared with coverage_config_x86_64.json: a drop of more than 1 point
# fails; a rise is reported so the figure can be raised.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=rust-vmm-ci/coverage_config_x86_64.json
want=$(python3 -c "import json;print(json.load(open('$cfg'))['coverage_score'])")
exclude=$(python3 -c "import json;print(json.load(open('$cfg')).get('exclude_path',''))")
out=$(mktemp)
# The guest tests run QEMU for minutes; coverage is measured on the library, the protocol,
# blkio and CLI tests. `--tests` runs the library's unit tests too (adding `--lib` ran them twice).
status=0
DRBLK_QUICK=1 DRBLK_SKIP_VM=1 cargo tarpaulin --locked --skip-clean --target-dir target/tarpaulin --engine ptrace --timeout 600 \
    -p drblk --features fault-injection --exclude-files "$exclude" --tests --out Stdout >"$out" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
    # Show why: every failing test's own output, then the end of the run.
    echo "coverage: tarpaulin failed (exit $status); failing tests' output:"
    awk '/^failures:$/{f=1} f' "$out" | head -n 400
    echo "--- last lines of the run ---"
    tail -n 60 "$out"
    exit "$status"
fi
tail -n 3 "$out"
got=$(grep -oE '^[0-9]+\.[0-9]+% coverage' "$out" | tail -1 | cut -d% -f1)
[ -n "$got" ] || { echo "coverage: no figure in tarpaulin's output"; exit 1; }
echo "coverage: ${got}% (recorded: ${want}%)"
python3 - "$got" "$want" <<'PY'
import sys
got, want = float(sys.argv[1]), float(sys.argv[2])
if got < want - 1.0:
    sys.exit(f"coverage fell from {want}% to {got}%")
if got > want + 1.0:
    print(f"coverage rose to {got}%: raise coverage_score in coverage_config_x86_64.json")
PY
