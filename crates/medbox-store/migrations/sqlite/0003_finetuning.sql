-- SQLite flavour; keep in step with migrations/postgres (same versions, same
-- tables, columns and indexes). Timestamps are unix milliseconds.
-- JSON columns hold documents medboxd writes and reads; the store keeps them
-- as text and does not look inside.

-- Uploaded fine-tuning datasets. `id` is `ds_` + 12 hex digits. An accepted
-- dataset was de-identified and split; its files are in `path` and `sha256`
-- is the SHA-256 of its canonical de-identified JSONL. A rejected one keeps
-- only its report (bad lines by number and reason, never their content) and
-- no file: it cannot be trained on. Several uploads may share a name; the
-- newest is the one the name means.
CREATE TABLE datasets (
    id             TEXT    PRIMARY KEY,
    name           TEXT    NOT NULL,
    format         TEXT    NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('accepted', 'rejected')),
    sha256         TEXT,
    path           TEXT,
    bytes          BIGINT  NOT NULL,
    lines          BIGINT  NOT NULL,
    blank_lines    BIGINT  NOT NULL,
    valid_lines    BIGINT  NOT NULL,
    invalid_lines  BIGINT  NOT NULL,
    train_examples BIGINT  NOT NULL,
    eval_examples  BIGINT  NOT NULL,
    eval_percent   INTEGER NOT NULL,
    split_seed     BIGINT  NOT NULL,
    deid_counts    TEXT    NOT NULL,
    report         TEXT    NOT NULL,
    created_at_ms  BIGINT  NOT NULL
);

CREATE INDEX datasets_name ON datasets (name, created_at_ms);

-- Registered results of fine-tuning: one row per version of a name
-- (1, 2, 3, …), each a folder under <data_dir>/models/<name>/<version> with a
-- manifest whose SHA-256 is `manifest_sha256`. `kind` is adapter (PEFT) or
-- merged (a whole model folder).
CREATE TABLE model_versions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    version         BIGINT  NOT NULL,
    base_model      TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('adapter', 'merged')),
    path            TEXT    NOT NULL,
    manifest_sha256 TEXT    NOT NULL,
    metrics         TEXT    NOT NULL,
    job_id          TEXT,
    dataset_id      TEXT,
    created_at_ms   BIGINT  NOT NULL,
    UNIQUE (name, version)
);

-- Fine-tuning jobs. `id` is `job_` + 12 hex digits. States: queued → running
-- → succeeded | failed | cancelled (queued → cancelled too; a running job
-- left by a stopped medboxd is started again, `attempts` counts the starts).
-- `error` is the message shown to clients, never internal detail.
CREATE TABLE jobs (
    id                 TEXT    PRIMARY KEY,
    state              TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    method             TEXT    NOT NULL,
    base_model         TEXT    NOT NULL,
    base_model_path    TEXT    NOT NULL,
    teacher_model      TEXT,
    teacher_model_path TEXT,
    dataset_id         TEXT    NOT NULL REFERENCES datasets (id),
    hyperparameters    TEXT    NOT NULL,
    seed               BIGINT  NOT NULL,
    checkpoint_every   BIGINT  NOT NULL,
    output_name        TEXT    NOT NULL,
    error              TEXT,
    attempts           BIGINT  NOT NULL,
    last_step          BIGINT  NOT NULL,
    total_steps        BIGINT  NOT NULL,
    model_version_id   BIGINT  REFERENCES model_versions (id),
    created_at_ms      BIGINT  NOT NULL,
    started_at_ms      BIGINT,
    finished_at_ms     BIGINT,
    updated_at_ms      BIGINT  NOT NULL
);

CREATE INDEX jobs_state ON jobs (state, created_at_ms);
CREATE INDEX jobs_created_at ON jobs (created_at_ms);

-- What happened to each job, in order: state changes and the trainer's
-- progress, evaluations and checkpoints. Append-only: a trigger refuses UPDATE.
CREATE TABLE job_events (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id            TEXT    NOT NULL REFERENCES jobs (id),
    at_ms             BIGINT  NOT NULL,
    kind              TEXT    NOT NULL CHECK (kind IN ('state', 'progress', 'eval', 'checkpoint')),
    state             TEXT,
    message           TEXT,
    step              BIGINT,
    total_steps       BIGINT,
    epoch             REAL,
    loss              REAL,
    learning_rate     REAL,
    tokens_per_second REAL,
    eval_loss         REAL,
    eta_seconds       REAL
);

CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TRIGGER job_events_append_only
BEFORE UPDATE ON job_events
BEGIN
    SELECT RAISE(ABORT, 'job_events is append-only: rows cannot be updated');
END;
