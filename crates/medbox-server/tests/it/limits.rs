//! Protecting the box: per-key rates, load shedding, deadlines.

use std::{collections::HashSet, time::Duration};

use medbox_proto::v1::{self as pb, inference_client::InferenceClient};
use tonic::Code;

use crate::{Bearer, greedy, http_get, start_with};

async fn new_key(test: &crate::TestServer, label: &str) -> String {
    test.admin()
        .create_api_key(pb::CreateApiKeyRequest {
            label: label.into(),
            scopes: vec!["inference".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_refused_while_another_is_served() {
    // Every key, the admin's included, gets 20 at once, then one every 2 s.
    let test = start_with("", "[limits]\nrequests_per_second = 0.5\nburst = 20\n").await;
    let noisy = new_key(&test, "noisy").await;
    let quiet = new_key(&test, "quiet").await;
    let client =
        |key: &str| InferenceClient::with_interceptor(test.channel.clone(), Bearer::new(Some(key)));
    for _ in 0..20 {
        client(&noisy)
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap();
    }
    let status = client(&noisy)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("retry in"), "{status:?}");
    let retry_ms: u64 = status
        .metadata()
        .get("retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2_100).contains(&retry_ms), "{retry_ms}");
    // The other key is served normally.
    for _ in 0..3 {
        client(&quiet)
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap();
    }
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_shed_and_every_accepted_answer_arrives_once() {
    let test = start_with("", "[limits]\nmax_concurrent_requests = 3\n").await;
    let requests = 30;
    let mut tasks = Vec::new();
    for index in 0..requests {
        let mut client = test.inference();
        tasks.push(tokio::spawn(async move {
            let mut request = greedy("Flood", 12);
            request.request_id = format!("flood-{index}");
            match client.generate_stream(request).await {
                Err(status) => Err(status.code()),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let (mut tokens, mut finish, mut ids) = (0, String::new(), HashSet::new());
                    while let Some(chunk) =
                        stream.message().await.map_err(|status| status.code())?
                    {
                        tokens += chunk.token_ids.len();
                        ids.insert(chunk.request_id);
                        if !chunk.finish_reason.is_empty() {
                            finish = chunk.finish_reason;
                        }
                    }
                    Ok((index, tokens, finish, ids))
                }
            }
        }));
    }
    let (mut accepted, mut shed) = (Vec::new(), 0);
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("no request hangs")
            .unwrap()
        {
            Ok(answer) => accepted.push(answer),
            Err(Code::ResourceExhausted) => shed += 1,
            Err(other) => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(accepted.len() + shed, requests);
    assert!(
        shed > 0,
        "30 simultaneous streams over a limit of 3 shed none"
    );
    assert!(accepted.len() >= 3, "only {} accepted", accepted.len());
    for (index, tokens, finish, ids) in &accepted {
        assert_eq!(
            (*tokens, finish.as_str()),
            (12, "length"),
            "request {index}"
        );
        assert_eq!(
            ids,
            &HashSet::from([format!("flood-{index}")]),
            "request {index} got another's chunks"
        );
    }
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_frees_the_engine_at_once() {
    let test = crate::start("").await;
    let mut request = tonic::Request::new(greedy("A long discharge summary:", 480));
    request.set_timeout(Duration::from_millis(100));
    let status = test.inference().generate(request).await.unwrap_err();
    // The client's own timer and the server's grpc-timeout race; either ends it.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The sequence left the engine: nothing stays in flight...
    let metrics = test.server.metrics_addr().unwrap();
    let mut in_flight = String::new();
    for _ in 0..50 {
        let body = http_get(metrics, "/metrics").await;
        in_flight = body
            .lines()
            .find(|line| line.starts_with("medbox_requests_in_flight{model=\"tiny\"}"))
            .unwrap_or_default()
            .to_owned();
        if in_flight.ends_with(" 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight.ends_with(" 0"), "{in_flight}");
    // ...and the abandoned call is in the audit trail.
    let events = test
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            method: "medbox.v1.Inference/Generate".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events.last().map(|event| event.error_kind.as_str()),
        Some("abandoned")
    );
    // The next request is served at once, not after 480 tokens.
    let started = std::time::Instant::now();
    test.inference().generate(greedy("fever", 4)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    test.server.shutdown().await.unwrap();
}

async fn generate_events(test: &crate::TestServer) -> Vec<pb::AuditEvent> {
    test.inference()
        .generate(greedy("Patient Zhang, chest pain", 3))
        .await
        .unwrap();
    test.admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            method: "medbox.v1.Inference/Generate".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_text_reaches_the_audit_trail_only_when_configured() {
    let test = crate::start("").await;
    let events = generate_events(&test).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].detail, "", "text kept without [audit] store_text");
    test.server.shutdown().await.unwrap();

    let test = start_with("", "[audit]\nstore_text = true\n").await;
    let events = generate_events(&test).await;
    let detail: serde_json::Value = serde_json::from_str(&events[0].detail).unwrap();
    assert_eq!(detail["prompt"], "Patient Zhang, chest pain");
    assert!(detail["answer"].is_string());
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_queue_and_batch_are_in_the_metrics() {
    let test = crate::start("").await;
    let mut first = test
        .inference()
        .generate_stream(greedy("Discharge summary:", 400))
        .await
        .unwrap()
        .into_inner();
    first.message().await.unwrap().unwrap();
    let mut second = test
        .inference()
        .generate_stream(greedy("Follow-up plan:", 400))
        .await
        .unwrap()
        .into_inner();
    // The second stream is generating now; the first may still be (both in
    // the batch) or may already have finished: its tokens wait in its
    // channel, so the engine does not wait for this client to read them.
    second.message().await.unwrap().unwrap();
    let body = http_get(test.server.metrics_addr().unwrap(), "/metrics").await;
    let gauge = |name: &str| -> i64 {
        body.lines()
            .find(|line| line.starts_with(&format!("{name}{{model=\"tiny\"}}")))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    let (waiting, running) = (
        gauge("medbox_num_requests_waiting"),
        gauge("medbox_num_requests_running"),
    );
    // One engine, two streams: the second generating, the first batched
    // alongside it or already done; nothing else is queued.
    assert!(running >= 1, "running {running}");
    assert_eq!(waiting, 0, "waiting {waiting}, running {running}");
    assert!(running <= 2, "running {running}");
    // Dropping the streams cancels both sequences, so shutdown is quick.
    drop((first, second));
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_deadline_applies_when_the_client_sets_none() {
    let test = start_with("", "[limits]\nrequest_timeout_seconds = 1\n").await;
    let started = std::time::Instant::now();
    let result = test
        .inference()
        .generate(greedy("A long discharge summary:", 480))
        .await;
    match result {
        Err(status) => {
            assert!(
                matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
                "{status:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
        // Only a machine that generates 480 tokens within the second may answer.
        Ok(answer) => assert!(
            started.elapsed() < Duration::from_secs(1),
            "{} tokens in {:?} despite a 1 s deadline",
            answer.into_inner().token_ids.len(),
            started.elapsed()
        ),
    }
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_deadline_ends_a_stream_and_frees_its_batch_place() {
    let test = start_with(
        "",
        "[limits]\nmethod_timeout_seconds = { \"Inference.GenerateStream\" = 0.2 }\n",
    )
    .await;
    let started = std::time::Instant::now();
    // 500 tokens take the tiny model about a second on two cores.
    let mut stream = test
        .inference()
        .generate_stream(greedy("A long discharge summary:", 500))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => chunks += 1,
            Ok(None) => panic!("the stream finished within its 0.2 s deadline ({chunks} chunks)"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("default deadline"), "{status:?}");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    // The sequence leaves the engine's batch.
    let metrics = test.server.metrics_addr().unwrap();
    let running = |body: String| {
        body.lines()
            .find(|line| line.starts_with("medbox_num_requests_running{model=\"tiny\"}"))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<i64>().ok())
    };
    let mut left = false;
    for _ in 0..40 {
        if running(http_get(metrics, "/metrics").await) == Some(0) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left, "the sequence is still running after its deadline");
    // Other methods keep the default.
    test.inference()
        .generate(greedy("Plan:", 4))
        .await
        .expect("Generate has the default deadline");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_a_request_id_and_a_client_one_is_kept() {
    let test = crate::start("").await;
    let answer = test
        .inference()
        .tokenize(pb::TokenizeRequest {
            model: "tiny".into(),
            text: "chest pain".into(),
        })
        .await
        .unwrap();
    let given = answer
        .metadata()
        .get("x-request-id")
        .expect("an id is returned")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!given.is_empty());

    let mut request = tonic::Request::new(greedy("Plan:", 2));
    request
        .metadata_mut()
        .insert("x-request-id", "ward-7-0001".parse().unwrap());
    let answer = test.inference().generate(request).await.unwrap();
    assert_eq!(
        answer.metadata().get("x-request-id").unwrap(),
        "ward-7-0001"
    );
    assert_eq!(answer.into_inner().request_id, "ward-7-0001", "echoed");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_deadline_ends_a_unary_call() {
    let test = start_with(
        "",
        "[limits]\nmethod_timeout_seconds = { \"Inference.Generate\" = 1 }\n",
    )
    .await;
    let started = std::time::Instant::now();
    let result = test
        .inference()
        .generate(greedy("A long discharge summary:", 480))
        .await;
    let elapsed = started.elapsed();
    match result {
        Err(status) => {
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
            assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
        }
        Ok(answer) => assert!(
            elapsed < Duration::from_secs(1),
            "{} tokens in {elapsed:?} despite a 1 s deadline",
            answer.into_inner().token_ids.len()
        ),
    }
    test.server.shutdown().await.unwrap();
}
