//! `medbox.v1.Admin`: what IT staff and administrators look at and change on
//! a running box: model states, API keys and the audit trail.

use medbox_proto::v1 as pb;
use medbox_store::{ApiKeyRecord, AuditFilter, NewApiKey};
use tonic::{Request, Response, Status};

use crate::{
    auth::SCOPES,
    config::{ModelKind, ValidModelConfig},
    error::ApiError,
    router::ManageError,
    state::AppState,
};

pub struct AdminService {
    state: AppState,
}

impl AdminService {
    pub fn new(state: AppState) -> AdminService {
        AdminService { state }
    }
}

fn manage_error(err: ManageError) -> ApiError {
    match err {
        ManageError::AlreadyLoaded(_)
        | ManageError::StillLoading(_)
        | ManageError::ServesAdapters { .. } => ApiError::Conflict(err.to_string()),
        ManageError::AliasIsAModel { .. } => ApiError::InvalidField {
            field: "aliases",
            reason: err.to_string(),
        },
        ManageError::NotLoaded(name) => ApiError::ModelNotFound(name),
        ManageError::LoadFailed { name, error } => ApiError::LoadFailed { name, error },
    }
}

impl AdminService {
    /// Checks a LoadModel request; with no path, the registered folder of the name.
    async fn model_config(
        &self,
        request: pb::LoadModelRequest,
    ) -> Result<ValidModelConfig, ApiError> {
        if request.name.trim().is_empty() {
            return Err(ApiError::MissingField("name"));
        }
        let (path, kind, dtype, device) = if request.path.is_empty() {
            let registered = self
                .state
                .store
                .get_model(&request.name)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::InvalidField {
                    field: "path",
                    reason: format!(
                        "`{}` is not a registered model; give the folder to load",
                        request.name
                    ),
                })?;
            (
                registered.path.into(),
                registered.kind,
                registered.dtype.unwrap_or_default(),
                registered.device,
            )
        } else {
            (
                std::path::PathBuf::from(&request.path),
                request.kind,
                request.dtype,
                request.device,
            )
        };
        let kind = match kind.as_str() {
            "" | "causal-lm" => ModelKind::CausalLm,
            "embedding" => ModelKind::Embedding,
            other => {
                return Err(ApiError::InvalidField {
                    field: "kind",
                    reason: format!("`{other}` is not one of causal-lm, embedding"),
                });
            }
        };
        let dtype = match dtype.as_str() {
            "" => None,
            text => Some(
                text.parse()
                    .map_err(|reason: String| ApiError::InvalidField {
                        field: "dtype",
                        reason,
                    })?,
            ),
        };
        let device = match device.as_str() {
            "" => medbox_runtime::Device::Cpu,
            text => text
                .parse()
                .map_err(|reason: String| ApiError::InvalidField {
                    field: "device",
                    reason,
                })?,
        };
        // A LoRA adapter folder loads merged onto the base model it names.
        if !path.join("config.json").is_file() && !medbox_runtime::lora::is_adapter_folder(&path) {
            return Err(ApiError::InvalidField {
                field: "path",
                reason: format!(
                    "{} is not a model folder on this box (no config.json or adapter_config.json there)",
                    path.display()
                ),
            });
        }
        Ok(ValidModelConfig {
            name: request.name,
            // Absolute, like the configured models (against medboxd's folder).
            path: std::path::absolute(&path).unwrap_or(path),
            kind,
            aliases: request.aliases,
            dtype,
            device,
            max_waiting: 64,
            batching: Default::default(),
        })
    }
}

