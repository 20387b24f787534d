//! Start-up and shutdown of `medboxd`: configuration checked, store opened,
//! gRPC bound, models loaded in the background, and a graceful stop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use medbox_proto::v1::{admin_server::AdminServer, inference_server::InferenceServer};
use medbox_store::{NewModel, Store, StoreError};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::AdminService,
    config::{Config, ConfigError, ValidModelConfig},
    inference::InferenceService,
    metrics::{self, Metrics},
    request_log::RequestLogger,
    router::ModelRouter,
    state::AppState,
};

/// How long the request-log writer may take to drain at shutdown.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
        store.upsert_model(&registry_entry(model)).await?;
    }
    tracing::info!(backend = store.backend().as_str(), "store open");

    let router = Arc::new(ModelRouter::new(models));
    let (log, log_writer) = RequestLogger::start(store.clone(), metrics.clone());
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
    let loader = {
        let router = router.clone();
        let health = health.clone();
        tokio::spawn(async move {
            router.load_all().await;
            health
                .set_serving::<InferenceServer<InferenceService>>()
                .await;
            tracing::info!("all configured models tried; Inference is SERVING");
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
    if let Some(listener) = metrics_listener {
        let router = router.clone();
        let refresh = move |metrics: &Metrics| {
            metrics.models.reset();
            for view in router.views() {
                metrics.models.with_label_values(&[view.state]).inc();
            }
        };
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(listener, metrics, refresh, token).await {
                tracing::error!(error = %err, "the metrics endpoint failed");
            }
        });
    }
    let serve = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InferenceServer::new(InferenceService::new(state.clone())))
        .add_service(AdminServer::new(AdminService::new(state)))
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

fn registry_entry(model: &ValidModelConfig) -> NewModel {
    NewModel {
        name: model.name.clone(),
        path: model.path.display().to_string(),
        kind: model.kind.as_str().to_owned(),
        aliases: model.aliases.clone(),
        dtype: model.dtype.map(|dtype| dtype.to_string()),
        device: model.device.to_string(),
        source: "config".to_owned(),
    }
}
