#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check and test:
# formatting, clippy, the Rust tests (SQLite and PostgreSQL), and the
# end-to-end tests of a real medboxd process with an independent Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

log "tiny model (made once, then reused from $MEDBOX_CACHE/models/tiny)"
scripts/make-tiny-model "$MEDBOX_CACHE/models/tiny"
log "the longer pre-trained tiny model that the LoRA acceptance test tunes (made once)"
scripts/make-tiny-model "$MEDBOX_CACHE/models/tiny-pretrained" --train-steps 1500

log "PostgreSQL on loopback for the store and end-to-end tests"
MEDBOX_TEST_POSTGRES_URL=$(scripts/postgres.sh | tail -n 1)
export MEDBOX_TEST_POSTGRES_URL

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --release --workspace --locked

log "end-to-end: medboxd as a real process, Python grpcio client (SQLite and PostgreSQL)"
MEDBOX_BIN_DIR="$CARGO_TARGET_DIR/release" MEDBOX_TINY_MODEL="$MEDBOX_CACHE/models/tiny" \
  python -m pytest -q tests/e2e
