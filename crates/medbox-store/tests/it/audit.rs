//! The audit trail: append, list, concurrency, and tamper evidence.

use medbox_store::{
    AuditEvent, AuditFilter, Backend, ChainVerdict, GENESIS_HASH, NewAuditEvent, Store,
};
use sqlx::{AnyConnection, Executor};

use crate::support::TestDb;

on_both_backends!(
    events_round_trip_and_chain,
    events_are_filtered_and_paged,
    audit_rows_cannot_be_updated_or_deleted,
    concurrent_appenders_make_one_chain,
    an_edited_event_is_found,
    a_deleted_middle_event_is_found,
    a_deleted_last_event_is_found,
    reordered_events_are_found,
    rewritten_and_forged_events_are_found,
);

const GENERATE: &str = "medbox.v1.Inference/Generate";
const CHAT: &str = "medbox.v1.Inference/Chat";

fn event(at_ms: i64, method: &str) -> NewAuditEvent {
    NewAuditEvent {
        at_ms,
        method: method.to_owned(),
        ..NewAuditEvent::default()
    }
}

async fn verify(store: &Store) -> ChainVerdict {
    store.verify_audit_chain().await.expect("verify")
}

fn intact(checked: u64) -> ChainVerdict {
    ChainVerdict {
        ok: true,
        checked,
        first_broken_id: None,
        reason: None,
    }
}

async fn events_round_trip_and_chain(db: &TestDb) {
    let store = db.open().await;
    assert_eq!(verify(&store).await, intact(0), "an empty trail is intact");
    let full = NewAuditEvent {
        at_ms: 1_763_900_000_123,
        key_id: Some("mbk_0123456789ab".to_owned()),
        key_label: Some("radiology, reporting".to_owned()),
        method: GENERATE.to_owned(),
        target: Some("qwen3".to_owned()),
        status_code: 8,
        error_kind: Some("rate_limited".to_owned()),
        latency_us: 12_345_678,
        prompt_tokens: 1_234,
        completion_tokens: 5_678_901_234,
        request_id: Some("req-42".to_owned()),
        client_addr: Some("[::1]:50123".to_owned()),
        detail: Some("prompt: ünïcode ✓\nline two".to_owned()),
    };
    let first = store.append_audit_event(&full).await.expect("append");
    let second = store
        .append_audit_event(&event(1_763_900_000_124, CHAT))
        .await
        .expect("append");
    assert_eq!((first.id, second.id), (1, 2));
    assert_eq!(first.prev_hash, GENESIS_HASH);
    assert_eq!(second.prev_hash, first.hash);
    assert_eq!(first.hash, first.expected_hash());
    assert_eq!(first.detail, full.detail);
    assert_eq!(first.completion_tokens, 5_678_901_234);

    let listed = store
        .list_audit_events(&AuditFilter::default())
        .await
        .expect("list");
    assert_eq!(listed, vec![first, second.clone()]);
    let head = store.audit_chain_head().await.expect("head");
    assert_eq!((head.last_id, head.last_hash), (2, second.hash));
    assert_eq!(verify(&store).await, intact(2));

    // A second handle (another process) continues the same chain.
    store.close().await;
    let reopened = db.open().await;
    let third = reopened
        .append_audit_event(&event(3, CHAT))
        .await
        .expect("append");
    assert_eq!((third.id, third.prev_hash), (3, listed[1].hash.clone()));
    assert_eq!(verify(&reopened).await, intact(3));
    reopened.close().await;
}

