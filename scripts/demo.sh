#!/usr/bin/env bash
# Builds postcopy and runs the demo: a guest migrated between two ends on this
# machine over loopback TCP, its memory checked, the report printed.
# Arguments go to `postcopy demo` (default: a 1 GiB `ab` process guest).
# Needs root (kernel-mode userfaultfd; /dev/kvm for --guest kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --workspace --bins
exec ./target/release/postcopy demo "$@"
