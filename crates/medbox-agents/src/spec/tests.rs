//! Spec parsing and validation: the bundled specs load, and each rule refuses
//! a bad spec naming the field.

use std::path::{Path, PathBuf};

use crate::ToolRegistry;
use crate::spec::{
    AgentSpec, KnownTools, RouteKind, SpecError, SpecProblem, load_specs_dir, load_specs_dir_with,
};

/// The fields of a small valid spec, as `key = value` TOML lines.
const BASE: &[(&str, &str)] = &[
    ("id", r#""demo_bmi""#),
    ("version", "1"),
    ("name_zh", r#""体重指数""#),
    ("name_en", r#""Body mass index""#),
    ("description", r#""Computes BMI.""#),
    ("system_prompt", r#""Compute the BMI with the tool.""#),
    ("tools", r#"["bmi"]"#),
    ("max_steps", "4"),
    ("timeout_seconds", "30"),
    (
        "input_schema",
        r#"'{"type": "object", "properties": {"weight_kg": {"type": "number"}}}'"#,
    ),
    (
        "output_schema",
        r#"'{"type": "object", "properties": {"bmi": {"type": "number"}}, "required": ["bmi"]}'"#,
    ),
];

const BASE_ROUTES: &str = "default = \"medical\"\nextract = \"fast\"\n";

/// The base spec with `edits` applied: a value replaces the field's, `None`
/// removes it, a new key is added. The `routes` key gives the table's body.
fn render(edits: &[(&str, Option<&str>)]) -> String {
    let mut fields: Vec<(String, String)> = BASE
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    fields.push(("routes".to_owned(), BASE_ROUTES.to_owned()));
    for (key, value) in edits {
        let position = fields.iter().position(|(name, _)| name == key);
        match (position, value) {
            (Some(index), Some(value)) => fields[index].1 = (*value).to_owned(),
            (Some(index), None) => {
                fields.remove(index);
            }
            (None, Some(value)) => fields.insert(0, ((*key).to_owned(), (*value).to_owned())),
            (None, None) => {}
        }
    }
    let mut text = String::new();
    let mut routes = None;
    for (key, value) in fields {
        if key == "routes" {
            routes = Some(value);
        } else {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    if let Some(routes) = routes {
        text.push_str(&format!("[routes]\n{routes}"));
    }
    text
}

fn parse(edits: &[(&str, Option<&str>)]) -> Result<AgentSpec, SpecError> {
    AgentSpec::from_toml_str("demo.toml", &render(edits), &ToolRegistry::medical())
}

#[test]
fn base_spec_is_valid() {
    let spec = parse(&[]).expect("the base spec is valid");
    assert_eq!(spec.id(), "demo_bmi");
    assert_eq!(spec.tools(), ["bmi"]);
    assert_eq!(spec.max_tokens(), crate::spec::DEFAULT_MAX_TOKENS);
    assert_eq!(spec.routes().route_for(RouteKind::Extract), "fast");
    assert_eq!(spec.routes().route_for(RouteKind::Reason), "medical");
    assert_eq!(spec.routes().route_for(RouteKind::Repair), "medical");
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    #[track_caller]
    fn check(edit: (&str, Option<&str>), field: &str, reason: &str) {
        let error = parse(&[edit]).expect_err("refused");
        assert_eq!(error.file, "demo.toml");
        assert_eq!(error.field, field, "{error}");
        let message = error.to_string();
        assert!(message.contains(reason), "`{message}` lacks `{reason}`");
    }
    check(("id", Some(r#""Demo BMI""#)), "id", "is not an id");
    check(("version", Some("0")), "version", "0 is out of range");
    check(("max_steps", Some("0")), "max_steps", "expected 1 to 64");
    check(("max_steps", Some("65")), "max_steps", "65 is out of range");
    check(("max_steps", Some(r#""six""#)), "max_steps", "invalid type");
    check(
        ("timeout_seconds", Some("0")),
        "timeout_seconds",
        "out of range",
    );
    check(("max_tokens", Some("0")), "max_tokens", "out of range");
    check(("name_en", Some(r#""  ""#)), "name_en", "must not be empty");
    check(("name_zh", None), "name_zh", "missing field");
    check(("colour", Some(r#""blue""#)), "colour", "unknown field");
    check(
        ("tools", Some(r#"["bmi", "no_such_tool"]"#)),
        "tools[1]",
        "tool `no_such_tool` is not in the registry; available tools: anion_gap",
    );
    check(
        ("tools", Some(r#"["bmi", "bmi"]"#)),
        "tools[1]",
        "listed twice",
    );
    check(
        ("input_schema", Some("'not json'")),
        "input_schema",
        "is not JSON",
    );
    check(
        (
            "input_schema",
            Some(r#"'{"type": "object", "properties": {"a": {"type": "strnig"}}}'"#),
        ),
        "input_schema",
        "does not compile",
    );
    check(
        ("output_schema", Some(r#"'{"type": "array"}'"#)),
        "output_schema",
        "must be an object schema",
    );
    check(
        (
            "output_schema",
            Some(
                r##"'{"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "string"}}}'"##,
            ),
        ),
        "output_schema",
        "`$ref` at `/properties/a/$ref`",
    );
    check(
        ("routes", Some("default = \"\"\n")),
        "routes.default",
        "must not be empty",
    );
    check(
        ("routes", Some("default = \"medical\"\nreason = \" \"\n")),
        "routes.reason",
        "must not be empty",
    );
    check(
        (
            "routes",
            Some("default = \"medical\"\nsummarise = \"fast\"\n"),
        ),
        "routes.summarise",
        "unknown field",
    );
    check(
        ("routes", Some("extract = \"fast\"\n")),
        "routes.default",
        "missing field",
    );
    check(("routes", None), "routes", "missing field");
}

#[test]
fn toml_syntax_error_names_the_file() {
    let error = AgentSpec::from_toml_str("broken.toml", "id = \n", &ToolRegistry::medical())
        .expect_err("refused");
    assert_eq!(error.file, "broken.toml");
    assert_eq!(error.field, "(file)");
    assert!(matches!(error.problem, SpecProblem::Toml(_)), "{error}");
}

fn bundled_specs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("specs")
}

/// The context tools the server registers for every run.
fn server_context_tools() -> Vec<&'static str> {
    let mut names = crate::patient::TOOL_NAMES.to_vec();
    names.push(crate::context::SCHEDULE_FOLLOW_UP);
    names.push(crate::knowledge::KNOWLEDGE_SEARCH_TOOL);
    names
}

fn load_bundled() -> Vec<AgentSpec> {
    let registry = ToolRegistry::medical();
    let context = server_context_tools();
    load_specs_dir_with(
        &bundled_specs_dir(),
        KnownTools {
            registry: &registry,
            context: &context,
        },
    )
    .expect("bundled specs load")
}

#[test]
fn the_twenty_bundled_specs_validate_and_their_examples_fit() {
    let registry = ToolRegistry::medical();
    let specs = load_bundled();
    assert_eq!(specs.len(), 20);
    for spec in &specs {
        let id = spec.id();
        assert!(!spec.name_zh().is_ascii(), "{id}: name_zh");
        let context = crate::context::ContextTools::new();
        let toolbox = crate::context::Toolbox::new(&registry, &context);
        let step_schema = crate::step_loop::build_step_schema_with(spec, toolbox);
        jsonschema::validator_for(&step_schema)
            .unwrap_or_else(|error| panic!("{id}: step schema: {error}"));
        let example_path = bundled_specs_dir().join(format!("examples/{id}.json"));
        let example: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&example_path).expect("every spec has an example input"),
        )
        .expect("example is JSON");
        let violations = spec.input_schema().violations(&example);
        assert!(violations.is_empty(), "{id}: example input: {violations:?}");
        // Every required tool gets its arguments from the example, and a
        // static tool accepts them.
        for required in spec.required_tools() {
            let arguments = required
                .arguments_for(&example)
                .unwrap_or_else(|pointer| panic!("{id}: example lacks {pointer}"));
            if let Some(tool) = registry.get(&required.tool) {
                tool.call(&arguments)
                    .unwrap_or_else(|error| panic!("{id}: {}: {error}", required.tool));
            }
        }
        // Agents with tools run at least one of them before the model.
        if !spec.tools().is_empty() {
            assert!(!spec.required_tools().is_empty(), "{id}: no required tool");
        }
    }
}

#[test]
fn an_optional_tool_is_used_only_when_the_box_has_it() {
    let text = std::fs::read_to_string(bundled_specs_dir().join("guideline_qa.toml")).unwrap();
    let registry = ToolRegistry::medical();
    let without = AgentSpec::from_toml_str("guideline_qa.toml", &text, &registry).unwrap();
    assert!(without.tools().is_empty());
    assert!(without.required_tools().is_empty());
    let with = AgentSpec::from_toml_str_with(
        "guideline_qa.toml",
        &text,
        KnownTools {
            registry: &registry,
            context: &["knowledge_search"],
        },
    )
    .unwrap();
    assert_eq!(with.tools(), ["knowledge_search"]);
    // Searched before the first model step, with the question.
    assert_eq!(with.required_tools().len(), 1);
    let arguments = with.required_tools()[0]
        .arguments_for(&serde_json::json!({"question": "q"}))
        .unwrap();
    assert_eq!(arguments, serde_json::json!({"query": "q"}));
}

#[test]
fn templates_take_values_from_the_input() {
    let required = crate::spec::RequiredTool {
        tool: "bmi".into(),
        arguments: serde_json::json!({"weight_kg": "$input/m/w", "fixed": "x", "list": ["$input/m"]}),
    };
    let input = serde_json::json!({"m": {"w": 70}});
    assert_eq!(
        required.arguments_for(&input),
        Ok(serde_json::json!({"weight_kg": 70, "fixed": "x", "list": [{"w": 70}]}))
    );
    let missing = required
        .arguments_for(&serde_json::json!({}))
        .expect_err("the input lacks /m");
    assert!(missing.starts_with("/m"), "{missing}");
}

/// A fresh directory under the system temp dir, removed by the caller.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("medbox-agents-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn duplicate_ids_are_refused_naming_both_files() {
    let dir = scratch_dir("duplicate-ids");
    let text = render(&[]);
    std::fs::write(dir.join("a.toml"), &text).expect("write");
    std::fs::write(dir.join("b.toml"), &text).expect("write");
    std::fs::write(dir.join("notes.txt"), "not a spec").expect("write");
    let result = load_specs_dir(&dir, &ToolRegistry::medical());
    let _ = std::fs::remove_dir_all(&dir);
    let error = result.expect_err("duplicate id refused");
    assert!(error.file.ends_with("b.toml"), "{error}");
    assert_eq!(error.field, "id");
    match error.problem {
        SpecProblem::DuplicateId { id, first_file } => {
            assert_eq!(id, "demo_bmi");
            assert!(first_file.ends_with("a.toml"), "{first_file}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_directory_is_refused() {
    let error = load_specs_dir(
        Path::new("/nonexistent/medbox/specs"),
        &ToolRegistry::medical(),
    )
    .expect_err("refused");
    assert!(
        matches!(error.problem, SpecProblem::Unreadable(_)),
        "{error}"
    );
}

#[test]
fn a_bundled_spec_runs_its_tools_to_a_valid_answer() {
    use crate::step_loop::{RunStatus, run_agent};
    use crate::test_support::{ScriptedModel, block_on};
    use serde_json::json;

    let registry = ToolRegistry::medical();
    let text = std::fs::read_to_string(bundled_specs_dir().join("lab_report_interpretation.toml"))
        .expect("bundled spec");
    let spec = AgentSpec::from_toml_str("lab_report_interpretation.toml", &text, &registry)
        .expect("valid");
    let input = json!({
        "patient": {"sex": "male", "age_years": 64},
        "results": [{"test": "K", "value": 6.8, "unit": "mmol/L"}],
        "audience": "clinician",
        "language": "en"
    });
    let answer = json!({"final": {
        "summary": "Critical hyperkalaemia: tell the treating clinician at once.",
        "results": [{"test": "K", "interpretation": "HH",
                     "explanation": "Potassium above the critical limit."}],
        "critical_values": ["K 6.8 mmol/L (HH)"],
        "recommendations": ["Repeat potassium and obtain an ECG."]
    }});
    // The orchestrator runs lab_interpret first; the model only answers.
    let model = ScriptedModel::replies([answer.to_string()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let run = block_on(run_agent(&spec, &registry, &model, input, &[], deadline)).expect("valid");
    assert_eq!(run.status, RunStatus::Completed, "{:#?}", run.steps);
    assert!(run.steps[0].required);
    let tool_result = run.steps[0].result.as_ref().expect("tool result");
    assert_eq!(
        tool_result["results"][0]["interpretation"]["code"], "HH",
        "{tool_result}"
    );
    // The model saw the tool's result before answering.
    let turns = model.turns();
    assert!(
        turns[0]
            .messages
            .iter()
            .any(|message| message.content.contains("\"HH\"")),
        "the tool result is in the conversation"
    );
}
