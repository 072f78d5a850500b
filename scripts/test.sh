#!/usr/bin/env bash
# Installs what the tests need, builds once (release) and runs every test:
# unit tests, role tests against fake peers, the KVM VMM, and the
# whole-system migrations (two network namespaces joined by veth included).
# The Linux guest's kernel and initramfs are built first (Debian's kernel
# package, unpacked; scripts/linux-guest.sh, reused when present).
# Needs root. KVM tests report "skipped: <reason>" without a usable /dev/kvm
# (Linux guest tests also without the kernel, or on a KVM too slow to boot it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
./scripts/linux-guest.sh >/dev/null
cargo build --release --workspace --all-targets
cargo test --release --workspace "$@"
