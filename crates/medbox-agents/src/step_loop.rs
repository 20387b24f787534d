//! The step loop: the model answers each turn with a tool call or a final
//! answer; tools run and their results go back; the run ends at a valid final
//! answer, the step limit, the deadline, or a model error.
//!
//! Every refusal is fed back to the model as a message it can act on, never
//! a crash: an answer that does not parse, a tool the agent may not call, a
//! tool error, a final answer that does not satisfy the output schema. Each
//! counts as a step, so a model that never recovers meets the step limit.
//!
//! **Architecture Invariant:** a run with status [`RunStatus::Completed`] has
//! an output valid against the agent's output schema; no other run has one.
//!
//! Before the first model step the orchestrator runs the spec's
//! `required_tools` with arguments taken from the input; their results are
//! in the trace (marked `required`) and in the conversation. The last step
//! the step limit allows admits only a final answer, so that a run ends with
//! an answer whenever the model can write one.
//!
//! Routes: the first model step takes `routes.extract`, a step after a tool
//! result `routes.reason`, a step after a refusal or a tool error
//! `routes.repair`; each falls back to `routes.default`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ToolRegistry;
use crate::context::{ContextTools, Toolbox};
use crate::model::{AgentModel, Message, ModelError, ModelTurn, Role};
use crate::spec::{AgentSpec, RouteKind};

/// What a step of the trace records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A model call: the route asked, the model that answered, its text.
    Model,
    /// A tool call with its arguments and its result or error.
    Tool,
    /// A final answer: accepted (with `result`) or refused (with `error`).
    Final,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Model => "model",
            StepKind::Tool => "tool",
            StepKind::Final => "final",
        }
    }
}

/// One entry of a run's trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub kind: StepKind,
    /// The route a model step asked for.
    pub route: Option<String>,
    /// The model that answered a model step.
    pub model: Option<String>,
    /// The model's raw text, for a model step.
    pub text: Option<String>,
    /// The tool a tool step called (or was refused).
    pub tool: Option<String>,
    pub arguments: Option<Value>,
    /// A tool's result, or the accepted final output.
    pub result: Option<Value>,
    /// Why the step failed or was refused, as fed back to the model.
    pub error: Option<String>,
    pub elapsed: Duration,
    /// A tool step the orchestrator ran before the first model step.
    pub required: bool,
    /// Prompt and generated tokens of a model step (0 for other steps).
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Step {
    fn new(kind: StepKind, elapsed: Duration) -> Step {
        Step {
            kind,
            route: None,
            model: None,
            text: None,
            tool: None,
            arguments: None,
            result: None,
            error: None,
            elapsed,
            required: false,
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunStatus {
    /// A final answer valid against the output schema.
    Completed,
    /// `max_steps` model calls without a valid final answer.
    StepLimit,
    /// The deadline (the caller's, or the spec's timeout) passed.
    Deadline,
    /// The model could not answer.
    ModelError(ModelError),
}

impl RunStatus {
    /// The status as the API spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::StepLimit => "step_limit",
            RunStatus::Deadline => "deadline",
            RunStatus::ModelError(_) => "model_error",
        }
    }
}

/// A finished run: its status, the output when completed, and the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRun {
    pub status: RunStatus,
    pub output: Option<Value>,
    pub steps: Vec<Step>,
}

impl AgentRun {
    /// Prompt tokens over every model step of the run.
    pub fn prompt_tokens(&self) -> u32 {
        self.steps.iter().map(|step| step.prompt_tokens).sum()
    }

    /// Generated tokens over every model step of the run.
    pub fn completion_tokens(&self) -> u32 {
        self.steps.iter().map(|step| step.completion_tokens).sum()
    }
}

/// A run refused before any model call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The input does not satisfy the agent's input schema. `field` is the
    /// JSON pointer of the offending value (`""` for the input itself).
    #[error("input `{field}`: {reason}")]
    InvalidInput { field: String, reason: String },
}

/// The schema every model answer must satisfy: a call to one of the agent's
/// tools with that tool's argument schema, or a final answer valid against
/// the agent's output schema. The branches are disjoint (distinct `tool`
/// constants, distinct required keys), so `anyOf` means exactly one of them
/// and constrained decoders enforce it as written.
pub fn build_step_schema(spec: &AgentSpec, registry: &ToolRegistry) -> Value {
    build_step_schema_with(spec, Toolbox::new(registry, &ContextTools::new()))
}

