//! The fine-tuning job runner: an actor that owns the queue and starts at
//! most `max_concurrent_jobs` `medbox-trainer` processes, one supervisor task
//! per running job, and one registrar task that turns a finished job's output
//! into a model version.
//!
//! - [`JobRunner`] is the cloneable handle: it sends a command over a bounded
//!   channel and waits for the one-shot reply. Only the actor task touches
//!   the queue (FIFO by creation) and the table of running jobs.
//! - A supervisor marks its job `running`, writes `job.json` (once, before the
//!   first start), starts the trainer in its own process group with stdout
//!   piped and stderr appended to `trainer.log`, turns each stdout line into a
//!   job event (stored, then broadcast to watchers), and decides the outcome
//!   when the process ends. Cancel is SIGTERM to the group, then SIGKILL after
//!   `cancel_grace_seconds`.
//! - The registrar (one task, so that version numbers are handed out one at a
//!   time) moves `<job-dir>/output` to `<data_dir>/models/<name>/.tmp-<job>`,
//!   writes `manifest.json` (SHA-256 of every file), renames the folder to
//!   `<data_dir>/models/<name>/<version>`, and commits the version with the
//!   job's success in one store transaction.
//! - At start the actor queues the jobs a previous medboxd left `running`
//!   (first: they resume from their checkpoints) and `queued`. At shutdown it
//!   stops the trainers (SIGTERM, then SIGKILL) and leaves their jobs
//!   `running`, so that the next start resumes them.
//!
//! **Architecture Invariant:** the client-facing `error` of a failed job never
//! carries internal text: a crashed trainer's last log lines go to the
//! server log, the client reads that the trainer stopped unexpectedly.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use medbox_finetune::{
    DatasetRef, Hyperparameters, JobSpec, Method, ModelManifest, ModelRef, TrainerEvent,
    manifest::{self, MANIFEST_FILE, ManifestDataset},
    protocol::{
        self, CHECKPOINTS_DIR, JOB_DIR_ARG, MAX_EVENT_LINE_BYTES, OUTPUT_DIR, TRAINER_LOG_FILE,
        TRAINER_PID_FILE,
    },
};
use medbox_store::{
    DatasetRecord, JobEventKind, JobEventRecord, JobRecord, JobState, JobTransition,
    ModelVersionRecord, NewJob, NewModel, NewModelVersion, Store, StoreError,
};
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::{
    sync::{Notify, broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::{auth::now_ms, datasets, metrics::Metrics};

/// The folder of the jobs inside `data_dir`.
pub const JOBS_DIR: &str = "jobs";
/// The folder of registered model versions inside `data_dir`.
pub const MODELS_DIR: &str = "models";
/// Commands waiting for the actor.
const COMMAND_CAPACITY: usize = 64;
/// Job events kept for watchers that fall behind (they catch up from the store).
const EVENT_CAPACITY: usize = 1024;
/// How many of the trainer log's last lines a crash report carries (to the server log).
const LOG_TAIL_LINES: usize = 20;
/// The longest failure reason from a trainer shown to clients.
const MAX_REASON_CHARS: usize = 500;
/// After the trainer exits, how long its last stdout lines may take to arrive.
const STDOUT_DRAIN: Duration = Duration::from_secs(2);

/// What the runner needs from the configuration.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Absolute.
    pub data_dir: PathBuf,
    pub trainer_path: PathBuf,
    pub max_concurrent_jobs: usize,
    pub max_queued_jobs: usize,
    pub cancel_grace: Duration,
    pub device: String,
}

impl RunnerConfig {
    /// Absolute (`data_dir` is canonical), because the trainer runs inside
    /// it and reads every path of its spec from there.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join(JOBS_DIR).join(id)
    }
}

/// Why the runner could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("the queue is full ({limit} jobs waiting)")]
    QueueFull { limit: usize },
    #[error("job `{0}` does not exist")]
    NotFound(String),
    #[error("job `{id}` has already {state}")]
    Finished { id: String, state: JobState },
    #[error("the job runner has stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a supervisor is asked to stop its trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// CancelJob: the job ends `cancelled`.
    Cancel,
    /// medboxd is stopping: the job stays `running` and resumes at the next start.
    Shutdown,
}

enum Command {
    Submit {
        job: Box<NewJob>,
        reply: oneshot::Sender<Result<JobRecord, RunnerError>>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<JobRecord, RunnerError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// The handle on the runner: cheap to clone.
#[derive(Clone)]
pub struct JobRunner {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<JobEventRecord>,
}

impl JobRunner {
    /// Starts the actor and the registrar; the actor first queues the jobs a
    /// previous medboxd left unfinished.
    pub fn start(
        store: Store,
        config: RunnerConfig,
        gauge: JobGauge,
    ) -> (JobRunner, JoinHandle<()>) {
        let (commands, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (registrar, registrar_rx) = mpsc::channel(config.max_concurrent_jobs.max(1));
        let (finished, finished_rx) = mpsc::channel(config.max_concurrent_jobs.max(1));
        let shared = Arc::new(Shared {
            store,
            config,
            events: events.clone(),
            gauge,
            registrar,
        });
        tokio::spawn(register_versions(shared.clone(), registrar_rx));
        let actor = Actor {
            shared,
            queue: VecDeque::new(),
            running: HashMap::new(),
            finished,
            shutdown_waiters: Vec::new(),
            stopping: false,
        };
        let task = tokio::spawn(actor.run(command_rx, finished_rx));
        (JobRunner { commands, events }, task)
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, RunnerError>>) -> Command,
    ) -> Result<T, RunnerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| RunnerError::Stopped)?;
        answer.await.map_err(|_| RunnerError::Stopped)?
    }

