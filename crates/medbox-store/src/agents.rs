//! Agents: spec versions, multi-turn sessions with their history, runs with
//! their traces, and the follow-ups agents schedule.

use std::{fmt, str::FromStr};

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError, datasets::decode_error, random_id};

const SESSION_ID_PREFIX: &str = "ses_";
const RUN_ID_PREFIX: &str = "run_";
const FOLLOW_UP_ID_PREFIX: &str = "fu_";
const MILLIS_PER_DAY: i64 = 86_400_000;

/// Where a spec version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecOrigin {
    /// The specs folder, at start.
    File,
    /// `CreateAgent` or `UpdateAgent`.
    Api,
}

impl SpecOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            SpecOrigin::File => "file",
            SpecOrigin::Api => "api",
        }
    }
}

impl fmt::Display for SpecOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SpecOrigin {
    type Err = String;
    fn from_str(text: &str) -> Result<SpecOrigin, String> {
        match text {
            "file" => Ok(SpecOrigin::File),
            "api" => Ok(SpecOrigin::Api),
            other => Err(format!("unknown spec origin `{other}`")),
        }
    }
}

/// One stored version of an agent spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpecVersionRecord {
    pub agent_id: String,
    pub version: u32,
    pub spec_toml: String,
    pub origin: SpecOrigin,
    pub created_at_ms: i64,
}

/// A multi-turn session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSessionRecord {
    /// `ses_` + 12 hex digits.
    pub id: String,
    pub agent_id: String,
    pub patient_bundle_json: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Who wrote a message of a session's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRole {
    User,
    Assistant,
}

impl SessionRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRole::User => "user",
            SessionRole::Assistant => "assistant",
        }
    }
}

impl FromStr for SessionRole {
    type Err = String;
    fn from_str(text: &str) -> Result<SessionRole, String> {
        match text {
            "user" => Ok(SessionRole::User),
            "assistant" => Ok(SessionRole::Assistant),
            other => Err(format!("unknown session role `{other}`")),
        }
    }
}

/// One message of a session's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMessageRecord {
    pub turn: u32,
    pub role: SessionRole,
    /// JSON text: the turn's input (user) or the agent's output (assistant).
    pub content: String,
    pub run_id: String,
    pub created_at_ms: i64,
}

/// A finished run to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgentRun {
    pub agent_id: String,
    pub agent_version: u32,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
    /// `completed`, `step_limit`, `deadline` or `model_error`.
    pub status: String,
    /// JSON array of the model names that answered.
    pub models_json: String,
    /// JSON array of the steps.
    pub trace_json: String,
    /// JSON output, when completed.
    pub output_json: Option<String>,
    pub started_at_ms: i64,
    pub elapsed_ms: u64,
}

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRunRecord {
    pub id: String,
    pub run: NewAgentRun,
}

/// A follow-up an agent scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFollowUp {
    pub run_id: String,
    pub agent_id: String,
    pub session_id: Option<String>,
    /// Days from `now_ms` to the follow-up.
    pub interval_days: u32,
    /// `phone`, `sms`, `app` or `clinic`.
    pub channel: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowUpRecord {
    /// `fu_` + 12 hex digits.
    pub id: String,
    pub follow_up: NewFollowUp,
    pub due_at_ms: i64,
    pub created_at_ms: i64,
}

const SESSION_COLUMNS: &str = "id, agent_id, patient_bundle_json, created_at_ms, updated_at_ms";
const RUN_COLUMNS: &str = "id, agent_id, agent_version, session_id, request_id, status, models, \
     trace, output, started_at_ms, elapsed_ms";
const FOLLOW_UP_COLUMNS: &str = "id, run_id, agent_id, session_id, due_at_ms, interval_days, \
     channel, reason, created_at_ms";