/// [`build_step_schema`] over a run's whole toolbox.
pub fn build_step_schema_with(spec: &AgentSpec, toolbox: Toolbox<'_>) -> Value {
    let tool_branches = spec.tools().iter().filter_map(|name| {
        let tool = toolbox.describe(name)?;
        Some(json!({
            "type": "object",
            "properties": {
                "tool": {"const": name},
                "arguments": tool.parameters,
            },
            "required": ["tool", "arguments"],
            "additionalProperties": false,
        }))
    });
    let branches: Vec<Value> = tool_branches.chain([final_only_schema(spec)]).collect();
    json!({"anyOf": branches})
}

/// The schema of the last step a run allows: a final answer only.
pub fn final_only_schema(spec: &AgentSpec) -> Value {
    json!({
        "type": "object",
        "properties": {"final": spec.output_schema().schema()},
        "required": ["final"],
        "additionalProperties": false,
    })
}

/// Runs an agent to its end. See [`run_agent_streaming`].
pub async fn run_agent(
    spec: &AgentSpec,
    registry: &ToolRegistry,
    model: &impl AgentModel,
    input: Value,
    history: &[Message],
    deadline: Instant,
) -> Result<AgentRun, RunError> {
    run_agent_streaming(spec, registry, model, input, history, deadline, &mut |_| {}).await
}

/// Runs an agent, handing each step to `on_step` as soon as it is recorded.
/// The effective deadline is the earlier of `deadline` and the spec's timeout
/// from now. The input is checked against the input schema first; a bad
/// input is refused before any model call.
pub async fn run_agent_streaming(
    spec: &AgentSpec,
    registry: &ToolRegistry,
    model: &impl AgentModel,
    input: Value,
    history: &[Message],
    deadline: Instant,
    on_step: &mut (dyn FnMut(&Step) + Send),
) -> Result<AgentRun, RunError> {
    let context = ContextTools::new();
    run_agent_with(
        spec,
        Toolbox::new(registry, &context),
        model,
        input,
        history,
        deadline,
        on_step,
    )
    .await
}

