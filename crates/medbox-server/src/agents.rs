//! `medbox.v1.Agents`: the agent catalogue, runs, sessions.
//!
//! - [`RuntimeModel`] implements the orchestrator's `AgentModel` over the
//!   runtime engines: each step is routed by model name or alias through the
//!   [`ModelRouter`], falling back to `[agents] default_model` when the route
//!   is not served (unknown, loading or failed), and decoded under the step's
//!   JSON Schema (`Constraint::JsonSchema`), so that every answer parses.
//! - [`AgentCatalog`] holds the validated specs: the spec files loaded at
//!   start (a bad one stops the start) and versions created or updated through
//!   the API, each version recorded in the store.
//! - [`AgentsService`] runs agents with the static tool registry and the
//!   run's context tools (the patient tools over the run's FHIR bundle,
//!   `schedule_follow_up`, and any shared tools the server registers, such as
//!   a knowledge-base `knowledge_search`), records every run with its trace,
//!   and keeps sessions' history in the store.
//!
//! **Invariant:** no lock is held across an `.await`: the catalogue hands out
//! `Arc<AgentSpec>` clones.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use medbox_agents::{
    ToolError, ToolRegistry,
    context::{ContextTool, ContextTools, SCHEDULE_FOLLOW_UP, ToolFuture, Toolbox},
    model::{AgentModel, Message, ModelError, ModelReply, ModelTurn, Role},
    parse_arguments,
    patient::{self, CivilDate, PatientRecord},
    spec::{AgentSpec, KnownTools, SpecError, load_specs_dir_with},
    step_loop::{AgentRun, RunError, Step, run_agent_with},
};
use medbox_proto::v1 as pb;
use medbox_runtime::{
    ChatMessage, ChatRequest, Constraint, GenerationEvent, ReasoningSplitter, SamplingParams,
    Usage, ValidationError,
};
use medbox_store::{
    AgentSessionRecord, NewAgentRun, NewFollowUp, SessionRole, SpecOrigin, Store, StoreError,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::{
    auth::now_ms,
    config::{AgentsConfig, DEFAULT_AGENT_SPECS_DIR},
    error::ApiError,
    request_log::RequestRecord,
    router::ModelRouter,
    state::AppState,
};

const METHOD: &str = "RunAgent";

/// Why the agent catalogue could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum AgentsStartError {
    #[error("agents.specs_dir: {0}")]
    Spec(#[from] SpecError),
    #[error("agents.specs_dir: {path} does not exist or is not a folder")]
    MissingDir { path: std::path::PathBuf },
    #[error("agents: {0}")]
    Store(#[from] StoreError),
}

// ---------------------------------------------------------------------------
// The model boundary.

/// The runtime engines as the step loop sees them.
pub struct RuntimeModel {
    router: Arc<ModelRouter>,
    default_model: String,
    temperature: f32,
}

impl RuntimeModel {
    pub fn new(router: Arc<ModelRouter>, config: &AgentsConfig) -> RuntimeModel {
        RuntimeModel {
            router,
            default_model: config.default_model.clone(),
            temperature: config.temperature,
        }
    }

    /// The engine for a route, or for the default model when the route is
    /// not served.
    fn engine(&self, route: &str) -> Result<(String, medbox_runtime::Engine), ModelError> {
        match self.router.causal_lm(route, METHOD) {
            Ok(found) => Ok(found),
            Err(
                ApiError::ModelNotFound(_)
                | ApiError::ModelLoading(_)
                | ApiError::ModelFailed { .. }
                | ApiError::WrongModelKind { .. },
            ) if route != self.default_model => self
                .router
                .causal_lm(&self.default_model, METHOD)
                .map_err(|error| model_error(&self.default_model, error)),
            Err(error) => Err(model_error(route, error)),
        }
    }
}

fn model_error(route: &str, error: ApiError) -> ModelError {
    let route = route.to_owned();
    match error {
        ApiError::ModelNotFound(_) | ApiError::WrongModelKind { .. } => {
            ModelError::NotFound { route }
        }
        ApiError::ModelLoading(_) | ApiError::ShuttingDown => ModelError::Unavailable {
            route,
            reason: error.to_string(),
        },
        ApiError::QueueFull(_) => ModelError::Overloaded {
            route,
            reason: error.to_string(),
        },
        other => ModelError::Failed {
            route,
            reason: other.to_string(),
        },
    }
}

/// Chat roles as the runtime's templates know them; a tool result is shown
/// as a user message that says so, since not every template has a tool role.
fn chat_messages(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|message| match message.role {
            Role::Tool => ChatMessage {
                role: "user".to_owned(),
                content: format!("Tool result: {}", message.content),
            },
            role => ChatMessage {
                role: role.as_str().to_owned(),
                content: message.content.clone(),
            },
        })
        .collect()
}

impl AgentModel for RuntimeModel {
    async fn complete(&self, turn: ModelTurn) -> Result<ModelReply, ModelError> {
        let (model, engine) = self.engine(&turn.route)?;
        let failed = |reason: String| ModelError::Failed {
            route: turn.route.clone(),
            reason,
        };
        let schema = turn.response_schema.to_string();
        let mut messages = chat_messages(&turn.messages);
        let mut input_index = turn.input_index;
        let mut max_tokens = turn.max_tokens;
        // Fit the context: give the answer the room that is left, and when
        // the prompt alone does not fit, leave out earlier session turns,
        // then the oldest tool exchanges of this run (see ModelTurn).
        let valid = loop {
            let request = ChatRequest {
                messages: messages.clone(),
                sampling: SamplingParams {
                    max_tokens: Some(max_tokens),
                    temperature: Some(self.temperature),
                    ..SamplingParams::default()
                },
                constraint: Some(Constraint::JsonSchema(schema.clone())),
            };
            match engine.validate_chat(request) {
                Ok(valid) => break valid,
                Err(ValidationError::MaxTokens { max, got }) if max > 0 && max < got => {
                    max_tokens = max;
                }
                Err(ValidationError::PromptTooLong { .. })
                    if input_index > 1 || messages.len() > input_index + 2 =>
                {
                    if input_index > 1 {
                        messages.remove(1);
                        input_index -= 1;
                    } else {
                        messages.remove(input_index + 1);
                    }
                }
                Err(error) => return Err(failed(format!("model `{model}`: {error}"))),
            }
        };
        let splitter = engine
            .thinks()
            .then(|| ReasoningSplitter::new(valid.starts_in_reasoning()));
        let stream = engine
            .submit(valid)
            .map_err(|error| model_error(&turn.route, ApiError::from_engine(&model, error)))?;
        let deadline = tokio::time::Instant::from_std(turn.deadline);
        let collected = tokio::time::timeout_at(deadline, collect(stream, splitter)).await;
        match collected {
            // The loop sees the deadline and ends the run; the stream was
            // dropped, which cancelled the sequence.
            Err(_elapsed) => Ok(ModelReply {
                text: String::new(),
                model,
                prompt_tokens: 0,
                completion_tokens: 0,
            }),
            Ok(Ok((text, usage))) => Ok(ModelReply {
                text,
                model,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            }),
            Ok(Err(reason)) => Err(failed(format!("model `{model}`: {reason}"))),
        }
    }
}

/// The answer text of a generation (reasoning left out) and its token counts.
async fn collect(
    mut stream: medbox_runtime::GenerationStream,
    mut splitter: Option<ReasoningSplitter>,
) -> Result<(String, Usage), String> {
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event {
            GenerationEvent::Delta { text: delta, .. } => match &mut splitter {
                Some(splitter) => text.push_str(&splitter.push(&delta).answer),
                None => text.push_str(&delta),
            },
            GenerationEvent::Finished { usage, .. } => {
                if let Some(splitter) = &mut splitter {
                    text.push_str(&splitter.finish().answer);
                }
                return Ok((text, usage));
            }
            GenerationEvent::Failed(error) => return Err(error.to_string()),
        }
    }
    Err("the engine closed the stream without finishing it".to_owned())
}

