#!/usr/bin/env bash
# Builds postcopy and runs the demo: a guest migrated between two ends on this
# machine over loopback TCP, its memory checked, the report printed.
# Arguments go to `postcopy demo` (default: a 1 GiB `ab` process guest).
# Needs root (kernel-mode userfaultfd; /dev/kvm for --guest kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --workspace --bins
# --guest linux without --kernel boots the default kernel and initramfs:
# build them (Debian's kernel package, the project's /init) if missing.
want_linux=no; own_kernel=no; prev=
for a in "$@"; do
    case "$prev:$a" in
        --guest:linux | *:--guest=linux) want_linux=yes ;;
    esac
    case "$a" in --kernel | --kernel=*) own_kernel=yes ;; esac
    prev=$a
done
if [ "$want_linux" = yes ] && [ "$own_kernel" = no ]; then
    ./scripts/linux-guest.sh >/dev/null
fi
exec ./target/release/postcopy demo "$@"
