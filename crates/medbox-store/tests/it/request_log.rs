//! The request log.

use medbox_store::{NewRequestLog, RequestFilter, RequestLog};
use sqlx::Executor;

use crate::support::TestDb;

on_both_backends!(
    requests_round_trip,
    requests_are_filtered_and_listed_newest_first,
    request_log_rows_cannot_be_updated,
    concurrent_writers_all_succeed,
);

fn entry(started_at_ms: i64, method: &str) -> NewRequestLog {
    NewRequestLog {
        started_at_ms,
        method: method.to_owned(),
        model: None,
        request_id: None,
        status_code: 0,
        error_kind: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        latency_ms: 0.0,
        client_addr: None,
    }
}

fn stored(id: i64, entry: &NewRequestLog) -> RequestLog {
    RequestLog {
        id,
        started_at_ms: entry.started_at_ms,
        method: entry.method.clone(),
        model: entry.model.clone(),
        request_id: entry.request_id.clone(),
        status_code: entry.status_code,
        error_kind: entry.error_kind.clone(),
        prompt_tokens: entry.prompt_tokens,
        completion_tokens: entry.completion_tokens,
        latency_ms: entry.latency_ms,
        client_addr: entry.client_addr.clone(),
    }
}

const GENERATE: &str = "medbox.v1.Inference/Generate";
const CHAT: &str = "medbox.v1.Inference/Chat";

async fn requests_round_trip(db: &TestDb) {
    let store = db.open().await;
    let full = NewRequestLog {
        started_at_ms: 1_763_900_000_123,
        method: GENERATE.to_owned(),
        model: Some("qwen3".to_owned()),
        request_id: Some("req-42".to_owned()),
        status_code: 5,
        error_kind: Some("model_not_found".to_owned()),
        prompt_tokens: 1_234,
        completion_tokens: 5_678_901_234,
        latency_ms: 12.345_678_9,
        client_addr: Some("127.0.0.1:50123".to_owned()),
    };
    let bare = entry(1_763_900_000_124, CHAT);

    let full_id = store.record_request(&full).await.expect("record");
    let bare_id = store.record_request(&bare).await.expect("record");
    assert!(bare_id > full_id, "ids grow");

    let listed = store
        .list_requests(&RequestFilter::default())
        .await
        .expect("list");
    assert_eq!(listed, vec![stored(bare_id, &bare), stored(full_id, &full)]);
    store.close().await;
}

async fn requests_are_filtered_and_listed_newest_first(db: &TestDb) {
    let store = db.open().await;
    let mut ids = Vec::new();
    for (started_at_ms, method) in [
        (1_000, GENERATE),
        (2_000, CHAT),
        (3_000, GENERATE),
        (4_000, CHAT),
        (4_000, GENERATE),
    ] {
        ids.push(
            store
                .record_request(&entry(started_at_ms, method))
                .await
                .expect("record"),
        );
    }

    // (since_ms, method, limit) → the ids expected, newest first; ties on time go by id.
    let check =
        async |since_ms: Option<i64>, method: Option<&str>, limit: u32, expected: &[usize]| {
            let filter = RequestFilter {
                since_ms,
                method: method.map(str::to_owned),
                limit,
            };
            let listed: Vec<i64> = store
                .list_requests(&filter)
                .await
                .expect("list")
                .into_iter()
                .map(|row| row.id)
                .collect();
            let expected: Vec<i64> = expected.iter().map(|&index| ids[index]).collect();
            assert_eq!(listed, expected, "filter {filter:?}");
        };
    check(None, None, 0, &[4, 3, 2, 1, 0]).await;
    check(None, None, 2, &[4, 3]).await;
    check(Some(2_000), None, 0, &[4, 3, 2, 1]).await;
    check(Some(4_001), None, 0, &[]).await;
    check(None, Some(GENERATE), 0, &[4, 2, 0]).await;
    check(Some(2_500), Some(CHAT), 0, &[3]).await;
    check(Some(1_000), Some(GENERATE), 2, &[4, 2]).await;
    check(None, Some("medbox.v1.Admin/Status"), 0, &[]).await;
    store.close().await;
}

async fn request_log_rows_cannot_be_updated(db: &TestDb) {
    let store = db.open().await;
    store
        .record_request(&entry(1_000, GENERATE))
        .await
        .expect("record");
    let mut connection = db.raw_connection().await;
    let error = connection
        .execute("UPDATE request_log SET method = 'rewritten'")
        .await
        .expect_err("the request log is append-only");
    assert!(error.to_string().contains("append-only"), "{error}");
    let listed = store
        .list_requests(&RequestFilter::default())
        .await
        .expect("list");
    assert_eq!(listed[0].method, GENERATE);
    store.close().await;
}

/// Two handles (as two processes would have) and many tasks write at once;
/// on SQLite this must wait for the write lock, never fail with "database is locked".
async fn concurrent_writers_all_succeed(db: &TestDb) {
    const TASKS: i64 = 8;
    const WRITES_PER_TASK: i64 = 40;
    let stores = [db.open().await, db.open().await];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[(task % 2) as usize].clone();
        tasks.spawn(async move {
            for write in 0..WRITES_PER_TASK {
                store
                    .record_request(&entry(task * 1_000 + write, GENERATE))
                    .await
                    .map_err(|error| error.to_string())?;
                if write % 10 == 0 {
                    let model = medbox_store::NewModel {
                        name: format!("model-{}", write % 3),
                        path: format!("/models/{task}/{write}"),
                        kind: "decoder".to_owned(),
                        aliases: vec![format!("alias-{task}")],
                        dtype: None,
                        device: "cpu".to_owned(),
                        source: "admin".to_owned(),
                    };
                    store
                        .upsert_model(&model)
                        .await
                        .map_err(|error| error.to_string())?;
                }
            }
            Ok::<(), String>(())
        });
    }
    while let Some(finished) = tasks.join_next().await {
        finished
            .expect("writer task panicked")
            .expect("every write succeeds");
    }
    let all = RequestFilter {
        limit: 10_000,
        ..RequestFilter::default()
    };
    let listed = stores[0].list_requests(&all).await.expect("list");
    assert_eq!(listed.len() as i64, TASKS * WRITES_PER_TASK);
    assert_eq!(stores[1].list_models().await.expect("list").len(), 3);
    for store in stores {
        store.close().await;
    }
}
