#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine that has only the Rust
# toolchain: Debian packages (as root, or through sudo) and the cargo tools used by CI.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

PKGS=(qemu-system-x86 qemu-utils cpio util-linux procps python3-prometheus-client)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Cargo tools, pinned so every run builds the same thing.
install_tool() {  # crate version binary [cargo install options]
    local crate=$1 version=$2 binary=$3
    shift 3
    if ! command -v "$binary" >/dev/null 2>&1; then
        echo "deps: cargo install $* $crate@$version"
        cargo install --locked "$@" "$crate@$version" >/dev/null 2>&1 ||
            cargo install --locked "$@" "$crate@$version"
    fi
}
if [ "${DRBLK_SKIP_COVERAGE:-0}" != 1 ]; then
    # Without its default features (Coveralls upload through libgit2, wasm profiles), which
    # the ptrace engine and --out Stdout do not use: a third less to build.
    install_tool cargo-tarpaulin 0.37.5 cargo-tarpaulin --no-default-features
fi
if [ "${DRBLK_SKIP_FUZZ:-0}" != 1 ] && cargo +nightly --version >/dev/null 2>&1; then
    install_tool cargo-fuzz 0.13.2 cargo-fuzz
fi