/// Runs an agent with the static registry and this run's context tools,
/// handing each step to `on_step` as soon as it is recorded. The effective
/// deadline is the earlier of `deadline` and the spec's timeout from now.
/// The input is checked against the input schema first; a bad input is
/// refused before any tool or model call.
pub async fn run_agent_with(
    spec: &AgentSpec,
    toolbox: Toolbox<'_>,
    model: &impl AgentModel,
    input: Value,
    history: &[Message],
    deadline: Instant,
    on_step: &mut (dyn FnMut(&Step) + Send),
) -> Result<AgentRun, RunError> {
    let started = Instant::now();
    let deadline = deadline.min(started + Duration::from_secs(spec.timeout_seconds()));
    check_input(spec, &input)?;
    let step_schema = build_step_schema_with(spec, toolbox);
    let last_step_schema = final_only_schema(spec);
    let mut messages = opening_messages(spec, toolbox, &input, history);
    let mut trace = Trace {
        steps: Vec::new(),
        on_step,
    };
    for required in spec.required_tools() {
        if Instant::now() >= deadline {
            return Ok(trace.finish(RunStatus::Deadline, None));
        }
        let tool_started = Instant::now();
        let outcome = match required.arguments_for(&input) {
            Ok(arguments) => {
                let result = toolbox
                    .call(&required.tool, &arguments)
                    .await
                    .map_err(|error| error.to_string());
                (Some(arguments), result)
            }
            Err(pointer) => (
                None,
                Err(format!("not run: the input has no value at `{pointer}`")),
            ),
        };
        let mut tool_step = Step::new(StepKind::Tool, tool_started.elapsed());
        tool_step.required = true;
        tool_step.tool = Some(required.tool.clone());
        let observation = match &outcome.1 {
            Ok(result) => json!({"tool": required.tool, "result": result}),
            Err(error) => json!({"tool": required.tool, "error": error}),
        };
        tool_step.arguments = outcome.0;
        match outcome.1 {
            Ok(result) => tool_step.result = Some(result),
            Err(error) => tool_step.error = Some(error),
        }
        trace.push(tool_step);
        messages.push(Message::new(Role::Tool, observation.to_string()));
    }
    let mut route_kind = RouteKind::Extract;
    for step_index in 0..spec.max_steps() {
        if Instant::now() >= deadline {
            return Ok(trace.finish(RunStatus::Deadline, None));
        }
        let route = spec.routes().route_for(route_kind).to_owned();
        let is_last = step_index + 1 == spec.max_steps();
        let mut turn_messages = messages.clone();
        if is_last && step_index > 0 {
            turn_messages.push(Message::new(
                Role::User,
                "This is the last step: answer now with {\"final\": …}.",
            ));
        }
        let turn = ModelTurn {
            route: route.clone(),
            messages: turn_messages,
            input_index: 1 + history.len(),
            response_schema: if is_last {
                last_step_schema.clone()
            } else {
                step_schema.clone()
            },
            max_tokens: spec.max_tokens(),
            deadline,
        };
        let call_started = Instant::now();
        let reply = model.complete(turn).await;
        let mut model_step = Step::new(StepKind::Model, call_started.elapsed());
        model_step.route = Some(route);
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                model_step.error = Some(error.to_string());
                trace.push(model_step);
                return Ok(trace.finish(RunStatus::ModelError(error), None));
            }
        };
        let answer = parse_answer(&reply.text);
        model_step.model = Some(reply.model);
        model_step.prompt_tokens = reply.prompt_tokens;
        model_step.completion_tokens = reply.completion_tokens;
        model_step.text = Some(reply.text.clone());
        model_step.error = answer.as_ref().err().cloned();
        trace.push(model_step);
        if Instant::now() >= deadline {
            return Ok(trace.finish(RunStatus::Deadline, None));
        }
        messages.push(Message::new(Role::Assistant, reply.text));
        route_kind = match answer {
            Err(reason) => {
                messages.push(Message::new(Role::User, refused_answer_message(&reason)));
                RouteKind::Repair
            }
            Ok(Answer::Tool { name, arguments }) => {
                let tool_started = Instant::now();
                let outcome = if spec.tools().contains(&name) {
                    toolbox
                        .call(&name, &arguments)
                        .await
                        .map_err(|error| error.to_string())
                } else {
                    Err(format!(
                        "tool `{name}` is not available to this agent; its tools are: {}",
                        tool_list(spec)
                    ))
                };
                let mut tool_step = Step::new(StepKind::Tool, tool_started.elapsed());
                let observation = match &outcome {
                    Ok(result) => json!({"tool": name, "result": result}),
                    Err(error) => json!({"tool": name, "error": error}),
                };
                tool_step.tool = Some(name);
                tool_step.arguments = Some(arguments);
                let next = match outcome {
                    Ok(result) => {
                        tool_step.result = Some(result);
                        RouteKind::Reason
                    }
                    Err(error) => {
                        tool_step.error = Some(error);
                        RouteKind::Repair
                    }
                };
                trace.push(tool_step);
                messages.push(Message::new(Role::Tool, observation.to_string()));
                next
            }
            Ok(Answer::Final(output)) => {
                let violations = spec.output_schema().violations(&output);
                let mut final_step = Step::new(StepKind::Final, Duration::ZERO);
                if violations.is_empty() {
                    final_step.result = Some(output.clone());
                    trace.push(final_step);
                    return Ok(trace.finish(RunStatus::Completed, Some(output)));
                }
                let reason = describe_violations(&violations);
                final_step.error = Some(reason.clone());
                trace.push(final_step);
                messages.push(Message::new(
                    Role::User,
                    format!(
                        "Your final answer does not satisfy the output schema: {reason}. \
                         Answer again with a corrected {{\"final\": …}}."
                    ),
                ));
                RouteKind::Repair
            }
        };
    }
    Ok(trace.finish(RunStatus::StepLimit, None))
}

/// The steps so far, each also handed to the caller's callback.
struct Trace<'a> {
    steps: Vec<Step>,
    on_step: &'a mut (dyn FnMut(&Step) + Send),
}

impl Trace<'_> {
    fn push(&mut self, step: Step) {
        (self.on_step)(&step);
        self.steps.push(step);
    }

    fn finish(self, status: RunStatus, output: Option<Value>) -> AgentRun {
        AgentRun {
            status,
            output,
            steps: self.steps,
        }
    }
}

