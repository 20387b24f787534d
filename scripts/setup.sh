#!/usr/bin/env bash
# Installs everything medbox needs on a fresh Debian machine with the Rust
# toolchain, and builds the release binaries. Idempotent: what is already in
# the cache (~/.cache/medbox by default) is reused, so a second run takes
# seconds.
#
#   scripts/setup.sh            # venv + Python packages + cargo build --release
#   scripts/setup.sh --no-build # only the Python side
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=1
[ "${1:-}" = "--no-build" ] && build=0

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "setup: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
mkdir -p "${MEDBOX_CACHE:-$HOME/.cache/medbox}"
cache="${MEDBOX_CACHE:-$HOME/.cache/medbox}"
torch_version=2.13.0

if [ ! -x "$cache/venv/bin/python" ]; then
  log "creating the Python virtualenv in $cache/venv"
  python3 -m venv "$cache/venv" || {
    echo "setup: python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)" >&2; exit 1; }
  "$cache/venv/bin/pip" install -q --upgrade pip
fi
py="$cache/venv/bin/python"

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
  log "installing torch==$torch_version (libtorch for tch; about 5 GB with its CUDA libraries)"
  "$cache/venv/bin/pip" install -q "torch==$torch_version"
fi

stamp="$cache/venv/.medbox-requirements.sha256"
want=$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the Python test and model-making packages"
  "$cache/venv/bin/pip" install -q -r scripts/requirements-test.txt
  echo "$want" > "$stamp"
fi

# shellcheck source=scripts/env.sh
source scripts/env.sh

# target/ in the clone points at the shared build directory, so that
# target/release/medboxd is where the docs say it is.
if [ ! -e target ] || [ -L target ]; then
  mkdir -p "$CARGO_TARGET_DIR"
  ln -sfn "$CARGO_TARGET_DIR" target
fi

if [ "$build" = 1 ]; then
  log "cargo build --release (first time: several minutes)"
  start=$(date +%s)
  cargo build --release --workspace --locked || { echo "setup: cargo build failed" >&2; exit 1; }
  log "built in $(( $(date +%s) - start )) s: $root/target/release/{medboxd,medboxctl}"
fi
