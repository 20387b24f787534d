#!/usr/bin/env bash
# Installs medbox on this box from a built clone (after scripts/setup.sh), with
# no network access: the binaries, libtorch (from the setup's virtualenv), a
# configuration for the chosen profile, and the systemd unit.
#
#   sudo deploy/install.sh [--profile inference|training] [--prefix /opt/medbox]
#                          [--config /etc/medbox/medbox.toml] [--data-dir /var/lib/medbox]
#                          [--no-systemd]
#
# Re-running upgrades the binaries in place (each copied to a temporary name,
# then renamed) and never overwrites an existing configuration: a changed
# example is written beside it as medbox.toml.new.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
profile=inference prefix=/opt/medbox config=/etc/medbox/medbox.toml data_dir=/var/lib/medbox systemd=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --no-systemd) systemd=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in inference|training) ;; *) echo "install: --profile must be inference or training" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "install: run as root (it creates the medbox user and writes $prefix)" >&2; exit 1; }

cache="${MEDBOX_CACHE:-$HOME/.cache/medbox}"
bin_dir="$src/target/release"
site=$(ls -d "$cache"/venv/lib/python3.*/site-packages 2>/dev/null | head -n 1)
for f in medboxd medboxctl; do
  [ -x "$bin_dir/$f" ] || { echo "install: $bin_dir/$f is missing: run scripts/setup.sh first" >&2; exit 1; }
done
[ -d "$site/torch/lib" ] || { echo "install: no libtorch under $cache/venv: run scripts/setup.sh first" >&2; exit 1; }

say() { printf '==> %s\n' "$*"; }

if ! id medbox >/dev/null 2>&1; then
  say "creating system user medbox"
  useradd --system --home-dir "$data_dir" --shell /usr/sbin/nologin medbox
fi
install -d -m 0750 -o medbox -g medbox "$data_dir" "$data_dir/models"
install -d -m 0755 "$prefix/bin" "$prefix/lib" "$prefix/share/doc/medbox" "$(dirname "$config")"

say "installing binaries into $prefix/bin"
for f in medboxd medboxctl; do
  install -m 0755 "$bin_dir/$f" "$prefix/bin/.$f.new"
  mv -f "$prefix/bin/.$f.new" "$prefix/bin/$f"
done
ln -sfn "$prefix/bin/medboxctl" /usr/local/bin/medboxctl

# libtorch finds its CUDA libraries at ../../nvidia relative to itself, so the
# wheel's layout is kept: lib/torch/lib and lib/nvidia.
for part in torch/lib nvidia; do
  if [ -d "$site/$part" ]; then
    say "installing $part into $prefix/lib/$part"
    rm -rf "$prefix/lib/.$(basename "$part").new"
    mkdir -p "$(dirname "$prefix/lib/$part")"
    cp -a "$site/$part" "$prefix/lib/.$(basename "$part").new"
    rm -rf "$prefix/lib/$part"
    mv "$prefix/lib/.$(basename "$part").new" "$prefix/lib/$part"
  fi
done
install -m 0644 "$src/README.md" "$prefix/share/doc/medbox/README.md"

# The agent catalogue: one spec file per agent, replaced as a whole.
say "installing agent specs into $prefix/share/medbox/agents"
rm -rf "$prefix/share/medbox/.agents.new"
install -d -m 0755 "$prefix/share/medbox/.agents.new"
install -m 0644 "$src"/crates/medbox-agents/specs/*.toml "$prefix/share/medbox/.agents.new/"
rm -rf "$prefix/share/medbox/agents"
mv "$prefix/share/medbox/.agents.new" "$prefix/share/medbox/agents"

example="$src/deploy/config/$profile.toml"
if [ -f "$config" ]; then
  if ! cmp -s "$example" "$config"; then
    install -m 0640 -g medbox "$example" "$config.new"
    say "kept your $config; the $profile example is at $config.new"
  fi
else
  install -m 0640 -g medbox "$example" "$config"
  say "wrote $config ($profile profile): put your model folders under $data_dir/models"
fi

if [ "$systemd" = 1 ] && command -v systemctl >/dev/null; then
  say "installing the systemd unit medboxd.service"
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@CONFIG@|$config|g" -e "s|@DATA_DIR@|$data_dir|g" \
    "$src/deploy/medboxd.service" > /etc/systemd/system/medboxd.service
  systemctl daemon-reload
  systemctl enable medboxd.service
  say "start it with: systemctl start medboxd && medboxctl status"
else
  say "systemd not used; start with: sudo -u medbox env LD_LIBRARY_PATH=$prefix/lib/torch/lib $prefix/bin/medboxd --config $config"
fi
