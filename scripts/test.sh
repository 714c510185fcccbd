#!/usr/bin/env bash
# Sets up what the tests need (Debian packages, Python tools, terraform with
# an offline provider mirror, podman config) and runs every check CI runs:
# formatting, clippy, all tests against real tools, doc tests.
# Safe to run twice. Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
source "${CD_TOOLS_DIR:-$HOME/.cache/cd-tools}/tools.env"
# Build output outside the clone, kept between runs (and between clones).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cd-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
# The tests start and kill real processes (sshd fleets, deployed services,
# terraform, ansible). As root, run them in their own PID namespace so that no
# test can ever signal a process outside it (the CI runner, your shell).
SANDBOX=()
if [ "$(id -u)" = 0 ] && unshare -fp --mount-proc true 2>/dev/null; then
  SANDBOX=(unshare -fp --mount-proc)
fi
echo "== cargo nextest"
"${SANDBOX[@]}" cargo nextest run --workspace --all-features --no-fail-fast "$@"
echo "== doc tests"
cargo test --workspace --all-features --doc
# The examples a new user runs: the quickstart (the main job), the canary
# judged on a real Prometheus, the containers behind the HTTP router, and a
# deploy binary mounting the operator CLI. Each checks its own outcome and exits non-zero
# otherwise.
if [ "$#" = 0 ]; then
  echo "== examples"
  state="$(mktemp -d)"
  "${SANDBOX[@]}" cargo run -q --all-features --example quickstart -- --auto-approve --state-dir "$state" > "$state/quickstart.log" 2>&1 \
    || { tail -40 "$state/quickstart.log"; exit 1; }
  tail -1 "$state/quickstart.log"
  "${SANDBOX[@]}" cargo run -q --all-features --example canary_prometheus > "$state/canary.log" 2>&1 \
    || { tail -60 "$state/canary.log"; exit 1; }
  tail -1 "$state/canary.log"
  "${SANDBOX[@]}" cargo run -q --all-features --example container_canary > "$state/containers.log" 2>&1 \
    || { tail -60 "$state/containers.log"; exit 1; }
  tail -1 "$state/containers.log"
  # A deploy binary with the operator commands mounted: rollback --to v41.
  "${SANDBOX[@]}" cargo run -q --all-features --example mydeploy -- --db "$state/mydeploy.db" demo > "$state/mydeploy.log" 2>&1 \
    || { tail -40 "$state/mydeploy.log"; exit 1; }
  tail -1 "$state/mydeploy.log"
  rm -rf "$state"
fi
