#!/usr/bin/env bash
# A throw-away PostgreSQL server for medbox-store's tests, on loopback only.
#
#   scripts/postgres.sh          start it if needed; print its URL (last line of stdout)
#   scripts/postgres.sh stop     stop it
#   scripts/postgres.sh status   say whether it runs
#
# Typical use:
#   export MEDBOX_TEST_POSTGRES_URL="$(scripts/postgres.sh | tail -n 1)"
#
# The cluster lives in /var/lib/medbox-test-postgres when run as root (user
# `postgres` must own and reach it, and cannot enter /root), else in
# ${MEDBOX_CACHE:-$HOME/.cache/medbox}/postgres. It listens on 127.0.0.1:54329 only, and trusts every loopback connection: it is for tests,
# never for data anyone cares about (fsync is off). When run as root the
# cluster belongs to user `postgres` (created if absent), because PostgreSQL
# refuses to run as root. Safe to run again: every step checks first.
set -euo pipefail

readonly HOST=127.0.0.1
readonly PORT=54329
readonly ROLE=medbox
readonly DATABASE=medbox_test
readonly URL="postgres://$ROLE@$HOST:$PORT/$DATABASE"

CACHE_DIR="${MEDBOX_CACHE:-$HOME/.cache/medbox}"
case "$CACHE_DIR" in
    /*) ;;
    *) CACHE_DIR="$PWD/$CACHE_DIR" ;;
esac
if [ "$(id -u)" -eq 0 ]; then
    readonly CLUSTER_DIR="${MEDBOX_TEST_POSTGRES_DIR:-/var/lib/medbox-test-postgres}"
else
    readonly CLUSTER_DIR="${MEDBOX_TEST_POSTGRES_DIR:-$CACHE_DIR/postgres}"
fi
readonly DATA_DIR="$CLUSTER_DIR/data"
readonly SOCKET_DIR="$CLUSTER_DIR/run"
readonly LOG_FILE="$CLUSTER_DIR/server.log"

log() { echo "postgres.sh: $*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a server command as the cluster's owner.
as_owner() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# The newest /usr/lib/postgresql/<version>/bin holding pg_ctl, else the one on PATH.
find_bin_dir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
        echo "$dir"
        return
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    fi
}

install_postgres() {
    if ! is_root; then
        log "initdb/pg_ctl not found; install PostgreSQL (Debian: apt-get install -y postgresql) or run as root"
        exit 1
    fi
    log "initdb/pg_ctl not found; installing PostgreSQL with apt-get"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
}

ensure_postgres_user() {
    if ! is_root || id postgres >/dev/null 2>&1; then
        return
    fi
    log "creating system user postgres"
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
}

is_running() {
    [ -f "$DATA_DIR/PG_VERSION" ] && as_owner "$BIN_DIR/pg_ctl" status -D "$DATA_DIR" >/dev/null 2>&1
}

init_cluster() {
    mkdir -p "$CLUSTER_DIR"
    if is_root; then
        chown postgres:postgres "$CLUSTER_DIR"
    fi
    as_owner mkdir -p "$SOCKET_DIR"
    if [ -f "$DATA_DIR/PG_VERSION" ]; then
        return
    fi
    log "creating a test cluster in $DATA_DIR"
    as_owner "$BIN_DIR/initdb" --pgdata="$DATA_DIR" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C >&2
    as_owner tee "$DATA_DIR/pg_hba.conf" >/dev/null <<HBA
# Test-only cluster: trust the local socket and loopback, nothing else.
local all all trust
host  all all 127.0.0.1/32 trust
HBA
    as_owner tee -a "$DATA_DIR/postgresql.conf" >/dev/null <<CONF

# Added by medbox scripts/postgres.sh (test-only cluster).
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
}

start_cluster() {
    log "starting PostgreSQL on $HOST:$PORT (log: $LOG_FILE)"
    if ! as_owner "$BIN_DIR/pg_ctl" start --pgdata="$DATA_DIR" --log="$LOG_FILE" --wait --timeout=60 >&2; then
        log "PostgreSQL did not start; the end of $LOG_FILE says:"
        tail -n 20 "$LOG_FILE" >&2 || true
        exit 1
    fi
}

# Runs one SQL statement as the superuser over loopback; prints the result unaligned.
superuser_sql() {
    "$BIN_DIR/psql" --host="$HOST" --port="$PORT" --username=postgres --dbname=postgres \
        --no-psqlrc --quiet --tuples-only --no-align --set=ON_ERROR_STOP=1 --command="$1"
}

ensure_role_and_database() {
    if [ -z "$(superuser_sql "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" ]; then
        log "creating role $ROLE"
        superuser_sql "CREATE ROLE $ROLE LOGIN CREATEDB"
    fi
    if [ -z "$(superuser_sql "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" ]; then
        log "creating database $DATABASE"
        superuser_sql "CREATE DATABASE $DATABASE OWNER $ROLE"
    fi
}

main() {
    local command="${1:-start}"
    BIN_DIR="$(find_bin_dir)"
    case "$command" in
        start)
            if [ -z "$BIN_DIR" ]; then
                install_postgres
                BIN_DIR="$(find_bin_dir)"
                if [ -z "$BIN_DIR" ]; then
                    log "PostgreSQL was installed but initdb/pg_ctl are still missing"
                    exit 1
                fi
            fi
            ensure_postgres_user
            if ! is_running; then
                init_cluster
                start_cluster
            fi
            ensure_role_and_database
            echo "$URL"
            ;;
        stop)
            if [ -n "$BIN_DIR" ] && is_running; then
                as_owner "$BIN_DIR/pg_ctl" stop --pgdata="$DATA_DIR" --mode=fast --wait >&2
            else
                log "not running"
            fi
            ;;
        status)
            if [ -n "$BIN_DIR" ] && is_running; then
                echo "running: $URL"
            else
                echo "not running"
                exit 3
            fi
            ;;
        *)
            log "unknown command \`$command\`; use: $0 [start|stop|status]"
            exit 2
            ;;
    esac
}

main "$@"