    /// Stores the job as `queued` and puts it at the end of the queue.
    pub async fn submit(&self, job: NewJob) -> Result<JobRecord, RunnerError> {
        self.ask(|reply| Command::Submit {
            job: Box::new(job),
            reply,
        })
        .await
    }

    /// Cancels a queued job at once; stops a running one and answers once it has ended.
    pub async fn cancel(&self, id: &str) -> Result<JobRecord, RunnerError> {
        let id = id.to_owned();
        self.ask(|reply| Command::Cancel { id, reply }).await
    }

    /// Every job event from now on, as stored.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEventRecord> {
        self.events.subscribe()
    }

    /// Stops every trainer (their jobs stay `running`, to resume at the next
    /// start) and waits for the supervisors to finish.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_ok()
        {
            let _runner_may_be_gone = done.await;
        }
    }
}

/// Keeps `medbox_jobs{state}` equal to the store's counts: a task recounts
/// after every state change (one at a time, so the newest count lands last).
#[derive(Clone)]
pub struct JobGauge {
    changed: Arc<Notify>,
}

impl JobGauge {
    /// Counts once now, then after every [`JobGauge::changed`], until `stop`.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        stop: tokio_util::sync::CancellationToken,
    ) -> JobGauge {
        let changed = Arc::new(Notify::new());
        changed.notify_one();
        let wake = changed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = wake.notified() => {}
                    () = stop.cancelled() => return,
                }
                match store.count_jobs_by_state().await {
                    Ok(counts) => {
                        for (state, count) in counts {
                            metrics
                                .jobs
                                .with_label_values(&[state.as_str()])
                                .set(i64::try_from(count).unwrap_or(i64::MAX));
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot count jobs for the metrics"),
                }
            }
        });
        JobGauge { changed }
    }

    /// A job changed state.
    pub fn changed(&self) {
        self.changed.notify_one();
    }
}

/// What the actor, the supervisors and the registrar share.
struct Shared {
    store: Store,
    config: RunnerConfig,
    events: broadcast::Sender<JobEventRecord>,
    gauge: JobGauge,
    registrar: mpsc::Sender<Registration>,
}

impl Shared {
    /// Sends a stored event to the watchers (none listening is fine).
    fn publish(&self, event: JobEventRecord) {
        if let JobEventKind::State { .. } = event.kind {
            self.gauge.changed();
        }
        let _no_watchers_is_fine = self.events.send(event);
    }

    /// Moves a job and publishes the state event; `None` when it was not in `from`.
    async fn transition(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        message: Option<String>,
        error: Option<String>,
    ) -> Result<Option<JobRecord>, StoreError> {
        let transition = JobTransition {
            from: from.to_vec(),
            to,
            at_ms: now_ms(),
            message,
            error,
        };
        let Some((record, event)) = self.store.transition_job(id, &transition).await? else {
            return Ok(None);
        };
        self.publish(event);
        Ok(Some(record))
    }
}

struct QueuedJob {
    id: String,
    /// Left `running` by a previous medboxd.
    resumed: bool,
}

struct RunningJob {
    stop: watch::Sender<Option<StopReason>>,
    cancel_waiters: Vec<oneshot::Sender<Result<JobRecord, RunnerError>>>,
}

