#!/usr/bin/env bash
# Reproduces docs/benchmarks.md's table and chart: builds release binaries, runs the scenario
# matrix with fanout-bench (each run starts its own worker), then writes
#   bench/results/*.json, docs/bench-table.md, docs/bench-chart.svg
# Usage: bench/run.sh [quick]   (quick = 1k and 10k only)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/wavelog-worker-target}"
cargo build --release --workspace --bins
BIN="$CARGO_TARGET_DIR/release/fanout-bench"
OUT=bench/results
mkdir -p "$OUT"
rm -f "$OUT"/*.json

sizes=(1000 19000)
runs=3
[ "${1:-}" = quick ] && sizes=(1000) && runs=1
# nchan (nginx with libnginx-mod-nchan) is the reference for the 10,000-subscriber rows.
nchan=()
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] && nchan=(--nchan)

one() { # label json-name args...
  local label=$1 name=$2
  shift 2
  echo "== $label"
  "$BIN" run --rate 50 --in-flight 4 --bind-ips 32 --idle-secs 3 --label "$label" \
    --json "$OUT/$name.json" --require-no-loss "$@"
}

for n in "${sizes[@]}"; do
  events=$(( n >= 10000 ? 40 : 200 ))
  for transport in ws sse; do
    for topics in 1 10; do
      one "$transport ${n}x${topics}t" "${transport}-${n}-${topics}" \
        --connections "$n" --topics "$topics" --transport "$transport" --events "$events"
    done
  done
done

# 10,000 subscribers at 50 events/s: the user/kernel split, each scenario $runs times (the
# report shows the spread), the worker and nchan alternating. 1,000,000 deliveries per run (100
# events to one topic, 1,000 to ten): the kernel splits CPU time into user and kernel by
# sampling at its clock tick, and fewer deliveries left that split a tenth of a microsecond
# apart between runs of one build.
for run in $(seq "$runs"); do
  for transport in ws sse; do
    for topics in 1 10; do
      events=$(( topics == 1 ? 100 : 1000 ))
      args=(--connections 10000 --topics "$topics" --transport "$transport" --events "$events")
      one "$transport 10000x${topics}t" "${transport}-10000-${topics}-r$run" "${args[@]}"
      if [ ${#nchan[@]} -gt 0 ]; then
        one "nchan $transport 10000x${topics}t" "nchan-${transport}-10000-${topics}-r$run" \
          "${args[@]}" "${nchan[@]}"
      fi
    done
  done
done

# Sustained load: 10 topics at 400 events/s (400,000 deliveries/s asked), where the worker is
# busy instead of waking for every burst (see "Where the time goes" in docs/benchmarks.md).
for transport in ws sse; do
  label="$transport 10000x10t 400/s"
  echo "== $label"
  "$BIN" run --connections 10000 --topics 10 --transport "$transport" \
    --events 2000 --rate 400 --in-flight 4 --bind-ips 32 --idle-secs 1 \
    --label "$label" --json "$OUT/sustained-${transport}.json" --require-no-loss
done

# Cluster mode (needs redis-server): 2 nodes, subscribers spread over both, publishes on node 1;
# then 5 nodes holding 90,000 subscribers, opened by 5 tool processes (one process may hold at
# most 20,000 files).
if command -v redis-server >/dev/null; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null || true' EXIT
  sleep 0.5
  for nodes in 1 2; do
    label="ws 10000x1t redis ${nodes}n"
    echo "== $label"
    "$BIN" run --connections 10000 --topics 1 --transport ws --events 40 --rate 50 --bind-ips 32 \
      --idle-secs 3 --nodes "$nodes" --redis-url "redis://127.0.0.1:$port/0" \
      --label "$label" --json "$OUT/cluster-${nodes}n.json" --require-no-loss
  done
  for transport in ws sse; do
    label="$transport 90000x10t redis 5n"
    echo "== $label"
    "$BIN" run --connections 90000 --topics 10 --transport "$transport" --events 20 --rate 10 \
      --bind-ips 32 --idle-secs 3 --nodes 5 --processes 5 --redis-url "redis://127.0.0.1:$port/0" \
      --label "$label" --json "$OUT/cluster-5n-${transport}.json" --require-no-loss
  done
fi

shopt -s nullglob
results=("$OUT"/ws-*.json "$OUT"/sse-*.json "$OUT"/nchan-*.json "$OUT"/sustained-*.json "$OUT"/cluster-*.json)
"$BIN" report "${results[@]}" --markdown docs/bench-table.md --svg docs/bench-chart.svg
echo "wrote docs/bench-table.md and docs/bench-chart.svg"
