//! Error types of the runtime, one `thiserror` enum per stage: loading a
//! model, running it, validating a request and talking to an engine. Each has
//! a `kind()` label for metrics and the audit log.

use std::path::PathBuf;

/// Why a model folder could not be loaded. Every variant names the file (and
/// the tensor, where one is at fault).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid config: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error("`{path}`: unsupported architecture `{architecture}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: String,
        supported: &'static str,
    },
    #[error("`{path}`: unsupported setting {setting}")]
    Unsupported { path: PathBuf, setting: String },
    #[error("`{path}` is not a readable safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor `{tensor}` is missing from {path}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("tensor `{tensor}` in `{path}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("tensor `{tensor}` in `{path}` could not be prepared: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("`{path}` is not a usable tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "tokenizer `{path}` has {tokenizer_vocab} tokens but the model's vocab_size is {model_vocab}"
    )]
    VocabMismatch {
        path: PathBuf,
        tokenizer_vocab: usize,
        model_vocab: usize,
    },
    #[error("device {device} is not available: {message}")]
    DeviceUnavailable { device: String, message: String },
    #[error("the engine thread could not start: {0}")]
    Thread(String),
    #[error("`{path}` has an invalid chat template: {message}")]
    ChatTemplate { path: PathBuf, message: String },
    #[error("the KV cache could not be set up: {0}")]
    KvCache(String),
    #[error("model `{model}` is stopped")]
    EngineStopped { model: String },
}

impl LoadError {
    /// A short label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => "io",
            LoadError::InvalidConfig { .. } => "invalid_config",
            LoadError::UnsupportedArchitecture { .. } => "unsupported_architecture",
            LoadError::Unsupported { .. } => "unsupported",
            LoadError::Safetensors { .. } => "safetensors",
            LoadError::MissingTensor { .. } => "missing_tensor",
            LoadError::WrongShape { .. } => "wrong_shape",
            LoadError::Tensor { .. } => "tensor",
            LoadError::Tokenizer { .. } => "tokenizer",
            LoadError::VocabMismatch { .. } => "vocab_mismatch",
            LoadError::DeviceUnavailable { .. } => "device_unavailable",
            LoadError::Thread(_) => "thread",
            LoadError::ChatTemplate { .. } => "chat_template",
            LoadError::KvCache(_) => "kv_cache",
            LoadError::EngineStopped { .. } => "engine_stopped",
        }
    }
}

/// A failure while running a loaded model or its tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("sequence is {length} tokens, beyond the model's context of {max}")]
    ContextOverflow { length: usize, max: usize },
}

impl RuntimeError {
    /// A short label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            RuntimeError::Tokenizer(_) => "tokenizer",
            RuntimeError::Tensor(_) => "tensor",
            RuntimeError::ContextOverflow { .. } => "context_overflow",
        }
    }
}

/// Why an engine could not take or finish a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("model `{model}` has {max_waiting} requests waiting; try again later")]
    QueueFull { model: String, max_waiting: usize },
    #[error("model `{model}` is stopped")]
    Stopped { model: String },
    #[error("model failed: {0}")]
    Model(String),
}

impl EngineError {
    /// A short label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::QueueFull { .. } => "queue_full",
            EngineError::Stopped { .. } => "stopped",
            EngineError::Model(_) => "model",
        }
    }
}

/// One variant per validation rule; each message names the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("prompt must not be empty")]
    EmptyPrompt,
    #[error("prompt is {length} tokens but model `{model}` accepts at most {max}")]
    PromptTooLong {
        model: String,
        length: usize,
        max: usize,
    },
    #[error("sampling.max_tokens must be between 1 and {max} (got {got})")]
    MaxTokens { max: u32, got: u32 },
    #[error("sampling.temperature must be ≥ 0 and finite (got {0})")]
    Temperature(f32),
    #[error("sampling.top_p must be > 0 and ≤ 1 (got {0})")]
    TopP(f32),
    #[error("sampling.top_k must be ≥ 1 (got {0})")]
    TopK(u32),
    #[error("sampling.repetition_penalty must be > 0 and finite (got {0})")]
    RepetitionPenalty(f32),
    #[error("sampling.stop must have at most {max} entries (got {got})")]
    TooManyStops { max: usize, got: usize },
    #[error("sampling.stop[{index}] must not be empty")]
    EmptyStop { index: usize },
    #[error("sampling.stop[{index}] must be at most {max} bytes (got {got})")]
    StopTooLong {
        index: usize,
        max: usize,
        got: usize,
    },
    #[error("prompt could not be tokenized: {0}")]
    Tokenizer(String),
    #[error("texts must not be empty")]
    EmptyTexts,
    #[error("texts must have at most {max} entries (got {got})")]
    TooManyTexts { max: usize, got: usize },
    #[error("texts[{index}] must not be empty")]
    EmptyText { index: usize },
    #[error("messages must not be empty")]
    EmptyMessages,
    #[error("messages[{index}].role `{role}` is not one of system, user, assistant, tool")]
    MessageRole { index: usize, role: String },
    #[error("model `{model}` has no chat template")]
    NoChatTemplate { model: String },
    #[error("messages could not be rendered with the chat template: {0}")]
    ChatTemplate(String),
    /// `field` is `json_schema`, `regex` or `grammar`.
    #[error("constraint.{field} was rejected: {reason}")]
    Constraint { field: &'static str, reason: String },
    #[error("constraint.{field} must be at most {max} bytes (got {got})")]
    ConstraintTooLong {
        field: &'static str,
        max: usize,
        got: usize,
    },
}

impl ValidationError {
    /// A short label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidationError::EmptyPrompt => "empty_prompt",
            ValidationError::PromptTooLong { .. } => "prompt_too_long",
            ValidationError::MaxTokens { .. } => "max_tokens",
            ValidationError::Temperature(_) => "temperature",
            ValidationError::TopP(_) => "top_p",
            ValidationError::TopK(_) => "top_k",
            ValidationError::RepetitionPenalty(_) => "repetition_penalty",
            ValidationError::TooManyStops { .. } => "too_many_stops",
            ValidationError::EmptyStop { .. } => "empty_stop",
            ValidationError::StopTooLong { .. } => "stop_too_long",
            ValidationError::Tokenizer(_) => "tokenizer",
            ValidationError::EmptyTexts => "empty_texts",
            ValidationError::TooManyTexts { .. } => "too_many_texts",
            ValidationError::EmptyText { .. } => "empty_text",
            ValidationError::EmptyMessages => "empty_messages",
            ValidationError::MessageRole { .. } => "message_role",
            ValidationError::NoChatTemplate { .. } => "no_chat_template",
            ValidationError::ChatTemplate(_) => "chat_template",
            ValidationError::Constraint { .. } => "constraint",
            ValidationError::ConstraintTooLong { .. } => "constraint_too_long",
        }
    }
}
