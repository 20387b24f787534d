//! FineTuning in-process: dataset uploads, the inference-only refusal, and
//! the job runner driving a TEST DOUBLE of `medbox-trainer`.
//!
//! The double (`tests/test-doubles/fake-trainer`, a shell script each test
//! copies into its temporary folder) speaks the real process protocol: it reads `job.json`,
//! resumes from the newest `checkpoints/step-N`, prints event lines, writes
//! an adapter folder on success, and stops on SIGTERM. It trains nothing. What
//! it does is chosen by the job's output name: `ok…` succeeds, `slow…` takes
//! its time, `stubborn…` ignores SIGTERM, `crash…` dies of SIGKILL mid-run
//! after writing to stderr, `fail…` reports a failure.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use medbox_proto::v1::{self as pb, fine_tuning_client::FineTuningClient};
use medbox_server::RunningServer;
use tonic::{Code, transport::Channel};

use crate::{Authed, Bearer, config_text, http_get, load_config};

/// The test double of `medbox-trainer` (shared with the end-to-end tests).
const FAKE_TRAINER: &str = include_str!("../../../../tests/test-doubles/fake-trainer");

/// A medboxd with the fake trainer, in a data folder the test owns.
struct FinetuneServer {
    server: RunningServer,
    channel: Channel,
    admin_key: String,
    data_dir: PathBuf,
}

