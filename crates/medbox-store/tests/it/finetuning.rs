//! Fine-tuning: datasets, jobs and their events, model versions.

use medbox_store::{
    DatasetState, JobEventKind, JobFilter, JobState, JobTransition, NewDataset, NewJob,
    NewModelVersion, Store,
};
use sqlx::Executor;

use crate::support::TestDb;

on_both_backends!(
    datasets_are_found_by_id_or_newest_name,
    a_job_moves_through_its_states_with_one_event_each,
    transitions_happen_only_from_the_named_states,
    progress_events_move_the_job_and_read_back_in_order,
    completing_a_job_registers_its_version_atomically,
    unfinished_jobs_come_back_running_first_then_queued,
    job_events_are_append_only,
);

fn dataset(name: &str, state: DatasetState) -> NewDataset {
    let accepted = state == DatasetState::Accepted;
    NewDataset {
        name: name.to_owned(),
        format: "messages".to_owned(),
        state,
        sha256: accepted.then(|| "ab".repeat(32)),
        path: accepted.then(|| format!("/var/lib/medbox/datasets/{name}")),
        bytes: 12_345,
        lines: 101,
        blank_lines: 1,
        valid_lines: if accepted { 100 } else { 98 },
        invalid_lines: if accepted { 0 } else { 2 },
        train_examples: if accepted { 95 } else { 0 },
        eval_examples: if accepted { 5 } else { 0 },
        eval_percent: 5,
        split_seed: u64::MAX - 1,
        deid_counts_json: r#"{"mobile":3,"name":1}"#.to_owned(),
        report_json: r#"{"errors":[]}"#.to_owned(),
    }
}

async fn accepted_dataset(store: &Store) -> String {
    let id = store.new_dataset_id().unwrap();
    store
        .create_dataset(&id, &dataset("lab-flags", DatasetState::Accepted), 1_000)
        .await
        .expect("record a dataset");
    id
}

fn job(dataset_id: &str) -> NewJob {
    NewJob {
        method: "lora".to_owned(),
        base_model: "tiny".to_owned(),
        base_model_path: "/var/lib/medbox/models/tiny".to_owned(),
        teacher_model: None,
        teacher_model_path: None,
        dataset_id: dataset_id.to_owned(),
        hyperparameters_json: r#"{"epochs":3}"#.to_owned(),
        seed: 42,
        checkpoint_every: 50,
        output_name: "tiny-lab-flags".to_owned(),
    }
}

fn transition(from: &[JobState], to: JobState, at_ms: i64) -> JobTransition {
    JobTransition {
        from: from.to_vec(),
        to,
        at_ms,
        message: None,
        error: None,
    }
}

fn state_of(event: &JobEventKind) -> Option<JobState> {
    match event {
        JobEventKind::State { state, .. } => Some(*state),
        _ => None,
    }
}

async fn datasets_are_found_by_id_or_newest_name(db: &TestDb) {
    let store = db.open().await;
    let first = store.new_dataset_id().unwrap();
    assert!(first.starts_with("ds_") && first.len() == 15, "{first}");
    let older = store
        .create_dataset(&first, &dataset("notes", DatasetState::Accepted), 1_000)
        .await
        .unwrap();
    assert_eq!(older.state, DatasetState::Accepted);
    assert_eq!(older.split_seed, u64::MAX - 1);
    assert_eq!(older.train_examples, 95);
    assert_eq!(older.created_at_ms, 1_000);
    let second = store.new_dataset_id().unwrap();
    let newer = store
        .create_dataset(&second, &dataset("notes", DatasetState::Rejected), 2_000)
        .await
        .unwrap();
    assert_eq!(newer.sha256, None);
    assert_eq!(newer.invalid_lines, 2);

    // A name means its newest upload, rejected or not; an id means itself.
    let by_name = store.find_dataset("notes").await.unwrap().unwrap();
    assert_eq!(by_name, newer);
    let by_id = store.find_dataset(&first).await.unwrap().unwrap();
    assert_eq!(by_id, older);
    assert_eq!(store.find_dataset("nothing").await.unwrap(), None);
    let listed: Vec<String> = store
        .list_datasets()
        .await
        .unwrap()
        .into_iter()
        .map(|record| record.id)
        .collect();
    assert_eq!(listed, [second, first]);
    store.close().await;
}

