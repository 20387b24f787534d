//! API keys.

use medbox_store::{KeyCheck, NewApiKey, SCOPES, StoreError};
use sqlx::{Executor, Row};

use crate::support::TestDb;
use medbox_store::Backend;

on_both_backends!(
    keys_are_created_and_authenticated,
    revoked_expired_and_unknown_keys_are_told_apart,
    scopes_are_validated,
    admin_keys_are_counted,
    secrets_are_not_stored,
);

const NOW: i64 = 1_763_900_000_000;

fn new_key(label: &str, scopes: &[&str]) -> NewApiKey {
    NewApiKey {
        label: label.to_owned(),
        scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
        tenant: None,
        expires_at_ms: None,
    }
}

async fn keys_are_created_and_authenticated(db: &TestDb) {
    let store = db.open().await;
    let created = store
        .create_api_key(&NewApiKey {
            tenant: Some("radiology".to_owned()),
            expires_at_ms: Some(NOW + 60_000),
            ..new_key("reporting", &["agents", "inference", "agents"])
        })
        .await
        .expect("create");
    let record = &created.record;
    assert!(
        record.id.starts_with("mbk_") && record.id.len() == 16,
        "{}",
        record.id
    );
    assert!(
        created
            .secret
            .starts_with(&format!("mbx_{}_", &record.id[4..]))
    );
    assert_eq!(created.secret.len(), 4 + 12 + 1 + 64);
    assert_eq!(record.label, "reporting");
    assert_eq!(record.scopes, ["inference", "agents"]);
    assert_eq!(record.tenant.as_deref(), Some("radiology"));
    assert_eq!(record.expires_at_ms, Some(NOW + 60_000));
    assert_eq!((record.revoked_at_ms, record.last_used_at_ms), (None, None));
    assert!(record.has_scope("agents") && !record.has_scope("admin"));
    assert!(
        !format!("{created:?}").contains(&created.secret),
        "Debug hides the secret"
    );

    let other = store
        .create_api_key(&new_key("other", &["admin"]))
        .await
        .expect("create");
    assert_ne!(other.record.id, record.id);
    assert_ne!(other.secret, created.secret);

    assert_eq!(
        store
            .authenticate_api_key(&created.secret, NOW)
            .await
            .expect("authenticate"),
        KeyCheck::Valid(record.clone())
    );

    store
        .touch_api_key(&record.id, NOW + 5)
        .await
        .expect("touch");
    store
        .touch_api_key(&record.id, NOW + 1)
        .await
        .expect("touch (older: ignored)");
    let listed = store.list_api_keys().await.expect("list");
    assert_eq!(listed.len(), 2);
    let touched = listed
        .iter()
        .find(|key| key.id == record.id)
        .expect("listed");
    assert_eq!(touched.last_used_at_ms, Some(NOW + 5));
    assert_eq!(
        store.get_api_key(&other.record.id).await.expect("get"),
        Some(other.record.clone())
    );
    assert_eq!(
        store.get_api_key("mbk_000000000000").await.expect("get"),
        None
    );
    store.close().await;
}

async fn revoked_expired_and_unknown_keys_are_told_apart(db: &TestDb) {
    let store = db.open().await;
    let created = store
        .create_api_key(&NewApiKey {
            expires_at_ms: Some(NOW + 1_000),
            ..new_key("expiring", &["inference"])
        })
        .await
        .expect("create");
    let secret = created.secret.clone();
    let check = async |secret: &str, now: i64| {
        store
            .authenticate_api_key(secret, now)
            .await
            .expect("authenticate")
    };

    assert!(matches!(
        check(&secret, NOW + 999).await,
        KeyCheck::Valid(_)
    ));
    assert!(matches!(
        check(&secret, NOW + 1_000).await,
        KeyCheck::Expired(_)
    ));

    // Unknown: malformed, wrong secret for a real id, an id that does not exist.
    let (prefix, random) = secret.rsplit_once('_').expect("secret shape");
    let mut wrong_random: Vec<u8> = random.bytes().collect();
    wrong_random[0] = if wrong_random[0] == b'0' { b'1' } else { b'0' };
    let wrong = format!(
        "{prefix}_{}",
        String::from_utf8(wrong_random).expect("ascii")
    );
    let no_such_id = format!("mbx_000000000000_{random}");
    for unknown in [
        "",
        "Bearer x",
        secret.as_str().trim_end_matches(random),
        &wrong,
        &no_such_id,
    ] {
        assert_eq!(check(unknown, NOW).await, KeyCheck::Unknown, "{unknown:?}");
    }
    let upper = secret.to_uppercase();
    assert_eq!(check(&upper, NOW).await, KeyCheck::Unknown);

    // Revocation wins over expiry, happens once, and is idempotent.
    assert!(
        store
            .revoke_api_key(&created.record.id, NOW + 10)
            .await
            .expect("revoke")
    );
    assert!(
        !store
            .revoke_api_key(&created.record.id, NOW + 20)
            .await
            .expect("revoke again")
    );
    assert!(
        !store
            .revoke_api_key("mbk_000000000000", NOW)
            .await
            .expect("revoke unknown")
    );
    match check(&secret, NOW).await {
        KeyCheck::Revoked(record) => assert_eq!(record.revoked_at_ms, Some(NOW + 10)),
        other => panic!("expected revoked, got {other:?}"),
    }
    assert!(matches!(
        check(&secret, NOW + 5_000).await,
        KeyCheck::Revoked(_)
    ));

    // Another key is unaffected.
    let other = store
        .create_api_key(&new_key("forever", &["finetune"]))
        .await
        .expect("create");
    assert!(matches!(
        check(&other.secret, i64::MAX).await,
        KeyCheck::Valid(_)
    ));
    store.close().await;
}

