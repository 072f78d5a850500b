#!/usr/bin/env bash
# Installs what the tests need, builds once (release) and runs every test:
# unit tests, role tests against fake peers, the KVM VMM, and the
# whole-system migrations (two network namespaces joined by veth included).
# Needs root. KVM tests report "skipped: <reason>" without a usable /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace "$@"