async fn events_are_filtered_and_paged(db: &TestDb) {
    let store = db.open().await;
    // (at_ms, method, key, status) for ids 1..=6.
    let rows = [
        (1_000, GENERATE, Some("mbk_a"), 0),
        (2_000, CHAT, Some("mbk_b"), 0),
        (3_000, GENERATE, None, 16),
        (4_000, CHAT, Some("mbk_a"), 7),
        (4_000, GENERATE, Some("mbk_a"), 0),
        (5_000, GENERATE, Some("mbk_b"), 7),
    ];
    for (at_ms, method, key, status_code) in rows {
        store
            .append_audit_event(&NewAuditEvent {
                key_id: key.map(str::to_owned),
                status_code,
                ..event(at_ms, method)
            })
            .await
            .expect("append");
    }
    let ids = async |filter: AuditFilter| -> Vec<i64> {
        store
            .list_audit_events(&filter)
            .await
            .expect("list")
            .into_iter()
            .map(|event| event.id)
            .collect()
    };
    let all = AuditFilter::default();
    assert_eq!(ids(all.clone()).await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        ids(AuditFilter {
            since_ms: Some(3_000),
            ..all.clone()
        })
        .await,
        [3, 4, 5, 6]
    );
    assert_eq!(
        ids(AuditFilter {
            until_ms: Some(4_000),
            ..all.clone()
        })
        .await,
        [1, 2, 3]
    );
    assert_eq!(
        ids(AuditFilter {
            since_ms: Some(2_000),
            until_ms: Some(4_001),
            ..all.clone()
        })
        .await,
        [2, 3, 4, 5]
    );
    assert_eq!(
        ids(AuditFilter {
            key_id: Some("mbk_a".into()),
            ..all.clone()
        })
        .await,
        [1, 4, 5]
    );
    assert_eq!(
        ids(AuditFilter {
            method: Some(CHAT.into()),
            ..all.clone()
        })
        .await,
        [2, 4]
    );
    assert_eq!(
        ids(AuditFilter {
            status_code: Some(7),
            ..all.clone()
        })
        .await,
        [4, 6]
    );
    assert_eq!(
        ids(AuditFilter {
            status_code: Some(0),
            ..all.clone()
        })
        .await,
        [1, 2, 5]
    );
    assert_eq!(
        ids(AuditFilter {
            key_id: Some("mbk_b".into()),
            method: Some(GENERATE.into()),
            status_code: Some(7),
            since_ms: Some(1),
            until_ms: Some(10_000),
            ..all.clone()
        })
        .await,
        [6]
    );
    assert!(
        ids(AuditFilter {
            key_id: Some("mbk_none".into()),
            ..all.clone()
        })
        .await
        .is_empty()
    );

    // Export paging: pages of 2 with the last id as the cursor, also under a filter.
    let mut pages = Vec::new();
    let mut after_id = None;
    loop {
        let page = ids(AuditFilter {
            after_id,
            limit: 2,
            ..all.clone()
        })
        .await;
        let Some(&last) = page.last() else { break };
        after_id = Some(last);
        pages.push(page);
    }
    assert_eq!(pages, [vec![1, 2], vec![3, 4], vec![5, 6]]);
    assert_eq!(
        ids(AuditFilter {
            after_id: Some(1),
            limit: 2,
            method: Some(GENERATE.into()),
            ..all
        })
        .await,
        [3, 5]
    );
    store.close().await;
}

async fn audit_rows_cannot_be_updated_or_deleted(db: &TestDb) {
    let store = db.open().await;
    store
        .append_audit_event(&event(1, GENERATE))
        .await
        .expect("append");
    let mut connection = db.raw_connection().await;
    for sql in [
        "UPDATE audit_events SET method = 'rewritten'",
        "DELETE FROM audit_events",
    ] {
        let error = connection.execute(sql).await.expect_err("append-only");
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    if db.backend == Backend::Postgres {
        let error = connection
            .execute("TRUNCATE audit_events")
            .await
            .expect_err("append-only");
        assert!(error.to_string().contains("append-only"), "{error}");
    }
    assert_eq!(verify(&store).await, intact(1));
    store.close().await;
}

/// Eight tasks on two handles (as two processes would be) append at once:
/// every append succeeds and the result is one unbroken chain 1..=N.
async fn concurrent_appenders_make_one_chain(db: &TestDb) {
    const TASKS: i64 = 8;
    const APPENDS_PER_TASK: i64 = 25;
    let stores = [db.open().await, db.open().await];
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = stores[(task % 2) as usize].clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for append in 0..APPENDS_PER_TASK {
                let stored = store
                    .append_audit_event(&NewAuditEvent {
                        request_id: Some(format!("{task}-{append}")),
                        ..event(task * 1_000 + append, GENERATE)
                    })
                    .await
                    .map_err(|error| error.to_string())?;
                ids.push(stored.id);
            }
            Ok::<Vec<i64>, String>(ids)
        });
    }
    let mut all_ids = Vec::new();
    while let Some(finished) = tasks.join_next().await {
        let ids = finished
            .expect("appender panicked")
            .expect("every append succeeds");
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "ids grow per task"
        );
        all_ids.extend(ids);
    }
    all_ids.sort_unstable();
    let total = TASKS * APPENDS_PER_TASK;
    assert_eq!(all_ids, (1..=total).collect::<Vec<_>>());

    let events = stores[1]
        .list_audit_events(&AuditFilter {
            limit: 10_000,
            ..AuditFilter::default()
        })
        .await
        .expect("list");
    assert_eq!(events.len() as i64, total);
    let mut previous = GENESIS_HASH.to_owned();
    for event in &events {
        assert_eq!(
            event.prev_hash, previous,
            "event {} links to its predecessor",
            event.id
        );
        previous = event.hash.clone();
    }
    assert_eq!(verify(&stores[0]).await, intact(total as u64));
    for store in stores {
        store.close().await;
    }
}

// The tamper tests: someone with database access removes the triggers and
// edits rows directly; verification must say what happened and where.

/// Six events (ids 1..=6) with varied fields; returns them as stored.
async fn six_events(store: &Store) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    for index in 1..=6_i64 {
        let stored = store
            .append_audit_event(&NewAuditEvent {
                key_id: Some(format!("mbk_{index:012}")),
                target: Some("qwen3".to_owned()),
                status_code: (index % 3) as i32,
                latency_us: index * 1_001,
                prompt_tokens: index * 10,
                completion_tokens: index * 20,
                detail: Some(format!("event {index}")),
                ..event(1_000 * index, if index % 2 == 0 { CHAT } else { GENERATE })
            })
            .await
            .expect("append");
        events.push(stored);
    }
    assert_eq!(verify(store).await, intact(6));
    events
}