struct Actor {
    shared: Arc<Shared>,
    queue: VecDeque<QueuedJob>,
    running: HashMap<String, RunningJob>,
    /// Each supervisor sends its job's id here when it is done.
    finished: mpsc::Sender<String>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    stopping: bool,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut finished: mpsc::Receiver<String>,
    ) {
        match self.shared.store.unfinished_jobs().await {
            Ok(jobs) => {
                for job in jobs {
                    let resumed = job.state == JobState::Running;
                    if resumed {
                        tracing::info!(job_id = %job.id, "job left running by an earlier medboxd: starting it again to resume");
                    }
                    self.queue.push_back(QueuedJob {
                        id: job.id,
                        resumed,
                    });
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the unfinished jobs; they wait for the next start")
            }
        }
        self.fill();
        let mut handles_left = true;
        loop {
            tokio::select! {
                command = commands.recv(), if handles_left => match command {
                    Some(command) => self.handle(command).await,
                    None => {
                        // Every handle is gone: stop as for a shutdown.
                        handles_left = false;
                        self.begin_shutdown(None);
                    }
                },
                Some(id) = finished.recv() => self.supervisor_done(id).await,
            }
            if self.stopping && self.running.is_empty() {
                for waiter in self.shutdown_waiters.drain(..) {
                    let _caller_may_be_gone = waiter.send(());
                }
                tracing::info!("job runner stopped");
                return;
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Submit { job, reply } => {
                let result = self.submit(&job).await;
                let _caller_may_be_gone = reply.send(result);
            }
            Command::Cancel { id, reply } => self.cancel(id, reply).await,
            Command::Shutdown { reply } => self.begin_shutdown(Some(reply)),
        }
    }

    async fn submit(&mut self, job: &NewJob) -> Result<JobRecord, RunnerError> {
        if self.stopping {
            return Err(RunnerError::Stopped);
        }
        let limit = self.shared.config.max_queued_jobs;
        if self.queue.len() >= limit {
            return Err(RunnerError::QueueFull { limit });
        }
        let (record, event) = self.shared.store.create_job(job, now_ms()).await?;
        self.shared.publish(event);
        tracing::info!(job_id = %record.id, method = %record.method, base_model = %record.base_model, "job queued");
        self.queue.push_back(QueuedJob {
            id: record.id.clone(),
            resumed: false,
        });
        self.fill();
        Ok(record)
    }

    async fn cancel(&mut self, id: String, reply: oneshot::Sender<Result<JobRecord, RunnerError>>) {
        if let Some(running) = self.running.get_mut(&id) {
            running.stop.send_replace(Some(StopReason::Cancel));
            running.cancel_waiters.push(reply);
            return;
        }
        let result = async {
            let from: &[JobState] =
                if let Some(position) = self.queue.iter().position(|queued| queued.id == id) {
                    self.queue.remove(position);
                    &[JobState::Queued, JobState::Running]
                } else {
                    // Not known to the actor: only a job no trainer runs for.
                    &[JobState::Queued]
                };
            let cancelled = self
                .shared
                .transition(
                    &id,
                    from,
                    JobState::Cancelled,
                    Some("cancelled by request".into()),
                    None,
                )
                .await?;
            if let Some(record) = cancelled {
                tracing::info!(job_id = %id, "queued job cancelled");
                return Ok(record);
            }
            match self.shared.store.get_job(&id).await? {
                None => Err(RunnerError::NotFound(id.clone())),
                Some(record) => Err(RunnerError::Finished {
                    id: id.clone(),
                    state: record.state,
                }),
            }
        }
        .await;
        let _caller_may_be_gone = reply.send(result);
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        if !self.stopping {
            tracing::info!(
                running = self.running.len(),
                queued = self.queue.len(),
                "job runner stopping: trainers get SIGTERM; their jobs resume at the next start"
            );
        }
        self.stopping = true;
        self.queue.clear();
        for running in self.running.values() {
            running.stop.send_if_modified(|reason| {
                if reason.is_none() {
                    *reason = Some(StopReason::Shutdown);
                    true
                } else {
                    false
                }
            });
        }
        if let Some(reply) = reply {
            self.shutdown_waiters.push(reply);
        }
    }

    async fn supervisor_done(&mut self, id: String) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        if !running.cancel_waiters.is_empty() {
            let record = match self.shared.store.get_job(&id).await {
                Ok(Some(record)) => Ok(record),
                Ok(None) => Err(RunnerError::NotFound(id.clone())),
                Err(error) => Err(RunnerError::Store(error)),
            };
            for waiter in running.cancel_waiters {
                let answer = match &record {
                    Ok(record) => Ok(record.clone()),
                    Err(RunnerError::NotFound(id)) => Err(RunnerError::NotFound(id.clone())),
                    Err(_) => Err(RunnerError::Stopped),
                };
                let _caller_may_be_gone = waiter.send(answer);
            }
        }
        self.fill();
    }

    /// Starts queued jobs, oldest first, while there is room.
    fn fill(&mut self) {
        while !self.stopping && self.running.len() < self.shared.config.max_concurrent_jobs {
            let Some(next) = self.queue.pop_front() else {
                return;
            };
            let (stop, stop_rx) = watch::channel(None);
            let shared = self.shared.clone();
            let finished = self.finished.clone();
            let id = next.id.clone();
            tokio::spawn(async move {
                supervise(&shared, &next, stop_rx).await;
                // The actor outlives every supervisor; a failed send means it is gone already.
                let _actor_may_be_gone = finished.send(next.id).await;
            });
            self.running.insert(
                id,
                RunningJob {
                    stop,
                    cancel_waiters: Vec::new(),
                },
            );
        }
    }
}

/// Why a job could not be run, with the message the client reads.
#[derive(Debug)]
struct JobFailure {
    /// For clients: no paths, no log lines.
    client_message: String,
    /// For the server log.
    detail: String,
}

