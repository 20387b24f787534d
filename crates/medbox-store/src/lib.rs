//! `medbox-store`: the database behind medboxd, SQLite on one box or
//! PostgreSQL for a site that already runs one.
//!
//! The crate owns the schema (embedded migrations, applied by [`Store::open`])
//! and one typed repository per concern: the model registry ([`models`]), the
//! per-RPC request log ([`request_log`]), API keys ([`api_keys`]), the
//! hash-chained audit trail ([`audit`]), and fine-tuning: uploaded datasets
//! ([`datasets`]), jobs with their append-only events ([`jobs`]) and the
//! model versions they produce ([`model_versions`]); agents ([`agents`]):
//! spec versions, multi-turn sessions with their history, runs with their
//! traces, and scheduled follow-ups; and the knowledge base's documents with
//! their embedded chunks ([`knowledge`]).
//!
//! **Architecture Invariant:** only this crate knows SQL. Callers see typed
//! records and [`StoreError`]; no SQL string, row or pool crosses the API.
//!
//! **Architecture Invariant:** one code path serves both backends. Queries go
//! through one `sqlx::AnyPool` with `$1` placeholders and portable SQL; the only
//! per-backend code is connection set-up and the choice of migration folder.
//! `migrations/sqlite` and `migrations/postgres` hold the same versions, tables,
//! columns and indexes, differing only in DDL spelling (a unit test checks the
//! versions and names match).
//!
//! **Architecture Invariant:** audit-style tables (`request_log`,
//! `audit_events`, `job_events`) are append-only. The store offers no update or delete for
//! them, and the schema refuses `UPDATE` with a trigger (`audit_events` also
//! `DELETE`, and on PostgreSQL `TRUNCATE`).
//!
//! **Architecture Invariant:** the audit trail is a hash chain with dense ids.
//! Each event's SHA-256 covers the previous event's hash and all its own
//! columns in a fixed, length-prefixed encoding ([`AuditEvent::expected_hash`]);
//! ids are assigned by the store, never by a sequence; appends are serialized
//! through the one-row `audit_chain_head` (SQLite `BEGIN IMMEDIATE`, PostgreSQL
//! its row lock), which also records the newest id and hash so that
//! [`Store::verify_audit_chain`] notices edited, missing, reordered and
//! truncated-at-the-end events.
//!
//! **Architecture Invariant:** API key secrets are never stored. Only their
//! SHA-256 is, and it is compared in constant time; records and `Debug`
//! output never carry the secret or its hash.
//!
//! **Architecture Invariant:** a job's state and its event log never
//! disagree: every state change is a conditional update (it happens only from
//! the states the caller names) that appends its `state` event in the same
//! transaction, and a job's success commits together with its model version.
//!
//! **Architecture Invariant:** timestamps are `BIGINT` unix milliseconds, taken
//! from the medboxd clock, never from the database's.
//!
//! A database written by a newer medboxd (it has migrations this build does not
//! know) is refused at open with [`StoreError::SchemaTooNew`], never modified.
//!
//! **API Boundary:** no gRPC or serialization here; records are plain structs and
//! are deliberately not `Serialize`.

pub mod agents;
pub mod api_keys;
pub mod audit;
pub mod datasets;
mod error;
pub mod jobs;
pub mod knowledge;
pub mod model_versions;
pub mod models;
pub mod request_log;

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    AnyPool, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

pub use agents::{
    AgentRunRecord, AgentSessionRecord, AgentSpecVersionRecord, FollowUpRecord, NewAgentRun,
    NewFollowUp, SessionMessageRecord, SessionRole, SpecOrigin,
};
pub use api_keys::{ApiKeyRecord, CreatedApiKey, KeyCheck, NewApiKey, SCOPES};
pub use audit::{AuditEvent, AuditFilter, AuditHead, ChainVerdict, GENESIS_HASH, NewAuditEvent};
pub use datasets::{DatasetRecord, DatasetState, NewDataset};
pub use error::StoreError;
pub use jobs::{
    JobEventKind, JobEventRecord, JobFilter, JobRecord, JobState, JobTransition, NewJob,
};
pub use knowledge::{
    KnowledgeChunkRecord, KnowledgeDocumentRecord, KnowledgeInsert, NewKnowledgeChunk,
    NewKnowledgeDocument,
};
pub use model_versions::{ModelVersionRecord, NewModelVersion};
pub use models::{ModelRecord, NewModel};
pub use request_log::{NewRequestLog, RequestFilter, RequestLog};

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The SQLite file inside `data_dir`.
pub const SQLITE_FILE_NAME: &str = "medbox.db";

