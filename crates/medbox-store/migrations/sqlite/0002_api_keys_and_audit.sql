-- SQLite flavour; keep in step with migrations/postgres (same versions, same
-- tables, columns and indexes). Timestamps are unix milliseconds.

-- API keys. `id` is public (`mbk_` + 12 hex digits); the secret handed to the
-- client once is never stored, only its SHA-256 (`secret_hash`, hex).
-- `scopes` is a comma-separated list drawn from inference, agents, finetune, admin.
CREATE TABLE api_keys (
    id              TEXT    PRIMARY KEY,
    label           TEXT    NOT NULL,
    scopes          TEXT    NOT NULL,
    tenant          TEXT,
    secret_hash     TEXT    NOT NULL,
    created_at_ms   BIGINT  NOT NULL,
    expires_at_ms   BIGINT,
    revoked_at_ms   BIGINT,
    last_used_at_ms BIGINT
);

-- The audit trail: one row per RPC, chained by SHA-256 (`hash` covers
-- `prev_hash` and every other column, id included). Ids are dense (1, 2, 3, …),
-- assigned by the store from `audit_chain_head`. Append-only: triggers refuse
-- UPDATE and DELETE.
CREATE TABLE audit_events (
    id                INTEGER PRIMARY KEY,
    at_ms             BIGINT  NOT NULL,
    key_id            TEXT,
    key_label         TEXT,
    method            TEXT    NOT NULL,
    target            TEXT,
    status_code       INTEGER NOT NULL,
    error_kind        TEXT,
    latency_us        BIGINT  NOT NULL,
    prompt_tokens     BIGINT  NOT NULL,
    completion_tokens BIGINT  NOT NULL,
    request_id        TEXT,
    client_addr       TEXT,
    detail            TEXT,
    prev_hash         TEXT    NOT NULL,
    hash              TEXT    NOT NULL
);

CREATE INDEX audit_events_at ON audit_events (at_ms);
CREATE INDEX audit_events_key_id ON audit_events (key_id, id);
CREATE INDEX audit_events_method ON audit_events (method, id);

-- The newest event's id and hash (one row, id = 1): appenders lock it to
-- serialize, and verification compares it with the table so that deleting the
-- last events is detected.
CREATE TABLE audit_chain_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    last_id   BIGINT  NOT NULL,
    last_hash TEXT    NOT NULL
);

INSERT INTO audit_chain_head (id, last_id, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER audit_events_refuse_update
BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: rows cannot be updated');
END;

CREATE TRIGGER audit_events_refuse_delete
BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: rows cannot be deleted');
END;
