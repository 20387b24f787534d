//! Per-run tools: tools whose answer depends on the run (the patient's
//! record, the store, a knowledge base), handed to each run beside the static
//! [`ToolRegistry`].
//!
//! A [`ContextTool`] is async and may do I/O (the server's
//! `schedule_follow_up` writes to the store; a knowledge-base search reads an
//! index). Its name is known when specs load, so a spec that lists it is
//! checked then; the tool itself is built for each run (see [`ContextTools`]).
//!
//! **API Boundary:** like [`crate::Tool`], arguments and results are JSON and
//! errors are [`ToolError`]s written for the model.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::{ToolError, ToolRegistry};

/// Two context tools of one run share a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a context tool named `{0}` is already registered")]
pub struct DuplicateContextTool(pub String);

/// The future a [`ContextTool`] returns.
pub type ToolFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, ToolError>> + Send + 'a>>;

/// A tool built for one run (or shared by runs) that may wait on I/O.
pub trait ContextTool: Send + Sync {
    /// The name the model calls the tool by (`snake_case`).
    fn name(&self) -> &str;
    /// One or two sentences telling the model when to use the tool.
    fn description(&self) -> &str;
    /// The JSON Schema of the arguments (`"type": "object"`).
    fn parameters_schema(&self) -> Value;
    /// Runs the tool.
    fn call<'a>(&'a self, arguments: &'a Value) -> ToolFuture<'a>;
}

/// The context tools of one run, by name.
#[derive(Default, Clone)]
pub struct ContextTools {
    tools: BTreeMap<String, Arc<dyn ContextTool>>,
}

impl ContextTools {
    pub fn new() -> ContextTools {
        ContextTools::default()
    }

    /// Adds a tool; refuses a second one with the same name.
    pub fn add(&mut self, tool: Arc<dyn ContextTool>) -> Result<(), DuplicateContextTool> {
        let name = tool.name().to_owned();
        if self.tools.contains_key(&name) {
            return Err(DuplicateContextTool(name));
        }
        self.tools.insert(name, tool);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn ContextTool>> {
        self.tools.get(name)
    }
}

/// The name of the server's follow-up scheduling tool.
pub const SCHEDULE_FOLLOW_UP: &str = "schedule_follow_up";

/// Everything a run may call: the static registry and the run's context tools.
/// A name in both is the context tool's.
#[derive(Clone, Copy)]
pub struct Toolbox<'a> {
    pub registry: &'a ToolRegistry,
    pub context: &'a ContextTools,
}

/// A tool's description and argument schema, whichever kind it is.
pub struct ToolDescription {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

impl<'a> Toolbox<'a> {
    pub fn new(registry: &'a ToolRegistry, context: &'a ContextTools) -> Toolbox<'a> {
        Toolbox { registry, context }
    }

    /// The tool's description and schema, when it exists.
    pub fn describe(&self, name: &str) -> Option<ToolDescription> {
        if let Some(tool) = self.context.get(name) {
            return Some(ToolDescription {
                name: tool.name().to_owned(),
                description: tool.description().to_owned(),
                parameters: tool.parameters_schema(),
            });
        }
        self.registry.get(name).map(|tool| ToolDescription {
            name: tool.name().to_owned(),
            description: tool.description().to_owned(),
            parameters: tool.parameters_schema(),
        })
    }

    /// Calls a tool by name; an unknown name is [`ToolError::NotFound`].
    pub async fn call(&self, name: &str, arguments: &Value) -> Result<Value, ToolError> {
        if let Some(tool) = self.context.get(name) {
            return tool.call(arguments).await;
        }
        self.registry.call(name, arguments)
    }
}