async fn tamper(db: &TestDb, statements: &[&str]) {
    let mut connection: AnyConnection = db.raw_connection().await;
    let drops: &[&str] = match db.backend {
        Backend::Sqlite => &[
            "DROP TRIGGER audit_events_refuse_update",
            "DROP TRIGGER audit_events_refuse_delete",
        ],
        Backend::Postgres => &[
            "DROP TRIGGER audit_events_refuse_update ON audit_events",
            "DROP TRIGGER audit_events_refuse_delete ON audit_events",
        ],
    };
    for sql in drops.iter().chain(statements) {
        connection
            .execute(*sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
}

fn broken(checked: u64, first_broken_id: i64, reason: &str) -> ChainVerdict {
    ChainVerdict {
        ok: false,
        checked,
        first_broken_id: Some(first_broken_id),
        reason: Some(reason.to_owned()),
    }
}

async fn an_edited_event_is_found(db: &TestDb) {
    let store = db.open().await;
    six_events(&store).await;
    tamper(
        db,
        &["UPDATE audit_events SET status_code = 0, detail = 'nothing to see' WHERE id = 4"],
    )
    .await;
    assert_eq!(
        verify(&store).await,
        broken(3, 4, "event 4 was edited (hash mismatch)")
    );
    store.close().await;
}

async fn a_deleted_middle_event_is_found(db: &TestDb) {
    let store = db.open().await;
    six_events(&store).await;
    tamper(db, &["DELETE FROM audit_events WHERE id = 3"]).await;
    assert_eq!(
        verify(&store).await,
        broken(
            2,
            3,
            "event 3 missing before event 4 (id gap; its prev_hash does not match event 2's hash)"
        )
    );
    store.close().await;
}

async fn a_deleted_last_event_is_found(db: &TestDb) {
    let store = db.open().await;
    six_events(&store).await;
    tamper(db, &["DELETE FROM audit_events WHERE id >= 5"]).await;
    assert_eq!(
        verify(&store).await,
        broken(
            4,
            5,
            "the chain ends at event 4 but the head says 6: events 5..=6 deleted"
        )
    );
    // The store keeps appending after the head, so the gap stays visible.
    let next = store
        .append_audit_event(&event(7_000, CHAT))
        .await
        .expect("append");
    assert_eq!(next.id, 7);
    assert_eq!(
        verify(&store).await,
        broken(
            4,
            5,
            "events 5..=6 missing before event 7 (id gap; its prev_hash does not match event 4's hash)"
        )
    );
    store.close().await;
}

async fn reordered_events_are_found(db: &TestDb) {
    let store = db.open().await;
    let events = six_events(&store).await;
    // Swap events 3 and 5 (three statements: the primary key is checked row by row).
    tamper(
        db,
        &[
            "UPDATE audit_events SET id = -3 WHERE id = 3",
            "UPDATE audit_events SET id = 3 WHERE id = 5",
            "UPDATE audit_events SET id = 5 WHERE id = -3",
        ],
    )
    .await;
    let listed = store
        .list_audit_events(&AuditFilter::default())
        .await
        .expect("list");
    assert_eq!(listed[2].hash, events[4].hash, "event 5 now sits at id 3");
    assert_eq!(
        verify(&store).await,
        broken(
            2,
            3,
            "events reordered at 3: the event stored as 3 was written as event 5"
        )
    );
    store.close().await;
}

/// A tamperer who recomputes the edited event's hash is still caught by the
/// next event's link; rows forged past the head are caught by the head.
async fn rewritten_and_forged_events_are_found(db: &TestDb) {
    let store = db.open().await;
    let events = six_events(&store).await;

    let forged = format!(
        "INSERT INTO audit_events (id, at_ms, method, status_code, latency_us, prompt_tokens, \
         completion_tokens, prev_hash, hash) VALUES (7, 7000, 'x', 0, 0, 0, 0, '{}', '{}')",
        events[5].hash,
        "f".repeat(64)
    );
    tamper(db, &[forged.as_str()]).await;
    assert_eq!(
        verify(&store).await,
        broken(
            6,
            7,
            "event 7 lies beyond the chain head (6): events were inserted outside medboxd"
        )
    );
    tamper_again(db, &["DELETE FROM audit_events WHERE id = 7"]).await;
    assert_eq!(verify(&store).await, intact(6));

    let mut rewritten = events[3].clone();
    rewritten.detail = Some("nothing to see".to_owned());
    rewritten.hash = rewritten.expected_hash();
    let update = format!(
        "UPDATE audit_events SET detail = 'nothing to see', hash = '{}' WHERE id = 4",
        rewritten.hash
    );
    tamper_again(db, &[update.as_str()]).await;
    assert_eq!(
        verify(&store).await,
        broken(
            3,
            4,
            "event 5 does not follow event 4: its prev_hash does not match event 4's hash \
             (event 4 was rewritten with a recomputed hash, or events were removed and renumbered)"
        )
    );
    store.close().await;
}

/// Raw statements once the triggers are gone.
async fn tamper_again(db: &TestDb, statements: &[&str]) {
    let mut connection: AnyConnection = db.raw_connection().await;
    for sql in statements {
        connection
            .execute(*sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
}
