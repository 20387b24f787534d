//! Start-up and shutdown of `medboxd`: configuration checked, store opened,
//! gRPC bound, models loaded in the background, and a graceful stop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use medbox_agents::{ToolRegistry, context::ContextTool};
use medbox_proto::v1::{
    admin_server::AdminServer, agents_server::AgentsServer, fine_tuning_server::FineTuningServer,
    inference_server::InferenceServer, knowledge_server::KnowledgeServer,
};
use medbox_store::{NewApiKey, NewModel, Store, StoreError};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::AdminService,
    agents::{AgentCatalog, AgentsService, AgentsStartError, RuntimeModel},
    auth::{AuthLayer, Gatekeeper},
    config::{Config, ConfigError, ValidModelConfig},
    deadline::{DeadlineLayer, MethodDeadlines, RequestIdLayer},
    finetuning::{FineTuningService, FinetuneStartError},
    inference::InferenceService,
    jobs::JobGauge,
    knowledge::{KnowledgeContext, KnowledgeService},
    limits::{AdmissionLayer, KeyLimiter, KeyLimits},
    metrics::{self, Metrics},
    request_log::RequestLogger,
    router::ModelRouter,
    state::AppState,
};

/// How long the request-log writer may take to drain at shutdown.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond the trainers' SIGTERM grace, how long the job runner may take to stop.
const RUNNER_STOP_MARGIN: Duration = Duration::from_secs(10);

