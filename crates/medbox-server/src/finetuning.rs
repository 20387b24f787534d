//! `medbox.v1.FineTuning`: dataset uploads and fine-tuning jobs, proto ⇄
//! domain types at this edge. The dataset pipeline is in `datasets.rs`, the
//! job runner in `jobs.rs`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use medbox_deid::Deidentifier;
use medbox_finetune::{
    DEFAULT_EVAL_PERCENT, DatasetFormat, HyperparameterOverrides, Hyperparameters, Method,
    SplitConfig,
};
use medbox_proto::v1 as pb;
use medbox_store::{
    DatasetRecord, DatasetState, JobEventKind, JobEventRecord, JobFilter, JobRecord, JobState,
    NewJob,
};
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    auth::now_ms,
    datasets::{self, DEFAULT_SPLIT_SEED, StoredReport, ValidHeader},
    error::ApiError,
    jobs::{JobRunner, RunnerError},
    request_log::RequestRecord,
    state::AppState,
};

/// Events buffered per watcher before the sender waits for the client.
const WATCH_BUFFER: usize = 64;
/// Events read from the store per page when a watcher catches up.
const EVENT_PAGE: u32 = 1000;
/// The default seed of a job's data order and initialisation.
const DEFAULT_JOB_SEED: u64 = 42;
/// Longest dataset name.
const MAX_DATASET_NAME_CHARS: usize = 128;
/// Longest output (model) name; it names a folder.
const MAX_OUTPUT_NAME_CHARS: usize = 64;

/// What the service knows beyond the shared state.
pub struct FinetuneContext {
    /// `[finetune] enabled`: false on the inference-only profile.
    pub enabled: bool,
    /// `None` on the inference-only profile.
    pub runner: Option<JobRunner>,
    /// `<data_dir>/datasets`, absolute.
    pub datasets_dir: PathBuf,
    pub trainer_path: PathBuf,
    pub checkpoint_every: u32,
    pub max_dataset_bytes: u64,
    pub deidentifier: Arc<Deidentifier>,
}

pub struct FineTuningService {
    state: AppState,
    finetune: Arc<FinetuneContext>,
}

impl FineTuningService {
    pub fn new(state: AppState, finetune: Arc<FinetuneContext>) -> FineTuningService {
        FineTuningService { state, finetune }
    }

    fn require_enabled(&self) -> Result<&JobRunner, ApiError> {
        match (&self.finetune.runner, self.finetune.enabled) {
            (Some(runner), true) => Ok(runner),
            _ => Err(ApiError::FinetuneDisabled),
        }
    }
}

fn runner_error(err: RunnerError) -> ApiError {
    match err {
        RunnerError::QueueFull { limit } => ApiError::JobQueueFull { limit },
        RunnerError::NotFound(id) => ApiError::JobNotFound(id),
        RunnerError::Finished { id, state } => ApiError::JobFinished {
            id,
            state: state.as_str(),
        },
        RunnerError::Stopped => ApiError::ShuttingDown,
        RunnerError::Store(err) => err.into(),
    }
}

fn valid_header(header: pb::DatasetHeader) -> Result<ValidHeader, ApiError> {
    let name = header.name.trim().to_owned();
    if name.is_empty() {
        return Err(ApiError::MissingField("name"));
    }
    if name.chars().count() > MAX_DATASET_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidField {
            field: "name",
            reason: format!("at most {MAX_DATASET_NAME_CHARS} characters, no control characters"),
        });
    }
    let format: DatasetFormat = match header.format.as_str() {
        "" => DatasetFormat::Messages,
        text => {
            text.parse().map_err(
                |err: medbox_finetune::UnknownFormat| ApiError::InvalidField {
                    field: "format",
                    reason: err.to_string(),
                },
            )?
        }
    };
    let eval_percent = match header.eval_percent {
        0 => DEFAULT_EVAL_PERCENT,
        percent @ 1..=50 => percent as u8,
        other => {
            return Err(ApiError::InvalidField {
                field: "eval_percent",
                reason: format!(
                    "must be between 1 and 50 (0 = {DEFAULT_EVAL_PERCENT}), got {other}"
                ),
            });
        }
    };
    Ok(ValidHeader {
        name,
        format,
        split: SplitConfig {
            eval_percent,
            seed: header.split_seed.unwrap_or(DEFAULT_SPLIT_SEED),
        },
    })
}

