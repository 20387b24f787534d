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
    fn not_found_names_the_model() {
        let status = Status::from(ApiError::ModelNotFound("radiology-7b".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("radiology-7b"));
    }
}