// ---------------------------------------------------------------------------
// The catalogue.

/// The validated specs, by id, and the tool names they may use.
pub struct AgentCatalog {
    specs: RwLock<BTreeMap<String, Arc<AgentSpec>>>,
    registry: Arc<ToolRegistry>,
    context_names: Vec<String>,
}

impl AgentCatalog {
    /// Loads the specs folder and the versions created through the API,
    /// recording every file version in the store.
    pub async fn load(
        config: &AgentsConfig,
        store: &Store,
        registry: Arc<ToolRegistry>,
        shared_tool_names: &[String],
    ) -> Result<AgentCatalog, AgentsStartError> {
        let mut context_names: Vec<String> = patient::TOOL_NAMES
            .iter()
            .map(|name| (*name).to_owned())
            .collect();
        context_names.push(SCHEDULE_FOLLOW_UP.to_owned());
        context_names.extend(shared_tool_names.iter().cloned());
        let catalog = AgentCatalog {
            specs: RwLock::new(BTreeMap::new()),
            registry,
            context_names,
        };
        let dir = match &config.specs_dir {
            Some(dir) if !dir.is_dir() => {
                return Err(AgentsStartError::MissingDir { path: dir.clone() });
            }
            Some(dir) => Some(dir.clone()),
            None => {
                let dir = Path::new(DEFAULT_AGENT_SPECS_DIR);
                dir.is_dir().then(|| dir.to_path_buf())
            }
        };
        let file_specs = match &dir {
            Some(dir) => {
                let names = catalog.context_name_refs();
                load_specs_dir_with(
                    dir,
                    KnownTools {
                        registry: &catalog.registry,
                        context: &names,
                    },
                )?
            }
            None => {
                tracing::warn!(
                    "no agent specs folder ([agents] specs_dir unset and no ./agents): no agents are served"
                );
                Vec::new()
            }
        };
        let now = now_ms();
        let mut specs = BTreeMap::new();
        for spec in file_specs {
            let recorded = store
                .record_agent_spec_version(
                    spec.id(),
                    spec.version(),
                    spec.source(),
                    SpecOrigin::File,
                    now,
                )
                .await?;
            if !recorded {
                // A stored version never changes: an edited file must say so.
                let stored = store.agent_spec_versions(spec.id()).await?;
                let edited = stored
                    .iter()
                    .find(|stored| stored.version == spec.version())
                    .is_some_and(|stored| stored.spec_toml != spec.source());
                if edited {
                    tracing::error!(
                        agent = spec.id(),
                        version = spec.version(),
                        "the agent's spec file changed but its `version` did not: runs are recorded against the stored text of that version, not the file's; raise `version` in the file"
                    );
                }
            }
            specs.insert(spec.id().to_owned(), Arc::new(spec));
        }
        // Versions made through the API that are newer than the files.
        for stored in store.latest_agent_spec_versions().await? {
            if stored.origin != SpecOrigin::Api {
                continue;
            }
            let newer = specs
                .get(&stored.agent_id)
                .is_none_or(|spec| spec.version() < stored.version);
            if !newer {
                continue;
            }
            match catalog.parse(&format!("stored:{}", stored.agent_id), &stored.spec_toml) {
                Ok(spec) => {
                    specs.insert(spec.id().to_owned(), Arc::new(spec));
                }
                Err(error) => tracing::warn!(
                    agent = %stored.agent_id,
                    version = stored.version,
                    error = %error,
                    "a stored agent version no longer validates; serving the previous one"
                ),
            }
        }
        tracing::info!(agents = specs.len(), "agent catalogue loaded");
        if let Ok(mut slot) = catalog.specs.write() {
            *slot = specs;
        }
        Ok(catalog)
    }