/// An output name becomes a folder under `<data_dir>/models`: a plain word.
fn check_output_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::MissingField("output_name"));
    }
    let plain = name.len() <= MAX_OUTPUT_NAME_CHARS
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if plain {
        Ok(())
    } else {
        Err(ApiError::InvalidField {
            field: "output_name",
            reason: format!(
                "use letters, digits, '.', '_' and '-' (at most {MAX_OUTPUT_NAME_CHARS}), not starting with '.'"
            ),
        })
    }
}

fn overrides(hyperparameters: Option<pb::Hyperparameters>) -> HyperparameterOverrides {
    let h = hyperparameters.unwrap_or_default();
    HyperparameterOverrides {
        epochs: h.epochs,
        learning_rate: h.learning_rate,
        batch_size: h.batch_size,
        gradient_accumulation_steps: h.gradient_accumulation_steps,
        max_seq_len: h.max_seq_len,
        warmup_ratio: h.warmup_ratio,
        weight_decay: h.weight_decay,
        max_grad_norm: h.max_grad_norm,
        eval_every: h.eval_every,
        early_stopping_patience: h.early_stopping_patience,
        lora_r: h.lora_r,
        lora_alpha: h.lora_alpha,
        lora_dropout: h.lora_dropout,
        distill_ratio: h.distill_ratio,
        distill_temperature: h.distill_temperature,
    }
}

/// The hyper-parameter errors name the proto field: `hyperparameters.<field>`.
fn hyperparameter_error(err: medbox_finetune::HyperparameterError) -> ApiError {
    ApiError::InvalidField {
        field: "hyperparameters",
        reason: err.to_string(),
    }
}

impl FineTuningService {
    /// A registered causal-LM (by name or alias) for `field`: its name and folder.
    async fn registered_model(
        &self,
        field: &'static str,
        name: &str,
    ) -> Result<(String, PathBuf), ApiError> {
        if name.is_empty() {
            return Err(ApiError::MissingField(field));
        }
        let models = self
            .state
            .store
            .list_models()
            .await
            .map_err(ApiError::from)?;
        let model = models
            .into_iter()
            .find(|model| model.name == name || model.aliases.iter().any(|alias| alias == name))
            .ok_or_else(|| ApiError::UnknownModel {
                field,
                name: name.to_owned(),
            })?;
        if model.kind != "causal-lm" {
            return Err(ApiError::InvalidField {
                field,
                reason: format!(
                    "`{}` is a {} model; only causal-lm models can be trained",
                    model.name, model.kind
                ),
            });
        }
        let path = PathBuf::from(&model.path);
        let is_folder = tokio::fs::metadata(path.join("config.json"))
            .await
            .is_ok_and(|metadata| metadata.is_file());
        if !is_folder {
            return Err(ApiError::InvalidField {
                field,
                reason: format!("the folder of `{}` is missing on this box", model.name),
            });
        }
        Ok((model.name, path))
    }

