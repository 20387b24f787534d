//! Migrations: applied at open, once, and never onto a newer schema.

use sqlx::{Executor, Row};

use crate::support::TestDb;

on_both_backends!(reopening_applies_migrations_once, newer_schema_is_refused);

async fn reopening_applies_migrations_once(db: &TestDb) {
    let first = db.open().await;
    assert_eq!(
        first.schema_version().await.expect("schema version"),
        Some(medbox_store::latest_schema_version())
    );
    first.close().await;

    // Opening again, and from two handles at once, finds nothing to do and keeps the data.
    let (second, third) = tokio::join!(db.open(), db.open());
    second.ping().await.expect("ping");
    third.ping().await.expect("ping");
    assert_eq!(
        second.schema_version().await.expect("schema version"),
        Some(medbox_store::latest_schema_version())
    );

    let mut connection = db.raw_connection().await;
    let applied = connection
        .fetch_all("SELECT version FROM _sqlx_migrations ORDER BY version")
        .await
        .expect("read applied migrations");
    let versions: Vec<i64> = applied.iter().map(|row| row.get(0)).collect();
    assert_eq!(
        versions.last().copied(),
        Some(medbox_store::latest_schema_version())
    );
    let mut distinct = versions.clone();
    distinct.dedup();
    assert_eq!(versions, distinct, "each migration is recorded once");
    second.close().await;
    third.close().await;
}

async fn newer_schema_is_refused(db: &TestDb) {
    db.open().await.close().await;
    let future_version: i64 = 99_990_001;
    let mut connection = db.raw_connection().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(future_version)
    .bind("from a newer medboxd")
    .bind(true)
    .bind(vec![0_u8; 48])
    .bind(0_i64)
    .execute(&mut connection)
    .await
    .expect("pretend a newer medboxd migrated this database");

    let error = medbox_store::Store::open(&db.url)
        .await
        .expect_err("a database from a newer medboxd must be refused");
    assert_eq!(error.kind(), "schema_too_new");
    assert_eq!(
        error.to_string(),
        "database schema is newer than this medboxd (migration 99990001); upgrade medboxd"
    );
}
