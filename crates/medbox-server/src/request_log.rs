//! Writes one row per RPC to the store's request log, off the request path.
//!
//! Handlers hand a finished entry to a bounded queue; one task writes them.
//! When the queue is full (the database is slower than the traffic) the entry
//! is dropped with a warning rather than slowing the answer down.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use medbox_store::{NewRequestLog, Store};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::metrics::Metrics;

const QUEUE_CAPACITY: usize = 1024;

/// The sending side, cloned into every service.
#[derive(Clone)]
pub struct RequestLogger {
    tx: mpsc::Sender<NewRequestLog>,
    metrics: Arc<Metrics>,
}

impl RequestLogger {
    /// Starts the writer task; it ends when every logger clone is dropped and the queue drained.
    pub fn start(store: Store, metrics: Arc<Metrics>) -> (RequestLogger, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<NewRequestLog>(QUEUE_CAPACITY);
        let writer = tokio::spawn(async move {
            while let Some(entry) = rx.recv().await {
                if let Err(err) = store.record_request(&entry).await {
                    tracing::warn!(error = %err, method = %entry.method, "could not write the request log");
                }
            }
        });
        (RequestLogger { tx, metrics }, writer)
    }

    pub fn begin(&self, method: &'static str, client_addr: Option<SocketAddr>) -> RequestRecord {
        RequestRecord {
            logger: self.clone(),
            started: Instant::now(),
            started_at_ms: unix_millis(),
            method,
            client_addr,
            model: None,
            request_id: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            first_token: None,
            in_flight: false,
        }
    }
}

/// One RPC being served; `finish` writes it.
pub struct RequestRecord {
    logger: RequestLogger,
    started: Instant,
    started_at_ms: i64,
    method: &'static str,
    client_addr: Option<SocketAddr>,
    pub model: Option<String>,
    pub request_id: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    first_token: Option<Instant>,
    /// Counted in `medbox_requests_in_flight` until finished.
    in_flight: bool,
}

impl RequestRecord {
    /// The request now waits for or runs on the engine of `self.model`.
    pub fn submitted(&mut self) {
        if let Some(model) = &self.model {
            self.logger
                .metrics
                .requests_in_flight
                .with_label_values(&[model])
                .inc();
            self.in_flight = true;
        }
    }

    /// Notes the arrival of the first generated token (once).
    pub fn first_token(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
    }

    fn observe(&self, code: tonic::Code) {
        let metrics = &self.logger.metrics;
        let elapsed = self.started.elapsed();
        metrics.observe_request(self.method, code, elapsed);
        let Some(model) = &self.model else { return };
        if self.in_flight {
            metrics.requests_in_flight.with_label_values(&[model]).dec();
        }
        metrics
            .prompt_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(self.prompt_tokens));
        metrics
            .generation_tokens
            .with_label_values(&[model])
            .inc_by(u64::from(self.completion_tokens));
        if let Some(first) = self.first_token {
            metrics
                .time_to_first_token
                .with_label_values(&[model])
                .observe((first - self.started).as_secs_f64());
            if self.completion_tokens > 1 {
                metrics
                    .time_per_output_token
                    .with_label_values(&[model])
                    .observe(first.elapsed().as_secs_f64() / f64::from(self.completion_tokens - 1));
            }
        }
    }

    /// Writes the entry with its gRPC status code and, on failure, the error's kind.
    pub fn finish(self, code: tonic::Code, error_kind: Option<&str>) {
        self.observe(code);
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            method = self.method,
            model = self.model.as_deref().unwrap_or(""),
            request_id = self.request_id.as_deref().unwrap_or(""),
            code = ?code,
            error_kind = error_kind.unwrap_or(""),
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms,
            "request"
        );
        let entry = NewRequestLog {
            started_at_ms: self.started_at_ms,
            method: self.method.to_owned(),
            model: self.model,
            request_id: self.request_id,
            status_code: code as i32,
            error_kind: error_kind.map(str::to_owned),
            prompt_tokens: i64::from(self.prompt_tokens),
            completion_tokens: i64::from(self.completion_tokens),
            latency_ms,
            client_addr: self.client_addr.map(|addr| addr.to_string()),
        };
        if let Err(mpsc::error::TrySendError::Full(entry)) = self.logger.tx.try_send(entry) {
            tracing::warn!(method = %entry.method, "request log queue is full; entry dropped");
        }
    }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