    /// Checks a CreateJob request and turns it into the job to store.
    async fn new_job(&self, request: pb::CreateJobRequest) -> Result<NewJob, ApiError> {
        if request.method.is_empty() {
            return Err(ApiError::MissingField("method"));
        }
        let method: Method =
            request
                .method
                .parse()
                .map_err(
                    |err: medbox_finetune::UnknownMethod| ApiError::InvalidField {
                        field: "method",
                        reason: err.to_string(),
                    },
                )?;
        check_output_name(&request.output_name)?;
        let hyperparameters = Hyperparameters::resolve(method, &overrides(request.hyperparameters))
            .map_err(hyperparameter_error)?;
        let (base_model, base_model_path) = self
            .registered_model("base_model", &request.base_model)
            .await?;
        let teacher = match (method, request.teacher_model.is_empty()) {
            (Method::Distill, true) => return Err(ApiError::MissingField("teacher_model")),
            (Method::Distill, false) => Some(
                self.registered_model("teacher_model", &request.teacher_model)
                    .await?,
            ),
            (_, true) => None,
            (_, false) => {
                return Err(ApiError::InvalidField {
                    field: "teacher_model",
                    reason: format!(
                        "only method distill has a teacher; this job's method is {method}"
                    ),
                });
            }
        };
        if request.dataset.is_empty() {
            return Err(ApiError::MissingField("dataset"));
        }
        let dataset = self
            .state
            .store
            .find_dataset(&request.dataset)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::DatasetNotFound(request.dataset.clone()))?;
        if dataset.state != DatasetState::Accepted {
            return Err(ApiError::DatasetRejected {
                name: dataset.name,
                invalid_lines: dataset.invalid_lines,
            });
        }
        if let Some(existing) = self
            .state
            .store
            .get_model(&request.output_name)
            .await
            .map_err(ApiError::from)?
            && existing.source != "finetune"
        {
            return Err(ApiError::InvalidField {
                field: "output_name",
                reason: format!(
                    "`{}` is already a model on this box that fine-tuning did not make; choose another name",
                    request.output_name
                ),
            });
        }
        let is_trainer = tokio::fs::metadata(&self.finetune.trainer_path)
            .await
            .is_ok_and(|metadata| metadata.is_file());
        if !is_trainer {
            return Err(ApiError::TrainerMissing);
        }
        let hyperparameters_json = serde_json::to_string(&hyperparameters)
            .map_err(|err| ApiError::Internal(format!("hyper-parameters: {err}")))?;
        let (teacher_model, teacher_model_path) = match teacher {
            Some((name, path)) => (Some(name), Some(path.display().to_string())),
            None => (None, None),
        };
        Ok(NewJob {
            method: method.as_str().to_owned(),
            base_model,
            base_model_path: base_model_path.display().to_string(),
            teacher_model,
            teacher_model_path,
            dataset_id: dataset.id,
            hyperparameters_json,
            seed: request.seed.unwrap_or(DEFAULT_JOB_SEED),
            checkpoint_every: self.finetune.checkpoint_every,
            output_name: request.output_name,
        })
    }

    /// A job as clients see it, with its dataset's name and registered version.
    async fn job_to_proto(
        &self,
        job: JobRecord,
        dataset_names: &mut HashMap<String, String>,
    ) -> Result<pb::Job, ApiError> {
        let store = &self.state.store;
        let dataset_name = match dataset_names.get(&job.dataset_id) {
            Some(name) => name.clone(),
            None => {
                let name = store
                    .find_dataset(&job.dataset_id)
                    .await
                    .map_err(ApiError::from)?
                    .map(|dataset| dataset.name)
                    .unwrap_or_default();
                dataset_names.insert(job.dataset_id.clone(), name.clone());
                name
            }
        };
        let version = match job.model_version_id {
            Some(id) => store
                .get_model_version_by_id(id)
                .await
                .map_err(ApiError::from)?,
            None => None,
        };
        Ok(pb::Job {
            id: job.id,
            state: job.state.as_str().to_owned(),
            method: job.method,
            base_model: job.base_model,
            teacher_model: job.teacher_model.unwrap_or_default(),
            dataset_id: job.dataset_id,
            dataset_name,
            hyperparameters_json: job.hyperparameters_json,
            seed: job.seed,
            output_name: job.output_name,
            error: job.error.unwrap_or_default(),
            attempts: job.attempts,
            step: job.last_step,
            total_steps: job.total_steps,
            created_at: job.created_at_ms,
            started_at: job.started_at_ms.unwrap_or_default(),
            finished_at: job.finished_at_ms.unwrap_or_default(),
            model_version: version
                .as_ref()
                .map(|version| version.version)
                .unwrap_or_default(),
            model_kind: version.map(|version| version.kind).unwrap_or_default(),
        })
    }

    async fn one_job_to_proto(&self, job: JobRecord) -> Result<pb::Job, ApiError> {
        self.job_to_proto(job, &mut HashMap::new()).await
    }

    /// Reads the client stream into the upload's temporary file, then
    /// processes it off the async workers.
    async fn upload(
        &self,
        mut stream: Streaming<pb::UploadDatasetRequest>,
        record: &mut RequestRecord,
    ) -> Result<pb::Dataset, ApiError> {
        self.require_enabled()?;
        let header = match stream.message().await {
            Ok(Some(pb::UploadDatasetRequest {
                part: Some(pb::upload_dataset_request::Part::Header(header)),
            })) => header,
            Ok(_) => {
                return Err(ApiError::InvalidField {
                    field: "header",
                    reason: "the first message must carry the header (name, format)".to_owned(),
                });
            }
            Err(_) => return Err(ApiError::UploadInterrupted),
        };
        let header = valid_header(header)?;
        record.model = Some(header.name.clone());
        let store = &self.state.store;
        let id = store.new_dataset_id().map_err(ApiError::from)?;
        let datasets_dir = self.finetune.datasets_dir.clone();
        let upload = UploadFile::create(&datasets_dir, &id).await?;
        let received = self.receive(&mut stream, &upload).await;
        let processed = match received {
            Ok(()) => {
                let header = header.clone();
                let deidentifier = self.finetune.deidentifier.clone();
                let id = id.clone();
                tokio::task::spawn_blocking(move || {
                    datasets::process_upload(&datasets_dir, &id, &header, &deidentifier)
                })
                .await
                .map_err(|err| ApiError::Internal(format!("processing an upload: {err}")))
                .and_then(|result| {
                    result.map_err(|err| ApiError::Internal(format!("processing an upload: {err}")))
                })
            }
            Err(err) => Err(err),
        };
        upload.remove().await;
        let new_dataset = processed?;
        let dataset = store
            .create_dataset(&id, &new_dataset, now_ms())
            .await
            .map_err(ApiError::from)?;
        tracing::info!(
            dataset_id = %dataset.id,
            state = %dataset.state,
            lines = dataset.lines,
            invalid_lines = dataset.invalid_lines,
            train = dataset.train_examples,
            eval = dataset.eval_examples,
            "dataset uploaded"
        );
        Ok(dataset_to_proto(dataset))
    }

    async fn receive(
        &self,
        stream: &mut Streaming<pb::UploadDatasetRequest>,
        upload: &UploadFile,
    ) -> Result<(), ApiError> {
        let limit = self.finetune.max_dataset_bytes;
        let mut file = upload.open().await?;
        let mut total: u64 = 0;
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => return Err(ApiError::UploadInterrupted),
            };
            match message.part {
                Some(pb::upload_dataset_request::Part::Chunk(bytes)) => {
                    total += bytes.len() as u64;
                    if total > limit {
                        return Err(ApiError::DatasetTooLarge { limit });
                    }
                    file.write_all(&bytes)
                        .await
                        .map_err(|err| ApiError::Internal(format!("writing an upload: {err}")))?;
                }
                Some(pb::upload_dataset_request::Part::Header(_)) => {
                    return Err(ApiError::InvalidField {
                        field: "header",
                        reason: "only the first message carries the header".to_owned(),
                    });
                }
                None => {}
            }
        }
        file.flush()
            .await
            .and(file.sync_all().await)
            .map_err(|err| ApiError::Internal(format!("writing an upload: {err}")))
    }
}

