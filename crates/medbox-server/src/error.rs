//! The one place where failures become gRPC statuses.
//!
//! Every variant maps to a code explicitly (no catch-all arm), and every
//! variant has a short `kind` label for the request log. Internal details
//! (file paths, tensor names, SQL) are logged, never sent to the client.

use medbox_runtime::{EngineError, ValidationError};
use tonic::{Code, Status};

/// Why an RPC failed, as the services see it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("model `{0}` is not served by this box (see ListModels)")]
    ModelNotFound(String),
    #[error("model `{0}` is still loading; retry shortly")]
    ModelLoading(String),
    #[error("model `{name}` failed to load; an administrator must fix it (see ListModels)")]
    ModelFailed { name: String },
    #[error("model `{name}` is a {kind} model and cannot serve {method}")]
    WrongModelKind {
        name: String,
        kind: &'static str,
        method: &'static str,
    },
    #[error("{0} must not be empty")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("API key `{0}` does not exist")]
    KeyNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("model `{name}` failed to load: {error}")]
    LoadFailed { name: String, error: String },
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("model `{0}` has too many waiting requests; retry later")]
    QueueFull(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "fine-tuning is off: this box runs the inference-only profile ([finetune] enabled = false)"
    )]
    FinetuneDisabled,
    #[error("{field}: model `{name}` is not registered on this box (see ListModels)")]
    UnknownModel { field: &'static str, name: String },
    #[error("dataset `{0}` does not exist (see ListDatasets)")]
    DatasetNotFound(String),
    #[error(
        "dataset `{name}` was rejected at upload ({invalid_lines} bad lines) and cannot be trained on; fix it and upload it again"
    )]
    DatasetRejected { name: String, invalid_lines: u64 },
    #[error("the dataset is larger than {limit} bytes (finetune.max_dataset_bytes)")]
    DatasetTooLarge { limit: u64 },
    #[error("the upload ended before it was complete")]
    UploadInterrupted,
    #[error("job `{0}` does not exist (see ListJobs)")]
    JobNotFound(String),
    #[error("job `{id}` has already {state}; there is nothing to cancel")]
    JobFinished { id: String, state: &'static str },
    #[error("the fine-tuning queue is full ({limit} jobs waiting); retry when one has started")]
    JobQueueFull { limit: usize },
    #[error(
        "the trainer program (medbox-trainer) is not installed on this box; an administrator must install it"
    )]
    TrainerMissing,
    /// No usable embedding model for the knowledge base; the message names
    /// `knowledge.embedding_model`.
    #[error("{0}")]
    KnowledgeNotConfigured(String),
    /// The knowledge base's embedding model is loading, busy or stopping.
    #[error("{0}")]
    KnowledgeUnavailable(String),
    #[error("knowledge document `{0}` does not exist (see ListDocuments)")]
    DocumentNotFound(String),
    #[error("agent `{0}` does not exist (see ListAgents)")]
    AgentNotFound(String),
    #[error("agent `{0}` already exists; use UpdateAgent")]
    AgentExists(String),
    #[error("session `{0}` does not exist (see CreateSession)")]
    SessionNotFound(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A short stable label for logs and the request log.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::ModelLoading(_) => "model_loading",
            ApiError::ModelFailed { .. } => "model_failed",
            ApiError::WrongModelKind { .. } => "wrong_model_kind",
            ApiError::MissingField(_) => "missing_field",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::KeyNotFound(_) => "key_not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::LoadFailed { .. } => "load_failed",
            ApiError::Invalid(_) => "invalid_argument",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::FinetuneDisabled => "finetune_disabled",
            ApiError::UnknownModel { .. } => "model_not_found",
            ApiError::DatasetNotFound(_) => "dataset_not_found",
            ApiError::DatasetRejected { .. } => "dataset_rejected",
            ApiError::DatasetTooLarge { .. } => "dataset_too_large",
            ApiError::UploadInterrupted => "upload_interrupted",
            ApiError::JobNotFound(_) => "job_not_found",
            ApiError::JobFinished { .. } => "job_finished",
            ApiError::JobQueueFull { .. } => "job_queue_full",
            ApiError::TrainerMissing => "trainer_missing",
            ApiError::KnowledgeNotConfigured(_) => "knowledge_not_configured",
            ApiError::KnowledgeUnavailable(_) => "knowledge_unavailable",
            ApiError::DocumentNotFound(_) => "document_not_found",
            ApiError::AgentNotFound(_) => "agent_not_found",
            ApiError::AgentExists(_) => "agent_exists",
            ApiError::SessionNotFound(_) => "session_not_found",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::ModelNotFound(_) => Code::NotFound,
            ApiError::ModelLoading(_) => Code::Unavailable,
            ApiError::ModelFailed { .. } => Code::FailedPrecondition,
            ApiError::WrongModelKind { .. } => Code::InvalidArgument,
            ApiError::MissingField(_) => Code::InvalidArgument,
            ApiError::InvalidField { .. } => Code::InvalidArgument,
            ApiError::KeyNotFound(_) => Code::NotFound,
            ApiError::Conflict(_) => Code::FailedPrecondition,
            ApiError::LoadFailed { .. } => Code::FailedPrecondition,
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::QueueFull(_) => Code::ResourceExhausted,
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::FinetuneDisabled => Code::FailedPrecondition,
            ApiError::UnknownModel { .. } => Code::NotFound,
            ApiError::DatasetNotFound(_) => Code::NotFound,
            ApiError::DatasetRejected { .. } => Code::FailedPrecondition,
            ApiError::DatasetTooLarge { .. } => Code::InvalidArgument,
            ApiError::UploadInterrupted => Code::Cancelled,
            ApiError::JobNotFound(_) => Code::NotFound,
            ApiError::JobFinished { .. } => Code::FailedPrecondition,
            ApiError::JobQueueFull { .. } => Code::ResourceExhausted,
            ApiError::TrainerMissing => Code::FailedPrecondition,
            ApiError::KnowledgeNotConfigured(_) => Code::FailedPrecondition,
            ApiError::KnowledgeUnavailable(_) => Code::Unavailable,
            ApiError::DocumentNotFound(_) => Code::NotFound,
            ApiError::AgentNotFound(_) => Code::NotFound,
            ApiError::AgentExists(_) => Code::AlreadyExists,
            ApiError::SessionNotFound(_) => Code::NotFound,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// Turns an engine failure for `model` into an API error.
    pub fn from_engine(model: &str, err: EngineError) -> ApiError {
        match err {
            EngineError::QueueFull { .. } => ApiError::QueueFull(model.to_owned()),
            EngineError::Stopped { .. } => ApiError::ShuttingDown,
            EngineError::Model(detail) => ApiError::Internal(format!("model `{model}`: {detail}")),
        }
    }
}

/// The store failing is the box's fault, never the caller's: logged in full,
/// answered as INTERNAL without the detail.
impl From<medbox_store::StoreError> for ApiError {
    fn from(error: medbox_store::StoreError) -> ApiError {
        ApiError::Internal(format!("store: {error}"))
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        if let ApiError::Internal(detail) = &err {
            tracing::error!(error = %detail, "internal error");
        }
        Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_text_never_reaches_the_client() {
        let status = Status::from(ApiError::Internal(
            "/var/lib/medbox/models/x/model.safetensors: truncated".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn not_found_names_the_agent() {
        let status = Status::from(ApiError::AgentNotFound("radiology_report".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("radiology_report"));
    }

    #[test]
    fn not_found_names_the_model() {
        let status = Status::from(ApiError::ModelNotFound("radiology-7b".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("radiology-7b"));
    }
}
