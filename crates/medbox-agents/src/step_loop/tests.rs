//! The step loop against a scripted model: recoveries, limits, routes,
//! sessions, and the step schema.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ToolRegistry;
use crate::model::{Message, ModelError, Role};
use crate::session::SessionHistory;
use crate::spec::AgentSpec;
use crate::step_loop::{
    AgentRun, Answer, RunError, RunStatus, Step, build_step_schema, parse_answer, run_agent,
    run_agent_streaming,
};
use crate::test_support::{SCRIPTED_PROMPT_TOKENS, Scripted, ScriptedModel, block_on};

const SPEC: &str = r#"
id = "demo_bmi"
version = 1
name_zh = "体重指数"
name_en = "Body mass index"
description = "Computes the BMI and names its category."
system_prompt = "Compute the BMI with the `bmi` tool, then answer."
tools = ["bmi"]
max_steps = 4
timeout_seconds = 30
input_schema = '''
{"type": "object",
 "properties": {"weight_kg": {"type": "number", "minimum": 1}, "height_cm": {"type": "number"}},
 "required": ["weight_kg", "height_cm"], "additionalProperties": false}
'''
output_schema = '''
{"type": "object",
 "properties": {"bmi": {"type": "number"}, "category": {"type": "string", "enum": ["underweight", "normal", "overweight", "obese"]}},
 "required": ["bmi", "category"], "additionalProperties": false}
'''
[routes]
default = "medical"
extract = "fast"
repair = "careful"
"#;

const CALL_BMI: &str = r#"{"tool": "bmi", "arguments": {"weight_kg": 70, "height_cm": 175}}"#;
const FINAL: &str = r#"{"final": {"bmi": 22.9, "category": "normal"}}"#;

fn spec() -> AgentSpec {
    AgentSpec::from_toml_str("demo.toml", SPEC, &ToolRegistry::medical()).expect("valid spec")
}

fn input() -> Value {
    json!({"weight_kg": 70, "height_cm": 175})
}

fn in_a_minute() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn run(model: &ScriptedModel, history: &[Message], deadline: Instant) -> AgentRun {
    block_on(run_agent(
        &spec(),
        &ToolRegistry::medical(),
        model,
        input(),
        history,
        deadline,
    ))
    .expect("the input is valid")
}

