//! Records every RPC, off the request path: one row in the request log (for
//! operations) and one event in the hash-chained audit trail (for
//! compliance), plus the Prometheus counters.
//!
//! Handlers (and the auth layer, for denied calls) hand a finished record to
//! a bounded queue; one task writes them in order. When the queue is full
//! (the database is slower than the traffic) the entry is dropped with an
//! error log rather than slowing the answer down.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use medbox_store::{NewAuditEvent, NewRequestLog, Store};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    auth::Caller, deadline::RequestId, error::ApiError, limits::KeyLimiter, metrics::Metrics,
};

const QUEUE_CAPACITY: usize = 1024;

/// The sending side, cloned into every service.
#[derive(Clone)]
pub struct RequestLogger {
    tx: mpsc::Sender<Entry>,
    metrics: Arc<Metrics>,
    limiter: Arc<KeyLimiter>,
    /// `[audit] store_text`: keep prompt and answer text in the audit event.
    store_text: bool,
}

impl RequestLogger {
    /// Starts the writer task; it ends when every logger clone is dropped and the queue drained.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        limiter: Arc<KeyLimiter>,
        store_text: bool,
    ) -> (RequestLogger, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE_CAPACITY);
        let writer = tokio::spawn(async move {
            while let Some(entry) = rx.recv().await {
                match entry {
                    Entry::Finished(finished) => {
                        let (request, audit) = *finished;
                        if let Err(err) = store.append_audit_event(&audit).await {
                            tracing::error!(error = %err, method = %audit.method, "could not append to the audit trail");
                        }
                        if let Err(err) = store.record_request(&request).await {
                            tracing::warn!(error = %err, method = %request.method, "could not write the request log");
                        }
                    }
                    Entry::Flush(done) => {
                        let _caller_may_be_gone = done.send(());
                    }
                }
            }
        });
        (
            RequestLogger {
                tx,
                metrics,
                limiter,
                store_text,
            },
            writer,
        )
    }

    /// Waits until everything recorded so far is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Entry::Flush(done)).await.is_ok() {
            let _writer_may_be_gone = written.await;
        }
    }

    /// Starts the record of an RPC a service is handling.
    pub fn begin_for<T>(&self, method: &'static str, request: &tonic::Request<T>) -> RequestRecord {
        self.begin(
            method.to_owned(),
            request.remote_addr(),
            request.extensions().get::<Caller>(),
            request.extensions().get::<RequestId>(),
        )
    }

    /// Starts the record of an RPC; `method` is the gRPC path without its
    /// leading slash, e.g. `medbox.v1.Inference/Generate`.
    pub fn begin(
        &self,
        method: String,
        client_addr: Option<SocketAddr>,
        caller: Option<&Caller>,
        request_id: Option<&RequestId>,
    ) -> RequestRecord {
        RequestRecord {
            logger: self.clone(),
            caller: caller.cloned(),
            started: Instant::now(),
            started_at_ms: crate::auth::now_ms(),
            method,
            client_addr,
            model: None,
            request_id: request_id.map(|id| id.0.clone()),
            prompt_tokens: 0,
            completion_tokens: 0,
            first_token: None,
            in_flight: false,
            written: false,
            text: None,
        }
    }
}

/// What the writer task receives.
enum Entry {
    Finished(Box<(NewRequestLog, NewAuditEvent)>),
    Flush(oneshot::Sender<()>),
}

/// One RPC being served; `finish` writes it.
pub struct RequestRecord {
    logger: RequestLogger,
    caller: Option<Caller>,
    started: Instant,
    started_at_ms: i64,
    method: String,
    client_addr: Option<SocketAddr>,
    pub model: Option<String>,
    pub request_id: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    first_token: Option<Instant>,
    /// Counted in `medbox_requests_in_flight` until finished.
    in_flight: bool,
    /// Written already (by `finish`, or by `drop` for an abandoned RPC).
    written: bool,
    /// Prompt and answer so far, kept only when `[audit] store_text` is on.
    text: Option<(String, String)>,
}

