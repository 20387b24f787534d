//! Agent spec files: what an agent is, declared in TOML and validated once.
//!
//! A spec file is one TOML document:
//!
//! ```toml
//! id = "lab_report_interpretation"       # [a-z][a-z0-9_]*, at most 64 characters
//! version = 1                            # ≥ 1; the store versions updates
//! name_zh = "检验报告解读"
//! name_en = "Lab report interpretation"
//! description = "…"
//! system_prompt = """…"""
//! tools = ["lab_interpret", "lab_unit_convert"]   # names in the ToolRegistry; may be empty
//! max_steps = 6                          # model calls per run, 1 to 64
//! timeout_seconds = 60                   # 1 to 3600
//! max_tokens = 1024                      # optional: tokens per model step, default 1024
//! input_schema = '''{ "type": "object", … }'''   # JSON Schema, as a JSON string
//! output_schema = '''{ "type": "object", … }'''  # JSON Schema, as a JSON string
//!
//! [routes]                               # model (name or alias) per step kind
//! default = "medical"                    # required: any step not routed below
//! extract = "fast"                       # optional: the first model step
//! reason = "medical"                     # optional: steps that follow a tool result
//! repair = "medical"                     # optional: steps that follow a refused answer
//! ```
//!
//! **Schemas are JSON strings** (TOML literal strings, `'''…'''`), not TOML
//! tables: they read as any JSON Schema tool writes them, keep `null` and key
//! order, and are exactly what `ListAgents` returns as `input_schema_json` and
//! `output_schema_json`. Both must be object schemas (`"type": "object"`) that
//! compile. The output schema may not use `$ref`, because the step schema
//! embeds it under `final` (see [`crate::step_loop::build_step_schema`]).
//!
//! **Architecture Invariant:** an [`AgentSpec`] exists only validated: its
//! tools are in the registry it was checked against, its schemas compile, and
//! its limits are in range. Every refusal is a [`SpecError`] naming the file,
//! the field and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::ToolRegistry;

/// The most model calls a spec may allow in one run.
pub const MAX_STEPS_LIMIT: u32 = 64;
/// The longest timeout a spec may ask for.
pub const TIMEOUT_SECONDS_LIMIT: u64 = 3600;
/// Tokens per model step when the spec does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;
const MAX_TOKENS_LIMIT: u32 = 32768;
const ID_MAX_CHARS: usize = 64;

/// A spec file refused: which file, which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("agent spec `{file}`: field `{field}`: {problem}")]
pub struct SpecError {
    /// The file name (or the name given to [`AgentSpec::from_toml_str`]).
    pub file: String,
    /// The field at fault: a TOML key path such as `routes.default`, or
    /// `tools[1]`; `id` for a duplicate id; the whole file is `(file)`.
    pub field: String,
    pub problem: SpecProblem,
}

/// Why a spec is refused; one variant per rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecProblem {
    #[error("cannot read the file: {0}")]
    Unreadable(String),
    /// The TOML does not parse, a field is missing or unknown, or has the wrong type.
    #[error("{0}")]
    Toml(String),
    #[error("must not be empty")]
    Empty,
    #[error(
        "`{0}` is not an id: use a lowercase letter then lowercase letters, digits or `_`, at most 64 characters"
    )]
    BadId(String),
    #[error("{value} is out of range: expected {expected}")]
    OutOfRange { value: u64, expected: String },
    #[error("tool `{tool}` is not in the registry; available tools: {available}")]
    UnknownTool { tool: String, available: String },
    #[error("tool `{0}` is listed twice")]
    DuplicateTool(String),
    #[error("is not JSON: {0}")]
    SchemaNotJson(String),
    #[error("must be an object schema (`\"type\": \"object\"`)")]
    SchemaNotObject,
    #[error("does not compile as a JSON Schema: {0}")]
    SchemaInvalid(String),
    #[error(
        "uses `$ref` at `{0}`; inline the definition, since the step schema embeds the output schema"
    )]
    SchemaRef(String),
    #[error("id `{id}` is already defined in `{first_file}`")]
    DuplicateId { id: String, first_file: String },
}

impl SpecError {
    fn new(file: &str, field: impl Into<String>, problem: SpecProblem) -> SpecError {
        SpecError {
            file: file.to_owned(),
            field: field.into(),
            problem,
        }
    }
}

/// The model route for each kind of step. Values are model names or aliases,
/// resolved by the server (which falls back to `[agents] default_model` when a
/// route is not loaded).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// Any step the routes below do not name.
    pub default: String,
    /// The first model step: reading the input, extracting tool arguments.
    pub extract: Option<String>,
    /// A step that follows a tool result: reasoning over the evidence.
    pub reason: Option<String>,
    /// A step that follows a refused answer (unparseable, unknown tool, invalid final).
    pub repair: Option<String>,
}