struct Sandbox {
    dir: tempfile::TempDir,
    trainer: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let trainer = dir.path().join("fake-trainer");
        std::fs::write(&trainer, FAKE_TRAINER).unwrap();
        std::fs::set_permissions(&trainer, std::fs::Permissions::from_mode(0o755)).unwrap();
        Sandbox { dir, trainer }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts medboxd on this sandbox's data folder with `[finetune]` settings.
    async fn start(&self, finetune: &str) -> FinetuneServer {
        let section = format!(
            "[finetune]\ntrainer_path = \"{}\"\ncancel_grace_seconds = 2\n{finetune}",
            self.trainer.display()
        );
        let text = format!("{}{section}", config_text(&self.data_dir(), ""));
        let config = load_config(&text, self.dir.path());
        let server = medbox_server::start(config).await.expect("medboxd starts");
        let channel = Channel::from_shared(format!("http://{}", server.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let admin_key = std::fs::read_to_string(self.data_dir().join("admin.key"))
            .unwrap()
            .trim()
            .to_owned();
        FinetuneServer {
            server,
            channel,
            admin_key,
            data_dir: std::fs::canonicalize(self.data_dir()).unwrap(),
        }
    }
}

impl FinetuneServer {
    fn client(&self) -> FineTuningClient<Authed> {
        FineTuningClient::with_interceptor(self.channel.clone(), Bearer::new(Some(&self.admin_key)))
    }

    async fn upload(
        &self,
        name: &str,
        format: &str,
        body: &[u8],
    ) -> Result<pb::Dataset, tonic::Status> {
        let mut messages = vec![pb::UploadDatasetRequest {
            part: Some(pb::upload_dataset_request::Part::Header(
                pb::DatasetHeader {
                    name: name.to_owned(),
                    format: format.to_owned(),
                    eval_percent: 0,
                    split_seed: None,
                },
            )),
        }];
        // Small pieces, so that lines straddle messages.
        for piece in body.chunks(37) {
            messages.push(pb::UploadDatasetRequest {
                part: Some(pb::upload_dataset_request::Part::Chunk(piece.to_vec())),
            });
        }
        self.client()
            .upload_dataset(tokio_stream::iter(messages))
            .await
            .map(|response| response.into_inner().dataset.unwrap())
    }

    async fn good_dataset(&self) -> pb::Dataset {
        let dataset = self
            .upload("lab-flags", "messages", good_dataset_text().as_bytes())
            .await
            .unwrap();
        assert_eq!(dataset.state, "accepted", "{dataset:?}");
        dataset
    }

    async fn create(&self, output_name: &str) -> Result<pb::Job, tonic::Status> {
        self.client()
            .create_job(job_request(output_name))
            .await
            .map(|response| response.into_inner().job.unwrap())
    }

    async fn job(&self, id: &str) -> pb::Job {
        self.client()
            .get_job(pb::GetJobRequest { id: id.to_owned() })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap()
    }

    /// Polls until the job is in `state` (at most 60 s).
    async fn wait_for(&self, id: &str, state: &str) -> pb::Job {
        for _ in 0..600 {
            let job = self.job(id).await;
            if job.state == state {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} never reached {state}: {:?}", self.job(id).await);
    }

    /// Every event of a job, from a WatchJob that runs to the job's end.
    async fn watch_to_end(&self, id: &str) -> Vec<pb::JobEvent> {
        let mut stream = self
            .client()
            .watch_job(pb::WatchJobRequest { id: id.to_owned() })
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        let collect = async {
            while let Some(event) = stream.message().await.unwrap() {
                events.push(event);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .expect("the watch ends when the job does");
        events
    }
}

fn job_request(output_name: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        base_model: "medical".into(),
        dataset: "lab-flags".into(),
        method: "lora".into(),
        teacher_model: String::new(),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(2),
            ..Default::default()
        }),
        output_name: output_name.into(),
        seed: Some(7),
    }
}

fn good_dataset_text() -> String {
    let mut text = String::new();
    for index in 0..40 {
        text.push_str(&format!(
            r#"{{"messages":[{{"role":"user","content":"Potassium {}.{} mmol/L, call 13812345678"}},{{"role":"assistant","content":"high"}}]}}"#,
            5 + index % 3,
            index
        ));
        text.push('\n');
    }
    text
}

fn states(events: &[pb::JobEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.event {
            Some(pb::job_event::Event::State(change)) => Some(change.state.clone()),
            _ => None,
        })
        .collect()
}

fn progress_steps(events: &[pb::JobEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|event| match &event.event {
            Some(pb::job_event::Event::Progress(progress)) => Some(progress.step),
            _ => None,
        })
        .collect()
}

fn assert_status(status: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{status:?} should say {needle}"
    );
}

fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_validated_deidentified_and_split() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("").await;
    let dataset = test.good_dataset().await;
    assert!(dataset.id.starts_with("ds_"), "{dataset:?}");
    assert_eq!(dataset.format, "messages");
    assert_eq!(
        (dataset.lines, dataset.valid_lines, dataset.invalid_lines),
        (40, 40, 0)
    );
    assert_eq!((dataset.train_examples, dataset.eval_examples), (38, 2));
    assert_eq!(dataset.sha256.len(), 64);
    assert_eq!(dataset.deidentified.get("mobile"), Some(&40));
    assert!(dataset.errors.is_empty());
    assert!(
        dataset.summary.starts_with("accepted"),
        "{}",
        dataset.summary
    );
    // The stored files hold no phone number, and the raw upload is gone.
    let folder = test.data_dir.join("datasets").join(&dataset.id);
    let train = std::fs::read_to_string(folder.join("train.jsonl")).unwrap();
    assert_eq!(train.lines().count(), 38);
    assert!(!train.contains("13812345678"), "{train}");
    assert!(train.contains("[MOBILE]"), "{train}");
    let leftovers: Vec<_> = std::fs::read_dir(test.data_dir.join("datasets"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, std::slice::from_ref(&dataset.id));

    // The same bytes again: the same SHA-256, a new id; the name means the newest.
    let again = test.good_dataset().await;
    assert_eq!(again.sha256, dataset.sha256);
    assert_ne!(again.id, dataset.id);
    let listed = test
        .client()
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .datasets;
    assert_eq!(
        listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        [again.id.as_str(), dataset.id.as_str()]
    );

    // Header faults name the field.
    let status = test.upload("", "messages", b"{}").await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "name");
    let status = test.upload("x", "sharegpt", b"{}").await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "format");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_with_bad_lines_is_rejected_and_cannot_be_trained_on() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("").await;
    let good =
        r#"{"messages":[{"role":"user","content":"K 6.1"},{"role":"assistant","content":"high"}]}"#;
    let body = format!(
        "{good}\n{{\"messages\": [\n{good}\n{{\"messages\":[{{\"role\":\"doctor\",\"content\":\"x\"}},{{\"role\":\"assistant\",\"content\":\"y\"}}]}}\n\n{good}\n"
    );
    let dataset = test
        .upload("lab-flags", "messages", body.as_bytes())
        .await
        .unwrap();
    assert_eq!(dataset.state, "rejected");
    assert_eq!((dataset.lines, dataset.blank_lines), (6, 1));
    assert_eq!((dataset.valid_lines, dataset.invalid_lines), (3, 2));
    assert_eq!((dataset.train_examples, dataset.eval_examples), (0, 0));
    assert!(dataset.sha256.is_empty());
    let errors: Vec<(u64, &str)> = dataset
        .errors
        .iter()
        .map(|error| (error.line, error.kind.as_str()))
        .collect();
    assert_eq!(errors, [(2, "bad_json"), (4, "unknown_role")]);
    assert!(dataset.errors[1].reason.contains("`doctor`"), "{dataset:?}");
    assert_eq!(dataset.invalid_by_kind.get("bad_json"), Some(&1));
    assert!(
        dataset.summary.contains("2 of 5 lines are bad"),
        "{}",
        dataset.summary
    );
    // Nothing of it is on disk.
    let entries = std::fs::read_dir(test.data_dir.join("datasets"))
        .unwrap()
        .count();
    assert_eq!(entries, 0);

    let status = test.create("ok-model").await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "rejected");
    assert!(status.message().contains("lab-flags"), "{status:?}");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_job_names_what_is_at_fault() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("").await;
    test.good_dataset().await;
    let check = |request: pb::CreateJobRequest, code: Code, needle: &'static str| {
        let mut client = test.client();
        async move {
            let status = client.create_job(request).await.unwrap_err();
            assert_status(&status, code, needle);
        }
    };
    let mut request = job_request("ok-a");
    request.base_model = "cardiology-70b".into();
    check(request, Code::NotFound, "cardiology-70b").await;
    let mut request = job_request("ok-a");
    request.dataset = "nope".into();
    check(request, Code::NotFound, "dataset `nope`").await;
    let mut request = job_request("ok-a");
    request.method = "qlora".into();
    check(request, Code::InvalidArgument, "method").await;
    let mut request = job_request("ok-a");
    request.hyperparameters = Some(pb::Hyperparameters {
        epochs: Some(0),
        ..Default::default()
    });
    check(request, Code::InvalidArgument, "`epochs`").await;
    let mut request = job_request("ok-a");
    request.method = "distill".into();
    check(request, Code::InvalidArgument, "teacher_model").await;
    let mut request = job_request("ok-a");
    request.teacher_model = "tiny".into();
    check(request, Code::InvalidArgument, "teacher_model").await;
    check(
        job_request("../escape"),
        Code::InvalidArgument,
        "output_name",
    )
    .await;
    check(job_request("tiny"), Code::InvalidArgument, "output_name").await;
    let status = test
        .client()
        .get_job(pb::GetJobRequest {
            id: "job_000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "job_000000000000");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_only_profile_refuses_datasets_and_jobs() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("enabled = false\n").await;
    let status = test
        .upload("lab-flags", "messages", good_dataset_text().as_bytes())
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "inference-only");
    let status = test.create("ok-a").await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "inference-only");
    // What was done before can still be looked at.
    let jobs = test
        .client()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty());
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_order_one_at_a_time_and_register_versions() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("max_concurrent_jobs = 1\n").await;
    let dataset = test.good_dataset().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = test.create("ok-flags").await.unwrap();
        assert_eq!(job.state, "queued");
        assert_eq!(job.dataset_name, "lab-flags");
        assert_eq!(job.base_model, "tiny", "the alias resolves to the model");
        ids.push(job.id);
    }
    let mut jobs = Vec::new();
    for id in &ids {
        jobs.push(test.wait_for(id, "succeeded").await);
    }
    for pair in jobs.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at,
            "one at a time, in order: {pair:?}"
        );
    }
    let versions: Vec<u32> = jobs.iter().map(|job| job.model_version).collect();
    assert_eq!(versions, [1, 2, 3]);
    assert!(
        jobs.iter()
            .all(|job| job.model_kind == "adapter" && job.attempts == 1)
    );
    assert_eq!((jobs[0].step, jobs[0].total_steps), (6, 6));

    // Each version is a folder with a manifest that matches it.
    let folder = test.data_dir.join("models/ok-flags/2");
    let manifest: medbox_finetune::ModelManifest = medbox_finetune::ModelManifest::from_json(
        &std::fs::read_to_string(folder.join("manifest.json")).unwrap(),
    )
    .unwrap();
    medbox_finetune::manifest::verify_folder(&folder, &manifest).unwrap();
    assert_eq!((manifest.name.as_str(), manifest.version), ("ok-flags", 2));
    assert_eq!(manifest.job_id, ids[1]);
    assert_eq!(manifest.dataset.sha256, dataset.sha256);
    assert_eq!(manifest.seed, 7);
    assert_eq!(manifest.hyperparameters.epochs, 2);
    assert_eq!(manifest.metrics.get("eval_loss"), Some(&0.4286));
    let files: Vec<&str> = manifest
        .files
        .iter()
        .map(|file| file.path.as_str())
        .collect();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    // The job folder keeps the spec, the log and the checkpoints; the output moved.
    let job_dir = test.data_dir.join("jobs").join(&ids[1]);
    let spec = medbox_finetune::JobSpec::from_json(
        &std::fs::read_to_string(job_dir.join("job.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec.dataset.train_examples, 38);
    assert_eq!(spec.hyperparameters.lora.as_ref().unwrap().r, 16);
    assert!(job_dir.join("checkpoints/step-6").is_dir());
    assert!(!job_dir.join("output").exists());
    let log = std::fs::read_to_string(job_dir.join("trainer.log")).unwrap();
    assert!(
        log.contains("fake-trainer: ok-flags (ok) from step 0"),
        "{log}"
    );

    let metrics = http_get(test.server.metrics_addr().unwrap(), "/metrics").await;
    for needle in [
        "medbox_jobs{state=\"succeeded\"} 3",
        "medbox_jobs{state=\"queued\"} 0",
        "medbox_jobs{state=\"running\"} 0",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack `{needle}`:\n{metrics}"
        );
    }
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_job_streams_stored_then_live_events_to_the_end() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("").await;
    test.good_dataset().await;
    let job = test.create("ok-watch").await.unwrap();
    let live = test.watch_to_end(&job.id).await;
    assert_eq!(states(&live), ["queued", "running", "succeeded"]);
    assert_eq!(progress_steps(&live), [1, 2, 3, 4, 5, 6]);
    let seqs: Vec<i64> = live.iter().map(|event| event.seq).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    let evals = live
        .iter()
        .filter(|event| matches!(event.event, Some(pb::job_event::Event::Eval(_))))
        .count();
    let checkpoints = live
        .iter()
        .filter(|event| matches!(event.event, Some(pb::job_event::Event::Checkpoint(_))))
        .count();
    assert_eq!((evals, checkpoints), (3, 3));
    let Some(pb::job_event::Event::State(last)) = &live.last().unwrap().event else {
        panic!("the stream ends with the final state");
    };
    assert_eq!(last.message, "registered ok-watch version 1");
    let Some(pb::job_event::Event::Progress(progress)) = &live
        .iter()
        .rev()
        .find(|event| matches!(event.event, Some(pb::job_event::Event::Progress(_))))
        .unwrap()
        .event
    else {
        unreachable!()
    };
    assert_eq!((progress.total_steps, progress.learning_rate), (6, 0.0002));
    assert_eq!(progress.eta_seconds, Some(0.0));
    // Watching a finished job replays the same events and ends.
    let replay = test.watch_to_end(&job.id).await;
    assert_eq!(replay, live);
    let status = test
        .client()
        .watch_job(pb::WatchJobRequest {
            id: "job_000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_trainer_and_drops_a_queued_job() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("max_concurrent_jobs = 2\n").await;
    test.good_dataset().await;
    let first = test.create("slow-a").await.unwrap();
    let second = test.create("stubborn-b").await.unwrap();
    let third = test.create("slow-c").await.unwrap();
    test.wait_for(&first.id, "running").await;
    test.wait_for(&second.id, "running").await;
    // Two at a time: the third waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(test.job(&third.id).await.state, "queued");

    let cancelled = test
        .client()
        .cancel_job(pb::CancelJobRequest {
            id: third.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, "cancelled");
    assert_eq!(cancelled.attempts, 0);

    let first_dir = test.data_dir.join("jobs").join(&first.id);
    let pid: i32 = std::fs::read_to_string(first_dir.join("trainer.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(pid));
    let cancelled = test
        .client()
        .cancel_job(pb::CancelJobRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, "cancelled");
    assert!(
        !process_alive(pid),
        "the trainer is gone when CancelJob answers"
    );
    assert!(!first_dir.join("trainer.pid").exists());
    let log = std::fs::read_to_string(first_dir.join("trainer.log")).unwrap();
    assert!(log.contains("SIGTERM, stopping"), "{log}");

    // A trainer that ignores SIGTERM gets SIGKILL after the grace (2 s here).
    let started = std::time::Instant::now();
    let cancelled = test
        .client()
        .cancel_job(pb::CancelJobRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.state, "cancelled");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(
        test.data_dir
            .join("jobs")
            .join(&second.id)
            .join("trainer.log"),
    )
    .unwrap();
    assert!(log.contains("SIGTERM ignored"), "{log}");

    // Nothing left to cancel.
    let status = test
        .client()
        .cancel_job(pb::CancelJobRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "already cancelled");
    let events = test.watch_to_end(&first.id).await;
    assert_eq!(states(&events), ["queued", "running", "cancelled"]);
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_or_failing_trainer_fails_its_job_with_a_clean_message() {
    let sandbox = Sandbox::new();
    let test = sandbox.start("max_concurrent_jobs = 2\n").await;
    test.good_dataset().await;
    let crashed = test.create("crash-a").await.unwrap();
    let failed = test.create("fail-b").await.unwrap();
    let crashed = test.wait_for(&crashed.id, "failed").await;
    assert_eq!(
        crashed.error,
        "the trainer stopped unexpectedly (killed by signal 9)"
    );
    assert_eq!(crashed.step, 3);
    // The trainer's own words stay in its log, not in the answer.
    let log = std::fs::read_to_string(
        test.data_dir
            .join("jobs")
            .join(&crashed.id)
            .join("trainer.log"),
    )
    .unwrap();
    assert!(log.contains("/very/internal/path.py"), "{log}");
    let failed = test.wait_for(&failed.id, "failed").await;
    assert_eq!(
        failed.error,
        "the trainer failed: out of memory at batch size 8: lower batch_size"
    );
    let events = test.watch_to_end(&crashed.id).await;
    assert_eq!(states(&events), ["queued", "running", "failed"]);
    assert!(!test.data_dir.join("models/crash-a").exists());
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_medboxd_resumes_running_jobs_from_their_checkpoints() {
    let sandbox = Sandbox::new();
    let before = sandbox.start("").await;
    before.good_dataset().await;
    let job = before.create("slow-resume").await.unwrap();
    let waiting = before.create("ok-after").await.unwrap();
    // Let it pass a checkpoint, then stop medboxd mid-job.
    let mut stream = before
        .client()
        .watch_job(pb::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let checkpoint = loop {
        let event = stream
            .message()
            .await
            .unwrap()
            .expect("events until a checkpoint");
        if let Some(pb::job_event::Event::Checkpoint(checkpoint)) = event.event {
            break checkpoint.step;
        }
    };
    drop(stream);
    let job_dir = before.data_dir.join("jobs").join(&job.id);
    before.server.shutdown().await.unwrap();
    // As if an earlier medboxd had died without stopping its trainer: one
    // still runs for the job, named in trainer.pid. It must be stopped before
    // the job starts again, so that two never share the checkpoints.
    let orphan_log = sandbox.dir.path().join("orphan.log");
    let mut orphan = std::process::Command::new(&sandbox.trainer);
    std::os::unix::process::CommandExt::process_group(&mut orphan, 0);
    let mut orphan = orphan
        .arg("--job-dir")
        .arg(&job_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&orphan_log).unwrap())
        .spawn()
        .unwrap();
    std::fs::write(job_dir.join("trainer.pid"), format!("{}\n", orphan.id())).unwrap();
    // Wait until it runs its SIGTERM handler's script (its first log line
    // comes after the trap): a fast medboxd could otherwise signal it before
    // the shell has installed the trap, and the default action kills it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&orphan_log)
        .unwrap_or_default()
        .contains("from step")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Jobs keep their places: the interrupted one is still running, the other queued.
    let after = sandbox.start("").await;
    let resumed = after.wait_for(&job.id, "succeeded").await;
    eprintln!(
        "{}",
        std::fs::read_to_string(job_dir.join("trainer.log")).unwrap()
    );
    assert_eq!(resumed.attempts, 2);
    let events = after.watch_to_end(&job.id).await;
    assert_eq!(
        states(&events),
        ["queued", "running", "running", "succeeded"]
    );
    let restart = events
        .iter()
        .position(|event| {
            matches!(&event.event, Some(pb::job_event::Event::State(change))
                if change.state == "running" && change.message.contains("resuming"))
        })
        .expect("the second start says it resumes");
    let steps_after = progress_steps(&events[restart..]);
    let first = steps_after[0];
    assert!(
        first > checkpoint,
        "resumed after the checkpoint at step {checkpoint}, not from scratch: {steps_after:?}"
    );
    assert_eq!(steps_after.last(), Some(&20));
    let log = std::fs::read_to_string(
        after
            .data_dir
            .join("jobs")
            .join(&job.id)
            .join("trainer.log"),
    )
    .unwrap();
    assert!(log.contains("SIGTERM, stopping"), "{log}");
    assert!(log.contains("(slow) from step 0"), "{log}");
    assert!(
        log.contains(&format!("(slow) from step {}", first - 1)),
        "{log}"
    );
    let orphan_status = orphan.wait().unwrap();
    assert_eq!(orphan_status.code(), Some(143), "the orphan got SIGTERM");
    let orphan_said = std::fs::read_to_string(&orphan_log).unwrap();
    assert!(orphan_said.contains("SIGTERM, stopping"), "{orphan_said}");
    let waited = after.wait_for(&waiting.id, "succeeded").await;
    assert!(
        waited.started_at >= resumed.finished_at,
        "the queue order holds"
    );
    after.server.shutdown().await.unwrap();
}