    fn context_name_refs(&self) -> Vec<&str> {
        self.context_names.iter().map(String::as_str).collect()
    }

    fn parse(&self, name: &str, text: &str) -> Result<AgentSpec, SpecError> {
        let names = self.context_name_refs();
        AgentSpec::from_toml_str_with(
            name,
            text,
            KnownTools {
                registry: &self.registry,
                context: &names,
            },
        )
    }

    pub fn get(&self, id: &str) -> Result<Arc<AgentSpec>, ApiError> {
        self.specs
            .read()
            .ok()
            .and_then(|specs| specs.get(id).cloned())
            .ok_or_else(|| ApiError::AgentNotFound(id.to_owned()))
    }

    pub fn all(&self) -> Vec<Arc<AgentSpec>> {
        self.specs
            .read()
            .map(|specs| specs.values().cloned().collect())
            .unwrap_or_default()
    }

    fn insert(&self, spec: Arc<AgentSpec>) {
        if let Ok(mut specs) = self.specs.write() {
            specs.insert(spec.id().to_owned(), spec);
        }
    }
}

// ---------------------------------------------------------------------------
// Context tools the server provides.

/// `schedule_follow_up`: writes a follow-up for this run into the store.
struct ScheduleFollowUp {
    store: Store,
    run_id: String,
    agent_id: String,
    session_id: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FollowUpArguments {
    interval_days: u32,
    channel: String,
    reason: String,
}

const FOLLOW_UP_CHANNELS: [&str; 4] = ["phone", "sms", "app", "clinic"];

impl ContextTool for ScheduleFollowUp {
    fn name(&self) -> &str {
        SCHEDULE_FOLLOW_UP
    }