/// The trace as `kind` or `kind!` (a step with an error), space-separated.
fn shape(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|step| {
            let mark = if step.error.is_some() { "!" } else { "" };
            format!("{}{mark}", step.kind.as_str())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the script and checks the status, the trace's shape, the routes
/// asked, and that the output is there exactly when the run completed.
#[track_caller]
fn check(script: &[&str], status: &str, trace: &str, routes: &[&str]) -> (AgentRun, ScriptedModel) {
    let model = ScriptedModel::replies(script.iter().copied());
    let run = run(&model, &[], in_a_minute());
    assert_eq!(run.status.as_str(), status, "{:#?}", run.steps);
    assert_eq!(shape(&run.steps), trace);
    let asked: Vec<String> = model.turns().into_iter().map(|turn| turn.route).collect();
    assert_eq!(asked, routes);
    assert_eq!(run.output.is_some(), run.status == RunStatus::Completed);
    (run, model)
}

/// The last message of the `index`th turn the model was asked.
fn last_message(model: &ScriptedModel, index: usize) -> Message {
    let turns = model.turns();
    turns[index].messages.last().cloned().expect("a message")
}

#[test]
fn a_tool_call_then_a_final_answer_completes() {
    let (run, model) = check(
        &[CALL_BMI, FINAL],
        "completed",
        "model tool model final",
        &["fast", "medical"],
    );
    assert_eq!(run.output, Some(json!({"bmi": 22.9, "category": "normal"})));
    let tool = &run.steps[1];
    assert_eq!(tool.tool.as_deref(), Some("bmi"));
    assert_eq!(
        tool.arguments,
        Some(json!({"weight_kg": 70, "height_cm": 175}))
    );
    let result = tool.result.as_ref().expect("a tool result");
    assert_eq!(result["bmi"], 22.9, "{result}");
    assert_eq!(run.steps[0].model.as_deref(), Some("scripted"));
    assert_eq!(run.steps[0].text.as_deref(), Some(CALL_BMI));
    let observation = last_message(&model, 1);
    assert_eq!(observation.role, Role::Tool);
    let observation: Value = serde_json::from_str(&observation.content).expect("JSON");
    assert_eq!(observation["tool"], "bmi");
    assert_eq!(&observation["result"], result);
}

#[test]
fn refusals_are_fed_back_and_recovered() {
    // (script, trace, routes, what the model is told after its first answer)
    let cases: &[(&[&str], &str, &[&str], &str)] = &[
        (
            &[
                r#"{"tool": "bmi", "arguments": {"weight_kg": 70}}"#,
                CALL_BMI,
                FINAL,
            ],
            "model tool! model tool model final",
            &["fast", "careful", "medical"],
            "bad argument `height_cm`: missing field `height_cm`",
        ),
        (
            &[r#"{"tool": "drop_tables", "arguments": {}}"#, FINAL],
            "model tool! model final",
            &["fast", "careful"],
            "tool `drop_tables` is not available to this agent; its tools are: bmi",
        ),
        (
            // In the registry but not among this agent's tools.
            &[
                r#"{"tool": "qtc", "arguments": {"qt_ms": 400, "heart_rate_bpm": 60}}"#,
                FINAL,
            ],
            "model tool! model final",
            &["fast", "careful"],
            "tool `qtc` is not available to this agent",
        ),
        (
            &[r#"{"final": {"bmi": "22.9", "category": "fine"}}"#, FINAL],
            "model final! model final",
            &["fast", "careful"],
            "/bmi: \"22.9\" is not of type \"number\"",
        ),
        (
            &["The BMI is 22.9, which is normal.", FINAL],
            "model! model final",
            &["fast", "careful"],
            "Your answer was refused: the answer is not JSON",
        ),
        (
            &[
                r#"{"answer": 22.9}"#,
                "```json\n{\"final\": {\"bmi\": 22.9, \"category\": \"normal\"}}\n```",
            ],
            "model! model final",
            &["fast", "careful"],
            "the answer has neither `tool` nor `final`",
        ),
    ];
    for (script, trace, routes, feedback) in cases {
        let (run, model) = check(script, "completed", trace, routes);
        let told = last_message(&model, 1).content;
        assert!(
            told.contains(feedback),
            "told `{told}`, expected `{feedback}`"
        );
        let first_error = run.steps.iter().find_map(|step| step.error.clone());
        assert!(
            first_error.is_some_and(|error| told.contains(&error)),
            "the trace records what the model was told: {:#?}",
            run.steps
        );
    }
}

#[test]
fn a_model_that_never_answers_validly_meets_the_step_limit() {
    let bad = r#"{"final": {"bmi": 22.9}}"#;
    check(
        &[bad, "no", CALL_BMI, bad, FINAL],
        "step_limit",
        "model final! model! model tool model final!",
        &["fast", "careful", "careful", "medical"],
    );
}

#[test]
fn a_model_error_ends_the_run() {
    let error = ModelError::Unavailable {
        route: "medical".to_owned(),
        reason: "loading".to_owned(),
    };
    let model = ScriptedModel::new([
        Scripted::Reply(CALL_BMI.to_owned()),
        Scripted::Error(error.clone()),
    ]);
    let run = run(&model, &[], in_a_minute());
    assert_eq!(run.status, RunStatus::ModelError(error));
    assert_eq!(run.status.as_str(), "model_error");
    assert_eq!(shape(&run.steps), "model tool model!");
    assert_eq!(run.output, None);
}

#[test]
fn a_past_deadline_stops_before_asking_the_model() {
    let model = ScriptedModel::replies([FINAL]);
    let run = run(&model, &[], Instant::now());
    assert_eq!(run.status, RunStatus::Deadline);
    assert!(run.steps.is_empty());
    assert!(model.turns().is_empty());
}

#[test]
fn an_answer_after_the_deadline_is_recorded_and_discarded() {
    let model = ScriptedModel::new([
        Scripted::SlowReply(Duration::from_millis(80), FINAL.to_owned()),
        Scripted::Reply(FINAL.to_owned()),
    ]);
    let deadline = Instant::now() + Duration::from_millis(20);
    let run = run(&model, &[], deadline);
    assert_eq!(run.status, RunStatus::Deadline);
    assert_eq!(shape(&run.steps), "model");
    assert!(run.steps[0].elapsed >= Duration::from_millis(80));
    assert_eq!(run.output, None);
    assert_eq!(model.turns().len(), 1);
    assert_eq!(model.turns()[0].deadline, deadline);
}

#[test]
fn the_spec_timeout_caps_the_callers_deadline() {
    let model = ScriptedModel::replies([FINAL]);
    let far = Instant::now() + Duration::from_secs(3600);
    run(&model, &[], far);
    let asked = model.turns()[0].deadline;
    assert!(asked < far);
    assert!(asked <= Instant::now() + Duration::from_secs(30));
}

#[test]
fn invalid_input_is_refused_before_any_model_call() {
    let cases = [
        (
            json!({"weight_kg": 70}),
            "",
            "\"height_cm\" is a required property",
        ),
        (
            json!({"weight_kg": 0, "height_cm": 175}),
            "/weight_kg",
            "minimum of 1",
        ),
        (
            json!({"weight_kg": "70", "height_cm": 175}),
            "/weight_kg",
            "not of type",
        ),
        (
            json!({"weight_kg": 70, "height_cm": 175, "name": "x"}),
            "",
            "Additional properties",
        ),
        (json!([70, 175]), "", "not of type \"object\""),
    ];
    for (input, field, reason) in cases {
        let model = ScriptedModel::replies([FINAL]);
        let result = block_on(run_agent(
            &spec(),
            &ToolRegistry::medical(),
            &model,
            input.clone(),
            &[],
            in_a_minute(),
        ));
        match result {
            Err(RunError::InvalidInput {
                field: got_field,
                reason: got_reason,
            }) => {
                assert_eq!(got_field, field, "{input}");
                assert!(got_reason.contains(reason), "{input}: {got_reason}");
            }
            Ok(run) => panic!("{input} accepted: {run:?}"),
        }
        assert!(model.turns().is_empty(), "{input}: the model was asked");
    }
}

#[test]
fn a_session_remembers_an_earlier_turn() {
    let mut history = SessionHistory::new(8);
    let model = ScriptedModel::replies([
        FINAL,
        r#"{"final": {"bmi": 23.5, "category": "overweight"}}"#,
    ]);
    let first = run(&model, history.messages(), in_a_minute());
    assert!(history.record_run(&input(), &first));
    let second = run(&model, history.messages(), in_a_minute());
    assert_eq!(second.status, RunStatus::Completed);
    let turns = model.turns();
    let first_messages = &turns[0].messages;
    let second_messages = &turns[1].messages;
    assert_eq!(first_messages.len(), 2, "system and input");
    assert_eq!(second_messages.len(), 4, "system, earlier turn, input");
    assert_eq!(
        second_messages[1],
        Message::new(Role::User, input().to_string())
    );
    let remembered: Value = serde_json::from_str(&second_messages[2].content).expect("JSON");
    assert_eq!(second_messages[2].role, Role::Assistant);
    assert_eq!(remembered, json!({"bmi": 22.9, "category": "normal"}));
    assert_eq!(second_messages[3].role, Role::User);
    // Each turn says where this run's input is, after the earlier turns.
    assert_eq!((turns[0].input_index, turns[1].input_index), (1, 3));
    assert_eq!(
        second_messages[turns[1].input_index],
        Message::new(Role::User, input().to_string())
    );
}

#[test]
fn a_session_keeps_only_its_last_turns() {
    let mut history = SessionHistory::new(2);
    for turn in ["a", "b", "c"] {
        history.push_turn(format!("question {turn}"), format!("answer {turn}"));
    }
    assert_eq!(history.turns(), 2);
    let contents: Vec<&str> = history
        .messages()
        .iter()
        .map(|message| message.content.as_str())
        .collect();
    assert_eq!(
        contents,
        ["question b", "answer b", "question c", "answer c"]
    );
    let unfinished = AgentRun {
        status: RunStatus::StepLimit,
        output: None,
        steps: Vec::new(),
    };
    assert!(!history.record_run(&input(), &unfinished));
    assert_eq!(history.turns(), 2);
}

#[test]
fn a_run_sums_the_tokens_of_its_model_steps() {
    let model = ScriptedModel::replies([CALL_BMI, FINAL]);
    let run = run(&model, &[], in_a_minute());
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.prompt_tokens(), 2 * SCRIPTED_PROMPT_TOKENS);
    assert_eq!(
        run.completion_tokens() as usize,
        CALL_BMI.len() + FINAL.len()
    );
}

#[test]
fn each_step_is_streamed_as_it_is_recorded() {
    let model = ScriptedModel::replies([CALL_BMI, FINAL]);
    let mut streamed = Vec::new();
    let run = block_on(run_agent_streaming(
        &spec(),
        &ToolRegistry::medical(),
        &model,
        input(),
        &[],
        in_a_minute(),
        &mut |step: &Step| streamed.push(step.clone()),
    ))
    .expect("valid input");
    assert_eq!(streamed, run.steps);
}

#[test]
fn the_system_prompt_lists_the_tools_and_the_answer_format() {
    let model = ScriptedModel::replies([FINAL]);
    run(&model, &[], in_a_minute());
    let turn = &model.turns()[0];
    let system = &turn.messages[0];
    assert_eq!(system.role, Role::System);
    for expected in [
        "Compute the BMI with the `bmi` tool",
        "- `bmi`: ",
        "\"height_cm\"",
        "{\"final\": <answer>}",
        "\"category\"",
    ] {
        assert!(system.content.contains(expected), "lacks `{expected}`");
    }
    assert_eq!(
        turn.messages[1],
        Message::new(Role::User, input().to_string())
    );
    assert_eq!(
        turn.response_schema,
        build_step_schema(&spec(), &ToolRegistry::medical())
    );
    assert_eq!(turn.max_tokens, crate::spec::DEFAULT_MAX_TOKENS);
}

#[test]
fn the_step_schema_admits_allowed_calls_and_valid_finals_only() {
    let schema = build_step_schema(&spec(), &ToolRegistry::medical());
    let validator = jsonschema::validator_for(&schema).expect("the step schema compiles");
    let cases = [
        (
            json!({"tool": "bmi", "arguments": {"weight_kg": 70, "height_cm": 175}}),
            true,
        ),
        (json!({"final": {"bmi": 22.9, "category": "normal"}}), true),
        (
            json!({"tool": "qtc", "arguments": {"qt_ms": 400, "heart_rate_bpm": 60}}),
            false,
        ),
        (
            json!({"tool": "bmi", "arguments": {"weight_kg": "70", "height_cm": 175}}),
            false,
        ),
        (json!({"tool": "bmi"}), false),
        (json!({"final": {"bmi": 22.9}}), false),
        (
            json!({"final": {"bmi": 22.9, "category": "normal"}, "tool": "bmi"}),
            false,
        ),
        (json!({}), false),
        (json!("22.9"), false),
    ];
    for (answer, valid) in cases {
        assert_eq!(validator.is_valid(&answer), valid, "{answer}");
    }
}

#[test]
fn answers_parse_leniently_but_by_shape() {
    let tool = |name: &str, arguments: Value| {
        Ok(Answer::Tool {
            name: name.to_owned(),
            arguments,
        })
    };
    let cases: Vec<(&str, Result<Answer, &str>)> = vec![
        (
            CALL_BMI,
            tool("bmi", json!({"weight_kg": 70, "height_cm": 175})).map_err(|e: &str| e),
        ),
        ("  {\"final\": 1}\n", Ok(Answer::Final(json!(1)))),
        (
            "```\n{\"final\": null}\n```",
            Ok(Answer::Final(Value::Null)),
        ),
        (
            "```json\n{\"tool\": \"bmi\", \"arguments\": {}}```",
            tool("bmi", json!({})),
        ),
        ("", Err("not JSON")),
        ("[1]", Err("not a JSON object")),
        (r#"{"final": 1, "note": "x"}"#, Err("single key `final`")),
        (
            r#"{"tool": 3, "arguments": {}}"#,
            Err("must be a tool name"),
        ),
        (r#"{"tool": "bmi"}"#, Err("has no `arguments`")),
        (
            r#"{"tool": "bmi", "arguments": {}, "why": "x"}"#,
            Err("unexpected key `why`"),
        ),
    ];
    for (text, expected) in cases {
        match (parse_answer(text), expected) {
            (Ok(answer), Ok(expected)) => assert_eq!(answer, expected, "{text}"),
            (Err(error), Err(expected)) => assert!(error.contains(expected), "{text}: {error}"),
            (got, expected) => panic!("{text}: got {got:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn a_run_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let spec = spec();
    let registry = ToolRegistry::medical();
    let model = ScriptedModel::replies([FINAL]);
    let future = run_agent(&spec, &registry, &model, input(), &[], in_a_minute());
    assert_send(&future);
}

/// A spec whose `bmi` tool the orchestrator runs first, with a context tool.
const SPEC_WITH_REQUIRED: &str = r#"
id = "demo_required"
version = 1
name_zh = "体重指数"
name_en = "Body mass index"
description = "Computes the BMI and names its category."
system_prompt = "Report the BMI the tool computed."
tools = ["bmi", "ward_census"]
max_steps = 3
timeout_seconds = 30
input_schema = '''
{"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"}}, "required": ["w"]}
'''
output_schema = '''
{"type": "object",
 "properties": {"bmi": {"type": "number"}, "category": {"type": "string", "enum": ["underweight", "normal", "overweight", "obese"]}},
 "required": ["bmi", "category"], "additionalProperties": false}
'''
[[required_tools]]
tool = "bmi"
arguments = '{"weight_kg": "$input/w", "height_cm": "$input/h"}'
[routes]
default = "medical"
"#;

/// A context tool that answers after an `.await` and counts its calls.
struct WardCensus(std::sync::atomic::AtomicUsize);

impl crate::context::ContextTool for WardCensus {
    fn name(&self) -> &str {
        "ward_census"
    }
    fn description(&self) -> &str {
        "Beds free on the ward."
    }
    fn parameters_schema(&self) -> Value {
        json!({"type": "object", "properties": {}, "additionalProperties": false})
    }
    fn call<'a>(&'a self, _arguments: &'a Value) -> crate::context::ToolFuture<'a> {
        Box::pin(async move {
            let calls = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Ok(json!({"free_beds": 3, "calls": calls}))
        })
    }
}

fn run_required(model: &ScriptedModel, input: Value) -> AgentRun {
    let registry = ToolRegistry::medical();
    let spec = AgentSpec::from_toml_str_with(
        "demo_required.toml",
        SPEC_WITH_REQUIRED,
        crate::spec::KnownTools {
            registry: &registry,
            context: &["ward_census"],
        },
    )
    .expect("valid spec");
    let mut context = crate::context::ContextTools::new();
    context
        .add(std::sync::Arc::new(WardCensus(Default::default())))
        .unwrap();
    block_on(crate::step_loop::run_agent_with(
        &spec,
        crate::context::Toolbox::new(&registry, &context),
        model,
        input,
        &[],
        in_a_minute(),
        &mut |_| {},
    ))
    .expect("valid input")
}

#[test]
fn required_tools_run_before_the_model_and_context_tools_are_called() {
    let model = ScriptedModel::replies([
        r#"{"tool": "ward_census", "arguments": {}}"#,
        r#"{"final": {"bmi": 22.9, "category": "normal"}}"#,
    ]);
    let run = run_required(&model, json!({"w": 70, "h": 175}));
    assert_eq!(run.status, RunStatus::Completed, "{:#?}", run.steps);
    assert_eq!(shape(&run.steps), "tool model tool model final");
    assert!(run.steps[0].required && !run.steps[2].required);
    assert_eq!(run.steps[0].result.as_ref().unwrap()["bmi"], 22.9);
    assert_eq!(run.steps[2].result.as_ref().unwrap()["free_beds"], 3);
    // The first turn already holds the required tool's result.
    assert!(last_message(&model, 0).content.contains("\"bmi\":22.9"));
}

#[test]
fn a_required_tool_the_input_cannot_feed_is_recorded_not_run() {
    let model = ScriptedModel::replies([r#"{"final": {"bmi": 0, "category": "normal"}}"#]);
    let run = run_required(&model, json!({"w": 70}));
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(shape(&run.steps), "tool! model final");
    let error = run.steps[0].error.as_deref().unwrap();
    assert!(error.contains("/h"), "{error}");
    assert!(run.steps[0].arguments.is_none());
}

#[test]
fn the_last_step_admits_only_a_final_answer() {
    let model = ScriptedModel::replies(["not json", CALL_BMI, CALL_BMI, CALL_BMI]);
    let run = run(&model, &[], in_a_minute());
    assert_eq!(run.status, RunStatus::StepLimit);
    let turns = model.turns();
    assert_eq!(turns.len(), 4);
    let last = &turns[3];
    assert_eq!(
        last.response_schema,
        crate::step_loop::final_only_schema(&spec())
    );
    assert!(last.messages.last().unwrap().content.contains("last step"));
    assert_ne!(turns[0].response_schema, last.response_schema);
}
