#!/usr/bin/env bash
# The README's figures: runs one migration command N times (default 3, one
# after another on this machine) and prints the median of each figure.
#   scripts/figures.sh [-n N] -- [postcopy demo options]
# Default: the 1 GiB postcopy run of the README.
set -euo pipefail
cd "$(dirname "$0")/.."
n=3
if [ "${1:-}" = "-n" ]; then n=$2; shift 2; fi
if [ "${1:-}" = "--" ]; then shift; fi
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(--guest process --mem 1G --workload ab --vcpus 2 --postcopy auto --max-bandwidth 134217728)
fi
. scripts/setup.sh
cargo build --release --workspace --bins -q
linux=no
case " ${args[*]} " in *" --guest linux "*) linux=yes ;; esac
case " ${args[*]} " in *" --kernel "*) ;; *) [ "$linux" = no ] || ./scripts/linux-guest.sh >/dev/null ;; esac
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for i in $(seq 1 "$n"); do
    serial=()
    [ "$linux" = no ] || serial=(--serial-log "$dir/s$i.serial")
    ./target/release/postcopy demo "${args[@]}" "${serial[@]}" --json "$dir/r$i.json" >/dev/null 2>"$dir/e$i.log" \
        || { echo "run $i failed:"; tail -5 "$dir/e$i.log"; exit 1; }
done
python3 - "$dir" "$n" "${args[*]}" <<'PY'
import json, os, re, statistics, sys
d, n, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rs = [json.load(open(f"{d}/r{i}.json")) for i in range(1, n + 1)]
# Linux guest: its uptime when the workload started auditing
# (guest-init's "postcopy-init: running (uptime S s)" on the source console).
for i, r in enumerate(rs, 1):
    p = f"{d}/s{i}.serial"
    m = re.search(r"postcopy-init: running \(uptime ([0-9.]+) s\)", open(p, errors="replace").read()) if os.path.exists(p) else None
    r["_boot_s"] = float(m.group(1)) if m else None
def med(f):
    vals = [f(r) for r in rs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
lat = lambda k: (lambda r: (r.get("fault_latency_us") or {}).get(k))
sw = lambda k: (lambda r: (r.get("switchover_ms") or {}).get(k))
rows = [
    ("guest boot to workload (s)", lambda r: r["_boot_s"]),
    ("downtime_ms", lambda r: r["downtime_ms"]),
    ("  switchover: stop", sw("stop")),
    ("  switchover: final sync", sw("final_sync")),
    ("  switchover: discard", sw("discard")),
    ("  switchover: package", sw("package")),
    ("  switchover: dest start", sw("dest_start")),
    ("prediscard_ms (guest running)", lambda r: r.get("prediscard_ms")),
    ("fault latency p50 (µs)", lat("p50")),
    ("fault latency p99 (µs)", lat("p99")),
    ("fault latency p99.9 (µs)", lat("p999")),
    ("postcopy_requests", lambda r: r["postcopy_requests"]),
    ("postcopy_blocktime_ms", lambda r: r.get("postcopy_blocktime_ms")),
    ("postcopy_phase_ms", lambda r: r.get("postcopy_phase_ms")),
    ("total_time_ms", lambda r: r["total_time_ms"]),
    ("throughput_mbps", lambda r: r["throughput_mbps"]),
]
print(f"postcopy demo {cmd}  ({n} runs, medians)")
bad = [r for r in rs if r["status"] != "completed" or r["verify"]["mismatches"] != 0]
print(f"  all completed with 0 mismatches: {'yes' if not bad else 'NO'}")
for name, f in rows:
    v = med(f)
    print(f"  {name:32} {'-' if v is None else round(v, 1)}")
PY