    fn description(&self) -> &str {
        "Schedules a follow-up contact with the patient after interval_days (1 to 365) by phone, sms, app or clinic visit, with the reason; answers the follow-up's id and due date."
    }

    fn parameters_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "interval_days": {"type": "integer", "minimum": 1, "maximum": 365},
                "channel": {"type": "string", "enum": FOLLOW_UP_CHANNELS},
                "reason": {"type": "string", "minLength": 1, "maxLength": 120}
            },
            "required": ["interval_days", "channel", "reason"],
            "additionalProperties": false
        })
    }

    fn call<'a>(&'a self, arguments: &'a Value) -> ToolFuture<'a> {
        Box::pin(async move {
            let arguments: FollowUpArguments = parse_arguments(arguments)?;
            if !(1..=365).contains(&arguments.interval_days) {
                return Err(ToolError::OutOfRange {
                    field: "interval_days".to_owned(),
                    value: f64::from(arguments.interval_days),
                    expected: "expected 1 to 365 days".to_owned(),
                });
            }
            if !FOLLOW_UP_CHANNELS.contains(&arguments.channel.as_str()) {
                return Err(ToolError::BadArguments {
                    field: "channel".to_owned(),
                    reason: format!("use one of {}", FOLLOW_UP_CHANNELS.join(", ")),
                });
            }
            if arguments.reason.trim().is_empty() {
                return Err(ToolError::BadArguments {
                    field: "reason".to_owned(),
                    reason: "must not be empty".to_owned(),
                });
            }
            let follow_up = NewFollowUp {
                run_id: self.run_id.clone(),
                agent_id: self.agent_id.clone(),
                session_id: self.session_id.clone(),
                interval_days: arguments.interval_days,
                channel: arguments.channel,
                reason: arguments.reason,
            };
            let record = self
                .store
                .schedule_follow_up(&follow_up, now_ms())
                .await
                .map_err(|error| {
                    tracing::error!(error = %error, "scheduling a follow-up failed");
                    ToolError::Unavailable {
                        tool: SCHEDULE_FOLLOW_UP,
                        reason:
                            "the follow-up could not be saved; tell the user to schedule it by hand"
                                .to_owned(),
                    }
                })?;
            let due = CivilDate::from_days(record.due_at_ms.div_euclid(86_400_000));
            Ok(json!({
                "follow_up_id": record.id,
                "due_date": format!("{:04}-{:02}-{:02}", due.year, due.month, due.day),
                "interval_days": record.follow_up.interval_days,
                "channel": record.follow_up.channel,
            }))
        })
    }
}

// ---------------------------------------------------------------------------
// The service.

#[derive(Clone)]
pub struct AgentsService {
    state: AppState,
    catalog: Arc<AgentCatalog>,
    model: Arc<RuntimeModel>,
    /// Context tools every run gets (e.g. `knowledge_search`).
    shared_tools: Vec<Arc<dyn ContextTool>>,
    max_session_turns: usize,
}

/// What a run needs besides the spec and the input.
struct RunSetup {
    spec: Arc<AgentSpec>,
    input: Value,
    session_id: Option<String>,
    history: Vec<Message>,
    /// Turns the session held before this run.
    session_turns: usize,
    patient: Option<Arc<PatientRecord>>,
    request_id: String,
}

impl AgentsService {
    pub fn new(
        state: AppState,
        catalog: Arc<AgentCatalog>,
        model: Arc<RuntimeModel>,
        shared_tools: Vec<Arc<dyn ContextTool>>,
        config: &AgentsConfig,
    ) -> AgentsService {
        AgentsService {
            state,
            catalog,
            model,
            shared_tools,
            max_session_turns: config.max_session_turns.max(1),
        }
    }

