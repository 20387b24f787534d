//! Opening: URLs, the data directory, SQLite settings, and the errors callers see.

use medbox_store::{Backend, Store};
use sqlx::Row;

use crate::support::TestDb;

on_both_backends!(ping_answers_until_closed);

async fn ping_answers_until_closed(db: &TestDb) {
    let store = db.open().await;
    store.ping().await.expect("ping");
    let clone = store.clone();
    store.close().await;
    let error = clone
        .ping()
        .await
        .expect_err("a closed store refuses queries");
    assert_eq!(error.kind(), "unavailable");
}

#[tokio::test]
async fn data_dir_is_created_and_holds_a_wal_database() {
    let root = tempfile::tempdir().expect("temporary directory");
    let data_dir = root.path().join("var lib").join("medbox");
    let store = Store::open_in_data_dir(&data_dir)
        .await
        .expect("open in data dir");
    assert_eq!(store.backend(), Backend::Sqlite);
    assert_eq!(store.backend().as_str(), "sqlite");
    assert!(data_dir.join("medbox.db").is_file());

    let url = medbox_store::sqlite_url(&data_dir.join("medbox.db"));
    let mut connection = {
        use sqlx::Connection;
        sqlx::AnyConnection::connect(&url).await.expect("connect")
    };
    let journal_mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&mut connection)
        .await
        .expect("journal mode")
        .get(0);
    assert_eq!(journal_mode, "wal");
    store.close().await;

    // Opening the same directory again finds the same database.
    let again = Store::open_in_data_dir(&data_dir).await.expect("reopen");
    again.ping().await.expect("ping");
    again.close().await;
}

#[tokio::test]
async fn open_errors_say_what_to_fix() {
    let check = async |url: &str, expected_kind: &str, expected_message_start: &str| {
        let error = Store::open(url).await.expect_err("open must fail");
        assert_eq!(error.kind(), expected_kind, "{url}: {error}");
        let message = error.to_string();
        assert!(
            message.starts_with(expected_message_start),
            "{url}: {message}"
        );
    };
    check(
        "mysql://127.0.0.1/medbox",
        "unsupported_scheme",
        "unsupported database URL scheme `mysql`: use sqlite:// or postgres://",
    )
    .await;
    check(
        "sqlite:///nonexistent-medbox-dir/medbox.db",
        "open_sqlite",
        "cannot open SQLite database at /nonexistent-medbox-dir/medbox.db: ",
    )
    .await;
    // Port 1 on loopback: nothing listens there; the password is not repeated.
    check(
        "postgres://medbox:s3cret@127.0.0.1:1/medbox",
        "connect_postgres",
        "cannot connect to PostgreSQL at postgres://medbox:***@127.0.0.1:1/medbox: ",
    )
    .await;
}
