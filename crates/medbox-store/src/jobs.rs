//! Fine-tuning jobs and their events.
//!
//! A job's state moves only through [`Store::transition_job`] and
//! [`Store::complete_job`], each a conditional update (it happens only from
//! the states the caller names) that appends the matching `state` event in
//! the same transaction: the event log never disagrees with the state.

use std::{fmt, str::FromStr};

use sqlx::{Any, Row, Transaction, any::AnyRow};

use crate::{
    Backend, Store, StoreError,
    datasets::{decode_error, seed_from_column, seed_to_column, to_i64, to_u64},
    model_versions::{ModelVersionRecord, NewModelVersion, insert_model_version},
    random_id,
};

const JOB_ID_PREFIX: &str = "job_";

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing more happens to the job.
    pub fn is_terminal(self) -> bool {
        match self {
            JobState::Queued | JobState::Running => false,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => true,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(text: &str) -> Result<JobState, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("unknown job state `{text}`"))
    }
}

/// A job to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// `lora`, `full` or `distill`.
    pub method: String,
    pub base_model: String,
    /// The base model's folder, resolved when the job was created.
    pub base_model_path: String,
    pub teacher_model: Option<String>,
    pub teacher_model_path: Option<String>,
    pub dataset_id: String,
    /// JSON document: every hyper-parameter, defaults filled in.
    pub hyperparameters_json: String,
    pub seed: u64,
    pub checkpoint_every: u32,
    /// The name the result is registered under.
    pub output_name: String,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// `job_` + 12 hex digits.
    pub id: String,
    pub state: JobState,
    pub method: String,
    pub base_model: String,
    pub base_model_path: String,
    pub teacher_model: Option<String>,
    pub teacher_model_path: Option<String>,
    pub dataset_id: String,
    pub hyperparameters_json: String,
    pub seed: u64,
    pub checkpoint_every: u32,
    pub output_name: String,
    /// Why it failed, as clients may read it.
    pub error: Option<String>,
    /// How many times a trainer was started for it.
    pub attempts: u32,
    pub last_step: u64,
    pub total_steps: u64,
    /// The registered result, once succeeded.
    pub model_version_id: Option<i64>,
    pub created_at_ms: i64,
    /// The latest start.
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub updated_at_ms: i64,
}

/// What a job event says.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEventKind {
    /// The job entered `state`; `message` says why, when there is something to say.
    State {
        state: JobState,
        message: Option<String>,
    },
    /// An optimizer step.
    Progress {
        step: u64,
        total_steps: u64,
        epoch: f64,
        loss: f64,
        learning_rate: f64,
        tokens_per_second: f64,
        /// Seconds left at the recent pace, when known.
        eta_seconds: Option<f64>,
    },
    /// An evaluation.
    Eval { step: u64, eval_loss: f64 },
    /// A checkpoint was completed.
    Checkpoint { step: u64 },
}

impl JobEventKind {
    fn name(&self) -> &'static str {
        match self {
            JobEventKind::State { .. } => "state",
            JobEventKind::Progress { .. } => "progress",
            JobEventKind::Eval { .. } => "eval",
            JobEventKind::Checkpoint { .. } => "checkpoint",
        }
    }
}

/// A stored job event.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEventRecord {
    /// Increasing in the order events were appended (across jobs).
    pub id: i64,
    pub job_id: String,
    pub at_ms: i64,
    pub kind: JobEventKind,
}

/// Which jobs [`Store::list_jobs`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub state: Option<JobState>,
    /// 0 means [`DEFAULT_JOB_LIMIT`]; more than [`MAX_JOB_LIMIT`] is capped.
    pub limit: u32,
}

pub const DEFAULT_JOB_LIMIT: u32 = 100;
pub const MAX_JOB_LIMIT: u32 = 10_000;
/// The most events one [`Store::list_job_events`] call returns.
pub const MAX_JOB_EVENTS: u32 = 10_000;