    /// Starts the record of a `RunAgent`-shaped call and prepares its run.
    async fn begin_run(
        &self,
        method: &'static str,
        request: Request<pb::RunAgentRequest>,
    ) -> (RequestRecord, Result<RunSetup, ApiError>) {
        let mut record = self.state.log.begin_for(method, &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let setup = async {
            let session = match request.session_id.filter(|id| !id.is_empty()) {
                Some(id) => Some(self.find_session(&id).await?),
                None => None,
            };
            self.prepare(
                &request.agent,
                &request.input_json,
                session,
                request.patient_bundle_json,
                request_id,
            )
            .await
        }
        .await;
        (record, setup)
    }

    async fn find_session(&self, id: &str) -> Result<AgentSessionRecord, ApiError> {
        self.state
            .store
            .find_agent_session(id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::SessionNotFound(id.to_owned()))
    }

    /// Checks a run's request and gathers what it needs: the spec, the
    /// input, the session's recent history (`session`: already looked up)
    /// and the patient's record.
    async fn prepare(
        &self,
        agent: &str,
        input_json: &str,
        session: Option<AgentSessionRecord>,
        patient_bundle_json: Option<String>,
        request_id: String,
    ) -> Result<RunSetup, ApiError> {
        if agent.is_empty() {
            return Err(ApiError::MissingField("agent"));
        }
        let spec = self.catalog.get(agent)?;
        let input: Value =
            serde_json::from_str(input_json).map_err(|error| ApiError::InvalidField {
                field: "input_json",
                reason: format!("not JSON: {error}"),
            })?;
        let mut bundle = patient_bundle_json.filter(|text| !text.is_empty());
        let mut history = Vec::new();
        let mut session_turns = 0;
        let session_id = session.as_ref().map(|session| session.id.clone());
        if let Some(session) = session {
            let id = &session.id;
            if session.agent_id != spec.id() {
                return Err(ApiError::InvalidField {
                    field: "session_id",
                    reason: format!(
                        "session `{id}` belongs to agent `{}`, not `{}`",
                        session.agent_id,
                        spec.id()
                    ),
                });
            }
            if bundle.is_none() {
                bundle = session.patient_bundle_json;
            }
            let messages = self
                .state
                .store
                .agent_session_messages(id)
                .await
                .map_err(ApiError::from)?;
            session_turns = messages.len() / 2;
            let keep_from = messages.len().saturating_sub(self.max_session_turns * 2);
            history = messages[keep_from..]
                .iter()
                .map(|message| {
                    let role = match message.role {
                        SessionRole::User => Role::User,
                        SessionRole::Assistant => Role::Assistant,
                    };
                    Message::new(role, message.content.clone())
                })
                .collect();
        }
        let patient = match bundle {
            None => None,
            Some(text) => Some(Arc::new(parse_bundle_off_thread(text).await?)),
        };
        Ok(RunSetup {
            spec,
            input,
            session_id,
            history,
            session_turns,
            patient,
            request_id,
        })
    }

    /// Runs an agent, records the run (and the session turn), and answers;
    /// the request's record is charged the run's tokens and names the model
    /// that answered.
    #[instrument(skip_all, fields(agent = %setup.spec.id()))]
    async fn run(
        &self,
        setup: RunSetup,
        record: &mut RequestRecord,
        on_step: &mut (dyn FnMut(&Step) + Send),
    ) -> Result<pb::RunAgentResponse, ApiError> {
        let RunSetup {
            spec,
            input,
            session_id,
            history,
            patient,
            request_id,
            session_turns: _,
        } = setup;
        let store = &self.state.store;
        let run_id = store.new_agent_run_id().map_err(ApiError::from)?;
        let mut context = ContextTools::new();
        let today = CivilDate::from_days(now_ms().div_euclid(86_400_000));
        let follow_up: Arc<dyn ContextTool> = Arc::new(ScheduleFollowUp {
            store: store.clone(),
            run_id: run_id.clone(),
            agent_id: spec.id().to_owned(),
            session_id: session_id.clone(),
        });
        for tool in patient::patient_tools(patient, today)
            .into_iter()
            .chain([follow_up])
            .chain(self.shared_tools.iter().cloned())
        {
            if let Err(error) = context.add(tool) {
                tracing::error!(error = %error, "duplicate context tool");
            }
        }
        let started = Instant::now();
        let started_at_ms = now_ms();
        let deadline = started + Duration::from_secs(spec.timeout_seconds());
        let input_text = input.to_string();
        let run = run_agent_with(
            &spec,
            Toolbox::new(&self.catalog.registry, &context),
            self.model.as_ref(),
            input,
            &history,
            deadline,
            on_step,
        )
        .await
        .map_err(|error| match error {
            RunError::InvalidInput { field, reason } => ApiError::InvalidField {
                field: "input_json",
                reason: if field.is_empty() {
                    reason
                } else {
                    format!("{field}: {reason}")
                },
            },
        })?;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let models = models_used(&run);
        record.prompt_tokens = run.prompt_tokens();
        record.completion_tokens = run.completion_tokens();
        record.model = models.first().cloned();
        let steps: Vec<pb::AgentStep> = run.steps.iter().map(step_to_proto).collect();
        let output_json = run.output.as_ref().map(Value::to_string);
        store
            .record_agent_run(
                &run_id,
                &NewAgentRun {
                    agent_id: spec.id().to_owned(),
                    agent_version: spec.version(),
                    session_id: session_id.clone(),
                    request_id: (!request_id.is_empty()).then(|| request_id.clone()),
                    status: run.status.as_str().to_owned(),
                    models_json: json!(models).to_string(),
                    trace_json: Value::Array(run.steps.iter().map(step_to_json).collect())
                        .to_string(),
                    output_json: output_json.clone(),
                    started_at_ms,
                    elapsed_ms,
                },
            )
            .await
            .map_err(ApiError::from)?;
        if let (Some(id), Some(output)) = (&session_id, &output_json) {
            store
                .append_agent_session_turn(id, &run_id, &input_text, output, now_ms())
                .await
                .map_err(ApiError::from)?;
        }
        tracing::info!(
            status = run.status.as_str(),
            steps = run.steps.len(),
            elapsed_ms,
            "agent run finished"
        );
        Ok(pb::RunAgentResponse {
            run_id,
            output_json: output_json.unwrap_or_default(),
            status: run.status.as_str().to_owned(),
            steps,
            models,
            elapsed_ms,
            session_id: session_id.unwrap_or_default(),
            request_id,
            agent_version: spec.version(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
        })
    }

    fn known_tools(&self) -> Vec<&str> {
        self.catalog.context_name_refs()
    }
}

async fn parse_bundle_off_thread(text: String) -> Result<PatientRecord, ApiError> {
    tokio::task::spawn_blocking(move || patient::parse_bundle(&text))
        .await
        .map_err(|error| ApiError::Internal(format!("bundle parser task: {error}")))?
        .map_err(|error| ApiError::InvalidField {
            field: "patient_bundle_json",
            reason: error.to_string(),
        })
}

fn models_used(run: &AgentRun) -> Vec<String> {
    let mut models: Vec<String> = Vec::new();
    for model in run.steps.iter().filter_map(|step| step.model.as_ref()) {
        if !models.contains(model) {
            models.push(model.clone());
        }
    }
    models
}

fn step_to_proto(step: &Step) -> pb::AgentStep {
    let json_text =
        |value: &Option<Value>| value.as_ref().map(Value::to_string).unwrap_or_default();
    pb::AgentStep {
        kind: step.kind.as_str().to_owned(),
        model: step.model.clone().unwrap_or_default(),
        tool: step.tool.clone().unwrap_or_default(),
        arguments_json: json_text(&step.arguments),
        result_json: json_text(&step.result),
        error: step.error.clone().unwrap_or_default(),
        text: step.text.clone().unwrap_or_default(),
        route: step.route.clone().unwrap_or_default(),
        elapsed_ms: u64::try_from(step.elapsed.as_millis()).unwrap_or(u64::MAX),
        required: step.required,
        prompt_tokens: step.prompt_tokens,
        completion_tokens: step.completion_tokens,
    }
}

fn step_to_json(step: &Step) -> Value {
    json!({
        "kind": step.kind.as_str(),
        "route": step.route,
        "model": step.model,
        "text": step.text,
        "tool": step.tool,
        "arguments": step.arguments,
        "result": step.result,
        "error": step.error,
        "elapsed_ms": u64::try_from(step.elapsed.as_millis()).unwrap_or(u64::MAX),
        "required": step.required,
        "prompt_tokens": step.prompt_tokens,
        "completion_tokens": step.completion_tokens,
    })
}

fn agent_to_proto(spec: &AgentSpec) -> pb::AgentInfo {
    pb::AgentInfo {
        id: spec.id().to_owned(),
        name: spec.name_en().to_owned(),
        description: spec.description().to_owned(),
        input_schema_json: spec.input_schema().schema().to_string(),
        output_schema_json: spec.output_schema().schema().to_string(),
        name_zh: spec.name_zh().to_owned(),
        name_en: spec.name_en().to_owned(),
        version: spec.version(),
        tools: spec.tools().to_vec(),
        required_tools: spec
            .required_tools()
            .iter()
            .map(|required| required.tool.clone())
            .collect(),
        max_steps: spec.max_steps(),
        timeout_seconds: spec.timeout_seconds(),
        default_route: spec
            .routes()
            .route_for(medbox_agents::spec::RouteKind::Extract)
            .to_owned(),
    }
}

#[tonic::async_trait]
impl pb::agents_server::Agents for AgentsService {
    type RunAgentStreamStream = ReceiverStream<Result<pb::RunAgentStreamResponse, Status>>;

    #[instrument(skip_all)]
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/ListAgents", &request);
        let agents = self
            .catalog
            .all()
            .iter()
            .map(|spec| agent_to_proto(spec))
            .collect();
        record.answer(Ok(pb::ListAgentsResponse { agents }))
    }

    #[instrument(skip_all)]
    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/GetAgent", &request);
        let result =
            self.catalog
                .get(&request.into_inner().agent)
                .map(|spec| pb::GetAgentResponse {
                    agent: Some(agent_to_proto(&spec)),
                    spec_toml: spec.source().to_owned(),
                });
        record.answer(result)
    }

