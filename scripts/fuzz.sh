#!/usr/bin/env bash
# Runs one fuzz target for a while: scripts/fuzz.sh TARGET SECONDS
#
# Targets (fuzz/fuzz_targets/): frame, hello, control, package, guest_state,
# tls_record.
# Uses cargo-fuzz (libFuzzer) on the nightly toolchain; installs cargo-fuzz
# when missing. Starts from the seeds in fuzz/seeds/TARGET and keeps what it
# learns in fuzz/corpus/TARGET (not in git); a crash is saved under
# fuzz/artifacts/TARGET and makes this script fail. Prints the number of
# executions at the end.
set -euo pipefail
target=${1:?usage: scripts/fuzz.sh TARGET SECONDS (targets: frame hello control package guest_state tls_record)}
secs=${2:-60}
cd "$(dirname "$0")/../fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
mkdir -p "corpus/$target"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -max_len=16384 -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 2>&1 | tee "$log" | grep -v '^#[0-9]*	\(NEW\|REDUCE\|pulse\)'
status=${PIPESTATUS[0]}
set -e
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
echo "fuzz $target: ${runs:-?} executions in $secs s, exit status $status"
exit "$status"
