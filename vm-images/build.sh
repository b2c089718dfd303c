#!/usr/bin/env bash
# Build the drblk integration-test guest: a Debian kernel and a small initramfs with
# busybox, fio (+ all its shared libraries), util-linux's blkdiscard and the virtio
# modules. Everything comes from Debian packages (apt-get download + dpkg-deb -x).
#
#   vm-images/build.sh [OUTDIR]
#
# Writes OUTDIR/vmlinuz (bzImage), OUTDIR/vmlinux (the same kernel uncompressed, for
# QEMU's faster PVH boot) and OUTDIR/initramfs.img (plus manifest.txt and build.key).
# Default OUTDIR: ${DRBLK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/drblk/vm-images}/<key>,
# where <key> hashes the resolved package versions and this directory's build inputs.
# If OUTDIR already holds a complete build for that key, nothing is rebuilt.
# The output directory is printed as the last (and only) line of stdout; progress and
# errors go to stderr. See README.md.
set -euo pipefail
umask 022
export LC_ALL=C

# Everything but the final path goes to stderr.
exec 3>&1 1>&2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Kernel modules wanted in the guest (dependencies are added automatically).
MODULES="virtio_pci virtio_blk qemu_fw_cfg"
# Userland packages; their library dependencies are resolved recursively.
ROOT_PKGS="busybox-static fio util-linux"
# Binaries (paths inside the packages) copied into the initramfs with their libraries.
BINARIES="usr/bin/fio sbin/blkdiscard"
KERNEL_META=linux-image-amd64
LOADER=lib64/ld-linux-x86-64.so.2
# Library packages never needed by the binaries above (pulled in only through
# PAM, perl or python); skipping them keeps the download small.
SKIP_RE='^(libpam-modules.*|libperl.*|libpython.*|libc-bin|libc-dev-bin|libsemanage.*|libdebian-installer.*)$'

CACHE_ROOT=${DRBLK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/drblk/vm-images}
DEBS=$CACHE_ROOT/debs

log() { printf 'vm-images/build.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- host tools ----------------------------------------------------------------
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    die "needs a Debian/Ubuntu host (apt-get, dpkg-deb)"
missing=()
for t in cpio:cpio gzip:gzip flock:util-linux sha256sum:coreutils tar:tar find:findutils; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]} (run as root or install them)"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# apt's binary package cache is often disabled (Docker images' docker-clean sets
# Dir::Cache::pkgcache ""), which makes every apt-cache call re-parse all package lists
# (~1 s). Keep our own copy next to the image cache; apt rebuilds it when lists change.
mkdir -p "$CACHE_ROOT/apt"
apt-cache() { command apt-cache -o Dir::Cache::pkgcache="$CACHE_ROOT/apt/pkgcache.bin" \
    -o Dir::Cache::srcpkgcache="$CACHE_ROOT/apt/srcpkgcache.bin" "$@"; }
apt-get() { command apt-get -o Dir::Cache::pkgcache="$CACHE_ROOT/apt/pkgcache.bin" \
    -o Dir::Cache::srcpkgcache="$CACHE_ROOT/apt/srcpkgcache.bin" "$@"; }

is_complete() {   # DIR KEY
    [ -f "$1/build.key" ] && [ "$(cat "$1/build.key")" = "$2" ] &&
        [ -s "$1/vmlinuz" ] && [ -s "$1/initramfs.img" ]
}

# ---- fast path ---------------------------------------------------------------------
# Resolving the packages takes a dozen apt-cache calls (a few seconds). Their result can
# only change when the apt lists/sources or these build inputs change, so remember the
# key per fingerprint of those.
fingerprint=$( {
    stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* /etc/apt/sources.list \
        /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true
    echo "$MODULES|$ROOT_PKGS|$BINARIES|$KERNEL_META"
    cat "$HERE/build.sh" "$HERE/init" "$HERE/functions.sh"
} | sha256sum | cut -c1-16)
stamp=$CACHE_ROOT/resolved/$fingerprint
if [ -f "$stamp" ]; then
    key=$(cat "$stamp")
    OUT=${1:-$CACHE_ROOT/$key}
    if is_complete "$OUT" "$key"; then
        echo "$OUT" >&3
        exit 0
    fi
