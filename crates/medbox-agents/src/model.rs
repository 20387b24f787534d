//! The model boundary: the one trait through which the step loop reaches a
//! language model.
//!
//! **API Boundary:** the server implements [`AgentModel`] over the runtime,
//! routing [`ModelTurn::route`] by model name or alias and constraining the
//! decoding with [`ModelTurn::response_schema`]; the tests implement it with a
//! scripted double. Nothing here knows about tch, engines or gRPC.

use std::future::Future;
use std::time::Instant;

use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool result fed back to the model. A chat template without a tool
    /// role should show it as a user message.
    Tool,
}

impl Role {
    /// The role as chat templates and the gRPC API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// One request to the model: the conversation so far and the schema the
/// answer must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTurn {
    /// A model name or alias, from the agent's routes.
    pub route: String,
    pub messages: Vec<Message>,
    /// The index in `messages` of the run's input (after the system prompt
    /// and any earlier session turns). A model whose context cannot hold the
    /// whole conversation should leave out the earlier session turns first,
    /// then the oldest messages after the input, and never the system
    /// prompt, the input or the last message.
    pub input_index: usize,
    /// The JSON Schema the answer must satisfy (see
    /// [`crate::step_loop::build_step_schema`]): a tool call
    /// `{"tool": name, "arguments": {…}}` or a final answer `{"final": output}`.
    pub response_schema: Value,
    pub max_tokens: u32,
    /// When the run must end; an implementation should stop generating then
    /// (the loop discards an answer that arrives later).
    pub deadline: Instant,
}

/// The model's answer to one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelReply {
    /// The generated text (JSON when decoding was constrained).
    pub text: String,
    /// The model that actually answered (a route may be an alias or fall back).
    pub model: String,
    /// Tokens of the prompt the model read.
    pub prompt_tokens: u32,
    /// Tokens the model generated (reasoning included).
    pub completion_tokens: u32,
}

/// Why a model could not answer. The run ends with
/// [`crate::step_loop::RunStatus::ModelError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// No loaded model answers to this route and there is no default model.
    #[error("model `{route}` is not loaded")]
    NotFound { route: String },
    /// The model is loading or the server is shutting down.
    #[error("model `{route}` is unavailable: {reason}")]
    Unavailable { route: String, reason: String },
    /// The model's queue is full.
    #[error("model `{route}` is overloaded: {reason}")]
    Overloaded { route: String, reason: String },
    /// The engine failed while generating.
    #[error("model `{route}` failed: {reason}")]
    Failed { route: String, reason: String },
}

/// A language model as the step loop sees it.
pub trait AgentModel: Send + Sync {
    /// Answers one turn. Implementations may write `async fn complete`; the
    /// future must be `Send` so a run can move between threads.
    fn complete(
        &self,
        turn: ModelTurn,
    ) -> impl Future<Output = Result<ModelReply, ModelError>> + Send;
}
