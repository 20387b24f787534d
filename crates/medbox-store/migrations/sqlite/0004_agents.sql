-- SQLite flavour; keep in step with migrations/postgres (same versions, same
-- tables, columns and indexes). Timestamps are unix milliseconds. JSON
-- columns hold documents medboxd writes and reads; the store keeps them as
-- text and does not look inside.

-- Every version of every agent spec medboxd has served: loaded from the
-- specs folder at start (`origin` file) or created and updated through the
-- API (`origin` api). The newest version of an id is the one that runs.
CREATE TABLE agent_spec_versions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id      TEXT    NOT NULL,
    version       BIGINT  NOT NULL,
    spec_toml     TEXT    NOT NULL,
    origin        TEXT    NOT NULL CHECK (origin IN ('file', 'api')),
    created_at_ms BIGINT  NOT NULL,
    UNIQUE (agent_id, version)
);

-- Multi-turn sessions with one agent. `id` is `ses_` + 12 hex digits. The
-- patient bundle (FHIR R4 JSON), when given, is read by every turn.
CREATE TABLE agent_sessions (
    id                  TEXT   PRIMARY KEY,
    agent_id            TEXT   NOT NULL,
    patient_bundle_json TEXT,
    created_at_ms       BIGINT NOT NULL,
    updated_at_ms       BIGINT NOT NULL
);

-- A session's history: per turn the user's input and the agent's answer,
-- both JSON text, in order.
CREATE TABLE agent_session_messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id    TEXT    NOT NULL REFERENCES agent_sessions (id),
    turn          BIGINT  NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
    content       TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    UNIQUE (session_id, turn, role)
);

-- Every agent run: its status, the models that answered (JSON array), the
-- whole trace (JSON array of steps) and timings. `id` is `run_` + 12 hex.
CREATE TABLE agent_runs (
    id             TEXT   PRIMARY KEY,
    agent_id       TEXT   NOT NULL,
    agent_version  BIGINT NOT NULL,
    session_id     TEXT,
    request_id     TEXT,
    status         TEXT   NOT NULL,
    models         TEXT   NOT NULL,
    trace          TEXT   NOT NULL,
    output         TEXT,
    started_at_ms  BIGINT NOT NULL,
    elapsed_ms     BIGINT NOT NULL
);

CREATE INDEX agent_runs_agent ON agent_runs (agent_id, started_at_ms);
CREATE INDEX agent_runs_session ON agent_runs (session_id, started_at_ms);

-- Follow-ups an agent scheduled (the `schedule_follow_up` tool). `id` is
-- `fu_` + 12 hex digits; `due_at_ms` is when the patient should be contacted.
CREATE TABLE follow_ups (
    id            TEXT   PRIMARY KEY,
    run_id        TEXT   NOT NULL,
    agent_id      TEXT   NOT NULL,
    session_id    TEXT,
    due_at_ms     BIGINT NOT NULL,
    interval_days BIGINT NOT NULL,
    channel       TEXT   NOT NULL,
    reason        TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX follow_ups_due ON follow_ups (due_at_ms);