/// A state change asked of [`Store::transition_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTransition {
    /// It happens only when the job is in one of these.
    pub from: Vec<JobState>,
    pub to: JobState,
    pub at_ms: i64,
    /// Recorded in the state event.
    pub message: Option<String>,
    /// Recorded as the job's `error` (set when moving to `failed`).
    pub error: Option<String>,
}

const JOB_COLUMNS: &str = "id, state, method, base_model, base_model_path, teacher_model, \
     teacher_model_path, dataset_id, hyperparameters, seed, checkpoint_every, output_name, error, \
     attempts, last_step, total_steps, model_version_id, created_at_ms, started_at_ms, \
     finished_at_ms, updated_at_ms";

const EVENT_COLUMNS: &str = "id, job_id, at_ms, kind, state, message, step, total_steps, epoch, \
     loss, learning_rate, tokens_per_second, eval_loss, eta_seconds";

impl Store {
    /// A write transaction; on SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so that two writers wait for each other instead
    /// of failing when a read would turn into a write.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend() {
            Backend::Sqlite => self.pool().begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool().begin().await,
        }
    }

    /// Queues a job: stores it as `queued` with its first event, at `now_ms`.
    pub async fn create_job(
        &self,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(JobRecord, JobEventRecord), StoreError> {
        const OPERATION: &str = "queuing a job";
        let id = random_id(JOB_ID_PREFIX)?;
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        let sql = format!(
            "INSERT INTO jobs (id, state, method, base_model, base_model_path, teacher_model, \
                 teacher_model_path, dataset_id, hyperparameters, seed, checkpoint_every, \
                 output_name, attempts, last_step, total_steps, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, 0, 0, $13, $13) \
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&id)
            .bind(JobState::Queued.as_str())
            .bind(&job.method)
            .bind(&job.base_model)
            .bind(&job.base_model_path)
            .bind(job.teacher_model.as_deref())
            .bind(job.teacher_model_path.as_deref())
            .bind(&job.dataset_id)
            .bind(&job.hyperparameters_json)
            .bind(seed_to_column(job.seed))
            .bind(i64::from(job.checkpoint_every))
            .bind(&job.output_name)
            .bind(now_ms)
            .fetch_one(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        let record = job_from_row(&row).map_err(StoreError::query(OPERATION))?;
        let kind = JobEventKind::State {
            state: JobState::Queued,
            message: None,
        };
        let event = insert_event(&mut transaction, &id, now_ms, &kind)
            .await
            .map_err(StoreError::query(OPERATION))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok((record, event))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up a job"))?;
        row.as_ref()
            .map(job_from_row)
            .transpose()
            .map_err(StoreError::query("reading a job"))
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let limit = match filter.limit {
            0 => DEFAULT_JOB_LIMIT,
            limit => limit.min(MAX_JOB_LIMIT),
        };
        let (where_clause, limit_parameter) = match filter.state {
            Some(_) => ("WHERE state = $1", "$2"),
            None => ("", "$1"),
        };
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs {where_clause} \
             ORDER BY created_at_ms DESC, id DESC LIMIT {limit_parameter}"
        );
        let mut query = sqlx::query(&sql);
        if let Some(state) = filter.state {
            query = query.bind(state.as_str());
        }
        let rows = query
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing jobs"))?;
        rows.iter()
            .map(job_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the job list"))
    }

    /// Jobs a starting medboxd must run: those left `running` (first), then
    /// the `queued` ones, each oldest first.
    pub async fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('running', 'queued') \
             ORDER BY CASE state WHEN 'running' THEN 0 ELSE 1 END, created_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing unfinished jobs"))?;
        rows.iter()
            .map(job_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading unfinished jobs"))
    }

    /// How many jobs are in each state (every state listed, zeros included).
    pub async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("counting jobs"))?;
        let mut counts: Vec<(JobState, u64)> =
            JobState::ALL.into_iter().map(|state| (state, 0)).collect();
        for row in &rows {
            let state: String = row
                .try_get("state")
                .map_err(StoreError::query("counting jobs"))?;
            let n: i64 = row
                .try_get("n")
                .map_err(StoreError::query("counting jobs"))?;
            let state: JobState = state
                .parse()
                .map_err(decode_error("state"))
                .map_err(StoreError::query("counting jobs"))?;
            if let Some(slot) = counts.iter_mut().find(|(known, _)| *known == state) {
                slot.1 = to_u64(n);
            }
        }
        Ok(counts)
    }

    /// Moves the job to `transition.to` if it is in one of `transition.from`,
    /// and appends the state event. `None` when the job is not (or no longer)
    /// in one of those states, or does not exist. Entering `running` counts an
    /// attempt and sets `started_at_ms`; a terminal state sets `finished_at_ms`.
    pub async fn transition_job(
        &self,
        id: &str,
        transition: &JobTransition,
    ) -> Result<Option<(JobRecord, JobEventRecord)>, StoreError> {
        const OPERATION: &str = "changing a job's state";
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        let record = update_state(&mut transaction, id, transition, None)
            .await
            .map_err(StoreError::query(OPERATION))?;
        let Some(record) = record else {
            return Ok(None);
        };
        let kind = JobEventKind::State {
            state: transition.to,
            message: transition.message.clone(),
        };
        let event = insert_event(&mut transaction, id, transition.at_ms, &kind)
            .await
            .map_err(StoreError::query(OPERATION))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(Some((record, event)))
    }

    /// Appends a trainer event (progress, eval, checkpoint) to a job; a
    /// progress event also moves the job's `last_step` and `total_steps`.
    /// State events go through [`Store::transition_job`] instead.
    pub async fn append_job_event(
        &self,
        job_id: &str,
        at_ms: i64,
        kind: &JobEventKind,
    ) -> Result<JobEventRecord, StoreError> {
        const OPERATION: &str = "recording a job event";
        if let JobEventKind::State { .. } = kind {
            return Err(StoreError::StateEventOutsideTransition);
        }
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        if let JobEventKind::Progress {
            step, total_steps, ..
        } = kind
        {
            sqlx::query(
                "UPDATE jobs SET last_step = $2, total_steps = $3, updated_at_ms = $4 WHERE id = $1",
            )
            .bind(job_id)
            .bind(to_i64(*step))
            .bind(to_i64(*total_steps))
            .bind(at_ms)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        }
        let event = insert_event(&mut transaction, job_id, at_ms, kind)
            .await
            .map_err(StoreError::query(OPERATION))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(event)
    }

    /// Registers the job's result as a model version and marks the job
    /// `succeeded`, in one transaction, if the job is `running`. `None` when
    /// it is not (nothing is written then). A version number already taken
    /// for the name is a [`StoreError::Query`] (the unique constraint).
    pub async fn complete_job(
        &self,
        id: &str,
        version: &NewModelVersion,
        at_ms: i64,
        message: Option<String>,
    ) -> Result<Option<(JobRecord, JobEventRecord, ModelVersionRecord)>, StoreError> {
        const OPERATION: &str = "completing a job";
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        let registered = insert_model_version(&mut transaction, version, at_ms)
            .await
            .map_err(StoreError::query(OPERATION))?;
        let transition = JobTransition {
            from: vec![JobState::Running],
            to: JobState::Succeeded,
            at_ms,
            message: message.clone(),
            error: None,
        };
        let record = update_state(&mut transaction, id, &transition, Some(registered.id))
            .await
            .map_err(StoreError::query(OPERATION))?;
        let Some(record) = record else {
            // Dropping the transaction rolls the version back.
            return Ok(None);
        };
        let kind = JobEventKind::State {
            state: JobState::Succeeded,
            message,
        };
        let event = insert_event(&mut transaction, id, at_ms, &kind)
            .await
            .map_err(StoreError::query(OPERATION))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(Some((record, event, registered)))
    }

    /// A job's events with an id above `after_id`, oldest first, at most
    /// `limit` (capped at [`MAX_JOB_EVENTS`]).
    pub async fn list_job_events(
        &self,
        job_id: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<JobEventRecord>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(job_id)
            .bind(after_id)
            .bind(i64::from(limit.clamp(1, MAX_JOB_EVENTS)))
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing job events"))?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading job events"))
    }
}