    #[instrument(skip_all)]
    async fn run_agent(
        &self,
        request: Request<pb::RunAgentRequest>,
    ) -> Result<Response<pb::RunAgentResponse>, Status> {
        let (mut record, setup) = self.begin_run("medbox.v1.Agents/RunAgent", request).await;
        let result = match setup {
            Ok(setup) => self.run(setup, &mut record, &mut |_| {}).await,
            Err(error) => Err(error),
        };
        record.answer(result)
    }

    #[instrument(skip_all)]
    async fn run_agent_stream(
        &self,
        request: Request<pb::RunAgentRequest>,
    ) -> Result<Response<Self::RunAgentStreamStream>, Status> {
        let (mut record, setup) = self
            .begin_run("medbox.v1.Agents/RunAgentStream", request)
            .await;
        let setup = match setup {
            Ok(setup) => setup,
            Err(error) => return Err(record.fail(error)),
        };
        // Room for every step a run can record and the result, so that the
        // step callback never has to wait.
        let capacity = 2 * setup.spec.max_steps() as usize + setup.spec.required_tools().len() + 2;
        let (sender, receiver) = mpsc::channel(capacity);
        let service = self.clone();
        tokio::spawn(async move {
            let step_sender = sender.clone();
            let mut on_step = move |step: &Step| {
                let message = pb::RunAgentStreamResponse {
                    step: Some(step_to_proto(step)),
                    result: None,
                    done: false,
                };
                // Never full (see the capacity); a closed channel means the
                // client went away, and the run still finishes and is recorded.
                let _client_may_be_gone = step_sender.try_send(Ok(message));
            };
            match service.run(setup, &mut record, &mut on_step).await {
                Ok(result) => {
                    record.finish(Code::Ok, None);
                    let _client_may_be_gone = sender
                        .send(Ok(pb::RunAgentStreamResponse {
                            step: None,
                            result: Some(result),
                            done: true,
                        }))
                        .await;
                }
                Err(error) => {
                    let _client_may_be_gone = sender.send(Err(record.fail(error))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    #[instrument(skip_all)]
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/CreateSession", &request);
        let request = request.into_inner();
        let result = async {
            if request.agent.is_empty() {
                return Err(ApiError::MissingField("agent"));
            }
            let spec = self.catalog.get(&request.agent)?;
            let bundle = request.patient_bundle_json.filter(|text| !text.is_empty());
            if let Some(text) = &bundle {
                parse_bundle_off_thread(text.clone()).await?;
            }
            let session = self
                .state
                .store
                .create_agent_session(spec.id(), bundle.as_deref(), now_ms())
                .await
                .map_err(ApiError::from)?;
            Ok(pb::CreateSessionResponse {
                session_id: session.id,
                agent: session.agent_id,
            })
        }
        .await;
        record.answer(result)
    }

    #[instrument(skip_all)]
    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/SendMessage", &request);
        let request = request.into_inner();
        let request_id = record.adopt_client_request_id(&request.request_id);
        let result = async {
            if request.session_id.is_empty() {
                return Err(ApiError::MissingField("session_id"));
            }
            let session = self.find_session(&request.session_id).await?;
            let agent = session.agent_id.clone();
            let setup = self
                .prepare(&agent, &request.input_json, Some(session), None, request_id)
                .await?;
            let turns_before = setup.session_turns;
            let result = self.run(setup, &mut record, &mut |_| {}).await?;
            // A completed run appended its turn.
            let turns = turns_before + usize::from(!result.output_json.is_empty());
            Ok(pb::SendMessageResponse {
                result: Some(result),
                turns: u32::try_from(turns).unwrap_or(u32::MAX),
            })
        }
        .await;
        record.answer(result)
    }

    #[instrument(skip_all)]
    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::CreateAgentResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/CreateAgent", &request);
        let text = request.into_inner().spec_toml;
        let result = async {
            let spec = self.validate_spec(&text)?;
            if self.catalog.get(spec.id()).is_ok() {
                return Err(ApiError::AgentExists(spec.id().to_owned()));
            }
            self.save(spec).await
        }
        .await
        .map(|agent| pb::CreateAgentResponse { agent: Some(agent) });
        record.answer(result)
    }

    #[instrument(skip_all)]
    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::UpdateAgentResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Agents/UpdateAgent", &request);
        let request = request.into_inner();
        let result = async {
            let current = self.catalog.get(&request.agent)?;
            let spec = self.validate_spec(&request.spec_toml)?;
            if spec.id() != current.id() {
                return Err(ApiError::InvalidField {
                    field: "spec_toml",
                    reason: format!(
                        "the spec's id `{}` is not the agent `{}`",
                        spec.id(),
                        current.id()
                    ),
                });
            }
            if spec.version() <= current.version() {
                return Err(ApiError::InvalidField {
                    field: "spec_toml",
                    reason: format!(
                        "version {} must be greater than the current version {}",
                        spec.version(),
                        current.version()
                    ),
                });
            }
            self.save(spec).await
        }
        .await
        .map(|agent| pb::UpdateAgentResponse { agent: Some(agent) });
        record.answer(result)
    }
}

impl AgentsService {
    fn validate_spec(&self, text: &str) -> Result<AgentSpec, ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::MissingField("spec_toml"));
        }
        let names = self.known_tools();
        AgentSpec::from_toml_str_with(
            "spec_toml",
            text,
            KnownTools {
                registry: &self.catalog.registry,
                context: &names,
            },
        )
        .map_err(|error| ApiError::InvalidField {
            field: "spec_toml",
            reason: format!("field `{}`: {}", error.field, error.problem),
        })
    }

    /// Records a new version in the store, then serves it.
    async fn save(&self, spec: AgentSpec) -> Result<pb::AgentInfo, ApiError> {
        let inserted = self
            .state
            .store
            .record_agent_spec_version(
                spec.id(),
                spec.version(),
                spec.source(),
                SpecOrigin::Api,
                now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        if !inserted {
            return Err(ApiError::InvalidField {
                field: "spec_toml",
                reason: format!(
                    "version {} of agent `{}` is already stored; raise the version",
                    spec.version(),
                    spec.id()
                ),
            });
        }
        let info = agent_to_proto(&spec);
        self.catalog.insert(Arc::new(spec));
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use medbox_agents::step_loop::StepKind;

    use super::*;

    #[test]
    fn tool_results_reach_templates_as_user_messages() {
        let messages = chat_messages(&[
            Message::new(Role::System, "s"),
            Message::new(Role::Tool, "{\"tool\":\"x\"}"),
        ]);
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].role, "user");
        assert_eq!(messages[1].content, "Tool result: {\"tool\":\"x\"}");
    }

    #[test]
    fn a_missing_route_is_not_found_and_a_full_queue_overloaded() {
        assert_eq!(
            model_error("fast", ApiError::ModelNotFound("fast".into())),
            ModelError::NotFound {
                route: "fast".into()
            }
        );
        assert!(matches!(
            model_error("fast", ApiError::QueueFull("tiny".into())),
            ModelError::Overloaded { .. }
        ));
    }

    #[test]
    fn steps_keep_their_kind_and_tool() {
        let run = AgentRun {
            status: medbox_agents::step_loop::RunStatus::Completed,
            output: Some(json!({})),
            steps: Vec::new(),
        };
        assert!(models_used(&run).is_empty());
        assert_eq!(StepKind::Tool.as_str(), "tool");
    }
}
