-- SQLite flavour; keep in step with migrations/postgres (same versions, same
-- tables, columns and indexes). Timestamps are unix milliseconds.

-- The model registry: one row per model name, written from the config file at
-- start-up (source = 'config') or by an administrator (source = 'admin').
-- `aliases` is a comma-separated list (alias names cannot contain commas).
CREATE TABLE models (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    path          TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    aliases       TEXT    NOT NULL DEFAULT '',
    dtype         TEXT,
    device        TEXT    NOT NULL,
    source        TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    updated_at_ms BIGINT  NOT NULL
);

-- One row per RPC served. Append-only: rows are never updated.
CREATE TABLE request_log (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at_ms     BIGINT  NOT NULL,
    method            TEXT    NOT NULL,
    model             TEXT,
    request_id        TEXT,
    status_code       INTEGER NOT NULL,
    error_kind        TEXT,
    prompt_tokens     BIGINT  NOT NULL,
    completion_tokens BIGINT  NOT NULL,
    latency_ms        REAL    NOT NULL,
    client_addr       TEXT
);

CREATE INDEX request_log_started_at ON request_log (started_at_ms);
CREATE INDEX request_log_method_started_at ON request_log (method, started_at_ms);

CREATE TRIGGER request_log_append_only
BEFORE UPDATE ON request_log
BEGIN
    SELECT RAISE(ABORT, 'request_log is append-only: rows cannot be updated');
END;
