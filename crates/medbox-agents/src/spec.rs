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
//! tools = ["lab_interpret", "lab_unit_convert"]   # registry or context tool names; may be empty
//! optional_tools = ["knowledge_search"] # optional: used when the server registered them, else left out
//! max_steps = 6                          # model calls per run, 1 to 64
//! timeout_seconds = 60                   # 1 to 3600
//! max_tokens = 1024                      # optional: tokens per model step, default 1024
//! input_schema = '''{ "type": "object", … }'''   # JSON Schema, as a JSON string
//! output_schema = '''{ "type": "object", … }'''  # JSON Schema, as a JSON string
//!
//! [[required_tools]]                     # optional: run before the first model step
//! tool = "lab_interpret"                 # one of `tools`, or of `optional_tools` (then
//!                                        # it runs only where the box has it)
//! # JSON object; a string "$input/ptr" is replaced by the input's value at
//! # JSON pointer /ptr ("$input" alone: the whole input); the arguments may
//! # also be such a string alone, e.g. '"$input/braden"'.
//! arguments = '''{"sex": "$input/patient/sex", "results": "$input/results"}'''
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
    #[error("tool `{0}` is not among the agent's `tools` or `optional_tools`")]
    RequiredToolNotListed(String),
    #[error(
        "must be a JSON object, or a string \"$input/pointer\" naming an object of the input: {0}"
    )]
    ArgumentsNotObject(String),
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
    #[serde(default)]
    optional_tools: Vec<String>,
    #[serde(default)]
    required_tools: Vec<RequiredToolFile>,
    routes: Routes,
    max_steps: u32,
    timeout_seconds: u64,
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequiredToolFile {
    tool: String,
    arguments: String,
}

/// A tool the orchestrator calls before the first model step, with
/// arguments taken from the run's input: deterministic evidence the agent
/// always needs (lab flags, record rules), so the model reasons over real
/// tool results even when it would not have asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct RequiredTool {
    pub tool: String,
    /// A JSON template: strings `"$input/pointer"` are replaced from the input.
    pub arguments: Value,
}

/// The prefix of a template string taken from the input.
const INPUT_REFERENCE: &str = "$input";

impl RequiredTool {
    /// The arguments for this input; `Err` names the JSON pointer the input lacks.
    pub fn arguments_for(&self, input: &Value) -> Result<Value, String> {
        fill_template(&self.arguments, input)
    }
}

fn fill_template(template: &Value, input: &Value) -> Result<Value, String> {
    match template {
        Value::String(text) => match text.strip_prefix(INPUT_REFERENCE) {
            Some(pointer) if pointer.is_empty() || pointer.starts_with('/') => input
                .pointer(pointer)
                .cloned()
                .ok_or_else(|| pointer.to_owned()),
            _ => Ok(template.clone()),
        },
        Value::Array(items) => items
            .iter()
            .map(|item| fill_template(item, input))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| Ok((key.clone(), fill_template(value, input)?)))
            .collect::<Result<serde_json::Map<_, _>, String>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

/// The tool names a spec may list: the static registry's and the context
/// tools the server registers for every run.
#[derive(Clone, Copy)]
pub struct KnownTools<'a> {
    pub registry: &'a ToolRegistry,
    pub context: &'a [&'a str],
}

impl KnownTools<'_> {
    fn contains(&self, name: &str) -> bool {
        self.registry.get(name).is_some() || self.context.contains(&name)
    }

    fn names(&self) -> String {
        let mut names: Vec<&str> = self.registry.names();
        names.extend(self.context.iter().copied());
        names.sort_unstable();
        names.join(", ")
    }
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
    required_tools: Vec<RequiredTool>,
    routes: Routes,
    max_steps: u32,
    timeout_seconds: u64,
    max_tokens: u32,
    source: String,
}

impl AgentSpec {
    /// Parses and validates one spec; `name` is what errors call the file.
    pub fn from_toml_str(
        name: &str,
        text: &str,
        registry: &ToolRegistry,
    ) -> Result<AgentSpec, SpecError> {
        let known = KnownTools {
            registry,
            context: &[],
        };
        AgentSpec::from_toml_str_with(name, text, known)
    }

    /// Parses and validates one spec whose tools may also be context tools.
    pub fn from_toml_str_with(
        name: &str,
        text: &str,
        known: KnownTools<'_>,
    ) -> Result<AgentSpec, SpecError> {
        let file = parse_toml(name, text)?;
        validate(name, text, file, known)
    }

    /// The TOML text the spec was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Tools the orchestrator runs before the first model step.
    pub fn required_tools(&self) -> &[RequiredTool] {
        &self.required_tools
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
    load_specs_dir_with(
        dir,
        KnownTools {
            registry,
            context: &[],
        },
    )
}

/// [`load_specs_dir`] where specs may also list these context tools.
pub fn load_specs_dir_with(dir: &Path, known: KnownTools<'_>) -> Result<Vec<AgentSpec>, SpecError> {
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
        let spec = AgentSpec::from_toml_str_with(&name, &text, known)?;
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

fn validate(
    name: &str,
    source: &str,
    file: SpecFile,
    known: KnownTools<'_>,
) -> Result<AgentSpec, SpecError> {
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
        if !known.contains(tool) {
            return error(
                &field,
                SpecProblem::UnknownTool {
                    tool: tool.clone(),
                    available: known.names(),
                },
            );
        }
        if !seen.insert(tool.as_str()) {
            return error(&field, SpecProblem::DuplicateTool(tool.clone()));
        }
    }
    let mut tools = file.tools.clone();
    for (index, tool) in file.optional_tools.iter().enumerate() {
        let field = format!("optional_tools[{index}]");
        if !is_id(tool) {
            return error(&field, SpecProblem::BadId(tool.clone()));
        }
        if !seen.insert(tool.as_str()) {
            return error(&field, SpecProblem::DuplicateTool(tool.clone()));
        }
        // An optional tool the box does not have is left out.
        if known.contains(tool) {
            tools.push(tool.clone());
        }
    }
    let mut required_tools = Vec::with_capacity(file.required_tools.len());
    for (index, required) in file.required_tools.iter().enumerate() {
        let optional = file.optional_tools.contains(&required.tool);
        if !file.tools.contains(&required.tool) && !optional {
            return error(
                &format!("required_tools[{index}].tool"),
                SpecProblem::RequiredToolNotListed(required.tool.clone()),
            );
        }
        let field = format!("required_tools[{index}].arguments");
        let arguments: Value = serde_json::from_str(&required.arguments)
            .map_err(|e| SpecError::new(name, &field, SpecProblem::SchemaNotJson(e.to_string())))?;
        let whole_input_value = arguments
            .as_str()
            .is_some_and(|text| text.starts_with(INPUT_REFERENCE));
        if !arguments.is_object() && !whole_input_value {
            return error(
                &field,
                SpecProblem::ArgumentsNotObject(one_line(&required.arguments)),
            );
        }
        // A required optional tool runs only on a box that has it.
        if optional && !tools.contains(&required.tool) {
            continue;
        }
        required_tools.push(RequiredTool {
            tool: required.tool.clone(),
            arguments,
        });
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
        tools,
        required_tools,
        routes: file.routes,
        max_steps: file.max_steps,
        timeout_seconds: file.timeout_seconds,
        max_tokens,
        source: source.to_owned(),
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