/// What the previous step left for the model, which decides the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Extract,
    Reason,
    Repair,
}

impl Routes {
    /// The model route for a step of this kind.
    pub fn route_for(&self, kind: RouteKind) -> &str {
        let routed = match kind {
            RouteKind::Extract => &self.extract,
            RouteKind::Reason => &self.reason,
            RouteKind::Repair => &self.repair,
        };
        routed.as_deref().unwrap_or(&self.default)
    }
}

/// The file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    id: String,
    version: u32,
    name_zh: String,
    name_en: String,
    description: String,
    input_schema: String,
    output_schema: String,
    system_prompt: String,
    tools: Vec<String>,
    routes: Routes,
    max_steps: u32,
    timeout_seconds: u64,
    max_tokens: Option<u32>,
}

/// A JSON Schema with its compiled validator.
#[derive(Debug, Clone)]
pub struct CompiledSchema {
    schema: Value,
    validator: Arc<jsonschema::Validator>,
}

impl CompiledSchema {
    /// Compiles `schema`; the error is the compiler's message.
    pub fn compile(schema: Value) -> Result<CompiledSchema, String> {
        let validator = jsonschema::validator_for(&schema).map_err(|error| error.to_string())?;
        Ok(CompiledSchema {
            schema,
            validator: Arc::new(validator),
        })
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Every violation as `(JSON pointer of the instance, message)`; the root is `""`.
    pub fn violations(&self, instance: &Value) -> Vec<(String, String)> {
        self.validator
            .iter_errors(instance)
            .map(|error| (error.instance_path().to_string(), error.to_string()))
            .collect()
    }
}

/// A validated agent spec.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    id: String,
    version: u32,
    name_zh: String,
    name_en: String,
    description: String,
    input_schema: CompiledSchema,
    output_schema: CompiledSchema,
    system_prompt: String,
    tools: Vec<String>,
    routes: Routes,
    max_steps: u32,
    timeout_seconds: u64,
    max_tokens: u32,
}

impl AgentSpec {
    /// Parses and validates one spec; `name` is what errors call the file.
    pub fn from_toml_str(
        name: &str,
        text: &str,
        registry: &ToolRegistry,
    ) -> Result<AgentSpec, SpecError> {
        let file = parse_toml(name, text)?;
        validate(name, file, registry)
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn name_zh(&self) -> &str {
        &self.name_zh
    }
    pub fn name_en(&self) -> &str {
        &self.name_en
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn input_schema(&self) -> &CompiledSchema {
        &self.input_schema
    }
    pub fn output_schema(&self) -> &CompiledSchema {
        &self.output_schema
    }
    pub fn system_prompt(&self) -> &str {
        &self.system_prompt
    }
    /// The tools the agent may call, in the order the spec lists them.
    pub fn tools(&self) -> &[String] {
        &self.tools
    }
    pub fn routes(&self) -> &Routes {
        &self.routes
    }
    /// The most model calls in one run.
    pub fn max_steps(&self) -> u32 {
        self.max_steps
    }
    pub fn timeout_seconds(&self) -> u64 {
        self.timeout_seconds
    }
    /// Tokens per model step.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }
}

/// Loads every `*.toml` file in `dir` (not recursing), sorted by file name;
/// refuses the first bad spec and a second spec with an id already loaded.
pub fn load_specs_dir(dir: &Path, registry: &ToolRegistry) -> Result<Vec<AgentSpec>, SpecError> {
    let dir_name = dir.display().to_string();
    let unreadable = |error: std::io::Error| {
        SpecError::new(
            &dir_name,
            "(file)",
            SpecProblem::Unreadable(error.to_string()),
        )
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "toml")
            && path.is_file()
        {
            paths.push(path);
        }
    }
    paths.sort();
    let mut specs = Vec::with_capacity(paths.len());
    let mut files_by_id: BTreeMap<String, String> = BTreeMap::new();
    for path in paths {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|error| {
            SpecError::new(&name, "(file)", SpecProblem::Unreadable(error.to_string()))
        })?;
        let spec = AgentSpec::from_toml_str(&name, &text, registry)?;
        if let Some(first_file) = files_by_id.get(spec.id()) {
            return Err(SpecError::new(
                &name,
                "id",
                SpecProblem::DuplicateId {
                    id: spec.id().to_owned(),
                    first_file: first_file.clone(),
                },
            ));
        }
        files_by_id.insert(spec.id().to_owned(), name);
        specs.push(spec);
    }
    Ok(specs)
}

