#!/usr/bin/env bash
# The whole test suite: Rust (unit + integration over real sockets, real nginx, real Redis) and
# the JS client (node unit tests, transport tests against the real worker, browser tests in
# headless Chromium behind real nginx). .ci/run installs the system packages first.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/wavelog-worker-target}"

cargo test --workspace

# The JS tests drive the debug worker binary that `cargo test` just built.
export WAVELOG_WORKER_BIN="$CARGO_TARGET_DIR/debug/wavelog-worker"
cd js-client
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund
fi
npm test