/// The raw upload on disk while it arrives and is checked: created 0600,
/// removed when processed (and at start-up, should medboxd stop meanwhile).
struct UploadFile {
    path: PathBuf,
}

impl UploadFile {
    async fn create(datasets_dir: &Path, id: &str) -> Result<UploadFile, ApiError> {
        tokio::fs::create_dir_all(datasets_dir)
            .await
            .map_err(|err| {
                ApiError::Internal(format!("creating {}: {err}", datasets_dir.display()))
            })?;
        Ok(UploadFile {
            path: datasets::upload_path(datasets_dir, id),
        })
    }

    async fn open(&self) -> Result<tokio::fs::File, ApiError> {
        tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .await
            .map_err(|err| ApiError::Internal(format!("creating {}: {err}", self.path.display())))
    }

    async fn remove(self) {
        if let Err(err) = tokio::fs::remove_file(&self.path).await
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(error = %err, path = %self.path.display(), "cannot remove an upload's temporary file");
        }
    }
}

fn dataset_to_proto(dataset: DatasetRecord) -> pb::Dataset {
    let report = StoredReport::parse(&dataset.report_json);
    let deidentified =
        datasets::counts(&serde_json::from_str(&dataset.deid_counts_json).unwrap_or_default());
    let summary = match dataset.state {
        DatasetState::Accepted => format!(
            "accepted: {} examples ({} train, {} eval), {} identifiers replaced",
            dataset.valid_lines,
            dataset.train_examples,
            dataset.eval_examples,
            deidentified.values().sum::<u64>()
        ),
        DatasetState::Rejected if report.no_examples && dataset.invalid_lines == 0 => {
            "rejected: the file holds no example".to_owned()
        }
        DatasetState::Rejected => format!(
            "rejected: {} of {} lines are bad; nothing of it was kept for training",
            dataset.invalid_lines,
            dataset.lines - dataset.blank_lines
        ),
    };
    pb::Dataset {
        id: dataset.id,
        name: dataset.name,
        format: dataset.format,
        state: dataset.state.as_str().to_owned(),
        sha256: dataset.sha256.unwrap_or_default(),
        bytes: dataset.bytes,
        lines: dataset.lines,
        blank_lines: dataset.blank_lines,
        valid_lines: dataset.valid_lines,
        invalid_lines: dataset.invalid_lines,
        train_examples: dataset.train_examples,
        eval_examples: dataset.eval_examples,
        eval_percent: u32::from(dataset.eval_percent),
        split_seed: dataset.split_seed,
        deidentified: deidentified.into_iter().collect(),
        errors: report
            .errors
            .into_iter()
            .map(|(line, kind, reason)| pb::LineError { line, kind, reason })
            .collect(),
        invalid_by_kind: report.invalid_by_kind.into_iter().collect(),
        summary,
        created_at: dataset.created_at_ms,
    }
}