/// How long a SQLite writer waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite serializes writers anyway; a few connections let readers run beside them.
const SQLITE_MAX_CONNECTIONS: u32 = 8;
const POSTGRES_MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        }
    }
}

/// A handle on the database. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens `url` and applies any pending migrations.
    ///
    /// `url` is `sqlite://PATH` (the file is created if missing; WAL journal,
    /// foreign keys on, a busy timeout so concurrent writers wait rather than
    /// fail) or `postgres://…` / `postgresql://…`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let store = match DatabaseUrl::parse(url)? {
            DatabaseUrl::Sqlite { path, connect_url } => open_sqlite(&path, &connect_url).await?,
            DatabaseUrl::Postgres { url } => open_postgres(&url).await?,
        };
        store
            .backend
            .migrator()
            .run(&store.pool)
            .await
            .map_err(StoreError::migrate)?;
        tracing::debug!(
            backend = store.backend.as_str(),
            "database migrations applied"
        );
        Ok(store)
    }

    /// Opens the SQLite file `<data_dir>/medbox.db`, creating `data_dir` if needed.
    pub async fn open_in_data_dir(data_dir: &Path) -> Result<Store, StoreError> {
        let create_error = |source| StoreError::CreateDataDir {
            path: data_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(create_error)?;
        // An absolute path: the URL names the same file whatever the working directory, and messages show where it is.
        let data_dir = std::fs::canonicalize(data_dir).map_err(create_error)?;
        let path = data_dir.join(SQLITE_FILE_NAME);
        Store::open(&sqlite_url(&path)).await
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("pinging the database"))?;
        Ok(())
    }

    /// Waits for queries in flight, then closes every connection. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The newest migration applied to this database (`None` on an empty one).
    pub async fn schema_version(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::query("reading the schema version"))
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// The newest schema version this build knows (the last embedded migration).
pub fn latest_schema_version() -> i64 {
    SQLITE_MIGRATOR
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or(0)
}

/// The `sqlite://` URL for a file path, escaping the characters the URL syntax reserves.
pub fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for character in path.to_string_lossy().chars() {
        match character {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            character => url.push(character),
        }
    }
    url
}

