//! Test databases: a temporary SQLite file, or a private schema in the
//! PostgreSQL database named by `MEDBOX_TEST_POSTGRES_URL`.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use medbox_store::{Backend, Store};
use sqlx::{AnyConnection, Connection, Executor};
use tempfile::TempDir;

pub const POSTGRES_URL_VAR: &str = "MEDBOX_TEST_POSTGRES_URL";

pub struct TestDb {
    pub backend: Backend,
    /// What the test hands to `Store::open`.
    pub url: String,
    _sqlite_dir: Option<TempDir>,
    postgres_schema: Option<PostgresSchema>,
}

struct PostgresSchema {
    base_url: String,
    name: String,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let url = medbox_store::sqlite_url(&dir.path().join("medbox.db"));
        TestDb {
            backend: Backend::Sqlite,
            url,
            _sqlite_dir: Some(dir),
            postgres_schema: None,
        }
    }

    /// A fresh schema in the test PostgreSQL database, or `None` (after saying
    /// so) when `MEDBOX_TEST_POSTGRES_URL` is not set.
    pub async fn postgres(test_name: &str) -> Option<TestDb> {
        let Ok(base_url) = std::env::var(POSTGRES_URL_VAR) else {
            println!("skipped: {POSTGRES_URL_VAR} not set");
            return None;
        };
        let name = unique_schema_name(test_name);
        let mut admin = connect(&base_url).await;
        admin
            .execute(format!("CREATE SCHEMA {name}").as_str())
            .await
            .unwrap_or_else(|error| panic!("create schema {name} in {base_url}: {error}"));
        admin.close().await.expect("close the admin connection");

        // `options=-c search_path=<schema>`: every connection of the store works in the schema.
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        Some(TestDb {
            backend: Backend::Postgres,
            url,
            _sqlite_dir: None,
            postgres_schema: Some(PostgresSchema { base_url, name }),
        })
    }

    pub async fn open(&self) -> Store {
        let store = Store::open(&self.url)
            .await
            .unwrap_or_else(|error| panic!("open {}: {error}", self.url));
        assert_eq!(store.backend(), self.backend);
        store
    }

    /// A plain connection to the same database (and schema), for checks the API does not offer.
    pub async fn raw_connection(&self) -> AnyConnection {
        connect(&self.url).await
    }

    /// Drops the PostgreSQL schema; the SQLite directory goes with `self`.
    pub async fn finish(self) {
        let Some(schema) = self.postgres_schema else {
            return;
        };
        let mut admin = connect(&schema.base_url).await;
        admin
            .execute(format!("DROP SCHEMA {} CASCADE", schema.name).as_str())
            .await
            .unwrap_or_else(|error| panic!("drop schema {}: {error}", schema.name));
        admin.close().await.expect("close the admin connection");
    }
}

async fn connect(url: &str) -> AnyConnection {
    sqlx::any::install_default_drivers();
    AnyConnection::connect(url)
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
}

/// `t_<test>_<pid>_<time>_<n>`: unique across tests, runs and machines sharing a server.
fn unique_schema_name(test_name: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    let short_name: String = test_name.chars().take(32).collect();
    format!(
        "t_{short_name}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