fn event_to_proto(event: JobEventRecord) -> pb::JobEvent {
    let kind = match event.kind {
        JobEventKind::State { state, message } => pb::job_event::Event::State(pb::JobStateChange {
            state: state.as_str().to_owned(),
            message: message.unwrap_or_default(),
        }),
        JobEventKind::Progress {
            step,
            total_steps,
            epoch,
            loss,
            learning_rate,
            tokens_per_second,
            eta_seconds,
        } => pb::job_event::Event::Progress(pb::JobProgress {
            step,
            total_steps,
            epoch,
            loss,
            learning_rate,
            tokens_per_second,
            eta_seconds,
        }),
        JobEventKind::Eval { step, eval_loss } => {
            pb::job_event::Event::Eval(pb::JobEval { step, eval_loss })
        }
        JobEventKind::Checkpoint { step } => {
            pb::job_event::Event::Checkpoint(pb::JobCheckpoint { step })
        }
    };
    pb::JobEvent {
        seq: event.id,
        job_id: event.job_id,
        at: event.at_ms,
        event: Some(kind),
    }
}

/// The event ends the job's story: a state event into a terminal state.
fn is_final(event: &JobEventRecord) -> bool {
    matches!(event.kind, JobEventKind::State { state, .. } if state.is_terminal())
}

/// How a watch ended, for the record.
enum WatchEnd {
    /// The job reached its final state.
    Finished,
    /// The client went away.
    ClientGone,
    /// No more events will come (the runner stopped, or there is none).
    NoMoreEvents,
    Failed(ApiError),
}