impl Drop for RequestRecord {
    /// An RPC whose handler was dropped (the client went away, or its
    /// deadline passed) is still recorded.
    fn drop(&mut self) {
        if !self.written {
            self.write(tonic::Code::Cancelled, Some("abandoned"));
        }
    }
}

impl RequestRecord {
    /// The client's own `request_id` field, when it set one, replaces the
    /// id the server gave the call. Returns the id to echo back.
    pub fn adopt_client_request_id(&mut self, client: &str) -> String {
        if !client.is_empty() {
            self.request_id = Some(client.to_owned());
        }
        self.request_id.clone().unwrap_or_default()
    }

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

    /// Keeps the prompt for the audit event, when the configuration asks.
    pub fn prompt_text(&mut self, prompt: impl FnOnce() -> String) {
        if self.logger.store_text {
            self.text = Some((prompt(), String::new()));
        }
    }

    /// Adds answer text for the audit event, when the prompt is being kept.
    pub fn answer_text(&mut self, text: &str) {
        if let Some((_, answer)) = &mut self.text {
            answer.push_str(text);
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
        metrics.observe_request(&self.method, code, elapsed);
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
    pub fn finish(mut self, code: tonic::Code, error_kind: Option<&str>) {
        self.write(code, error_kind);
    }

    /// Writes the entry of a failed call and gives the client's status.
    pub fn fail(self, error: ApiError) -> tonic::Status {
        self.finish(error.code(), Some(error.kind()));
        error.into()
    }

    /// Writes the entry and answers a unary call: the message, or the
    /// error's status.
    pub fn answer<T>(
        self,
        result: Result<T, ApiError>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        match result {
            Ok(message) => {
                self.finish(tonic::Code::Ok, None);
                Ok(tonic::Response::new(message))
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    fn write(&mut self, code: tonic::Code, error_kind: Option<&str>) {
        self.written = true;
        self.observe(code);
        if let Some(caller) = &self.caller {
            self.logger
                .limiter
                .charge_tokens(&caller.key_id, self.completion_tokens);
        }
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            method = %self.method,
            key_id = self.caller.as_ref().map(|caller| caller.key_id.as_str()).unwrap_or(""),
            tenant = self.caller.as_ref().and_then(|caller| caller.tenant.as_deref()).unwrap_or(""),
            model = self.model.as_deref().unwrap_or(""),
            request_id = self.request_id.as_deref().unwrap_or(""),
            code = ?code,
            error_kind = error_kind.unwrap_or(""),
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms,
            "request"
        );
        let client_addr = self.client_addr.map(|addr| addr.to_string());
        let audit = NewAuditEvent {
            at_ms: self.started_at_ms,
            key_id: self.caller.as_ref().map(|caller| caller.key_id.clone()),
            key_label: self.caller.as_ref().map(|caller| caller.label.clone()),
            method: self.method.clone(),
            target: self.model.clone(),
            status_code: code as i32,
            error_kind: error_kind.map(str::to_owned),
            latency_us: i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX),
            prompt_tokens: i64::from(self.prompt_tokens),
            completion_tokens: i64::from(self.completion_tokens),
            request_id: self.request_id.clone(),
            client_addr: client_addr.clone(),
            detail: self.text.take().map(|(prompt, answer)| {
                serde_json::json!({"prompt": prompt, "answer": answer}).to_string()
            }),
        };
        let request = NewRequestLog {
            started_at_ms: self.started_at_ms,
            method: std::mem::take(&mut self.method),
            model: self.model.take(),
            request_id: self.request_id.take(),
            status_code: code as i32,
            error_kind: error_kind.map(str::to_owned),
            prompt_tokens: i64::from(self.prompt_tokens),
            completion_tokens: i64::from(self.completion_tokens),
            latency_ms,
            client_addr,
        };
        let entry = Entry::Finished(Box::new((request, audit)));
        if let Err(mpsc::error::TrySendError::Full(_)) = self.logger.tx.try_send(entry) {
            tracing::error!("the audit queue is full; an RPC record was dropped");
        }
    }
}