fi

# ---- package lists ---------------------------------------------------------------
has_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }' | grep -qv '^(none)$'
}
if ! has_candidate "$KERNEL_META" || ! has_candidate fio; then
    [ "$(id -u)" = 0 ] || die "apt package lists are missing; run apt-get update as root"
    log "running apt-get update"
    # Unrelated third-party sources may fail; what matters is the check below.
    timeout 600 apt-get update || log "apt-get update reported errors (continuing)"
    has_candidate "$KERNEL_META" && has_candidate fio ||
        die "$KERNEL_META / fio not available from the configured apt sources"
fi

# ---- resolve packages --------------------------------------------------------------
KPKG=$(apt-cache depends "$KERNEL_META" |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
[ -n "$KPKG" ] || die "cannot find the linux-image-*-amd64 dependency of $KERNEL_META"

declare -A seen=()
pkgs=()
queue=()
for p in $ROOT_PKGS; do seen[$p]=1; pkgs+=("$p"); queue+=("$p"); done
depth=0
while [ ${#queue[@]} -gt 0 ]; do
    depth=$((depth + 1))
    [ $depth -le 30 ] || die "dependency resolution does not terminate"
    cands=()
    while read -r dep; do
        dep=${dep%:any}
        case "$dep" in '<'*|'') continue ;; esac   # virtual package
        [[ $dep =~ $SKIP_RE ]] && continue
        [ -n "${seen[$dep]:-}" ] && continue
        seen[$dep]=1; cands+=("$dep")
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                 --no-replaces --no-enhances "${queue[@]}" |
             awk '$1 ~ /^\|?(Pre)?Depends:$/ { print $2 }')
    queue=()
    [ ${#cands[@]} -gt 0 ] || break
    # Follow only shared-library packages (Section: libs), e.g. not python3 or perl.
    while read -r dep section; do
        case "$section" in libs|*/libs) pkgs+=("$dep"); queue+=("$dep") ;; esac
    done < <(apt-cache show --no-all-versions "${cands[@]}" |
             awk '/^Package:/ { p = $2 } /^Section:/ { print p, $2 }' | sort -u)
done

# Pick for each package the newest version that a configured repository actually
# offers: the candidate may be an installed version no longer in any repository.
declare -A ver=()
while IFS='|' read -r p v src; do
    p=${p// /}; v=${v// /}
    [[ $src == *Packages* ]] || continue
    [ -n "${ver[$p]:-}" ] || ver[$p]=$v
done < <(apt-cache madison "$KPKG" "${pkgs[@]}")
pinned=()
for p in "$KPKG" "${pkgs[@]}"; do
    [ -n "${ver[$p]:-}" ] || die "no downloadable version of $p in the apt sources"
    pinned+=("$p=${ver[$p]}")
done
# One line per .deb: 'URL' FILENAME SIZE SHA256:HASH
uris=$(apt-get download --print-uris "${pinned[@]}" | sort) ||
    die "apt-get download --print-uris failed"
[ "$(wc -l <<<"$uris")" -eq $(( ${#pkgs[@]} + 1 )) ] ||
    die "could not resolve all packages: ${pkgs[*]} $KPKG"

key=$( {
    awk '{ print $2, $4 }' <<<"$uris"
    echo "modules: $MODULES"; echo "binaries: $BINARIES"
    cat "$HERE/build.sh" "$HERE/init" "$HERE/functions.sh"
} | sha256sum | cut -c1-16)

mkdir -p "$CACHE_ROOT/resolved"
echo "$key" > "$stamp.tmp.$$" && mv -f "$stamp.tmp.$$" "$stamp"
OUT=${1:-$CACHE_ROOT/$key}
if is_complete "$OUT" "$key"; then
    echo "$OUT" >&3
    exit 0
fi

mkdir -p "$CACHE_ROOT" "$DEBS"
exec 9>"$CACHE_ROOT/.lock"
flock -w 1800 9 || die "timed out waiting for $CACHE_ROOT/.lock"
if is_complete "$OUT" "$key"; then   # built by a concurrent run meanwhile
    echo "$OUT" >&3
    exit 0
fi
log "building guest image $key -> $OUT"

# ---- download ---------------------------------------------------------------------------
want=()
while read -r _url file _size hash; do
    if [ -f "$DEBS/$file" ] &&
       [ "$(sha256sum "$DEBS/$file" | cut -d' ' -f1)" = "${hash#SHA256:}" ]; then
        continue
    fi
    pkg=${file%%_*}
    want+=("$pkg=${ver[$pkg]}")
done <<<"$uris"
if [ ${#want[@]} -gt 0 ]; then
    log "downloading ${#want[@]} packages"
    (cd "$DEBS" && timeout 900 apt-get download "${want[@]}") ||
        die "apt-get download failed"
fi
debfile() { awk -v p="$1" '{ f = $2; sub(/_.*/, "", f); if (f == p) { print $2; exit } }' <<<"$uris"; }

WORK=$(mktemp -d "$CACHE_ROOT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/stage      # all userland packages extracted
KROOT=$WORK/kernel     # kernel package extracted
IRD=$WORK/initramfs    # initramfs tree
mkdir -p "$STAGE" "$KROOT" "$IRD"

for p in "${pkgs[@]}"; do
    f=$(debfile "$p"); [ -n "$f" ] && [ -f "$DEBS/$f" ] || die "missing .deb for $p"
    dpkg-deb -x "$DEBS/$f" "$STAGE"
done
kdeb=$(debfile "$KPKG"); [ -f "$DEBS/$kdeb" ] || die "missing .deb for $KPKG"
dpkg-deb --fsys-tarfile "$DEBS/$kdeb" |
    tar -x -C "$KROOT" --wildcards './boot/vmlinuz-*' './boot/config-*' './lib/modules/*'

# ---- initramfs skeleton -----------------------------------------------------------------
mkdir -p "$IRD"/{bin,sbin,usr/bin,usr/sbin,lib/drblk,etc/drblk,proc,sys,dev,tmp,run,root,mnt,var}
install -m 0755 "$HERE/init" "$IRD/init"
install -m 0644 "$HERE/functions.sh" "$IRD/lib/drblk/functions.sh"
install -m 0755 "$STAGE/bin/busybox" "$IRD/bin/busybox"
echo "root:x:0:0:root:/root:/bin/sh" > "$IRD/etc/passwd"
echo "root:x:0:" > "$IRD/etc/group"

# ---- binaries and their shared libraries --------------------------------------------------
# Copy a file from STAGE into the initramfs at the same path, resolving symlinks that
# point inside the tree (absolute symlinks are relative to STAGE, not to the host).
copy_from_stage() {
    local rel=$1 src tgt n=0
    src=$STAGE/$rel
    while [ -L "$src" ]; do
        n=$((n + 1)); [ $n -le 40 ] || die "symlink loop at $rel"
        tgt=$(readlink "$src")
        case "$tgt" in /*) src=$STAGE$tgt ;; *) src=$(dirname "$src")/$tgt ;; esac
    done
    [ -f "$src" ] || die "$rel: not a file in the package tree"
    mkdir -p "$(dirname "$IRD/$rel")"
    cp "$src" "$IRD/$rel"
}

ldso_rel=$LOADER
ldso=$STAGE/$LOADER
while [ -L "$ldso" ]; do
    t=$(readlink "$ldso"); case "$t" in /*) ldso=$STAGE$t ;; *) ldso=$(dirname "$ldso")/$t ;; esac
done
[ -x "$ldso" ] || die "no dynamic loader in the libc6 package ($LOADER)"
ldso_real_rel=${ldso#"$STAGE"/}
copy_from_stage "$ldso_real_rel"
mkdir -p "$IRD/$(dirname "$LOADER")"
ln -sf "/$ldso_real_rel" "$IRD/$LOADER"

# Search path: every directory of the extracted packages that holds shared objects.
libpath=$(find "$STAGE" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' | sort -u | paste -sd:)
declare -A libs=()
for bin in $BINARIES; do
    [ -f "$STAGE/$bin" ] || die "$bin not found in the packages"
    copy_from_stage "$bin"
    # Run the packaged loader (not the host's) in list mode against the packaged tree.
    listing=$("$ldso" --library-path "$libpath" --list "$STAGE/$bin") ||
        die "cannot resolve the libraries of $bin: $listing"
    if grep -q 'not found' <<<"$listing"; then
        die "unresolved libraries for $bin:"$'\n'"$(grep 'not found' <<<"$listing")"
    fi
    while read -r path; do
        case "$path" in
            "$STAGE"/*) libs[${path#"$STAGE"/}]=1 ;;
            *) die "$bin: $path resolved outside the package tree (missing dependency?)" ;;
        esac
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$listing")
done
for rel in "${!libs[@]}"; do
    [ "$rel" = "$ldso_real_rel" ] || copy_from_stage "$rel"
done

# busybox applets, for every name not already provided by a real binary
while read -r applet; do
    a=$(basename "$applet")
    [ -e "$IRD/bin/$a" ] || [ -e "$IRD/sbin/$a" ] || [ -e "$IRD/usr/bin/$a" ] ||
        [ -e "$IRD/usr/sbin/$a" ] || [ -L "$IRD/$applet" ] && continue
    mkdir -p "$IRD/$(dirname "$applet")"
    ln -s /bin/busybox "$IRD/$applet"
done < <("$IRD/bin/busybox" --list-full)

# Debian's busybox runs its own applets in preference to $PATH (FEATURE_PREFER_APPLETS),
# so shadow applets that have a real binary with a shell function (jobs source this).
{
    echo
    echo "# Generated by build.sh: real binaries that take precedence over busybox applets."
    for bin in $BINARIES; do
        a=$(basename "$bin")
        if "$IRD/bin/busybox" --list | grep -qx "$a"; then
            echo "$a() { /$bin \"\$@\"; }"
        fi
    done
} >> "$IRD/lib/drblk/functions.sh"

# ---- kernel and modules ---------------------------------------------------------------------
kvers=("$KROOT"/lib/modules/*)
[ ${#kvers[@]} -eq 1 ] || die "expected one module tree in $KPKG"
KVER=$(basename "${kvers[0]}")
MODDIR=$KROOT/lib/modules/$KVER
[ -f "$KROOT/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"

# The package ships no modules.dep (depmod runs in its postinst), so the dependency
# graph is taken from each module's modinfo "depends=" field, which is what depmod
# derives it from as well.
declare -A modfile=() builtin=() state=()
while read -r f; do
    n=$(basename "$f"); n=${n%%.ko*}; n=${n//-/_}
    modfile[$n]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*' -type f)
if [ -f "$MODDIR/modules.builtin" ]; then
    while read -r f; do
        n=$(basename "$f"); n=${n%%.ko*}; builtin[${n//-/_}]=1
    done < "$MODDIR/modules.builtin"
fi
mod_plain() {   # print the uncompressed module to stdout
    case "$1" in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *) die "unknown module format $1" ;;
    esac
}
order=()
visit() {
    local m=${1//-/_} d deps
    case "${state[$m]:-}" in done) return ;; visiting) die "module dependency cycle at $m" ;; esac
    if [ -n "${builtin[$m]:-}" ]; then state[$m]=done; return; fi
    [ -n "${modfile[$m]:-}" ] || die "kernel module $m not found in $KPKG"
    state[$m]=visiting
    deps=$(mod_plain "${modfile[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do visit "$d"; done
    state[$m]=done
    order+=("$m")
}
for m in $MODULES; do visit "$m"; done
mkdir -p "$IRD/lib/modules/$KVER"
: > "$IRD/etc/drblk/modules"
for m in "${order[@]}"; do
    mod_plain "${modfile[$m]}" > "$IRD/lib/modules/$KVER/$m.ko"
    echo "/lib/modules/$KVER/$m.ko" >> "$IRD/etc/drblk/modules"
done

# ---- sanity check: run the packaged fio with the initramfs's own loader and libraries ----
"$IRD/$ldso_real_rel" --library-path "$IRD/lib/x86_64-linux-gnu:$IRD/usr/lib/x86_64-linux-gnu:$(find "$IRD" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)" \
    --list "$IRD/usr/bin/fio" >/dev/null || die "fio does not link against the initramfs tree"

# ---- assemble ---------------------------------------------------------------------------------
mkdir -p "$OUT"
{
    echo "key: $key"
    echo "kernel: $KPKG ($KVER)"
    echo "modules (load order): ${order[*]}"
    echo "binaries: $BINARIES"
    echo "packages:"
    awk '{ print "  " $2 }' <<<"$uris"
    echo "libraries:"
    printf '  %s\n' "${!libs[@]}" | sort
} > "$OUT/manifest.txt.tmp"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
# Also the uncompressed ELF kernel: QEMU boots it directly through its PVH entry point,
# which skips the in-guest decompression of the bzImage (about 4-5 s under TCG).
extract_vmlinux() {   # bzImage -> ELF on stdout (like the kernel's scripts/extract-vmlinux)
    local img=$1 magic cmd off
    for magic in $'\xfd7zXZ:xz -dc --single-stream' $'\x28\xb5\x2f\xfd:zstd -qdc' \
                 $'\x1f\x8b\x08:gzip -dc'; do
        cmd=${magic#*:}; magic=${magic%%:*}
        command -v "${cmd%% *}" >/dev/null || continue
        while read -r off; do
            tail -c +$((off + 1)) "$img" | $cmd 2>/dev/null > "$WORK/vmlinux" || true
            if [ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                cat "$WORK/vmlinux"; return 0
            fi
        done < <(grep -aobF -- "$magic" "$img" | cut -d: -f1 | head -n 5)
    done
    return 1
}
rm -f "$OUT/vmlinux"
if extract_vmlinux "$KROOT/boot/vmlinuz-$KVER" > "$OUT/vmlinux.tmp" &&
   grep -q '^CONFIG_PVH=y' "$KROOT/boot/config-$KVER" 2>/dev/null; then
    mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
else
    rm -f "$OUT/vmlinux.tmp"
    log "warning: no PVH-bootable vmlinux extracted; only vmlinuz (slower boot)"
fi
(cd "$IRD" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -6 -n > "$OUT/initramfs.img.tmp"
mv -f "$OUT/manifest.txt.tmp" "$OUT/manifest.txt"
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv -f "$OUT/initramfs.img.tmp" "$OUT/initramfs.img"
echo "$key" > "$OUT/build.key"
# Keep the 4 most recently built images of the default cache, drop older ones.
if [ -z "${1:-}" ]; then
    ls -1dt "$CACHE_ROOT"/[0-9a-f]*/build.key 2>/dev/null | tail -n +5 | while read -r old; do
        d=$(dirname "$old")
        [[ $(basename "$d") =~ ^[0-9a-f]{16}$ ]] && [ "$d" != "$OUT" ] && rm -rf "$d"
    done
fi
log "done: kernel $KVER, initramfs $(du -h "$OUT/initramfs.img" | cut -f1) ($(du -sh "$IRD" | cut -f1) unpacked)"
echo "$OUT" >&3
