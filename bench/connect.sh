#!/usr/bin/env bash
# Server CPU per accepted connection, next to the floor of the exchange: connect-only runs of
# 10,000 subscribers (no events) against the worker, against `connect-floor` (the same bytes on
# the wire with nothing else: what the kernel and tokio cost) and, where installed, against
# nchan, rounds alternating so each round sees the same machine. Prints µs per connection as
# user + kernel = total for every run, and the median total per server.
# Usage: bench/connect.sh [rounds]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/wavelog-worker-target}"
cargo build --release --workspace --bins
REL="$CARGO_TARGET_DIR/release"
OUT=bench/results/connect
rounds=${1:-5}
mkdir -p "$OUT"
rm -f "$OUT"/*.json

servers=(worker floor)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] && servers+=(nchan)

for transport in ws sse; do
  for round in $(seq "$rounds"); do
    for server in "${servers[@]}"; do
      case $server in
        worker) extra=(--worker-bin "$REL/wavelog-worker") ;;
        floor) extra=(--worker-bin "$REL/connect-floor") ;;
        nchan) extra=(--nchan) ;;
      esac
      "$REL/fanout-bench" run --connections 10000 --topics 1 --transport "$transport" \
        --events 0 --bind-ips 32 --idle-secs 1 --json "$OUT/$transport-$server-$round.json" \
        "${extra[@]}" >/dev/null
    done
  done
done

python3 - "$OUT" "$rounds" "${servers[@]}" <<'PY'
import json, sys
out, rounds, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| transport | server | µs per connection, user + kernel = total (each run) | median total |")
print("|---|---|---|---:|")
for transport in ("ws", "sse"):
    for server in servers:
        runs = []
        for r in range(1, rounds + 1):
            c = json.load(open(f"{out}/{transport}-{server}-{r}.json"))["connect"]
            u, k = c["server_user_us_per_connection"], c["server_kernel_us_per_connection"]
            runs.append((u, k))
        totals = sorted(u + k for u, k in runs)
        each = ", ".join(f"{u:.0f}+{k:.0f}={u + k:.0f}" for u, k in runs)
        print(f"| {transport} | {server} | {each} | {totals[len(totals) // 2]:.0f} |")
PY