async fn scopes_are_validated(db: &TestDb) {
    let store = db.open().await;
    let error = store
        .create_api_key(&new_key("bad", &["inference", "superuser"]))
        .await
        .expect_err("unknown scope");
    assert!(matches!(&error, StoreError::UnknownScope { scope } if scope == "superuser"));
    assert!(error.to_string().contains("`superuser`"), "{error}");
    let error = store
        .create_api_key(&new_key("none", &[]))
        .await
        .expect_err("no scope");
    assert_eq!(error.kind(), "no_scopes");
    assert!(store.list_api_keys().await.expect("list").is_empty());

    let all = store
        .create_api_key(&new_key("all", &SCOPES))
        .await
        .expect("create");
    assert_eq!(all.record.scopes, SCOPES);
    store.close().await;
}

async fn admin_keys_are_counted(db: &TestDb) {
    let store = db.open().await;
    assert_eq!(store.count_active_admin_keys(NOW).await.expect("count"), 0);
    let admin = store
        .create_api_key(&new_key("a", &["admin"]))
        .await
        .expect("create");
    store
        .create_api_key(&new_key("b", &["inference", "admin"]))
        .await
        .expect("create");
    store
        .create_api_key(&NewApiKey {
            expires_at_ms: Some(NOW),
            ..new_key("expired", &["admin"])
        })
        .await
        .expect("create");
    store
        .create_api_key(&new_key("not admin", &["inference", "agents", "finetune"]))
        .await
        .expect("create");
    assert_eq!(store.count_active_admin_keys(NOW).await.expect("count"), 2);
    assert_eq!(
        store.count_active_admin_keys(NOW - 1).await.expect("count"),
        3
    );
    assert!(
        store
            .revoke_api_key(&admin.record.id, NOW)
            .await
            .expect("revoke")
    );
    assert_eq!(store.count_active_admin_keys(NOW).await.expect("count"), 1);
    store.close().await;
}

/// Neither the secret nor its random part appears in any column of any table,
/// nor (on SQLite) anywhere in the database files.
async fn secrets_are_not_stored(db: &TestDb) {
    let store = db.open().await;
    let created = store
        .create_api_key(&NewApiKey {
            tenant: Some("icu".to_owned()),
            ..new_key("searched", &["admin"])
        })
        .await
        .expect("create");
    assert!(matches!(
        store
            .authenticate_api_key(&created.secret, NOW)
            .await
            .expect("auth"),
        KeyCheck::Valid(_)
    ));
    store
        .touch_api_key(&created.record.id, NOW)
        .await
        .expect("touch");
    let random_part = created.secret.rsplit_once('_').expect("shape").1.to_owned();

    let mut connection = db.raw_connection().await;
    let columns_sql = match db.backend {
        Backend::Sqlite => {
            "SELECT m.name AS table_name, p.name AS column_name \
             FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'"
        }
        Backend::Postgres => {
            "SELECT table_name::text AS table_name, column_name::text AS column_name \
             FROM information_schema.columns WHERE table_schema = current_schema()"
        }
    };
    let columns = connection
        .fetch_all(columns_sql)
        .await
        .expect("list columns");
    let mut searched = 0;
    for column in &columns {
        let table: String = column.get("table_name");
        let name: String = column.get("column_name");
        let sql = format!(
            "SELECT COUNT(*) FROM {table} WHERE CAST({name} AS TEXT) LIKE $1 OR CAST({name} AS TEXT) LIKE $2"
        );
        let found: i64 = sqlx::query_scalar(&sql)
            .bind(format!("%{}%", created.secret))
            .bind(format!("%{random_part}%"))
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("search {table}.{name}: {error}"));
        assert_eq!(found, 0, "the secret is stored in {table}.{name}");
        searched += 1;
    }
    assert!(searched >= 9, "searched only {searched} columns");

    if db.backend == Backend::Sqlite {
        store.close().await;
        let path = db.url.trim_start_matches("sqlite://");
        let dir = std::path::Path::new(path).parent().expect("dir");
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
            assert!(
                !bytes
                    .windows(random_part.len())
                    .any(|window| window == random_part.as_bytes()),
                "the secret is in a database file"
            );
        }
    } else {
        store.close().await;
    }
}
