//! The model registry.

use std::time::Duration;

use medbox_store::{ModelRecord, NewModel};

use crate::support::TestDb;

on_both_backends!(
    upsert_inserts_then_updates,
    models_are_listed_by_name_and_found_by_name,
    invalid_aliases_are_refused_before_writing,
);

fn model(name: &str, aliases: &[&str]) -> NewModel {
    NewModel {
        name: name.to_owned(),
        path: format!("/var/lib/medbox/models/{name}"),
        kind: "decoder".to_owned(),
        aliases: aliases.iter().map(|alias| alias.to_string()).collect(),
        dtype: Some("bf16".to_owned()),
        device: "cuda:0".to_owned(),
        source: "config".to_owned(),
    }
}

/// Compares everything but the id and timestamps.
fn check_fields(record: &ModelRecord, expected: &NewModel) {
    assert_eq!(record.name, expected.name);
    assert_eq!(record.path, expected.path);
    assert_eq!(record.kind, expected.kind);
    assert_eq!(record.aliases, expected.aliases);
    assert_eq!(record.dtype, expected.dtype);
    assert_eq!(record.device, expected.device);
    assert_eq!(record.source, expected.source);
}

async fn upsert_inserts_then_updates(db: &TestDb) {
    let store = db.open().await;
    let original = model("qwen3-0.6b", &["qwen", "small"]);
    let inserted = store.upsert_model(&original).await.expect("insert");
    check_fields(&inserted, &original);
    assert_eq!(inserted.created_at_ms, inserted.updated_at_ms);
    assert!(
        inserted.created_at_ms > 1_700_000_000_000,
        "unix milliseconds"
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    let changed = NewModel {
        path: "/var/lib/medbox/models/qwen3-0.6b-v2".to_owned(),
        kind: "decoder".to_owned(),
        aliases: Vec::new(),
        dtype: None,
        device: "cpu".to_owned(),
        source: "admin".to_owned(),
        ..original.clone()
    };
    let updated = store.upsert_model(&changed).await.expect("update");
    check_fields(&updated, &changed);
    assert_eq!(updated.id, inserted.id, "the name is the key");
    assert_eq!(updated.created_at_ms, inserted.created_at_ms);
    assert!(updated.updated_at_ms > inserted.updated_at_ms);

    let listed = store.list_models().await.expect("list");
    assert_eq!(listed, vec![updated.clone()]);
    assert_eq!(
        store.get_model("qwen3-0.6b").await.expect("get"),
        Some(updated)
    );
    store.close().await;
}

async fn models_are_listed_by_name_and_found_by_name(db: &TestDb) {
    let store = db.open().await;
    assert_eq!(store.list_models().await.expect("list"), Vec::new());
    for name in ["medgemma", "bert-clinical", "qwen3"] {
        store
            .upsert_model(&model(name, &[name]))
            .await
            .expect("insert");
    }
    let names: Vec<String> = store
        .list_models()
        .await
        .expect("list")
        .into_iter()
        .map(|record| record.name)
        .collect();
    assert_eq!(names, ["bert-clinical", "medgemma", "qwen3"]);

    let found = store
        .get_model("medgemma")
        .await
        .expect("get")
        .expect("medgemma is registered");
    check_fields(&found, &model("medgemma", &["medgemma"]));
    assert_eq!(store.get_model("no-such-model").await.expect("get"), None);
    store.close().await;
}

async fn invalid_aliases_are_refused_before_writing(db: &TestDb) {
    let store = db.open().await;
    let error = store
        .upsert_model(&model("qwen3", &["qwen", "a,b"]))
        .await
        .expect_err("an alias with a comma cannot be stored");
    assert_eq!(error.kind(), "invalid_alias");
    assert_eq!(
        error.to_string(),
        "alias `a,b` of model `qwen3` is invalid: aliases must be non-empty and cannot contain commas"
    );
    assert_eq!(store.list_models().await.expect("list"), Vec::new());
    store.close().await;
}