async fn open_sqlite(path: &str, connect_url: &str) -> Result<Store, StoreError> {
    let open_error = |source| StoreError::OpenSqlite {
        path: path.to_owned(),
        source,
    };
    let options: AnyConnectOptions = connect_url.parse().map_err(open_error)?;
    let pool = AnyPoolOptions::new()
        .max_connections(SQLITE_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _metadata| {
            Box::pin(async move {
                // sqlx sets both by default; stating them keeps the invariants visible here.
                connection.execute("PRAGMA foreign_keys = ON").await?;
                let busy_timeout =
                    format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                connection.execute(busy_timeout.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(open_error)?;
    // The journal mode is stored in the file, so it is set once here rather than
    // per connection (switching needs an exclusive lock that busy_timeout cannot wait for).
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
        .fetch_one(&pool)
        .await
        .map_err(open_error)?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path, journal_mode, "SQLite database is not in WAL mode");
    }
    Ok(Store {
        pool,
        backend: Backend::Sqlite,
    })
}

async fn open_postgres(url: &str) -> Result<Store, StoreError> {
    let connect_error = |source| StoreError::ConnectPostgres {
        url: mask_password(url),
        source,
    };
    let options: AnyConnectOptions = url.parse().map_err(connect_error)?;
    let pool = AnyPoolOptions::new()
        .max_connections(POSTGRES_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(connect_error)?;
    Ok(Store {
        pool,
        backend: Backend::Postgres,
    })
}

/// A database URL, classified by scheme.
#[derive(Debug, PartialEq, Eq)]
enum DatabaseUrl {
    Sqlite {
        /// The file path as written in the URL, for messages.
        path: String,
        /// The URL handed to sqlx, with `mode=rwc` added unless a mode was given.
        connect_url: String,
    },
    Postgres {
        url: String,
    },
}

impl DatabaseUrl {
    fn parse(url: &str) -> Result<DatabaseUrl, StoreError> {
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(StoreError::UnsupportedScheme {
                scheme: "(none)".to_owned(),
            });
        };
        match scheme {
            "sqlite" => {
                let rest = rest.strip_prefix("//").unwrap_or(rest);
                let (path, params) = match rest.split_once('?') {
                    Some((path, params)) => (path, Some(params)),
                    None => (rest, None),
                };
                let connect_url = match params {
                    None => format!("{url}?mode=rwc"),
                    Some(params) if params.split('&').any(|param| param.starts_with("mode=")) => {
                        url.to_owned()
                    }
                    Some(_) => format!("{url}&mode=rwc"),
                };
                Ok(DatabaseUrl::Sqlite {
                    path: path.to_owned(),
                    connect_url,
                })
            }
            "postgres" | "postgresql" => Ok(DatabaseUrl::Postgres {
                url: url.to_owned(),
            }),
            scheme => Err(StoreError::UnsupportedScheme {
                scheme: scheme.to_owned(),
            }),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages and logs.
fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

/// A fresh public id: `prefix` + 12 random hex digits (48 bits from the
/// operating system's CSPRNG).
pub(crate) fn random_id(prefix: &str) -> Result<String, StoreError> {
    Ok(format!("{prefix}{}", api_keys::random_hex(6)?))
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_url(url: &str, expected: Result<DatabaseUrl, &str>) {
        let actual = DatabaseUrl::parse(url).map_err(|error| error.to_string());
        assert_eq!(actual, expected.map_err(str::to_owned), "url: {url}");
    }

    fn sqlite(path: &str, connect_url: &str) -> Result<DatabaseUrl, &'static str> {
        Ok(DatabaseUrl::Sqlite {
            path: path.to_owned(),
            connect_url: connect_url.to_owned(),
        })
    }

    #[test]
    fn database_urls_are_classified_by_scheme() {
        check_url(
            "sqlite:///var/lib/medbox/medbox.db",
            sqlite(
                "/var/lib/medbox/medbox.db",
                "sqlite:///var/lib/medbox/medbox.db?mode=rwc",
            ),
        );
        check_url(
            "sqlite://data/medbox.db?cache=shared",
            sqlite(
                "data/medbox.db",
                "sqlite://data/medbox.db?cache=shared&mode=rwc",
            ),
        );
        check_url(
            "sqlite:medbox.db?mode=ro",
            sqlite("medbox.db", "sqlite:medbox.db?mode=ro"),
        );
        check_url(
            "postgres://medbox@127.0.0.1:54329/medbox_test",
            Ok(DatabaseUrl::Postgres {
                url: "postgres://medbox@127.0.0.1:54329/medbox_test".to_owned(),
            }),
        );
        check_url(
            "postgresql://db/medbox",
            Ok(DatabaseUrl::Postgres {
                url: "postgresql://db/medbox".to_owned(),
            }),
        );
        check_url(
            "mysql://db/medbox",
            Err("unsupported database URL scheme `mysql`: use sqlite:// or postgres://"),
        );
        check_url(
            "/var/lib/medbox/medbox.db",
            Err("unsupported database URL scheme `(none)`: use sqlite:// or postgres://"),
        );
    }

    #[test]
    fn passwords_are_masked() {
        let check = |url: &str, expected: &str| assert_eq!(mask_password(url), expected);
        check(
            "postgres://medbox:s3cret@db:5432/medbox",
            "postgres://medbox:***@db:5432/medbox",
        );
        check("postgres://medbox@db/medbox", "postgres://medbox@db/medbox");
        check("postgres://db/medbox?user=a", "postgres://db/medbox?user=a");
        check("postgres://u:p@ss@db/x", "postgres://u:***@db/x");
    }

    #[test]
    fn sqlite_url_escapes_reserved_characters() {
        assert_eq!(
            sqlite_url(Path::new("/tmp/a b/medbox.db")),
            "sqlite:///tmp/a b/medbox.db"
        );
        assert_eq!(
            sqlite_url(Path::new("/tmp/50%?#/m.db")),
            "sqlite:///tmp/50%25%3F%23/m.db"
        );
    }

    #[test]
    fn both_migration_folders_hold_the_same_versions() {
        let versions = |migrator: &Migrator| -> Vec<(i64, String)> {
            migrator
                .iter()
                .map(|migration| (migration.version, migration.description.to_string()))
                .collect()
        };
        assert!(SQLITE_MIGRATOR.iter().next().is_some());
        assert_eq!(versions(&SQLITE_MIGRATOR), versions(&POSTGRES_MIGRATOR));
    }

    #[test]
    fn backend_labels() {
        assert_eq!(Backend::Sqlite.as_str(), "sqlite");
        assert_eq!(Backend::Postgres.as_str(), "postgres");
    }
}