fn parse_toml(name: &str, text: &str) -> Result<SpecFile, SpecError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| {
        SpecError::new(
            name,
            "(file)",
            SpecProblem::Toml(one_line(&error.to_string())),
        )
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let reason = one_line(error.inner().message());
        // A missing field is reported at its parent; the message names it in
        // backticks. (An unknown field's path already ends with its name.)
        let missing = reason
            .starts_with("missing field")
            .then(|| reason.split('`').nth(1))
            .flatten();
        let field = match (path.as_str(), missing) {
            (".", Some(name)) => name.to_owned(),
            (".", None) => "(file)".to_owned(),
            (parent, Some(name)) => format!("{parent}.{name}"),
            (parent, None) => parent.to_owned(),
        };
        SpecError::new(name, field, SpecProblem::Toml(reason))
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn validate(name: &str, file: SpecFile, registry: &ToolRegistry) -> Result<AgentSpec, SpecError> {
    let error = |field: &str, problem| Err(SpecError::new(name, field, problem));
    if !is_id(&file.id) {
        return error("id", SpecProblem::BadId(file.id));
    }
    for (field, value) in [
        ("name_zh", &file.name_zh),
        ("name_en", &file.name_en),
        ("description", &file.description),
        ("system_prompt", &file.system_prompt),
        ("routes.default", &file.routes.default),
    ] {
        if value.trim().is_empty() {
            return error(field, SpecProblem::Empty);
        }
    }
    for (field, route) in [
        ("routes.extract", &file.routes.extract),
        ("routes.reason", &file.routes.reason),
        ("routes.repair", &file.routes.repair),
    ] {
        if route.as_ref().is_some_and(|route| route.trim().is_empty()) {
            return error(field, SpecProblem::Empty);
        }
    }
    let max_tokens = file.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    for (field, value, max) in [
        ("version", u64::from(file.version), u64::from(u32::MAX)),
        (
            "max_steps",
            u64::from(file.max_steps),
            u64::from(MAX_STEPS_LIMIT),
        ),
        (
            "timeout_seconds",
            file.timeout_seconds,
            TIMEOUT_SECONDS_LIMIT,
        ),
        (
            "max_tokens",
            u64::from(max_tokens),
            u64::from(MAX_TOKENS_LIMIT),
        ),
    ] {
        if !(1..=max).contains(&value) {
            return error(
                field,
                SpecProblem::OutOfRange {
                    value,
                    expected: format!("1 to {max}"),
                },
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (index, tool) in file.tools.iter().enumerate() {
        let field = format!("tools[{index}]");
        if registry.get(tool).is_none() {
            return error(
                &field,
                SpecProblem::UnknownTool {
                    tool: tool.clone(),
                    available: registry.names().join(", "),
                },
            );
        }
        if !seen.insert(tool.as_str()) {
            return error(&field, SpecProblem::DuplicateTool(tool.clone()));
        }
    }
    let input_schema = compile_schema(name, "input_schema", &file.input_schema)?;
    let output_schema = compile_schema(name, "output_schema", &file.output_schema)?;
    if let Some(pointer) = find_ref(output_schema.schema(), "") {
        return error("output_schema", SpecProblem::SchemaRef(pointer));
    }
    Ok(AgentSpec {
        id: file.id,
        version: file.version,
        name_zh: file.name_zh,
        name_en: file.name_en,
        description: file.description,
        input_schema,
        output_schema,
        system_prompt: file.system_prompt,
        tools: file.tools,
        routes: file.routes,
        max_steps: file.max_steps,
        timeout_seconds: file.timeout_seconds,
        max_tokens,
    })
}

fn is_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && id.len() <= ID_MAX_CHARS
}

fn compile_schema(name: &str, field: &str, text: &str) -> Result<CompiledSchema, SpecError> {
    let schema: Value = serde_json::from_str(text).map_err(|error| {
        SpecError::new(name, field, SpecProblem::SchemaNotJson(error.to_string()))
    })?;
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(SpecError::new(name, field, SpecProblem::SchemaNotObject));
    }
    CompiledSchema::compile(schema)
        .map_err(|reason| SpecError::new(name, field, SpecProblem::SchemaInvalid(reason)))
}

/// The JSON pointer of the first `$ref` key in `schema`, if any.
fn find_ref(schema: &Value, pointer: &str) -> Option<String> {
    match schema {
        Value::Object(map) => {
            if map.contains_key("$ref") {
                return Some(format!("{pointer}/$ref"));
            }
            map.iter()
                .find_map(|(key, value)| find_ref(value, &format!("{pointer}/{key}")))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, value)| find_ref(value, &format!("{pointer}/{index}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