async fn update_state(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
    transition: &JobTransition,
    model_version_id: Option<i64>,
) -> Result<Option<JobRecord>, sqlx::Error> {
    if transition.from.is_empty() {
        return Ok(None);
    }
    // $1 id, $2 new state, $3 now, $4 error, $5 model version, then the from-states.
    let from: Vec<String> = (0..transition.from.len())
        .map(|index| format!("${}", index + 6))
        .collect();
    let entering_running = transition.to == JobState::Running;
    let attempts = if entering_running {
        "attempts + 1"
    } else {
        "attempts"
    };
    let started = if entering_running {
        "$3"
    } else {
        "started_at_ms"
    };
    let finished = if transition.to.is_terminal() {
        "$3"
    } else {
        "NULL"
    };
    let sql = format!(
        "UPDATE jobs SET state = $2, updated_at_ms = $3, error = COALESCE($4, error), \
             model_version_id = COALESCE($5, model_version_id), attempts = {attempts}, \
             started_at_ms = {started}, finished_at_ms = {finished} \
         WHERE id = $1 AND state IN ({}) \
         RETURNING {JOB_COLUMNS}",
        from.join(", ")
    );
    let mut query = sqlx::query(&sql)
        .bind(id)
        .bind(transition.to.as_str())
        .bind(transition.at_ms)
        .bind(transition.error.as_deref())
        .bind(model_version_id);
    for state in &transition.from {
        query = query.bind(state.as_str());
    }
    let row = query.fetch_optional(&mut **transaction).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// A value of one event column.
enum Column<'a> {
    Text(&'a str),
    Integer(i64),
    Real(f64),
}

async fn insert_event(
    transaction: &mut Transaction<'static, Any>,
    job_id: &str,
    at_ms: i64,
    kind: &JobEventKind,
) -> Result<JobEventRecord, sqlx::Error> {
    // Only the columns an event has are named, so no NULL is ever bound:
    // sqlx 0.8's Any driver declares a NULL double as PostgreSQL `float4`,
    // which breaks the cached statement for the next non-NULL value. The SQL
    // text then fixes every parameter's type.
    let mut columns: Vec<(&str, Column)> = Vec::new();
    match kind {
        JobEventKind::State { state, message } => {
            columns.push(("state", Column::Text(state.as_str())));
            if let Some(message) = message {
                columns.push(("message", Column::Text(message)));
            }
        }
        JobEventKind::Progress {
            step,
            total_steps,
            epoch,
            loss,
            learning_rate,
            tokens_per_second,
            eta_seconds,
        } => {
            columns.push(("step", Column::Integer(to_i64(*step))));
            columns.push(("total_steps", Column::Integer(to_i64(*total_steps))));
            columns.push(("epoch", Column::Real(*epoch)));
            columns.push(("loss", Column::Real(*loss)));
            columns.push(("learning_rate", Column::Real(*learning_rate)));
            columns.push(("tokens_per_second", Column::Real(*tokens_per_second)));
            if let Some(eta) = eta_seconds {
                columns.push(("eta_seconds", Column::Real(*eta)));
            }
        }
        JobEventKind::Eval { step, eval_loss } => {
            columns.push(("step", Column::Integer(to_i64(*step))));
            columns.push(("eval_loss", Column::Real(*eval_loss)));
        }
        JobEventKind::Checkpoint { step } => {
            columns.push(("step", Column::Integer(to_i64(*step))));
        }
    }
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let placeholders: Vec<String> = (0..columns.len())
        .map(|index| format!("${}", index + 4))
        .collect();
    let sql = format!(
        "INSERT INTO job_events (job_id, at_ms, kind, {}) VALUES ($1, $2, $3, {}) \
         RETURNING {EVENT_COLUMNS}",
        names.join(", "),
        placeholders.join(", ")
    );
    let mut query = sqlx::query(&sql).bind(job_id).bind(at_ms).bind(kind.name());
    for (_, value) in columns {
        query = match value {
            Column::Text(text) => query.bind(text),
            Column::Integer(integer) => query.bind(integer),
            Column::Real(real) => query.bind(real),
        };
    }
    let row = query.fetch_one(&mut **transaction).await?;
    event_from_row(&row)
}

fn job_from_row(row: &AnyRow) -> Result<JobRecord, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let checkpoint_every: i64 = row.try_get("checkpoint_every")?;
    let attempts: i64 = row.try_get("attempts")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        state: state.parse().map_err(decode_error("state"))?,
        method: row.try_get("method")?,
        base_model: row.try_get("base_model")?,
        base_model_path: row.try_get("base_model_path")?,
        teacher_model: row.try_get("teacher_model")?,
        teacher_model_path: row.try_get("teacher_model_path")?,
        dataset_id: row.try_get("dataset_id")?,
        hyperparameters_json: row.try_get("hyperparameters")?,
        seed: seed_from_column(row.try_get("seed")?),
        checkpoint_every: u32::try_from(checkpoint_every).unwrap_or(u32::MAX),
        output_name: row.try_get("output_name")?,
        error: row.try_get("error")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_step: to_u64(row.try_get("last_step")?),
        total_steps: to_u64(row.try_get("total_steps")?),
        model_version_id: row.try_get("model_version_id")?,
        created_at_ms: row.try_get("created_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn event_from_row(row: &AnyRow) -> Result<JobEventRecord, sqlx::Error> {
    let kind_name: String = row.try_get("kind")?;
    let step = || -> Result<u64, sqlx::Error> {
        let step: Option<i64> = row.try_get("step")?;
        step.map(to_u64)
            .ok_or_else(|| decode_error("step")("missing".to_owned()))
    };
    let real = |column: &'static str| -> Result<f64, sqlx::Error> {
        let value: Option<f64> = row.try_get(column)?;
        value.ok_or_else(|| decode_error(column)("missing".to_owned()))
    };
    let kind = match kind_name.as_str() {
        "state" => {
            let state: Option<String> = row.try_get("state")?;
            let state = state.ok_or_else(|| decode_error("state")("missing".to_owned()))?;
            JobEventKind::State {
                state: state.parse().map_err(decode_error("state"))?,
                message: row.try_get("message")?,
            }
        }
        "progress" => {
            let total_steps: Option<i64> = row.try_get("total_steps")?;
            JobEventKind::Progress {
                step: step()?,
                total_steps: total_steps.map(to_u64).unwrap_or(0),
                epoch: real("epoch")?,
                loss: real("loss")?,
                learning_rate: real("learning_rate")?,
                tokens_per_second: real("tokens_per_second")?,
                eta_seconds: row.try_get("eta_seconds")?,
            }
        }
        "eval" => JobEventKind::Eval {
            step: step()?,
            eval_loss: real("eval_loss")?,
        },
        "checkpoint" => JobEventKind::Checkpoint { step: step()? },
        other => {
            return Err(decode_error("kind")(format!(
                "unknown event kind `{other}`"
            )));
        }
    };
    Ok(JobEventRecord {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        at_ms: row.try_get("at_ms")?,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_round_trip_and_know_the_end() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse(), Ok(state));
        }
        let terminal: Vec<JobState> = JobState::ALL
            .into_iter()
            .filter(|state| state.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        );
        assert!("paused".parse::<JobState>().is_err());
    }
}
