#!/usr/bin/env bash
# Builds postcopy and runs its bench: scenarios of migrations (ours beside
# QEMU's when qemu-system-x86_64 is installed), baselines on the same links,
# results as JSON and Markdown in --out (default bench-results/).
# Arguments go to `postcopy bench`, e.g. `./scripts/bench.sh --quick`.
# Needs root (userfaultfd, network namespaces, /dev/kvm for the KVM guest).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --workspace --bins
exec ./target/release/postcopy bench "$@"
