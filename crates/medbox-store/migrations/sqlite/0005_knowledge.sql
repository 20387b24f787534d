-- SQLite flavour; keep in step with migrations/postgres (same versions, same
-- tables, columns and indexes). Timestamps are unix milliseconds.

-- The knowledge base's documents (guidelines, hospital protocols). `id` is
-- `kd_` + 12 hex digits. `sha256` is the SHA-256 of the document's text:
-- adding the same text again finds this row and changes nothing. Every
-- chunk of a document was embedded by `embedding_model` (the model's name,
-- not an alias) into vectors of `embedding_dimensions` floats; when the
-- configured model changes, medboxd re-embeds the chunks and updates both.
CREATE TABLE knowledge_documents (
    id                   TEXT   PRIMARY KEY,
    title                TEXT   NOT NULL,
    source               TEXT   NOT NULL,
    format               TEXT   NOT NULL CHECK (format IN ('markdown', 'text')),
    sha256               TEXT   NOT NULL UNIQUE,
    bytes                BIGINT NOT NULL,
    chunk_count          BIGINT NOT NULL,
    embedding_model      TEXT   NOT NULL,
    embedding_dimensions BIGINT NOT NULL,
    created_at_ms        BIGINT NOT NULL,
    updated_at_ms        BIGINT NOT NULL
);

CREATE INDEX knowledge_documents_created_at ON knowledge_documents (created_at_ms);

-- A document's chunks in order (`ordinal` 0, 1, 2, …): the section path
-- (headings joined by " > "), the text, and its embedding as
-- `embedding_dimensions` little-endian IEEE-754 f32 values.
CREATE TABLE knowledge_chunks (
    document_id TEXT   NOT NULL REFERENCES knowledge_documents (id) ON DELETE CASCADE,
    ordinal     BIGINT NOT NULL,
    section     TEXT   NOT NULL,
    text        TEXT   NOT NULL,
    vector      BLOB   NOT NULL,
    PRIMARY KEY (document_id, ordinal)
);
