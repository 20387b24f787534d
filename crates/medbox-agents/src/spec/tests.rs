//! Spec parsing and validation: the bundled specs load, and each rule refuses
//! a bad spec naming the field.

use std::path::{Path, PathBuf};

use crate::ToolRegistry;
use crate::spec::{AgentSpec, RouteKind, SpecError, SpecProblem, load_specs_dir};

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

#[test]
fn bundled_specs_validate_against_the_medical_registry() {
    let registry = ToolRegistry::medical();
    let specs = load_specs_dir(&bundled_specs_dir(), &registry).expect("bundled specs load");
    let ids: Vec<&str> = specs.iter().map(AgentSpec::id).collect();
    assert_eq!(
        ids,
        [
            "deidentification",
            "lab_report_interpretation",
            "record_quality_control"
        ]
    );
    for spec in &specs {
        assert!(!spec.tools().is_empty(), "{}", spec.id());
        assert!(!spec.name_zh().is_ascii(), "{}: name_zh", spec.id());
        let step_schema = crate::step_loop::build_step_schema(spec, &registry);
        jsonschema::validator_for(&step_schema)
            .unwrap_or_else(|error| panic!("{}: step schema: {error}", spec.id()));
    }
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
    let call = json!({"tool": "lab_interpret", "arguments": {
        "sex": "male", "age_years": 64, "results": [{"test": "K", "value": 6.8, "unit": "mmol/L"}]
    }});
    let answer = json!({"final": {
        "summary": "Critical hyperkalaemia: tell the treating clinician at once.",
        "results": [{"test": "K", "value": 6.8, "unit": "mmol/L", "interpretation": "HH",
                     "explanation": "Potassium above the critical limit."}],
        "critical_values": ["K 6.8 mmol/L (HH)"],
        "recommendations": ["Repeat potassium and obtain an ECG."]
    }});
    let model = ScriptedModel::replies([call.to_string(), answer.to_string()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let run = block_on(run_agent(&spec, &registry, &model, input, &[], deadline)).expect("valid");
    assert_eq!(run.status, RunStatus::Completed, "{:#?}", run.steps);
    let tool_result = run.steps[1].result.as_ref().expect("tool result");
    assert_eq!(
        tool_result["results"][0]["interpretation"]["code"], "HH",
        "{tool_result}"
    );
    let routes: Vec<String> = model.turns().into_iter().map(|turn| turn.route).collect();
    assert_eq!(routes, ["fast", "medical"]);
}
