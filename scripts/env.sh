# shellcheck shell=bash
# Sourced by the other scripts (and by developers: `source scripts/env.sh`).
# Puts the project's Python virtualenv first on PATH so that tch finds libtorch
# from the PyPI torch wheel, and bakes the library path into every binary
# (rpath) so that medboxd and friends run with no environment set by hand.
MEDBOX_CACHE="${MEDBOX_CACHE:-$HOME/.cache/medbox}"
MEDBOX_VENV="$MEDBOX_CACHE/venv"
MEDBOX_PYTHON_VERSION_DIR="$(ls -d "$MEDBOX_VENV"/lib/python3.* 2>/dev/null | head -n 1)"
MEDBOX_TORCH_LIB="$MEDBOX_PYTHON_VERSION_DIR/site-packages/torch/lib"
export MEDBOX_CACHE MEDBOX_VENV MEDBOX_TORCH_LIB
export PATH="$MEDBOX_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# One target directory outside the clone, shared by every clone on this
# machine, so a fresh CI clone does not rebuild the dependencies.
export CARGO_TARGET_DIR="$MEDBOX_CACHE/target"
# An installed box (deploy/install.sh) finds libtorch through the unit's
# LD_LIBRARY_PATH; $ORIGIN/../lib is kept for bundles that flatten it.
export RUSTFLAGS="-C link-arg=-Wl,-rpath,$MEDBOX_TORCH_LIB -C link-arg=-Wl,-rpath,\$ORIGIN/../lib"
# Transformers and friends must never reach for a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