async fn a_job_moves_through_its_states_with_one_event_each(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let (queued, first_event) = store.create_job(&job(&dataset_id), 10_000).await.unwrap();
    assert!(
        queued.id.starts_with("job_") && queued.id.len() == 16,
        "{}",
        queued.id
    );
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!((queued.attempts, queued.started_at_ms), (0, None));
    assert_eq!(state_of(&first_event.kind), Some(JobState::Queued));

    let (running, _) = store
        .transition_job(
            &queued.id,
            &transition(&[JobState::Queued], JobState::Running, 11_000),
        )
        .await
        .unwrap()
        .expect("queued → running");
    assert_eq!(running.attempts, 1);
    assert_eq!(running.started_at_ms, Some(11_000));
    assert_eq!(running.finished_at_ms, None);

    let failing = JobTransition {
        message: Some("the trainer stopped".to_owned()),
        error: Some("the trainer process ended unexpectedly".to_owned()),
        ..transition(&[JobState::Running], JobState::Failed, 12_000)
    };
    let (failed, event) = store
        .transition_job(&queued.id, &failing)
        .await
        .unwrap()
        .expect("running → failed");
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("the trainer process ended unexpectedly")
    );
    assert_eq!(failed.finished_at_ms, Some(12_000));
    assert_eq!(
        event.kind,
        JobEventKind::State {
            state: JobState::Failed,
            message: Some("the trainer stopped".to_owned())
        }
    );
    let states: Vec<Option<JobState>> = store
        .list_job_events(&queued.id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|event| state_of(&event.kind))
        .collect();
    assert_eq!(
        states,
        [
            Some(JobState::Queued),
            Some(JobState::Running),
            Some(JobState::Failed)
        ]
    );
    assert_eq!(store.get_job(&queued.id).await.unwrap(), Some(failed));
    assert_eq!(store.get_job("job_000000000000").await.unwrap(), None);
    store.close().await;
}