/// Why `medboxd` could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("server.listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("server reflection: {0}")]
    Reflection(String),
    #[error("server.metrics_listen: cannot listen on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("tls.{key}: cannot read {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("tls: the certificate, key or client CA is not usable: {0}")]
    Tls(String),
    #[error("finetune: {0}")]
    Finetune(#[from] FinetuneStartError),
    #[error(transparent)]
    Agents(#[from] AgentsStartError),
    #[error("cannot write the first admin key to {path}: {source}")]
    AdminKeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why the server stopped other than by request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed: {0}")]
    Transport(String),
}

/// A started server: its address, and the handle to stop it.
pub struct RunningServer {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A token that stops the server when cancelled (used by the signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped (after a shutdown request, or a failure).
    pub async fn wait(self) -> Result<(), ServeError> {
        match self.task.await {
            Ok(result) => result,
            Err(join_error) => Err(ServeError::Transport(join_error.to_string())),
        }
    }

    /// Stops accepting, lets in-flight requests finish (bounded), then returns.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Checks the configuration, opens the store, binds the listener and starts
/// serving. Models load in the background; `Inference` reports NOT_SERVING to
/// health checks until every configured model has been tried.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    start_with_agent_tools(config, Vec::new()).await
}

/// [`start`], with context tools every agent run gets besides the built-in
/// ones (the patient tools and `schedule_follow_up`); a spec may list a tool
/// only if it is built in or given here (e.g. `knowledge_search`).
pub async fn start_with_agent_tools(
    config: Config,
    shared_agent_tools: Vec<Arc<dyn ContextTool>>,
) -> Result<RunningServer, StartError> {
    let models = config.validate()?;
    let addr = config.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;

    let (metrics_listener, metrics_addr) = match config.metrics_addr()? {
        Some(addr) => {
            let bind_error = |source| StartError::MetricsBind { addr, source };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            let bound = listener.local_addr().map_err(bind_error)?;
            (Some(listener), Some(bound))
        }
        None => (None, None),
    };
    let metrics = Arc::new(Metrics::new()?);

    let store = match &config.storage.url {
        Some(url) => Store::open(url).await?,
        None => Store::open_in_data_dir(&config.storage.data_dir).await?,
    };
    for model in &models {
        store.upsert_model(&registry_entry(model, "config")).await?;
    }
    tracing::info!(backend = store.backend().as_str(), "store open");
    if config.auth.enabled {
        ensure_admin_key(&store, &config.storage.data_dir).await?;
    } else {
        tracing::warn!(
            listen = %addr,
            "AUTHENTICATION IS OFF (auth.enabled = false): anyone who can reach {addr} may use every RPC"
        );
    }

    let router = Arc::new(ModelRouter::new(models.clone()));
    let knowledge =
        KnowledgeContext::open(&config.knowledge, &models, router.clone(), store.clone()).await?;
    let mut shared_agent_tools = shared_agent_tools;
    if let Some(tool) = knowledge.search_tool() {
        shared_agent_tools.push(tool);
    }
    let shared_tool_names: Vec<String> = shared_agent_tools
        .iter()
        .map(|tool| tool.name().to_owned())
        .collect();
    // A bad spec stops the start here, naming the file, the field and why.
    let catalog = Arc::new(
        AgentCatalog::load(
            &config.agents,
            &store,
            Arc::new(ToolRegistry::medical()),
            &shared_tool_names,
        )
        .await?,
    );
    let limits = &config.limits;
    let limiter = Arc::new(KeyLimiter::new(KeyLimits {
        requests_per_second: limits.requests_per_second,
        burst: f64::from(limits.burst),
        tokens_per_minute: (limits.tokens_per_minute > 0)
            .then_some(limits.tokens_per_minute as f64),
    }));
    let (log, log_writer) = RequestLogger::start(
        store.clone(),
        metrics.clone(),
        limiter.clone(),
        config.audit.store_text,
    );
    let gatekeeper = Arc::new(Gatekeeper {
        store: store.clone(),
        enabled: config.auth.enabled,
        log: log.clone(),
        limiter,
    });
    let state = AppState {
        router: router.clone(),
        log,
        store: store.clone(),
        started: std::time::Instant::now(),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health
        .set_serving::<KnowledgeServer<KnowledgeService>>()
        .await;
    health.set_serving::<AgentsServer<AgentsService>>().await;
    let loader = {
        let router = router.clone();
        let health = health.clone();
        let knowledge = knowledge.clone();
        tokio::spawn(async move {
            router.load_all().await;
            health
                .set_serving::<InferenceServer<InferenceService>>()
                .await;
            tracing::info!("all configured models tried; Inference is SERVING");
            // The embedding model is loaded (or failed) now: re-embed what
            // another model embedded, then ingest [knowledge] dir.
            knowledge.ingest_at_start().await;
        })
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(medbox_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|err| StartError::Reflection(err.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(medbox_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|err| StartError::Reflection(err.to_string()))?;

    let shutdown = CancellationToken::new();
    let job_gauge = JobGauge::start(store.clone(), metrics.clone(), shutdown.clone());
    let finetuning = crate::finetuning::start(
        &config.finetune,
        &config.storage.data_dir,
        &store,
        job_gauge,
    )
    .await?;
    health
        .set_serving::<FineTuningServer<FineTuningService>>()
        .await;
    if let Some(listener) = metrics_listener {
        let router = router.clone();
        let refresh = move |metrics: &Metrics| {
            metrics.models.reset();
            metrics.requests_waiting.reset();
            metrics.requests_running.reset();
            for view in router.views() {
                metrics.models.with_label_values(&[view.state]).inc();
                if let Some(load) = view.details.and_then(|details| details.load) {
                    let as_gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
                    metrics
                        .requests_waiting
                        .with_label_values(&[&view.name])
                        .set(as_gauge(load.waiting));
                    metrics
                        .requests_running
                        .with_label_values(&[&view.name])
                        .set(as_gauge(load.running));
                    Metrics::sync_counter(&metrics.engine_steps, &view.name, load.steps);
                    Metrics::sync_counter(
                        &metrics.prefix_cache_tokens,
                        &view.name,
                        load.reused_tokens,
                    );
                    Metrics::sync_counter(&metrics.preemptions, &view.name, load.preemptions);
                }
            }
        };
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(listener, metrics, refresh, token).await {
                tracing::error!(error = %err, "the metrics endpoint failed");
            }
        });
    }
    let max_bytes = limits.max_request_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(server_tls(tls)?)
            .map_err(|err| StartError::Tls(error_chain(&err)))?;
        tracing::info!(mutual = tls.client_ca.is_some(), "TLS on");
    } else if !addr.ip().is_loopback() {
        tracing::warn!(listen = %addr, "plaintext gRPC on a non-loopback address (server.allow_plaintext)");
    }
    let deadlines = MethodDeadlines::new(
        Duration::from_secs(limits.request_timeout_seconds),
        &limits.method_timeout_seconds,
    );
    let serve = builder
        // The outer cap; the DeadlineLayer below applies each method's own.
        .timeout(deadlines.longest())
        // First a request id, in the span of everything the call logs.
        .layer(RequestIdLayer::new())
        // Then the method's deadline (a sooner grpc-timeout from the client
        // wins). When it fires the handler or the stream is dropped, which
        // frees the sequence's place in the engine's batch.
        .layer(DeadlineLayer::new(deadlines))
        // Who is calling and may they (health and reflection stay open).
        // Before admission, so that an unauthenticated flood costs one lookup
        // and never takes a concurrency permit; denials are audited here too.
        // Per-key rates are checked here, as they need the key.
        .layer(AuthLayer::new(gatekeeper))
        // Then the box-wide concurrency limit with load shedding: over the
        // limit is RESOURCE_EXHAUSTED at once, not a queue that hides overload.
        // The permit lives as long as the response body, streams included.
        .layer(AdmissionLayer::new(limits.max_concurrent_requests))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            InferenceServer::new(InferenceService::new(state.clone()))
                .max_decoding_message_size(max_bytes),
        )
        .add_service(
            FineTuningServer::new(FineTuningService::new(
                state.clone(),
                finetuning.context.clone(),
            ))
            .max_decoding_message_size(max_bytes),
        )
        .add_service(
            KnowledgeServer::new(KnowledgeService::new(state.clone(), knowledge))
                .max_decoding_message_size(max_bytes),
        )
        .add_service(
            AgentsServer::new(AgentsService::new(
                state.clone(),
                catalog,
                Arc::new(RuntimeModel::new(router.clone(), &config.agents)),
                shared_agent_tools,
                &config.agents,
            ))
            .max_decoding_message_size(max_bytes),
        )
        .add_service(
            AdminServer::new(AdminService::new(state)).max_decoding_message_size(max_bytes),
        )
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener).map(|accepted| {
                // Tokens go out one small frame at a time: without
                // TCP_NODELAY, Nagle's algorithm holds them back ~40 ms.
                accepted.and_then(|stream| stream.set_nodelay(true).map(|()| stream))
            }),
            shutdown.clone().cancelled_owned(),
        );
    tracing::info!(%local_addr, metrics = ?metrics_addr, "medboxd listening (gRPC, health, reflection)");

    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut serve = tokio::spawn(serve);
        let result = tokio::select! {
            finished = &mut serve => match finished {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(ServeError::Transport(err.to_string())),
                Err(join_error) => Err(ServeError::Transport(join_error.to_string())),
            },
            () = token.cancelled() => {
                health.set_not_serving::<InferenceServer<InferenceService>>().await;
                tracing::info!(grace_seconds = grace.as_secs(), "shutting down: no new requests; waiting for in-flight ones");
                match tokio::time::timeout(grace, &mut serve).await {
                    Ok(_) => tracing::info!("in-flight requests finished"),
                    Err(_) => {
                        tracing::warn!(grace_seconds = grace.as_secs(), "in-flight requests did not finish in time; closing them");
                        serve.abort();
                    }
                }
                Ok(())
            }
        };
        loader.abort();
        let engines = router.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || engines.shutdown_engines()).await {
            tracing::warn!(error = %err, "stopping the engines failed");
        }
        if let Some(runner) = &finetuning.runner {
            // Trainers get SIGTERM (SIGKILL after the grace); their jobs stay
            // `running` and resume from their checkpoints at the next start.
            let limit = finetuning.cancel_grace + RUNNER_STOP_MARGIN;
            if tokio::time::timeout(limit, runner.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("the job runner did not stop in time");
            }
        }
        drop(router);
        if tokio::time::timeout(LOG_DRAIN_TIMEOUT, log_writer)
            .await
            .is_err()
        {
            tracing::warn!("the request log did not drain in time");
        }
        store.close().await;
        tracing::info!("medboxd stopped");
        result
    });

    Ok(RunningServer {
        local_addr,
        metrics_addr,
        shutdown,
        task,
    })
}