impl Store {
    /// Records a spec version unless that (id, version) is already stored.
    /// Returns whether it was new. A stored version is never changed.
    pub async fn record_agent_spec_version(
        &self,
        agent_id: &str,
        version: u32,
        spec_toml: &str,
        origin: SpecOrigin,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO agent_spec_versions (agent_id, version, spec_toml, origin, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agent_id, version) DO NOTHING",
        )
        .bind(agent_id)
        .bind(i64::from(version))
        .bind(spec_toml)
        .bind(origin.as_str())
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(StoreError::query("recording an agent spec version"))?;
        Ok(result.rows_affected() == 1)
    }

    /// Every stored version of one agent, oldest first.
    pub async fn agent_spec_versions(
        &self,
        agent_id: &str,
    ) -> Result<Vec<AgentSpecVersionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, version, spec_toml, origin, created_at_ms FROM agent_spec_versions \
             WHERE agent_id = $1 ORDER BY version",
        )
        .bind(agent_id)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::query("listing agent spec versions"))?;
        rows.iter()
            .map(spec_version_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading agent spec versions"))
    }

    /// The newest stored version of every agent, by id.
    pub async fn latest_agent_spec_versions(
        &self,
    ) -> Result<Vec<AgentSpecVersionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT v.agent_id, v.version, v.spec_toml, v.origin, v.created_at_ms \
             FROM agent_spec_versions v \
             WHERE v.version = (SELECT MAX(w.version) FROM agent_spec_versions w WHERE w.agent_id = v.agent_id) \
             ORDER BY v.agent_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::query("listing the newest agent specs"))?;
        rows.iter()
            .map(spec_version_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the newest agent specs"))
    }

    /// Opens a session with `agent_id`.
    pub async fn create_agent_session(
        &self,
        agent_id: &str,
        patient_bundle_json: Option<&str>,
        now_ms: i64,
    ) -> Result<AgentSessionRecord, StoreError> {
        let id = random_id(SESSION_ID_PREFIX)?;
        let sql = format!(
            "INSERT INTO agent_sessions ({SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $4) \
             RETURNING {SESSION_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&id)
            .bind(agent_id)
            .bind(patient_bundle_json)
            .bind(now_ms)
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::query("creating an agent session"))?;
        session_from_row(&row).map_err(StoreError::query("reading a created session"))
    }

    pub async fn find_agent_session(
        &self,
        id: &str,
    ) -> Result<Option<AgentSessionRecord>, StoreError> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM agent_sessions WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up an agent session"))?;
        row.as_ref()
            .map(session_from_row)
            .transpose()
            .map_err(StoreError::query("reading an agent session"))
    }

    /// A session's history, oldest first.
    pub async fn agent_session_messages(
        &self,
        session_id: &str,
    ) -> Result<Vec<SessionMessageRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT turn, role, content, run_id, created_at_ms FROM agent_session_messages \
             WHERE session_id = $1 ORDER BY turn, id",
        )
        .bind(session_id)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::query("reading a session's history"))?;
        rows.iter()
            .map(|row| {
                let role: String = row.try_get("role")?;
                let turn: i64 = row.try_get("turn")?;
                Ok(SessionMessageRecord {
                    turn: u32::try_from(turn).unwrap_or(u32::MAX),
                    role: role.parse().map_err(decode_error("role"))?,
                    content: row.try_get("content")?,
                    run_id: row.try_get("run_id")?,
                    created_at_ms: row.try_get("created_at_ms")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::query("reading a session's history"))
    }

    /// Appends one turn (the user's input and the agent's answer) to a
    /// session's history in one transaction; returns the turn's number (1, 2, …).
    pub async fn append_agent_session_turn(
        &self,
        session_id: &str,
        run_id: &str,
        user_json: &str,
        assistant_json: &str,
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        const OPERATION: &str = "appending a session turn";
        let mut transaction = self
            .begin_write()
            .await
            .map_err(StoreError::query(OPERATION))?;
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(turn) FROM agent_session_messages WHERE session_id = $1",
        )
        .bind(session_id)
        .fetch_one(&mut *transaction)
        .await
        .map_err(StoreError::query(OPERATION))?;
        let turn = last.unwrap_or(0) + 1;
        for (role, content) in [
            (SessionRole::User, user_json),
            (SessionRole::Assistant, assistant_json),
        ] {
            sqlx::query(
                "INSERT INTO agent_session_messages (session_id, turn, role, content, run_id, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(session_id)
            .bind(turn)
            .bind(role.as_str())
            .bind(content)
            .bind(run_id)
            .bind(now_ms)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        }
        sqlx::query("UPDATE agent_sessions SET updated_at_ms = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(session_id)
            .execute(&mut *transaction)
            .await
            .map_err(StoreError::query(OPERATION))?;
        transaction
            .commit()
            .await
            .map_err(StoreError::query(OPERATION))?;
        Ok(u32::try_from(turn).unwrap_or(u32::MAX))
    }

    /// A fresh run id (`run_` + 12 hex digits), known before the run ends so
    /// that what the run writes (follow-ups) can name it.
    pub fn new_agent_run_id(&self) -> Result<String, StoreError> {
        random_id(RUN_ID_PREFIX)
    }

    /// Records a finished run under `id` (from [`Store::new_agent_run_id`]).
    pub async fn record_agent_run(&self, id: &str, run: &NewAgentRun) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO agent_runs ({RUN_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        sqlx::query(&sql)
            .bind(id)
            .bind(&run.agent_id)
            .bind(i64::from(run.agent_version))
            .bind(run.session_id.as_deref())
            .bind(run.request_id.as_deref())
            .bind(&run.status)
            .bind(&run.models_json)
            .bind(&run.trace_json)
            .bind(run.output_json.as_deref())
            .bind(run.started_at_ms)
            .bind(i64::try_from(run.elapsed_ms).unwrap_or(i64::MAX))
            .execute(self.pool())
            .await
            .map_err(StoreError::query("recording an agent run"))?;
        Ok(())
    }

    pub async fn find_agent_run(&self, id: &str) -> Result<Option<AgentRunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM agent_runs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up an agent run"))?;
        row.as_ref()
            .map(run_from_row)
            .transpose()
            .map_err(StoreError::query("reading an agent run"))
    }

    /// Schedules a follow-up `interval_days` after `now_ms`.
    pub async fn schedule_follow_up(
        &self,
        follow_up: &NewFollowUp,
        now_ms: i64,
    ) -> Result<FollowUpRecord, StoreError> {
        let id = random_id(FOLLOW_UP_ID_PREFIX)?;
        let due_at_ms = now_ms.saturating_add(i64::from(follow_up.interval_days) * MILLIS_PER_DAY);
        let sql = format!(
            "INSERT INTO follow_ups ({FOLLOW_UP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        );
        sqlx::query(&sql)
            .bind(&id)
            .bind(&follow_up.run_id)
            .bind(&follow_up.agent_id)
            .bind(follow_up.session_id.as_deref())
            .bind(due_at_ms)
            .bind(i64::from(follow_up.interval_days))
            .bind(&follow_up.channel)
            .bind(&follow_up.reason)
            .bind(now_ms)
            .execute(self.pool())
            .await
            .map_err(StoreError::query("scheduling a follow-up"))?;
        Ok(FollowUpRecord {
            id,
            follow_up: follow_up.clone(),
            due_at_ms,
            created_at_ms: now_ms,
        })
    }

    /// The follow-ups a run scheduled, soonest first.
    pub async fn follow_ups_of_run(&self, run_id: &str) -> Result<Vec<FollowUpRecord>, StoreError> {
        let sql = format!(
            "SELECT {FOLLOW_UP_COLUMNS} FROM follow_ups WHERE run_id = $1 ORDER BY due_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .bind(run_id)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing follow-ups"))?;
        rows.iter()
            .map(|row| {
                let interval: i64 = row.try_get("interval_days")?;
                Ok(FollowUpRecord {
                    id: row.try_get("id")?,
                    follow_up: NewFollowUp {
                        run_id: row.try_get("run_id")?,
                        agent_id: row.try_get("agent_id")?,
                        session_id: row.try_get("session_id")?,
                        interval_days: u32::try_from(interval).unwrap_or(u32::MAX),
                        channel: row.try_get("channel")?,
                        reason: row.try_get("reason")?,
                    },
                    due_at_ms: row.try_get("due_at_ms")?,
                    created_at_ms: row.try_get("created_at_ms")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::query("reading follow-ups"))
    }
}

fn spec_version_from_row(row: &AnyRow) -> Result<AgentSpecVersionRecord, sqlx::Error> {
    let origin: String = row.try_get("origin")?;
    let version: i64 = row.try_get("version")?;
    Ok(AgentSpecVersionRecord {
        agent_id: row.try_get("agent_id")?,
        version: u32::try_from(version)
            .map_err(|_| decode_error("version")(format!("{version} is out of range")))?,
        spec_toml: row.try_get("spec_toml")?,
        origin: origin.parse().map_err(decode_error("origin"))?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

fn session_from_row(row: &AnyRow) -> Result<AgentSessionRecord, sqlx::Error> {
    Ok(AgentSessionRecord {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        patient_bundle_json: row.try_get("patient_bundle_json")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn run_from_row(row: &AnyRow) -> Result<AgentRunRecord, sqlx::Error> {
    let version: i64 = row.try_get("agent_version")?;
    let elapsed: i64 = row.try_get("elapsed_ms")?;
    Ok(AgentRunRecord {
        id: row.try_get("id")?,
        run: NewAgentRun {
            agent_id: row.try_get("agent_id")?,
            agent_version: u32::try_from(version).unwrap_or(u32::MAX),
            session_id: row.try_get("session_id")?,
            request_id: row.try_get("request_id")?,
            status: row.try_get("status")?,
            models_json: row.try_get("models")?,
            trace_json: row.try_get("trace")?,
            output_json: row.try_get("output")?,
            started_at_ms: row.try_get("started_at_ms")?,
            elapsed_ms: u64::try_from(elapsed).unwrap_or(0),
        },
    })
}