async fn transitions_happen_only_from_the_named_states(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let (queued, _) = store.create_job(&job(&dataset_id), 10_000).await.unwrap();
    // Not running: it cannot succeed or fail.
    for to in [JobState::Succeeded, JobState::Failed] {
        assert_eq!(
            store
                .transition_job(&queued.id, &transition(&[JobState::Running], to, 11_000))
                .await
                .unwrap(),
            None
        );
    }
    let (cancelled, _) = store
        .transition_job(
            &queued.id,
            &transition(
                &[JobState::Queued, JobState::Running],
                JobState::Cancelled,
                12_000,
            ),
        )
        .await
        .unwrap()
        .expect("queued → cancelled");
    assert_eq!(cancelled.finished_at_ms, Some(12_000));
    // Terminal: nothing moves it again, and no event is appended.
    assert_eq!(
        store
            .transition_job(
                &queued.id,
                &transition(&[JobState::Queued], JobState::Running, 13_000)
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .transition_job(
                "job_000000000000",
                &transition(&[JobState::Queued], JobState::Running, 13_000)
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .list_job_events(&queued.id, 0, 100)
            .await
            .unwrap()
            .len(),
        2
    );
    let error = store
        .append_job_event(
            &queued.id,
            14_000,
            &JobEventKind::State {
                state: JobState::Running,
                message: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "state_event_outside_transition");
    store.close().await;
}

async fn progress_events_move_the_job_and_read_back_in_order(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let (queued, _) = store.create_job(&job(&dataset_id), 10_000).await.unwrap();
    store
        .transition_job(
            &queued.id,
            &transition(&[JobState::Queued], JobState::Running, 11_000),
        )
        .await
        .unwrap()
        .unwrap();
    let events = [
        JobEventKind::Progress {
            step: 1,
            total_steps: 40,
            epoch: 0.025,
            loss: 2.5,
            learning_rate: 2e-4,
            tokens_per_second: 1234.5,
            eta_seconds: None,
        },
        JobEventKind::Progress {
            step: 2,
            total_steps: 40,
            epoch: 0.05,
            loss: 2.25,
            learning_rate: 1.5e-4,
            tokens_per_second: 1300.0,
            eta_seconds: Some(38.5),
        },
        JobEventKind::Eval {
            step: 2,
            eval_loss: 2.125,
        },
        JobEventKind::Checkpoint { step: 2 },
    ];
    let mut ids = Vec::new();
    for (offset, kind) in events.iter().enumerate() {
        let stored = store
            .append_job_event(&queued.id, 12_000 + offset as i64, kind)
            .await
            .unwrap();
        assert_eq!(&stored.kind, kind);
        ids.push(stored.id);
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let job = store.get_job(&queued.id).await.unwrap().unwrap();
    assert_eq!((job.last_step, job.total_steps), (2, 40));

    let all = store.list_job_events(&queued.id, 0, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    let read_back: Vec<JobEventKind> = all[2..].iter().map(|event| event.kind.clone()).collect();
    assert_eq!(read_back, events);
    // Paging after an id, and a limit.
    let after = store
        .list_job_events(&queued.id, ids[1], 100)
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|event| event.id).collect::<Vec<_>>(),
        ids[2..]
    );
    assert_eq!(
        store.list_job_events(&queued.id, 0, 2).await.unwrap().len(),
        2
    );
    store.close().await;
}

fn version(name: &str, number: u32, job_id: &str) -> NewModelVersion {
    NewModelVersion {
        name: name.to_owned(),
        version: number,
        base_model: "tiny".to_owned(),
        kind: "adapter".to_owned(),
        path: format!("/var/lib/medbox/models/{name}/{number}"),
        manifest_sha256: "cd".repeat(32),
        metrics_json: r#"{"eval_loss":0.5}"#.to_owned(),
        job_id: Some(job_id.to_owned()),
        dataset_id: None,
    }
}

async fn completing_a_job_registers_its_version_atomically(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let (first, _) = store.create_job(&job(&dataset_id), 10_000).await.unwrap();
    let (second, _) = store.create_job(&job(&dataset_id), 10_001).await.unwrap();
    assert_eq!(
        store.latest_model_version("tiny-lab-flags").await.unwrap(),
        None
    );

    // Not running yet: nothing is written.
    assert_eq!(
        store
            .complete_job(
                &first.id,
                &version("tiny-lab-flags", 1, &first.id),
                11_000,
                None
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.list_model_versions(None).await.unwrap(), Vec::new());

    for job in [&first, &second] {
        store
            .transition_job(
                &job.id,
                &transition(&[JobState::Queued], JobState::Running, 11_000),
            )
            .await
            .unwrap()
            .unwrap();
    }
    let (done, event, registered) = store
        .complete_job(
            &first.id,
            &version("tiny-lab-flags", 1, &first.id),
            12_000,
            Some("registered tiny-lab-flags version 1".to_owned()),
        )
        .await
        .unwrap()
        .expect("running → succeeded");
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.model_version_id, Some(registered.id));
    assert_eq!(done.finished_at_ms, Some(12_000));
    assert_eq!(state_of(&event.kind), Some(JobState::Succeeded));
    assert_eq!(registered.version, 1);
    assert_eq!(
        store.get_model_version_by_id(registered.id).await.unwrap(),
        Some(registered.clone())
    );
    assert_eq!(
        store.latest_model_version("tiny-lab-flags").await.unwrap(),
        Some(1)
    );

    // The same version number again is refused, and the job stays running.
    let error = store
        .complete_job(
            &second.id,
            &version("tiny-lab-flags", 1, &second.id),
            13_000,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "query", "{error}");
    assert_eq!(
        store.get_job(&second.id).await.unwrap().unwrap().state,
        JobState::Running
    );
    store
        .complete_job(
            &second.id,
            &version("tiny-lab-flags", 2, &second.id),
            13_000,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let versions: Vec<u32> = store
        .list_model_versions(Some("tiny-lab-flags"))
        .await
        .unwrap()
        .iter()
        .map(|record| record.version)
        .collect();
    assert_eq!(versions, [2, 1]);
    store.close().await;
}

async fn unfinished_jobs_come_back_running_first_then_queued(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let mut ids = Vec::new();
    for at in 0..4 {
        let (created, _) = store
            .create_job(&job(&dataset_id), 10_000 + at)
            .await
            .unwrap();
        ids.push(created.id);
    }
    // ids[0] finished, ids[2] running, ids[1] and ids[3] queued.
    for (id, to) in [(&ids[0], JobState::Running), (&ids[2], JobState::Running)] {
        store
            .transition_job(id, &transition(&[JobState::Queued], to, 11_000))
            .await
            .unwrap()
            .unwrap();
    }
    store
        .transition_job(
            &ids[0],
            &transition(&[JobState::Running], JobState::Cancelled, 12_000),
        )
        .await
        .unwrap()
        .unwrap();
    let unfinished: Vec<String> = store
        .unfinished_jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(unfinished, [ids[2].clone(), ids[1].clone(), ids[3].clone()]);

    let counts = store.count_jobs_by_state().await.unwrap();
    assert_eq!(
        counts,
        [
            (JobState::Queued, 2),
            (JobState::Running, 1),
            (JobState::Succeeded, 0),
            (JobState::Failed, 0),
            (JobState::Cancelled, 1),
        ]
    );
    let queued: Vec<String> = store
        .list_jobs(&JobFilter {
            state: Some(JobState::Queued),
            limit: 0,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(queued, [ids[3].clone(), ids[1].clone()], "newest first");
    let newest_two = store
        .list_jobs(&JobFilter {
            state: None,
            limit: 2,
        })
        .await
        .unwrap();
    assert_eq!(newest_two.len(), 2);
    assert_eq!(newest_two[0].id, ids[3]);
    store.close().await;
}

async fn job_events_are_append_only(db: &TestDb) {
    let store = db.open().await;
    let dataset_id = accepted_dataset(&store).await;
    let (queued, _) = store.create_job(&job(&dataset_id), 10_000).await.unwrap();
    let mut connection = db.raw_connection().await;
    let error = connection
        .execute(
            sqlx::query("UPDATE job_events SET message = 'edited' WHERE job_id = $1")
                .bind(&queued.id),
        )
        .await
        .expect_err("job events cannot be edited");
    assert!(
        error.to_string().contains("append-only"),
        "unexpected error: {error}"
    );
    store.close().await;
}
