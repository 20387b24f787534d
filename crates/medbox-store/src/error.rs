//! The store's one error type. Each message says what went wrong and what to
//! do about it; [`StoreError::kind`] gives a stable label for metrics and logs.

use std::path::PathBuf;

use sqlx::migrate::MigrateError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL scheme `{scheme}`: use sqlite:// or postgres://")]
    UnsupportedScheme { scheme: String },

    #[error("cannot create data directory {path}: {source}")]
    CreateDataDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot open SQLite database at {path}: {source}")]
    OpenSqlite { path: String, source: sqlx::Error },

    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    ConnectPostgres {
        /// The URL with its password masked.
        url: String,
        source: sqlx::Error,
    },

    #[error("database schema is newer than this medboxd (migration {version}); upgrade medboxd")]
    SchemaTooNew { version: i64 },

    #[error(
        "database migration {version} was interrupted by an earlier run; restore the database from a backup"
    )]
    MigrationInterrupted { version: i64 },

    #[error(
        "database migration {version} was changed after it was applied; restore the migration file or the database"
    )]
    MigrationChanged { version: i64 },

    #[error("cannot apply database migrations: {source}")]
    Migrate { source: MigrateError },

    #[error(
        "alias `{alias}` of model `{model}` is invalid: aliases must be non-empty and cannot contain commas"
    )]
    InvalidAlias { model: String, alias: String },

    #[error("unknown API key scope `{scope}`: scopes are inference, agents, finetune and admin")]
    UnknownScope { scope: String },

    #[error("an API key needs at least one scope (inference, agents, finetune or admin)")]
    NoScopes,

    #[error("the operating system's random number generator failed: {message}")]
    Randomness { message: String },

    #[error(
        "the audit chain head (table audit_chain_head) is missing; the audit trail was tampered with or the schema damaged"
    )]
    AuditHeadMissing,

    #[error(
        "a job's state changes only through transition_job or complete_job, never as a plain event"
    )]
    StateEventOutsideTransition,

    #[error("database unavailable while {operation}: {source}; check that the database is running")]
    Unavailable {
        operation: &'static str,
        source: sqlx::Error,
    },

    #[error("database query failed while {operation}: {source}")]
    Query {
        operation: &'static str,
        source: sqlx::Error,
    },
}

impl StoreError {
    /// A short stable label (snake_case) for metrics, audit rows and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::UnsupportedScheme { .. } => "unsupported_scheme",
            StoreError::CreateDataDir { .. } => "create_data_dir",
            StoreError::OpenSqlite { .. } => "open_sqlite",
            StoreError::ConnectPostgres { .. } => "connect_postgres",
            StoreError::SchemaTooNew { .. } => "schema_too_new",
            StoreError::MigrationInterrupted { .. } => "migration_interrupted",
            StoreError::MigrationChanged { .. } => "migration_changed",
            StoreError::Migrate { .. } => "migrate",
            StoreError::InvalidAlias { .. } => "invalid_alias",
            StoreError::UnknownScope { .. } => "unknown_scope",
            StoreError::NoScopes => "no_scopes",
            StoreError::Randomness { .. } => "randomness",
            StoreError::AuditHeadMissing => "audit_head_missing",
            StoreError::StateEventOutsideTransition => "state_event_outside_transition",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Query { .. } => "query",
        }
    }

    /// Wraps a failed query: lost connections and pool exhaustion become
    /// [`StoreError::Unavailable`] (worth retrying), anything else [`StoreError::Query`].
    pub(crate) fn query(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| match source {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                StoreError::Unavailable { operation, source }
            }
            source => StoreError::Query { operation, source },
        }
    }

    pub(crate) fn migrate(source: MigrateError) -> StoreError {
        match source {
            MigrateError::VersionMissing(version) => StoreError::SchemaTooNew { version },
            MigrateError::Dirty(version) => StoreError::MigrationInterrupted { version },
            MigrateError::VersionMismatch(version) => StoreError::MigrationChanged { version },
            source => StoreError::Migrate { source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(error: StoreError, expected_kind: &str, expected_message: &str) {
        assert_eq!(error.kind(), expected_kind);
        assert_eq!(error.to_string(), expected_message);
    }

    #[test]
    fn messages_say_what_to_fix() {
        check(
            StoreError::UnsupportedScheme {
                scheme: "mysql".into(),
            },
            "unsupported_scheme",
            "unsupported database URL scheme `mysql`: use sqlite:// or postgres://",
        );
        check(
            StoreError::migrate(MigrateError::VersionMissing(7)),
            "schema_too_new",
            "database schema is newer than this medboxd (migration 7); upgrade medboxd",
        );
        check(
            StoreError::migrate(MigrateError::Dirty(2)),
            "migration_interrupted",
            "database migration 2 was interrupted by an earlier run; restore the database from a backup",
        );
        check(
            StoreError::query("listing models")(sqlx::Error::PoolTimedOut),
            "unavailable",
            "database unavailable while listing models: pool timed out while waiting for an open connection; check that the database is running",
        );
        check(
            StoreError::query("listing models")(sqlx::Error::RowNotFound),
            "query",
            "database query failed while listing models: no rows returned by a query that expected to return at least one row",
        );
    }
}