fn check_input(spec: &AgentSpec, input: &Value) -> Result<(), RunError> {
    let violations = spec.input_schema().violations(input);
    match violations.first() {
        None => Ok(()),
        Some((field, _)) => Err(RunError::InvalidInput {
            field: field.clone(),
            reason: describe_violations(&violations),
        }),
    }
}

/// `"/a/0: message; /b: message"`, the root written as `(root)`.
fn describe_violations(violations: &[(String, String)]) -> String {
    violations
        .iter()
        .map(|(pointer, message)| {
            let at = if pointer.is_empty() {
                "(root)"
            } else {
                pointer
            };
            format!("{at}: {message}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn tool_list(spec: &AgentSpec) -> String {
    if spec.tools().is_empty() {
        "none".to_owned()
    } else {
        spec.tools().join(", ")
    }
}

fn opening_messages(
    spec: &AgentSpec,
    toolbox: Toolbox<'_>,
    input: &Value,
    history: &[Message],
) -> Vec<Message> {
    let mut system = spec.system_prompt().trim_end().to_owned();
    system.push_str("\n\n## Tools\n");
    if spec.tools().is_empty() {
        system.push_str("This agent has no tools: answer directly.\n");
    } else {
        system.push_str(
            "You may call these tools; each result comes back in a `tool` message. \
             Use a tool for anything it can decide (a flag, a score, a deadline, a check) \
             and report its result rather than your own estimate.\n",
        );
        for tool in spec
            .tools()
            .iter()
            .filter_map(|name| toolbox.describe(name))
        {
            system.push_str(&format!(
                "- `{}`: {}\n  arguments schema: {}\n",
                tool.name, tool.description, tool.parameters
            ));
        }
    }
    system.push_str(&format!(
        "\n## Answer format\nAnswer every turn with exactly one JSON object and nothing else:\n\
         - to call a tool: {{\"tool\": \"<name>\", \"arguments\": {{…}}}}\n\
         - to finish: {{\"final\": <answer>}}, where <answer> satisfies this JSON Schema:\n{}\n",
        spec.output_schema().schema()
    ));
    let mut messages = Vec::with_capacity(history.len() + 2);
    messages.push(Message::new(Role::System, system));
    messages.extend_from_slice(history);
    messages.push(Message::new(Role::User, input.to_string()));
    messages
}

fn refused_answer_message(reason: &str) -> String {
    format!(
        "Your answer was refused: {reason}. Answer with exactly one JSON object: \
         {{\"tool\": \"<name>\", \"arguments\": {{…}}}} or {{\"final\": <answer>}}."
    )
}

/// A model answer, parsed.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Tool { name: String, arguments: Value },
    Final(Value),
}

/// Parses a model's text. Tolerates surrounding whitespace and a Markdown
/// code fence (what an unconstrained model tends to write); the error says
/// what was expected.
fn parse_answer(text: &str) -> Result<Answer, String> {
    let trimmed = strip_code_fence(text.trim());
    let value: Value = serde_json::from_str(trimmed)
        .map_err(|error| format!("the answer is not JSON ({error})"))?;
    let Value::Object(mut object) = value else {
        return Err("the answer is not a JSON object".to_owned());
    };
    if object.contains_key("final") {
        if object.len() != 1 {
            return Err("a final answer has the single key `final`".to_owned());
        }
        let output = object.remove("final").unwrap_or(Value::Null);
        return Ok(Answer::Final(output));
    }
    let name = match object.remove("tool") {
        Some(Value::String(name)) => name,
        Some(_) => return Err("`tool` must be a tool name (a string)".to_owned()),
        None => return Err("the answer has neither `tool` nor `final`".to_owned()),
    };
    let arguments = object
        .remove("arguments")
        .ok_or_else(|| format!("the call to `{name}` has no `arguments` object"))?;
    if let Some(extra) = object.keys().next() {
        return Err(format!(
            "unexpected key `{extra}`: a tool call has only `tool` and `arguments`"
        ));
    }
    Ok(Answer::Tool { name, arguments })
}

fn strip_code_fence(text: &str) -> &str {
    let Some(body) = text.strip_prefix("```") else {
        return text;
    };
    let body = body.strip_suffix("```").unwrap_or(body);
    // Drop an info string such as `json` on the opening line.
    let body = match body.split_once('\n') {
        Some((info, rest)) if !info.trim_start().starts_with(['{', '[']) => rest,
        _ => body,
    };
    body.trim()
}

#[cfg(test)]
mod tests;
