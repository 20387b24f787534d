//! Every RPC against every scope, with no key, a revoked key and an expired key.

use std::time::Duration;

use medbox_proto::v1 as pb;
use tonic::{Code, client::Grpc, transport::Channel};

use crate::{TestServer, start};

/// Every method medboxd serves, by service.
const INFERENCE: &[&str] = &[
    "Generate",
    "GenerateStream",
    "Chat",
    "ChatStream",
    "Embed",
    "Tokenize",
    "ListModels",
];
const FINETUNE: &[&str] = &[
    "UploadDataset",
    "ListDatasets",
    "CreateJob",
    "GetJob",
    "ListJobs",
    "CancelJob",
    "WatchJob",
];
const ADMIN: &[&str] = &[
    "ListModels",
    "Status",
    "LoadModel",
    "UnloadModel",
    "CreateApiKey",
    "RevokeApiKey",
    "ListApiKeys",
    "ListAuditEvents",
    "VerifyAuditChain",
];

/// Calls `path` with an empty message (every request message decodes from
/// no bytes) and returns the status code; auth acts before decoding.
async fn call(channel: &Channel, path: &str, key: Option<&str>) -> Code {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(pb::ListModelsRequest {});
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<pb::ListModelsRequest, pb::ListModelsRequest>::default();
    let path = http::uri::PathAndQuery::try_from(path).unwrap();
    match grpc.unary(request, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn create_key(
    test: &TestServer,
    scopes: &[&str],
    expires_at: Option<i64>,
) -> (String, String) {
    let created = test
        .admin()
        .create_api_key(pb::CreateApiKeyRequest {
            label: format!("matrix {scopes:?}"),
            scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
            tenant: "cardiology".into(),
            expires_at,
        })
        .await
        .unwrap()
        .into_inner();
    (created.id, created.key)
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_against_every_scope() {
    let test = start("").await;
    let mut keys = Vec::new();
    for scope in ["inference", "agents", "finetune", "admin"] {
        keys.push((scope, create_key(&test, &[scope], None).await.1));
    }
    let (revoked_id, revoked) = create_key(&test, &["admin"], None).await;
    test.admin()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: revoked_id })
        .await
        .unwrap();
    let (_, expired) = create_key(&test, &["admin"], Some(now_ms() + 1_500)).await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;

    let denied = [Code::Unauthenticated, Code::PermissionDenied];
    let mut checked = 0;
    for (service, methods, needs) in [
        ("medbox.v1.Inference", INFERENCE, "inference"),
        ("medbox.v1.FineTuning", FINETUNE, "finetune"),
        ("medbox.v1.Admin", ADMIN, "admin"),
    ] {
        for method in methods {
            let path = format!("/{service}/{method}");
            for (scope, key) in &keys {
                let code = call(&test.channel, &path, Some(key)).await;
                let allowed = *scope == needs || *scope == "admin";
                if allowed {
                    assert!(
                        !denied.contains(&code),
                        "{path} with scope {scope} was denied: {code:?}"
                    );
                } else {
                    assert_eq!(code, Code::PermissionDenied, "{path} with scope {scope}");
                }
                checked += 1;
            }
            for (what, key) in [
                ("no key", None),
                ("revoked", Some(revoked.as_str())),
                ("expired", Some(expired.as_str())),
                ("garbage", Some("mbx_nope")),
            ] {
                assert_eq!(
                    call(&test.channel, &path, key).await,
                    Code::Unauthenticated,
                    "{path} with {what}"
                );
                checked += 1;
            }
        }
    }
    // Health checking stays open.
    assert_eq!(
        call(&test.channel, "/grpc.health.v1.Health/Check", None).await,
        Code::Ok
    );
    assert_eq!(
        checked,
        (INFERENCE.len() + FINETUNE.len() + ADMIN.len()) * 8
    );

    // Denials are in the audit trail, and the chain holds.
    let events = test
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            status_code: Some(Code::PermissionDenied as i32),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    // Two scopes are refused each Inference and FineTuning method, three each Admin one.
    assert_eq!(
        events.len(),
        (INFERENCE.len() + FINETUNE.len()) * 2 + ADMIN.len() * 3
    );
    assert!(events.iter().all(|event| !event.key_id.is_empty()));
    let verdict = test
        .admin()
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.ok, "{verdict:?}");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_fails_on_the_next_request() {
    let test = start("").await;
    let (id, key) = create_key(&test, &["inference"], None).await;
    let path = "/medbox.v1.Inference/ListModels";
    assert_eq!(call(&test.channel, path, Some(&key)).await, Code::Ok);
    let revoked = test
        .admin()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    assert_eq!(
        call(&test.channel, path, Some(&key)).await,
        Code::Unauthenticated
    );
    let status = test
        .admin()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: "mbk_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = test
        .admin()
        .create_api_key(pb::CreateApiKeyRequest {
            label: "x".into(),
            scopes: vec!["superuser".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("scopes") && status.message().contains("superuser"));
    test.server.shutdown().await.unwrap();
}
