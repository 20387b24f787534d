//! Integration tests for medbox-store: every repository test runs against
//! SQLite (a temporary file) and against PostgreSQL when
//! `MEDBOX_TEST_POSTGRES_URL` is set (`scripts/postgres.sh` starts one and
//! prints its URL). Each PostgreSQL test works in a schema of its own, dropped
//! at the end, so tests run in parallel without meeting.

/// Defines, for each named `async fn(&TestDb)`, a module with two tests:
/// `<name>::sqlite` and `<name>::postgres`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let db = crate::support::TestDb::sqlite().await;
                    super::$test(&db).await;
                    db.finish().await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    let Some(db) = crate::support::TestDb::postgres(stringify!($test)).await else {
                        return;
                    };
                    super::$test(&db).await;
                    db.finish().await;
                }
            }
        )*
    };
}

mod agents;
mod api_keys;
mod audit;
mod finetuning;
mod knowledge;
mod migrations;
mod models;
mod open;
mod request_log;
mod support;
