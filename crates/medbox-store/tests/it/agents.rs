//! Agents: spec versions, sessions and their history, runs, follow-ups.

use medbox_store::{NewAgentRun, NewFollowUp, SessionRole, SpecOrigin};

use crate::support::TestDb;

on_both_backends!(
    spec_versions_are_kept_and_never_changed,
    a_session_keeps_its_turns_in_order,
    runs_and_their_follow_ups_read_back,
);

async fn spec_versions_are_kept_and_never_changed(db: &TestDb) {
    let store = db.open().await;
    let record = |version, text: &'static str, origin| {
        let store = store.clone();
        async move {
            store
                .record_agent_spec_version("triage", version, text, origin, 1_000)
                .await
                .expect("record a spec version")
        }
    };
    assert!(record(1, "v1", SpecOrigin::File).await);
    assert!(
        !record(1, "changed", SpecOrigin::Api).await,
        "kept as first stored"
    );
    assert!(record(2, "v2", SpecOrigin::Api).await);
    assert!(
        store
            .record_agent_spec_version("deid", 3, "d3", SpecOrigin::File, 1_000)
            .await
            .unwrap()
    );
    let versions = store.agent_spec_versions("triage").await.unwrap();
    let seen: Vec<(u32, &str, SpecOrigin)> = versions
        .iter()
        .map(|v| (v.version, v.spec_toml.as_str(), v.origin))
        .collect();
    assert_eq!(
        seen,
        [(1, "v1", SpecOrigin::File), (2, "v2", SpecOrigin::Api)]
    );
    let latest = store.latest_agent_spec_versions().await.unwrap();
    let latest: Vec<(&str, u32)> = latest
        .iter()
        .map(|v| (v.agent_id.as_str(), v.version))
        .collect();
    assert_eq!(latest, [("deid", 3), ("triage", 2)]);
    store.close().await;
}

async fn a_session_keeps_its_turns_in_order(db: &TestDb) {
    let store = db.open().await;
    let session = store
        .create_agent_session("consultation", Some(r#"{"resourceType":"Bundle"}"#), 5)
        .await
        .unwrap();
    assert!(session.id.starts_with("ses_"));
    let found = store.find_agent_session(&session.id).await.unwrap();
    assert_eq!(found.as_ref(), Some(&session));
    assert_eq!(store.find_agent_session("ses_missing").await.unwrap(), None);
    for (turn, (user, answer)) in [("{\"q\":1}", "{\"a\":1}"), ("{\"q\":2}", "{\"a\":2}")]
        .into_iter()
        .enumerate()
    {
        let number = store
            .append_agent_session_turn(&session.id, &format!("run_{turn}"), user, answer, 10)
            .await
            .unwrap();
        assert_eq!(number as usize, turn + 1);
    }
    let history = store.agent_session_messages(&session.id).await.unwrap();
    let seen: Vec<(u32, SessionRole, &str)> = history
        .iter()
        .map(|m| (m.turn, m.role, m.content.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, SessionRole::User, "{\"q\":1}"),
            (1, SessionRole::Assistant, "{\"a\":1}"),
            (2, SessionRole::User, "{\"q\":2}"),
            (2, SessionRole::Assistant, "{\"a\":2}"),
        ]
    );
    let updated = store
        .find_agent_session(&session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.updated_at_ms, 10);
    store.close().await;
}

async fn runs_and_their_follow_ups_read_back(db: &TestDb) {
    let store = db.open().await;
    let id = store.new_agent_run_id().unwrap();
    assert!(id.starts_with("run_"));
    let run = NewAgentRun {
        agent_id: "follow_up_planning".to_owned(),
        agent_version: 1,
        session_id: None,
        request_id: Some("req-1".to_owned()),
        status: "completed".to_owned(),
        models_json: r#"["tiny"]"#.to_owned(),
        trace_json: r#"[{"kind":"final"}]"#.to_owned(),
        output_json: Some("{}".to_owned()),
        started_at_ms: 1_000,
        elapsed_ms: 250,
    };
    store.record_agent_run(&id, &run).await.unwrap();
    let found = store.find_agent_run(&id).await.unwrap().expect("recorded");
    assert_eq!(found.run, run);
    let follow_up = NewFollowUp {
        run_id: id.clone(),
        agent_id: run.agent_id.clone(),
        session_id: None,
        interval_days: 14,
        channel: "phone".to_owned(),
        reason: "blood pressure review".to_owned(),
    };
    let scheduled = store.schedule_follow_up(&follow_up, 1_000).await.unwrap();
    assert_eq!(scheduled.due_at_ms, 1_000 + 14 * 86_400_000);
    let listed = store.follow_ups_of_run(&id).await.unwrap();
    assert_eq!(listed, [scheduled]);
    store.close().await;
}