fn key_to_proto(record: ApiKeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        id: record.id,
        label: record.label,
        scopes: record.scopes,
        tenant: record.tenant.unwrap_or_default(),
        created_at: record.created_at_ms,
        expires_at: record.expires_at_ms,
        revoked_at: record.revoked_at_ms,
        last_used_at: record.last_used_at_ms,
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/ListModels", &request);
        let models = self.state.model_statuses();
        record.answer(Ok(pb::ListModelsResponse { models }))
    }

    #[tracing::instrument(skip_all)]
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let record = self.state.log.begin_for("medbox.v1.Admin/Status", &request);
        let response = pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.state.started.elapsed().as_secs(),
            storage: self.state.store.backend().as_str().to_owned(),
            models: self.state.model_statuses(),
        };
        record.answer(Ok(response))
    }

    #[tracing::instrument(skip_all)]
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/LoadModel", &request);
        let request = request.into_inner();
        record.model = non_empty(request.name.clone());
        let result = async {
            let config = self.model_config(request).await?;
            self.state
                .store
                .upsert_model(&crate::server::registry_entry(&config, "admin"))
                .await
                .map_err(ApiError::from)?;
            let view = self
                .state
                .router
                .load_live(config)
                .await
                .map_err(manage_error)?;
            Ok(pb::LoadModelResponse {
                model: Some(self.state.model_status(view)),
            })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/UnloadModel", &request);
        let name = request.into_inner().name;
        record.model = non_empty(name.clone());
        let result = async {
            if name.is_empty() {
                return Err(ApiError::MissingField("name"));
            }
            if let Some(model) = self.state.router.unload(&name).map_err(manage_error)? {
                // In-flight requests finish first; then the memory goes.
                tokio::task::spawn_blocking(move || model.shutdown())
                    .await
                    .map_err(|err| ApiError::Internal(format!("unloading `{name}`: {err}")))?;
            }
            tracing::info!(model = %name, "model unloaded");
            Ok(pb::UnloadModelResponse {})
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/CreateApiKey", &request);
        let request = request.into_inner();
        let result = async {
            if request.label.trim().is_empty() {
                return Err(ApiError::MissingField("label"));
            }
            if request.scopes.is_empty() {
                return Err(ApiError::MissingField("scopes"));
            }
            if let Some(bad) = request.scopes.iter().find(|scope| !SCOPES.contains(&scope.as_str())) {
                return Err(ApiError::InvalidField {
                    field: "scopes",
                    reason: format!("`{bad}` is not one of {}", SCOPES.join(", ")),
                });
            }
            if let Some(expires_at) = request.expires_at
                && expires_at <= crate::auth::now_ms()
            {
                return Err(ApiError::InvalidField {
                    field: "expires_at",
                    reason: "must be in the future (unix milliseconds)".into(),
                });
            }
            let created = self
                .state
                .store
                .create_api_key(&NewApiKey {
                    label: request.label,
                    scopes: request.scopes,
                    tenant: non_empty(request.tenant),
                    expires_at_ms: request.expires_at,
                })
                .await
                .map_err(ApiError::from)?;
            tracing::info!(key_id = %created.record.id, label = %created.record.label, scopes = ?created.record.scopes, "API key created");
            Ok(pb::CreateApiKeyResponse {
                id: created.record.id.clone(),
                key: created.secret,
                api_key: Some(key_to_proto(created.record)),
            })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/RevokeApiKey", &request);
        let id = request.into_inner().id;
        record.model = non_empty(id.clone());
        let result = async {
            if id.is_empty() {
                return Err(ApiError::MissingField("id"));
            }
            let store = &self.state.store;
            if store
                .get_api_key(&id)
                .await
                .map_err(ApiError::from)?
                .is_none()
            {
                return Err(ApiError::KeyNotFound(id));
            }
            let revoked = store
                .revoke_api_key(&id, crate::auth::now_ms())
                .await
                .map_err(ApiError::from)?;
            tracing::info!(key_id = %id, revoked, "API key revoked");
            Ok(pb::RevokeApiKeyResponse { revoked })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/ListApiKeys", &request);
        let result = self
            .state
            .store
            .list_api_keys()
            .await
            .map(|keys| pb::ListApiKeysResponse {
                keys: keys.into_iter().map(key_to_proto).collect(),
            })
            .map_err(ApiError::from);
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/ListAuditEvents", &request);
        let request = request.into_inner();
        let filter = AuditFilter {
            since_ms: (request.since > 0).then_some(request.since),
            until_ms: (request.until > 0).then_some(request.until),
            key_id: non_empty(request.key_id),
            method: non_empty(request.method),
            status_code: request.status_code,
            after_id: (request.after_id > 0).then_some(request.after_id),
            limit: request.limit,
        };
        // Calls just answered may still be queued for the writer.
        self.state.log.flush().await;
        let result = self
            .state
            .store
            .list_audit_events(&filter)
            .await
            .map(|events| pb::ListAuditEventsResponse {
                events: events
                    .into_iter()
                    .map(|event| pb::AuditEvent {
                        id: event.id,
                        at: event.at_ms,
                        key_id: event.key_id.unwrap_or_default(),
                        key_label: event.key_label.unwrap_or_default(),
                        method: event.method,
                        target: event.target.unwrap_or_default(),
                        status_code: event.status_code,
                        error_kind: event.error_kind.unwrap_or_default(),
                        latency_us: event.latency_us,
                        prompt_tokens: event.prompt_tokens,
                        completion_tokens: event.completion_tokens,
                        request_id: event.request_id.unwrap_or_default(),
                        client_addr: event.client_addr.unwrap_or_default(),
                        prev_hash: event.prev_hash,
                        hash: event.hash,
                        detail: event.detail.unwrap_or_default(),
                    })
                    .collect(),
            })
            .map_err(ApiError::from);
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Admin/VerifyAuditChain", &request);
        // Events still queued would be missing from the check: let them land first.
        self.state.log.flush().await;
        let result = self
            .state
            .store
            .verify_audit_chain()
            .await
            .map(|verdict| {
                if !verdict.ok {
                    tracing::error!(first_broken_id = ?verdict.first_broken_id, reason = ?verdict.reason, "the audit chain is broken");
                }
                pb::VerifyAuditChainResponse {
                    ok: verdict.ok,
                    checked: verdict.checked,
                    first_broken_id: verdict.first_broken_id.unwrap_or_default(),
                    reason: verdict.reason.unwrap_or_default(),
                }
            })
            .map_err(ApiError::from);
        record.answer(result)
    }
}