/// Sends the stored events after `last_id`; `true` when the final one was among them.
async fn send_stored(
    store: &medbox_store::Store,
    job_id: &str,
    last_id: &mut i64,
    tx: &mpsc::Sender<Result<pb::JobEvent, Status>>,
) -> Result<bool, WatchEnd> {
    loop {
        let page = store
            .list_job_events(job_id, *last_id, EVENT_PAGE)
            .await
            .map_err(|err| WatchEnd::Failed(err.into()))?;
        let full_page = page.len() == EVENT_PAGE as usize;
        for event in page {
            *last_id = event.id;
            let last = is_final(&event);
            if tx.send(Ok(event_to_proto(event))).await.is_err() {
                return Err(WatchEnd::ClientGone);
            }
            if last {
                return Ok(true);
            }
        }
        if !full_page {
            return Ok(false);
        }
    }
}

async fn watch(
    store: medbox_store::Store,
    runner: Option<JobRunner>,
    job_id: String,
    tx: mpsc::Sender<Result<pb::JobEvent, Status>>,
) -> WatchEnd {
    // Subscribe first, then read what is stored: nothing falls in between.
    let mut live = runner.as_ref().map(JobRunner::subscribe);
    let mut last_id = 0;
    match send_stored(&store, &job_id, &mut last_id, &tx).await {
        Ok(true) => return WatchEnd::Finished,
        Ok(false) => {}
        Err(end) => return end,
    }
    let Some(live) = live.as_mut() else {
        return WatchEnd::NoMoreEvents;
    };
    loop {
        let received = tokio::select! {
            received = live.recv() => received,
            () = tx.closed() => return WatchEnd::ClientGone,
        };
        match received {
            Ok(event) if event.job_id == job_id && event.id > last_id => {
                last_id = event.id;
                let last = is_final(&event);
                if tx.send(Ok(event_to_proto(event))).await.is_err() {
                    return WatchEnd::ClientGone;
                }
                if last {
                    return WatchEnd::Finished;
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind the broadcast: the store has every event.
                match send_stored(&store, &job_id, &mut last_id, &tx).await {
                    Ok(true) => return WatchEnd::Finished,
                    Ok(false) => {}
                    Err(end) => return end,
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return WatchEnd::NoMoreEvents,
        }
    }
}

#[tonic::async_trait]
impl pb::fine_tuning_server::FineTuning for FineTuningService {
    #[tracing::instrument(skip_all)]
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::UploadDatasetResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/UploadDataset", &request);
        let result = self
            .upload(request.into_inner(), &mut record)
            .await
            .map(|dataset| pb::UploadDatasetResponse {
                dataset: Some(dataset),
            });
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/ListDatasets", &request);
        let result = self
            .state
            .store
            .list_datasets()
            .await
            .map(|datasets| pb::ListDatasetsResponse {
                datasets: datasets.into_iter().map(dataset_to_proto).collect(),
            })
            .map_err(ApiError::from);
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/CreateJob", &request);
        let result = async {
            let runner = self.require_enabled()?;
            let job = self.new_job(request.into_inner()).await?;
            let created = runner.submit(job).await.map_err(runner_error)?;
            record.model = Some(created.id.clone());
            Ok(pb::CreateJobResponse {
                job: Some(self.one_job_to_proto(created).await?),
            })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/GetJob", &request);
        let id = request.into_inner().id;
        record.model = (!id.is_empty()).then(|| id.clone());
        let result = async {
            if id.is_empty() {
                return Err(ApiError::MissingField("id"));
            }
            let job = self
                .state
                .store
                .get_job(&id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::JobNotFound(id.clone()))?;
            Ok(pb::GetJobResponse {
                job: Some(self.one_job_to_proto(job).await?),
            })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/ListJobs", &request);
        let request = request.into_inner();
        let result = async {
            let state = match request.state.as_str() {
                "" => None,
                text => Some(text.parse::<JobState>().map_err(|_| ApiError::InvalidField {
                    field: "state",
                    reason: format!(
                        "`{text}` is not one of queued, running, succeeded, failed, cancelled"
                    ),
                })?),
            };
            let jobs = self
                .state
                .store
                .list_jobs(&JobFilter {
                    state,
                    limit: request.limit,
                })
                .await
                .map_err(ApiError::from)?;
            let mut names = HashMap::new();
            let mut listed = Vec::with_capacity(jobs.len());
            for job in jobs {
                listed.push(self.job_to_proto(job, &mut names).await?);
            }
            Ok(pb::ListJobsResponse { jobs: listed })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/CancelJob", &request);
        let id = request.into_inner().id;
        record.model = (!id.is_empty()).then(|| id.clone());
        let result = async {
            if id.is_empty() {
                return Err(ApiError::MissingField("id"));
            }
            let cancelled = match &self.finetune.runner {
                Some(runner) => runner.cancel(&id).await.map_err(runner_error)?,
                // The inference-only profile runs no trainer: a job it
                // knows is only a row, cancelled in the store.
                None => self.cancel_without_runner(&id).await?,
            };
            Ok(pb::CancelJobResponse {
                job: Some(self.one_job_to_proto(cancelled).await?),
            })
        }
        .await;
        record.answer(result)
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    #[tracing::instrument(skip_all)]
    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.FineTuning/WatchJob", &request);
        let id = request.into_inner().id;
        record.model = (!id.is_empty()).then(|| id.clone());
        let found = async {
            if id.is_empty() {
                return Err(ApiError::MissingField("id"));
            }
            self.state
                .store
                .get_job(&id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::JobNotFound(id.clone()))
        }
        .await;
        if let Err(err) = found {
            record.finish(err.code(), Some(err.kind()));
            return Err(err.into());
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let store = self.state.store.clone();
        let runner = self.finetune.runner.clone();
        tokio::spawn(async move {
            match watch(store, runner, id, tx.clone()).await {
                WatchEnd::Finished | WatchEnd::NoMoreEvents => record.finish(Code::Ok, None),
                WatchEnd::ClientGone => record.finish(Code::Cancelled, Some("client_cancelled")),
                WatchEnd::Failed(err) => {
                    record.finish(err.code(), Some(err.kind()));
                    let _client_may_be_gone = tx.send(Err(err.into())).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FineTuningService {
    async fn cancel_without_runner(&self, id: &str) -> Result<JobRecord, ApiError> {
        let store = &self.state.store;
        let transition = medbox_store::JobTransition {
            from: vec![JobState::Queued, JobState::Running],
            to: JobState::Cancelled,
            at_ms: now_ms(),
            message: Some("cancelled by request".to_owned()),
            error: None,
        };
        if let Some((record, _)) = store
            .transition_job(id, &transition)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(record);
        }
        match store.get_job(id).await.map_err(ApiError::from)? {
            None => Err(ApiError::JobNotFound(id.to_owned())),
            Some(record) => Err(ApiError::JobFinished {
                id: id.to_owned(),
                state: record.state.as_str(),
            }),
        }
    }
}

/// The de-identification date-shift seed: a secret of this box, made at the
/// first start (`<data_dir>/deid.seed`, mode 0600), so that shifted dates
/// cannot be shifted back by anyone who knows the code.
const DEID_SEED_FILE: &str = "deid.seed";

/// Why fine-tuning could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneStartError {
    #[error("storage.data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read or create the de-identification seed {path}: {reason}")]
    DeidSeed { path: PathBuf, reason: String },
    #[error("finetune.deid_names_file: cannot read {path}: {source}")]
    NamesFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("de-identification: {0}")]
    Deid(#[from] medbox_deid::DeidError),
    #[error("datasets: cannot clear interrupted uploads in {path}: {source}")]
    Leftovers {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `start` hands the server: the service's context, and the runner to
/// stop at shutdown (none on the inference-only profile).
pub struct Finetuning {
    pub context: Arc<FinetuneContext>,
    pub runner: Option<JobRunner>,
    pub cancel_grace: std::time::Duration,
}

/// Sets up datasets and, unless this is the inference-only profile, starts
/// the job runner (which queues the jobs an earlier medboxd left unfinished).
pub async fn start(
    config: &crate::config::FinetuneConfig,
    data_dir: &Path,
    store: &medbox_store::Store,
    gauge: crate::jobs::JobGauge,
) -> Result<Finetuning, FinetuneStartError> {
    let data_dir = {
        let data_dir = data_dir.to_path_buf();
        let config = config.clone();
        tokio::task::spawn_blocking(move || prepare_data_dir(&data_dir, &config))
            .await
            .map_err(|err| FinetuneStartError::DataDir {
                path: PathBuf::new(),
                source: std::io::Error::other(err.to_string()),
            })??
    };
    let trainer_path = config
        .trainer_path
        .clone()
        .or_else(crate::jobs::default_trainer_path)
        .unwrap_or_else(|| PathBuf::from(medbox_finetune::protocol::TRAINER_PROGRAM));
    let runner = if config.enabled {
        if !trainer_path.is_file() {
            tracing::warn!(
                trainer = %trainer_path.display(),
                "the trainer program is not installed: CreateJob will be refused until it is (finetune.trainer_path)"
            );
        }
        let (runner, _task) = JobRunner::start(
            store.clone(),
            crate::jobs::RunnerConfig {
                data_dir: data_dir.root.clone(),
                trainer_path: trainer_path.clone(),
                max_concurrent_jobs: config.max_concurrent_jobs,
                max_queued_jobs: config.max_queued_jobs,
                cancel_grace: std::time::Duration::from_secs(config.cancel_grace_seconds),
                device: config.device.clone(),
            },
            gauge,
        );
        Some(runner)
    } else {
        tracing::info!("fine-tuning is off (inference-only profile)");
        None
    };
    Ok(Finetuning {
        context: Arc::new(FinetuneContext {
            enabled: config.enabled,
            runner: runner.clone(),
            datasets_dir: data_dir.root.join(datasets::DATASETS_DIR),
            trainer_path,
            checkpoint_every: config.checkpoint_every,
            max_dataset_bytes: config.max_dataset_bytes,
            deidentifier: Arc::new(data_dir.deidentifier),
        }),
        runner,
        cancel_grace: std::time::Duration::from_secs(config.cancel_grace_seconds),
    })
}

struct PreparedDataDir {
    /// Absolute.
    root: PathBuf,
    deidentifier: Deidentifier,
}

/// Blocking: the data folder made absolute, leftovers of interrupted uploads
/// removed, the de-identifier built from the box's seed and name list.
fn prepare_data_dir(
    data_dir: &Path,
    config: &crate::config::FinetuneConfig,
) -> Result<PreparedDataDir, FinetuneStartError> {
    let data_dir_error = |source| FinetuneStartError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(data_dir_error)?;
    let root = std::fs::canonicalize(data_dir).map_err(data_dir_error)?;
    let datasets_dir = root.join(datasets::DATASETS_DIR);
    let removed = datasets::remove_leftovers(&datasets_dir).map_err(|source| {
        FinetuneStartError::Leftovers {
            path: datasets_dir.clone(),
            source,
        }
    })?;
    if removed > 0 {
        tracing::info!(removed, "removed interrupted dataset uploads");
    }
    let seed = deid_seed(&root.join(DEID_SEED_FILE))?;
    let names = match &config.deid_names_file {
        None => Vec::new(),
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| FinetuneStartError::NamesFile {
                path: path.clone(),
                source,
            })?
            .lines()
            .map(str::trim)
            .filter(|name| name.chars().count() >= 2)
            .map(str::to_owned)
            .collect(),
    };
    let deidentifier = Deidentifier::new(&medbox_deid::DeidConfig::clinical(seed, names))?;
    Ok(PreparedDataDir { root, deidentifier })
}

fn deid_seed(path: &Path) -> Result<u64, FinetuneStartError> {
    let seed_error = |reason: String| FinetuneStartError::DeidSeed {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| seed_error("it does not hold a number".to_owned())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            use rand::TryRngCore;
            let seed = rand::rngs::OsRng
                .try_next_u64()
                .map_err(|err| seed_error(err.to_string()))?;
            crate::server::write_secret_file(path, &seed.to_string())
                .map_err(|err| seed_error(err.to_string()))?;
            tracing::info!(path = %path.display(), "created this box's de-identification seed");
            Ok(seed)
        }
        Err(err) => Err(seed_error(err.to_string())),
    }
}