/// A served model as the store's registry records it; `source` says who asked.
pub(crate) fn registry_entry(model: &ValidModelConfig, source: &str) -> NewModel {
    NewModel {
        name: model.name.clone(),
        path: model.path.display().to_string(),
        kind: model.kind.as_str().to_owned(),
        aliases: model.aliases.clone(),
        dtype: model.dtype.map(|dtype| dtype.to_string()),
        device: model.device.to_string(),
        source: source.to_owned(),
    }
}

/// On first start with auth on and no active admin key in the store, creates
/// one and writes its secret to `<data_dir>/admin.key` (mode 0600, written to
/// a temporary name and renamed). The secret is never logged.
async fn ensure_admin_key(store: &Store, data_dir: &std::path::Path) -> Result<(), StartError> {
    if store.count_active_admin_keys(crate::auth::now_ms()).await? > 0 {
        return Ok(());
    }
    let created = store
        .create_api_key(&NewApiKey {
            label: "first admin key (created at install)".to_owned(),
            scopes: vec!["admin".to_owned()],
            tenant: None,
            expires_at_ms: None,
        })
        .await?;
    let path = data_dir.join("admin.key");
    if let Err(source) = write_secret_file(&path, &created.secret) {
        // A key nobody can read is no use: take it back before failing.
        let _best_effort = store
            .revoke_api_key(&created.record.id, crate::auth::now_ms())
            .await;
        return Err(StartError::AdminKeyFile { path, source });
    }
    tracing::warn!(
        key_id = %created.record.id,
        path = %path.display(),
        "created the first admin key; its secret is in this file (mode 0600) and is shown nowhere else"
    );
    Ok(())
}

pub(crate) fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

fn read_tls_file(key: &'static str, path: &std::path::Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::TlsFile {
        key,
        path: path.to_owned(),
        source,
    })
}

fn server_tls(
    tls: &crate::config::TlsConfig,
) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let identity = Identity::from_pem(
        read_tls_file("cert", &tls.cert)?,
        read_tls_file("key", &tls.key)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(client_ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read_tls_file(
                "client_ca",
                client_ca,
            )?))
            .client_auth_optional(false);
    }
    Ok(config)
}

/// An error with its sources, for messages that must say what went wrong.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