impl JobFailure {
    fn internal(client_message: &str, detail: impl std::fmt::Display) -> JobFailure {
        JobFailure {
            client_message: client_message.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// Runs one job to its end (or until medboxd stops) and records the outcome.
#[tracing::instrument(skip_all, fields(job_id = %queued.id))]
async fn supervise(
    shared: &Arc<Shared>,
    queued: &QueuedJob,
    mut stop: watch::Receiver<Option<StopReason>>,
) {
    let id = queued.id.as_str();
    let message = queued.resumed.then(|| {
        "started again after a restart of medboxd; resuming from the last checkpoint".to_owned()
    });
    let job = match shared
        .transition(
            id,
            &[JobState::Queued, JobState::Running],
            JobState::Running,
            message,
            None,
        )
        .await
    {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(%error, "cannot mark the job running; it waits for the next start");
            return;
        }
    };
    let outcome = match run_trainer(shared, &job, &mut stop).await {
        Ok(outcome) => outcome,
        Err(failure) => Outcome::Failed(failure),
    };
    let stopped_for = *stop.borrow();
    let result = match outcome {
        Outcome::LeftRunning => {
            tracing::info!("trainer stopped for shutdown; the job resumes at the next start");
            return;
        }
        Outcome::Cancelled => {
            tracing::info!("job cancelled");
            shared
                .transition(
                    id,
                    &[JobState::Running],
                    JobState::Cancelled,
                    Some("cancelled by request".into()),
                    None,
                )
                .await
                .map(drop)
        }
        Outcome::Failed(failure) => {
            tracing::error!(detail = %failure.detail, "job failed");
            shared
                .transition(
                    id,
                    &[JobState::Running],
                    JobState::Failed,
                    Some(failure.client_message.clone()),
                    Some(failure.client_message),
                )
                .await
                .map(drop)
        }
        Outcome::Succeeded { metrics } => {
            if stopped_for == Some(StopReason::Shutdown) {
                tracing::info!(
                    "the trainer finished as medboxd was stopping; registering its result"
                );
            }
            register(shared, job, metrics).await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "cannot record the job's outcome; it is run again at the next start");
    }
}

/// How a trainer run ended.
enum Outcome {
    Succeeded {
        metrics: BTreeMap<String, f64>,
    },
    Failed(JobFailure),
    Cancelled,
    /// Stopped because medboxd is stopping: the job stays `running`.
    LeftRunning,
}

/// Writes the spec, starts the trainer, follows its events until it exits.
async fn run_trainer(
    shared: &Arc<Shared>,
    job: &JobRecord,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> Result<Outcome, JobFailure> {
    let config = &shared.config;
    let job_dir = config.job_dir(&job.id);
    let dataset = shared
        .store
        .find_dataset(&job.dataset_id)
        .await
        .map_err(|error| {
            JobFailure::internal("the job could not be started (internal error)", error)
        })?
        .ok_or_else(|| {
            JobFailure::internal(
                "the job's dataset no longer exists",
                format!("dataset {} missing", job.dataset_id),
            )
        })?;
    let spec = job_spec(config, job, &dataset)?;
    let prepared = {
        let dir = job_dir.clone();
        tokio::task::spawn_blocking(move || prepare_job_dir(&dir, &spec))
            .await
            .map_err(|error| {
                JobFailure::internal("the job could not be started (internal error)", error)
            })?
            .map_err(|error| {
                JobFailure::internal(
                    "the job could not be started (internal error)",
                    format!("preparing {}: {error}", job_dir.display()),
                )
            })?
    };
    if let Some(pid) = prepared.earlier_pid {
        stop_orphan(pid, &job_dir, config.cancel_grace).await;
    }
    match *stop.borrow() {
        Some(StopReason::Cancel) => return Ok(Outcome::Cancelled),
        Some(StopReason::Shutdown) => return Ok(Outcome::LeftRunning),
        None => {}
    }

    let mut command = tokio::process::Command::new(&config.trainer_path);
    command
        .arg(JOB_DIR_ARG)
        .arg(&job_dir)
        .current_dir(&job_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(prepared.log))
        // Its own process group: a Ctrl-C meant for medboxd does not reach it,
        // and a cancel reaches every process it started.
        .process_group(0)
        // medboxd decides when a trainer stops (SIGTERM, then SIGKILL), not a drop.
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|error| {
        JobFailure::internal(
            "the trainer program could not be started",
            format!("starting {}: {error}", config.trainer_path.display()),
        )
    })?;
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
    if let Some(pid) = pid
        && let Err(error) =
            tokio::fs::write(job_dir.join(TRAINER_PID_FILE), format!("{pid}\n")).await
    {
        tracing::warn!(%error, "cannot write trainer.pid");
    }
    tracing::info!(pid, attempt = job.attempts, "trainer started");
    let Some(stdout) = child.stdout.take() else {
        return Err(JobFailure::internal(
            "the trainer program could not be started",
            "no stdout pipe",
        ));
    };
    let mut lines = FramedRead::new(
        stdout,
        LinesCodec::new_with_max_length(MAX_EVENT_LINE_BYTES),
    );
    let mut follower = EventFollower::new(shared.clone(), job.id.clone());
    let mut stdout_open = true;
    let mut requested: Option<StopReason> = *stop.borrow();
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    if requested.is_some() {
        kill_at = Some(signal_group(pid, Signal::SIGTERM, config.cancel_grace));
    }
    let status = loop {
        tokio::select! {
            line = lines.next(), if stdout_open => match line {
                Some(line) => follower.line(line).await,
                None => stdout_open = false,
            },
            status = child.wait() => break status,
            changed = stop.changed(), if requested.is_none() => {
                if changed.is_err() {
                    // The actor is gone: treat as a shutdown.
                    requested = Some(StopReason::Shutdown);
                } else {
                    requested = *stop.borrow();
                }
                if requested.is_some() {
                    tracing::info!(reason = ?requested, "stopping the trainer (SIGTERM)");
                    kill_at = Some(signal_group(pid, Signal::SIGTERM, config.cancel_grace));
                }
            },
            () = sleep_until(kill_at), if kill_at.is_some() && !killed => {
                tracing::warn!(grace_seconds = config.cancel_grace.as_secs(), "the trainer did not exit after SIGTERM: SIGKILL");
                signal_group(pid, Signal::SIGKILL, Duration::ZERO);
                killed = true;
            },
        }
    };
    // Lines written just before the exit may still be in the pipe.
    while stdout_open {
        match tokio::time::timeout(STDOUT_DRAIN, lines.next()).await {
            Ok(Some(line)) => follower.line(line).await,
            Ok(None) | Err(_) => stdout_open = false,
        }
    }
    // Make sure nothing of the group lingers (a trainer's helper processes).
    if requested.is_some() || !status.as_ref().is_ok_and(ExitStatus::success) {
        signal_group(pid, Signal::SIGKILL, Duration::ZERO);
    }
    if let Err(error) = tokio::fs::remove_file(job_dir.join(TRAINER_PID_FILE)).await {
        tracing::debug!(%error, "trainer.pid was not removed");
    }
    let status = status.map_err(|error| {
        JobFailure::internal(
            "the trainer could not be supervised (internal error)",
            error,
        )
    })?;
    tracing::info!(?status, "trainer exited");
    decide(status, requested, follower.result, &job_dir).await
}

/// The job's outcome from the exit status, a stop request and what the trainer reported.
async fn decide(
    status: ExitStatus,
    requested: Option<StopReason>,
    reported: Option<Reported>,
    job_dir: &Path,
) -> Result<Outcome, JobFailure> {
    match (reported, requested) {
        // A result that was complete before the stop took effect stands.
        (Some(Reported::Succeeded { metrics }), _) if status.success() => {
            Ok(Outcome::Succeeded { metrics })
        }
        (_, Some(StopReason::Cancel)) => Ok(Outcome::Cancelled),
        (_, Some(StopReason::Shutdown)) => Ok(Outcome::LeftRunning),
        (Some(Reported::Failed { reason }), None) => Err(JobFailure {
            client_message: format!("the trainer failed: {reason}"),
            detail: format!("trainer reported failure; exit {status}"),
        }),
        (Some(Reported::Succeeded { .. }), None) => Err(JobFailure::internal(
            "the trainer reported success but exited with an error",
            status,
        )),
        (None, None) if status.success() => Err(JobFailure::internal(
            "the trainer exited without reporting a result",
            status,
        )),
        (None, None) => {
            let tail = read_log_tail(job_dir).await;
            Err(JobFailure {
                client_message: format!("the trainer stopped unexpectedly ({})", describe(status)),
                detail: format!("{status}; last lines of trainer.log:\n{tail}"),
            })
        }
    }
}

/// "exit code 3" or "killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "no exit status".to_owned(),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends `signal` to the trainer's process group (to the process alone when
/// it leads no group); returns when a follow-up is due.
fn signal_group(pid: Option<i32>, signal: Signal, grace: Duration) -> tokio::time::Instant {
    if let Some(pid) = pid {
        let result = match killpg(Pid::from_raw(pid), signal) {
            Err(nix::errno::Errno::ESRCH) => kill(Pid::from_raw(pid), signal),
            other => other,
        };
        if let Err(error) = result
            && error != nix::errno::Errno::ESRCH
        {
            tracing::warn!(%error, ?signal, "cannot signal the trainer");
        }
    }
    tokio::time::Instant::now() + grace
}

/// What the trainer said about its end.
#[derive(Debug, Clone)]
enum Reported {
    Succeeded { metrics: BTreeMap<String, f64> },
    Failed { reason: String },
}

/// Turns stdout lines into stored, published events.
struct EventFollower {
    shared: Arc<Shared>,
    job_id: String,
    result: Option<Reported>,
    /// The first progress of this run: the pace for the ETA.
    pace_start: Option<(u64, Instant)>,
    bad_lines: u64,
}

impl EventFollower {
    fn new(shared: Arc<Shared>, job_id: String) -> EventFollower {
        EventFollower {
            shared,
            job_id,
            result: None,
            pace_start: None,
            bad_lines: 0,
        }
    }

    async fn line(&mut self, line: Result<String, LinesCodecError>) {
        let event = match line.as_deref().map(TrainerEvent::parse_line) {
            Ok(Ok(event)) => event,
            Ok(Err(error)) => {
                self.bad_line(&error.to_string());
                return;
            }
            Err(error) => {
                self.bad_line(&error.to_string());
                return;
            }
        };
        let kind = match event {
            TrainerEvent::Started {
                total_steps,
                resumed_from_step,
            } => {
                tracing::info!(total_steps, resumed_from_step, "trainer started training");
                return;
            }
            TrainerEvent::Progress {
                step,
                total_steps,
                epoch,
                loss,
                learning_rate,
                tokens_per_second,
            } => JobEventKind::Progress {
                step,
                total_steps,
                epoch,
                loss,
                learning_rate,
                tokens_per_second,
                eta_seconds: self.eta(step, total_steps),
            },
            TrainerEvent::Eval { step, eval_loss } => JobEventKind::Eval { step, eval_loss },
            TrainerEvent::Checkpoint { step, .. } => JobEventKind::Checkpoint { step },
            TrainerEvent::Succeeded { metrics, .. } => {
                self.result = Some(Reported::Succeeded { metrics });
                return;
            }
            TrainerEvent::Failed { reason } => {
                self.result = Some(Reported::Failed {
                    reason: reason.chars().take(MAX_REASON_CHARS).collect(),
                });
                return;
            }
        };
        match self
            .shared
            .store
            .append_job_event(&self.job_id, now_ms(), &kind)
            .await
        {
            Ok(event) => self.shared.publish(event),
            Err(error) => tracing::warn!(%error, "cannot record a job event"),
        }
    }

    /// The line itself is not logged: the contract says it holds no patient
    /// text, but a broken trainer is exactly the one that might break that too.
    fn bad_line(&mut self, error: &str) {
        self.bad_lines += 1;
        if self.bad_lines <= 10 {
            tracing::warn!(%error, bad_lines = self.bad_lines, "ignoring a trainer stdout line that is not a protocol event");
        }
    }

    /// Seconds left at this run's pace so far.
    fn eta(&mut self, step: u64, total_steps: u64) -> Option<f64> {
        let now = Instant::now();
        let (first_step, first_at) = *self.pace_start.get_or_insert((step, now));
        let done = step.checked_sub(first_step).filter(|done| *done > 0)?;
        let per_step = now.duration_since(first_at).as_secs_f64() / done as f64;
        Some(total_steps.saturating_sub(step) as f64 * per_step)
    }
}

/// The spec of a job, from its row and its dataset's.
fn job_spec(
    config: &RunnerConfig,
    job: &JobRecord,
    dataset: &DatasetRecord,
) -> Result<JobSpec, JobFailure> {
    let internal = |detail: String| {
        JobFailure::internal("the job could not be started (internal error)", detail)
    };
    let method: Method = job
        .method
        .parse()
        .map_err(|error| internal(format!("{error}")))?;
    let hyperparameters: Hyperparameters = serde_json::from_str(&job.hyperparameters_json)
        .map_err(|error| internal(format!("stored hyper-parameters: {error}")))?;
    let (Some(folder), Some(sha256)) = (&dataset.path, &dataset.sha256) else {
        return Err(JobFailure::internal(
            "the job's dataset was rejected and cannot be trained on",
            format!("dataset {} has no files", dataset.id),
        ));
    };
    let folder = Path::new(folder);
    let job_dir = config.job_dir(&job.id);
    Ok(JobSpec {
        protocol_version: protocol::PROTOCOL_VERSION,
        job_id: job.id.clone(),
        method,
        base_model: ModelRef {
            name: job.base_model.clone(),
            path: absolute(Path::new(&job.base_model_path)),
        },
        teacher_model: job
            .teacher_model
            .clone()
            .zip(job.teacher_model_path.clone())
            .map(|(name, path)| ModelRef {
                name,
                path: absolute(Path::new(&path)),
            }),
        dataset: DatasetRef {
            id: dataset.id.clone(),
            name: dataset.name.clone(),
            sha256: sha256.clone(),
            format: dataset.format.clone(),
            train_file: folder.join(datasets::TRAIN_FILE),
            eval_file: folder.join(datasets::EVAL_FILE),
            train_examples: dataset.train_examples,
            eval_examples: dataset.eval_examples,
        },
        hyperparameters,
        seed: job.seed,
        checkpoint_every: job.checkpoint_every,
        device: config.device.clone(),
        checkpoints_dir: job_dir.join(CHECKPOINTS_DIR),
        output_dir: job_dir.join(OUTPUT_DIR),
        output_name: job.output_name.clone(),
    })
}

struct PreparedJobDir {
    /// `trainer.log`, opened for appending: the trainer's stderr.
    log: std::fs::File,
    /// The trainer an earlier medboxd started, if its pid file is still there.
    earlier_pid: Option<i32>,
}

/// Creates the job folder, writes `job.json` if it is not there yet
/// (temporary name, then rename: the spec is written once and never
/// changes), opens the log. Blocking.
fn prepare_job_dir(job_dir: &Path, spec: &JobSpec) -> std::io::Result<PreparedJobDir> {
    std::fs::create_dir_all(job_dir.join(CHECKPOINTS_DIR))?;
    let spec_path = JobSpec::path_in(job_dir);
    if !spec_path.exists() {
        write_atomically(&spec_path, spec.to_json().as_bytes())?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(job_dir.join(TRAINER_LOG_FILE))?;
    let earlier_pid = std::fs::read_to_string(job_dir.join(TRAINER_PID_FILE))
        .ok()
        .and_then(|text| text.trim().parse().ok());
    Ok(PreparedJobDir { log, earlier_pid })
}

/// Writes `path` by way of `<path>.tmp`, synced, then renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// Stops a trainer that an earlier medboxd started for this job and lost
/// (it was killed, say), so that two never write the same checkpoints.
/// Only a live process whose command line names this job folder is touched.
async fn stop_orphan(pid: i32, job_dir: &Path, grace: Duration) {
    let is_ours = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| {
                let needle = job_dir.as_os_str().as_encoded_bytes();
                cmdline.windows(needle.len()).any(|window| window == needle)
            })
            .unwrap_or(false)
    };
    if !is_ours(pid) {
        return;
    }
    tracing::warn!(
        pid,
        "a trainer from an earlier medboxd still runs for this job: stopping it first"
    );
    signal_group(Some(pid), Signal::SIGTERM, grace);
    let deadline = Instant::now() + grace;
    while is_ours(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if is_ours(pid) {
        signal_group(Some(pid), Signal::SIGKILL, Duration::ZERO);
        for _ in 0..50 {
            if !is_ours(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The last lines of `trainer.log`, for the server log. Blocking work off the worker.
async fn read_log_tail(job_dir: &Path) -> String {
    let path = job_dir.join(TRAINER_LOG_FILE);
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).ok()?;
        let length = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(8 * 1024)))
            .ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        Some(lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n"))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// A finished job's output to register.
struct Registration {
    job: JobRecord,
    metrics: BTreeMap<String, f64>,
    reply: oneshot::Sender<Result<ModelVersionRecord, JobFailure>>,
}

/// Hands the job's output to the registrar and records the outcome.
async fn register(
    shared: &Arc<Shared>,
    job: JobRecord,
    metrics: BTreeMap<String, f64>,
) -> Result<(), StoreError> {
    let id = job.id.clone();
    let (reply, answer) = oneshot::channel();
    let sent = shared
        .registrar
        .send(Registration {
            job,
            metrics,
            reply,
        })
        .await;
    let result = match sent {
        Ok(()) => answer.await.unwrap_or_else(|_| {
            Err(JobFailure::internal(
                "registering the result failed (internal error)",
                "the registrar is gone",
            ))
        }),
        Err(_) => Err(JobFailure::internal(
            "registering the result failed (internal error)",
            "the registrar is gone",
        )),
    };
    match result {
        Ok(version) => {
            tracing::info!(name = %version.name, version = version.version, kind = %version.kind, "job succeeded; model version registered");
            Ok(())
        }
        Err(failure) => {
            tracing::error!(detail = %failure.detail, "job output could not be registered");
            shared
                .transition(
                    &id,
                    &[JobState::Running],
                    JobState::Failed,
                    Some(failure.client_message.clone()),
                    Some(failure.client_message),
                )
                .await
                .map(drop)
        }
    }
}

/// The registrar: one registration at a time, so version numbers never collide.
async fn register_versions(shared: Arc<Shared>, mut registrations: mpsc::Receiver<Registration>) {
    while let Some(registration) = registrations.recv().await {
        let result = register_one(&shared, &registration.job, registration.metrics).await;
        let _supervisor_may_be_gone = registration.reply.send(result);
    }
}

async fn register_one(
    shared: &Arc<Shared>,
    job: &JobRecord,
    metrics: BTreeMap<String, f64>,
) -> Result<ModelVersionRecord, JobFailure> {
    let internal = |detail: String| {
        JobFailure::internal("registering the result failed (internal error)", detail)
    };
    let config = &shared.config;
    let dataset = shared
        .store
        .find_dataset(&job.dataset_id)
        .await
        .map_err(|error| internal(error.to_string()))?
        .ok_or_else(|| internal(format!("dataset {} missing", job.dataset_id)))?;
    let spec = job_spec(config, job, &dataset)?;
    let latest = shared
        .store
        .latest_model_version(&job.output_name)
        .await
        .map_err(|error| internal(error.to_string()))?
        .unwrap_or(0);
    let models_dir = config.data_dir.join(MODELS_DIR).join(&job.output_name);
    let manifest_seed = ManifestSeed {
        spec,
        job_id: job.id.clone(),
        metrics: metrics.clone(),
        latest_registered: latest,
    };
    let written = tokio::task::spawn_blocking(move || write_version(&models_dir, manifest_seed))
        .await
        .map_err(|error| internal(error.to_string()))??;
    let new_version = NewModelVersion {
        name: job.output_name.clone(),
        version: written.version,
        base_model: job.base_model.clone(),
        kind: written.kind.as_str().to_owned(),
        path: written.folder.display().to_string(),
        manifest_sha256: written.manifest_sha256.clone(),
        metrics_json: serde_json::to_string(&metrics).unwrap_or_else(|_| "{}".to_owned()),
        job_id: Some(job.id.clone()),
        dataset_id: Some(job.dataset_id.clone()),
    };
    let message = format!("registered {} version {}", job.output_name, written.version);
    let (_, event, version) = shared
        .store
        .complete_job(&job.id, &new_version, now_ms(), Some(message))
        .await
        .map_err(|error| internal(error.to_string()))?
        .ok_or_else(|| {
            internal("the job was no longer running when its result was registered".to_owned())
        })?;
    {
        // `LoadModel NAME` with no path loads the newest version: a whole
        // model folder, or an adapter, which the runtime loads merged onto
        // the base model its `adapter_config.json` names. Before the
        // `succeeded` event goes out, so that a watcher can load it at once.
        let base = shared.store.get_model(&job.base_model).await.ok().flatten();
        let entry = NewModel {
            name: job.output_name.clone(),
            path: written.folder.display().to_string(),
            kind: "causal-lm".to_owned(),
            aliases: Vec::new(),
            dtype: base.as_ref().and_then(|base| base.dtype.clone()),
            device: base
                .map(|base| base.device)
                .unwrap_or_else(|| "cpu".to_owned()),
            source: "finetune".to_owned(),
        };
        if let Err(error) = shared.store.upsert_model(&entry).await {
            tracing::warn!(%error, "the version is registered but not yet in the model registry");
        }
    }
    shared.publish(event);
    Ok(version)
}

/// What the manifest is made from.
struct ManifestSeed {
    spec: JobSpec,
    job_id: String,
    metrics: BTreeMap<String, f64>,
    latest_registered: u32,
}

struct WrittenVersion {
    version: u32,
    kind: medbox_finetune::OutputKind,
    folder: PathBuf,
    manifest_sha256: String,
}

/// Moves the trainer's output into `models/<name>/<version>/` with its
/// manifest. Blocking. The version is one past both the store's newest and
/// any folder already there (a folder left by an interrupted registration is
/// never reused).
fn write_version(models_dir: &Path, seed: ManifestSeed) -> Result<WrittenVersion, JobFailure> {
    let internal = |detail: String| {
        JobFailure::internal("registering the result failed (internal error)", detail)
    };
    let spec = &seed.spec;
    let kind = spec.method.output_kind();
    if !spec.output_dir.join(kind.marker_file()).is_file() {
        return Err(JobFailure {
            client_message: format!(
                "the trainer reported success but its output has no {}",
                kind.marker_file()
            ),
            detail: format!("{} lacks {}", spec.output_dir.display(), kind.marker_file()),
        });
    }
    std::fs::create_dir_all(models_dir)
        .map_err(|error| internal(format!("{}: {error}", models_dir.display())))?;
    let highest_folder = std::fs::read_dir(models_dir)
        .map_err(|error| internal(format!("{}: {error}", models_dir.display())))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let version = seed.latest_registered.max(highest_folder) + 1;
    let temporary = models_dir.join(format!(".tmp-{}", seed.job_id));
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary)
            .map_err(|error| internal(format!("{}: {error}", temporary.display())))?;
    }
    std::fs::rename(&spec.output_dir, &temporary).map_err(|error| {
        internal(format!(
            "moving {} to {}: {error}",
            spec.output_dir.display(),
            temporary.display()
        ))
    })?;
    let files = manifest::hash_folder(&temporary).map_err(|error| internal(error.to_string()))?;
    let manifest = ModelManifest {
        format: manifest::MANIFEST_FORMAT.to_owned(),
        name: spec.output_name.clone(),
        version,
        kind,
        method: spec.method,
        base_model: spec.base_model.clone(),
        teacher_model: spec.teacher_model.clone(),
        dataset: ManifestDataset {
            id: spec.dataset.id.clone(),
            name: spec.dataset.name.clone(),
            sha256: spec.dataset.sha256.clone(),
        },
        hyperparameters: spec.hyperparameters.clone(),
        seed: spec.seed,
        metrics: seed.metrics,
        job_id: seed.job_id,
        created_at_ms: now_ms(),
        files,
    };
    let text = manifest.to_json();
    write_atomically(&temporary.join(MANIFEST_FILE), text.as_bytes())
        .map_err(|error| internal(format!("writing the manifest: {error}")))?;
    let folder = models_dir.join(version.to_string());
    std::fs::rename(&temporary, &folder).map_err(|error| {
        internal(format!(
            "renaming {} to {}: {error}",
            temporary.display(),
            folder.display()
        ))
    })?;
    Ok(WrittenVersion {
        version,
        kind,
        folder,
        manifest_sha256: manifest::sha256_hex(text.as_bytes()),
    })
}

/// The trainer program next to this executable (`medboxd`).
pub fn default_trainer_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(protocol::TRAINER_PROGRAM))
}

/// A model path of a stored job made absolute against medboxd's working
/// directory. Model paths are absolute where they enter (configuration,
/// LoadModel); jobs queued by an earlier medboxd may still hold relative ones,
/// which a trainer running in its job folder would misread.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
