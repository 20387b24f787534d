//! The agent orchestrator: agent specs, the step loop, sessions, and the
//! tools that decide what rules and tables can decide.
//!
//! - [`spec`]: an agent is a TOML spec file (id, bilingual names, input and
//!   output JSON Schemas, system prompt, allowed tools, a model route per step
//!   kind, step limit, timeout), validated once into an [`spec::AgentSpec`];
//!   a bad file is a [`spec::SpecError`] naming the file, field and reason.
//!   Three example specs ship in `specs/`.
//! - [`model`]: the [`model::AgentModel`] trait, the only way the loop reaches
//!   a language model; the server implements it over the runtime.
//! - [`step_loop`]: [`step_loop::run_agent`] asks the model for a tool call or
//!   a final answer (constrained by [`step_loop::build_step_schema`]), runs
//!   tools, feeds results and refusals back, and ends at a valid final answer,
//!   the step limit, the deadline or a model error, with the whole trace.
//! - [`session`]: multi-turn history handed to the next run.
//! - [`context`]: per-run tools ([`context::ContextTool`], async, may do I/O)
//!   beside the static registry: the patient tools, the server's
//!   `schedule_follow_up`, a knowledge-base `knowledge_search`.
//! - [`patient`]: a FHIR R4 Bundle parsed into a [`patient::PatientRecord`]
//!   and the patient tools that read it (age, sex, allergies, drugs, eGFR).
//! - [`test_support`]: a scripted model double and a tiny executor.
//! - The [`Tool`] trait, the [`ToolRegistry`] that agents pick their tools
//!   from, and the deterministic medical tools: clinical [`calculators`],
//!   adult [`lab_ranges`] with FHIR interpretation flags and unit conversion,
//!   a bundled [`icd10`] subset, [`drug_interactions`] and dose ranges,
//!   Chinese medical-record [`record_rules`], and resident-ID / phone /
//!   bank-card [`identifiers`] with de-identification.
//! - [`knowledge`]: the knowledge base (documents chunked by section, BM25
//!   with Chinese bigrams fused with vector similarity) and the
//!   `knowledge_search` tool's schema and call, reached through the
//!   [`knowledge::Embedder`] trait the server implements.
//!
//! **Architecture Invariant:** tools are deterministic and pure: the same
//! arguments give the same result; no I/O, no clock, no randomness. Bundled
//! tables are compiled in with `include_str!` and parsed on first use.
//!
//! **Architecture Invariant:** no tch, no `medbox-runtime`, no store here. The
//! orchestrator reaches models through [`model::AgentModel`], which the server
//! implements, so everything in this crate is tested without libtorch.
//!
//! **Architecture Invariant:** a run that completes has an output valid
//! against its agent's output schema; everything the model gets wrong (bad
//! JSON, a tool it may not call, bad arguments, an invalid final answer) is fed
//! back to it as a message and costs a step, never a crash.
//!
//! **API Boundary:** a tool's arguments and result are JSON (`serde_json::Value`),
//! because that is what a model writes and reads. Inside, each tool parses its
//! arguments into a typed struct (`deny_unknown_fields`), calls a pure function,
//! and serializes a typed result that names its inputs, the rule or formula
//! with its version, the units, and an interpretation where one is standard.
//! Errors ([`ToolError`]) are written for the model to read and recover from.

use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod calculators;
pub mod context;
pub mod drug_interactions;
pub mod icd10;
pub mod identifiers;
pub mod knowledge;
pub mod lab_ranges;
pub mod model;
pub mod patient;
pub mod record_rules;
pub mod session;
pub mod spec;
pub mod step_loop;
pub mod test_support;

mod bundled_table;

/// A tool an agent may call: a name, a description and a JSON Schema for the
/// model, and a pure function from JSON arguments to a JSON result.
pub trait Tool: Send + Sync {
    /// The name the model calls the tool by (`snake_case`, unique in a registry).
    fn name(&self) -> &'static str;
    /// One or two sentences telling the model when to use the tool.
    fn description(&self) -> &'static str;
    /// The JSON Schema of the arguments (`"type": "object"`).
    fn parameters_schema(&self) -> Value;
    /// Runs the tool. Deterministic: the same arguments give the same result.
    fn call(&self, arguments: &Value) -> Result<Value, ToolError>;
}

