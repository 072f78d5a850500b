#!/usr/bin/env bash
# Builds what `--guest linux` boots by default, on this machine:
#   vmlinuz        Debian's kernel (the package linux-image-amd64 depends on),
#                  fetched with apt-get download and unpacked with dpkg-deb
#                  (no install hooks run, nothing is installed)
#   initrd.cpio.gz an initramfs (cpio newc, gzip) holding only /init: the
#                  project's static workload program (guest-init crate,
#                  Rust with +crt-static)
#   kernel-version the package the kernel came from
# into ${POSTCOPY_LINUX_GUEST_DIR:-target/linux-guest}. A kernel already
# there is reused; /init and the initramfs are rebuilt (cargo is
# incremental). Prints the directory on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${POSTCOPY_LINUX_GUEST_DIR:-$PWD/target/linux-guest}
mkdir -p "$out"

need=()
command -v cpio >/dev/null || need+=(cpio)
command -v gzip >/dev/null || need+=(gzip)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need[@]}"
fi

# Options the micro-VM relies on: the 8250 console, an initramfs, devtmpfs
# for /dev/console, MP-table SMP, kvmclock.
required_config="CONFIG_SERIAL_8250=y CONFIG_SERIAL_8250_CONSOLE=y CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y CONFIG_DEVTMPFS=y CONFIG_X86_MPPARSE=y CONFIG_KVM_GUEST=y CONFIG_SMP=y"

if [ ! -s "$out/vmlinuz" ]; then
    export DEBIAN_FRONTEND=noninteractive
    kernel_pkg() {
        apt-cache depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
    }
    work=$(mktemp -d /tmp/postcopy-linux-guest.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    # _apt cannot write into a root-only mktemp dir: let it.
    chmod 0777 "$work"
    pkg=$(kernel_pkg)
    # An old package list may name a version the archive no longer has:
    # refresh it once and try again.
    if [ -z "$pkg" ] || ! (cd "$work" && apt-get download -q "$pkg"); then
        apt-get update -q
        pkg=$(kernel_pkg)
        [ -n "$pkg" ] || { echo "linux-guest: apt knows no linux-image-amd64" >&2; exit 1; }
        (cd "$work" && apt-get download -q "$pkg")
    fi
    deb=$(ls "$work"/*.deb)
    # dpkg-deb unpacks the package's files only (no maintainer scripts);
    # /boot is all that is needed.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" --wildcards './boot/*'
    config=$(ls "$work"/boot/config-*)
    for opt in $required_config; do
        grep -qx "$opt" "$config" || {
            echo "linux-guest: $pkg lacks $opt (needed built in)" >&2
            exit 1
        }
    done
    cp "$config" "$out/config"
    cp "$(ls "$work"/boot/vmlinuz-*)" "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    dpkg-deb -f "$deb" Package Version | tr '\n' ' ' >"$out/kernel-version"
    echo >>"$out/kernel-version"
fi

# /init: static, so the initramfs needs no libraries. Built for the explicit
# target so RUSTFLAGS reach this build only (not build scripts, not the rest
# of the workspace) and its own target directory keeps it apart.
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
    cargo build --release -q -p guest-init --bin postcopy-init --target "$target"
init=target/$target/release/postcopy-init
if ldd "$init" >/dev/null 2>&1 && ! ldd "$init" 2>&1 | grep -q "statically linked"; then
    echo "linux-guest: $init is not static" >&2
    exit 1
fi

stage=$(mktemp -d /tmp/postcopy-initramfs.XXXXXX)
install -m 0755 "$init" "$stage/init"
(cd "$stage" && echo init | cpio -o -H newc --owner 0:0 --quiet) | gzip -9 -n >"$out/initrd.cpio.gz.tmp"
mv "$out/initrd.cpio.gz.tmp" "$out/initrd.cpio.gz"
rm -rf "$stage"
echo "linux-guest: kernel $(cat "$out/kernel-version")" >&2
echo "$out"