/// Why a tool refused its arguments. Messages are written for the model: they
/// name the field at fault and say what would be accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    /// The arguments do not parse: a field is missing, unknown, or of the wrong type.
    #[error("bad argument `{field}`: {reason}")]
    BadArguments { field: String, reason: String },
    /// A number parses but lies outside what the rule or a living patient allows.
    #[error("argument `{field}` = {value} is out of range: {expected}")]
    OutOfRange {
        field: String,
        value: f64,
        expected: String,
    },
    /// A code, test, drug or tool is not in the bundled table.
    #[error("{what} `{key}` not found: {hint}")]
    NotFound {
        what: &'static str,
        key: String,
        hint: String,
    },
    /// A bundled table failed to parse (a bug in the shipped data, caught by tests).
    #[error("bundled table `{table}` is unusable: {reason}")]
    BundledTable { table: &'static str, reason: String },
    /// A tool that needs a service of the box (the knowledge base's embedding
    /// model) cannot reach it now; the model should answer without the tool.
    #[error("tool `{tool}` is unavailable right now: {reason}; answer without it")]
    Unavailable { tool: &'static str, reason: String },
    /// The tool could not encode its own result (a bug in the tool, not the arguments).
    #[error("tool `{tool}` failed to encode its result: {reason}")]
    ResultEncoding { tool: &'static str, reason: String },
}

impl ToolError {
    pub(crate) fn bad(field: impl Into<String>, reason: impl Into<String>) -> ToolError {
        ToolError::BadArguments {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks that `value` lies in `[min, max]`; the message names the field, the
/// accepted range and its unit.
pub(crate) fn check_range(
    field: &str,
    value: f64,
    min: f64,
    max: f64,
    unit: &str,
) -> Result<f64, ToolError> {
    if value.is_finite() && (min..=max).contains(&value) {
        return Ok(value);
    }
    Err(ToolError::OutOfRange {
        field: field.to_owned(),
        value,
        expected: format!("expected {min} to {max} {unit}")
            .trim_end()
            .to_owned(),
    })
}

/// A patient's sex as recorded (administrative sex, as FHIR `Patient.gender`
/// for the two values rules depend on). Accepts `female`/`male`, `F`/`M`, 女/男.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sex {
    #[serde(alias = "f", alias = "F", alias = "Female", alias = "女")]
    Female,
    #[serde(alias = "m", alias = "M", alias = "Male", alias = "男")]
    Male,
}

/// The JSON Schema fragment for a [`Sex`] argument.
pub(crate) fn sex_schema() -> Value {
    serde_json::json!({
        "type": "string",
        "enum": ["female", "male", "F", "M", "女", "男"],
        "description": "patient's sex"
    })
}

/// An object schema with no extra properties: every tool's argument schema.
pub(crate) fn object_schema(properties: Value, required: &[&str]) -> Value {
    serde_json::json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// Rounds to `decimals` places (half away from zero), for results a human reads.
pub(crate) fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Parses a tool's arguments into its typed struct; an error names the field
/// (the JSON path) and serde's reason.
pub fn parse_arguments<T: DeserializeOwned>(arguments: &Value) -> Result<T, ToolError> {
    if !arguments.is_object() {
        return Err(ToolError::bad(
            "arguments",
            "must be a JSON object with the fields named in the tool's schema",
        ));
    }
    serde_path_to_error::deserialize(arguments).map_err(|error| {
        let path = error.path().to_string();
        let reason = error.inner().to_string();
        let field = if path == "." {
            // Missing and unknown fields are reported at the parent; serde's
            // message names them in backticks.
            reason
                .split('`')
                .nth(1)
                .map_or_else(|| "arguments".to_owned(), str::to_owned)
        } else {
            path
        };
        ToolError::bad(field, reason)
    })
}

/// A tool made of a typed argument struct `A`, a pure function and a typed
/// result `R`: the shape of every tool in this crate.
pub struct PureTool<A, R> {
    name: &'static str,
    description: &'static str,
    schema: fn() -> Value,
    compute: fn(A) -> Result<R, ToolError>,
    types: PhantomData<fn(A) -> R>,
}

impl<A, R> PureTool<A, R> {
    pub const fn new(
        name: &'static str,
        description: &'static str,
        schema: fn() -> Value,
        compute: fn(A) -> Result<R, ToolError>,
    ) -> PureTool<A, R> {
        PureTool {
            name,
            description,
            schema,
            compute,
            types: PhantomData,
        }
    }
}

impl<A: DeserializeOwned + 'static, R: Serialize + 'static> Tool for PureTool<A, R> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn description(&self) -> &'static str {
        self.description
    }

    fn parameters_schema(&self) -> Value {
        (self.schema)()
    }

    fn call(&self, arguments: &Value) -> Result<Value, ToolError> {
        let typed_arguments: A = parse_arguments(arguments)?;
        let result = (self.compute)(typed_arguments)?;
        serde_json::to_value(result).map_err(|error| ToolError::ResultEncoding {
            tool: self.name,
            reason: error.to_string(),
        })
    }
}

/// Boxes a [`PureTool`] for a registry.
pub(crate) fn boxed<A: DeserializeOwned + 'static, R: Serialize + 'static>(
    tool: PureTool<A, R>,
) -> Box<dyn Tool> {
    Box::new(tool)
}

/// Two tools were registered under one name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a tool named `{0}` is already registered")]
pub struct DuplicateToolName(pub &'static str);

/// Tools by name. Agents name the tools they may use; the step loop finds them here.
#[derive(Default)]
pub struct ToolRegistry {
    tools: BTreeMap<&'static str, Box<dyn Tool>>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> ToolRegistry {
        ToolRegistry::default()
    }

    /// Every deterministic medical tool in this crate.
    pub fn medical() -> ToolRegistry {
        let mut registry = ToolRegistry::new();
        let all = calculators::tools()
            .into_iter()
            .chain(lab_ranges::tools())
            .chain(icd10::tools())
            .chain(drug_interactions::tools())
            .chain(record_rules::tools())
            .chain(identifiers::tools());
        for tool in all {
            // The names are fixed in this crate and a test keeps them unique.
            if let Err(DuplicateToolName(name)) = registry.register(tool) {
                debug_assert!(false, "duplicate tool name {name}");
            }
        }
        registry
    }

    /// Adds a tool; refuses a second tool with the same name.
    pub fn register(&mut self, tool: Box<dyn Tool>) -> Result<(), DuplicateToolName> {
        let name = tool.name();
        if self.tools.contains_key(name) {
            return Err(DuplicateToolName(name));
        }
        self.tools.insert(name, tool);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&dyn Tool> {
        self.tools.get(name).map(|tool| tool.as_ref())
    }

    /// Tool names in sorted order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tools.keys().copied().collect()
    }

    /// One `{"name", "description", "parameters"}` object per tool, sorted by
    /// name: what the step loop shows the model and builds its constraint from.
    pub fn schemas(&self) -> Vec<Value> {
        self.tools
            .values()
            .map(|tool| {
                serde_json::json!({
                    "name": tool.name(),
                    "description": tool.description(),
                    "parameters": tool.parameters_schema(),
                })
            })
            .collect()
    }

    /// Calls a tool by name; an unknown name is [`ToolError::NotFound`] listing the tools.
    pub fn call(&self, name: &str, arguments: &Value) -> Result<Value, ToolError> {
        match self.get(name) {
            Some(tool) => tool.call(arguments),
            None => Err(ToolError::NotFound {
                what: "tool",
                key: name.to_owned(),
                hint: format!("available tools: {}", self.names().join(", ")),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
