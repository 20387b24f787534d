//! Prometheus metrics, served on their own local port (`server.metrics_listen`)
//! so that a scraper never shares the gRPC port and never sees prompts.
//!
//! Names follow what operators already chart for vLLM and TGI, with a
//! `medbox_` prefix; `docs/metrics.md` lists them.

use std::{sync::Arc, time::Duration};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every metric medboxd exports.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub time_per_output_token: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub requests_in_flight: IntGaugeVec,
    pub requests_waiting: IntGaugeVec,
    pub requests_running: IntGaugeVec,
    pub engine_steps: IntCounterVec,
    pub prefix_cache_tokens: IntCounterVec,
    pub preemptions: IntCounterVec,
    pub models: IntGaugeVec,
    pub jobs: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const PER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "medbox_requests_total",
                "RPCs served, by method and gRPC status code",
            ),
            &["method", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "medbox_request_duration_seconds",
                "End-to-end RPC latency, by method",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "medbox_time_to_first_token_seconds",
                "From request arrival to the first generated token, by model",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let time_per_output_token = HistogramVec::new(
            HistogramOpts::new(
                "medbox_time_per_output_token_seconds",
                "Mean inter-token latency of a request after its first token, by model",
            )
            .buckets(PER_TOKEN_BUCKETS.to_vec()),
            &["model"],
        )?;
        let prompt_tokens = IntCounterVec::new(
            Opts::new(
                "medbox_prompt_tokens_total",
                "Prompt tokens processed, by model",
            ),
            &["model"],
        )?;
        let generation_tokens = IntCounterVec::new(
            Opts::new(
                "medbox_generation_tokens_total",
                "Tokens generated, by model",
            ),
            &["model"],
        )?;
        let requests_in_flight = IntGaugeVec::new(
            Opts::new(
                "medbox_requests_in_flight",
                "Generation requests submitted to a model's engine and not finished (waiting or running)",
            ),
            &["model"],
        )?;
        let requests_waiting = IntGaugeVec::new(
            Opts::new(
                "medbox_num_requests_waiting",
                "Requests in a model engine's queue, not yet started",
            ),
            &["model"],
        )?;
        let requests_running = IntGaugeVec::new(
            Opts::new(
                "medbox_num_requests_running",
                "Sequences a model engine is generating now (its batch)",
            ),
            &["model"],
        )?;
        let engine_steps = IntCounterVec::new(
            Opts::new(
                "medbox_engine_steps_total",
                "Forward passes of a model's engine (one per batched decoding step)",
            ),
            &["model"],
        )?;
        let prefix_cache_tokens = IntCounterVec::new(
            Opts::new(
                "medbox_prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values were reused from the prefix cache",
            ),
            &["model"],
        )?;
        let preemptions = IntCounterVec::new(
            Opts::new(
                "medbox_num_preemptions_total",
                "Sequences sent back to the queue because the KV cache was full",
            ),
            &["model"],
        )?;
        let models = IntGaugeVec::new(
            Opts::new(
                "medbox_models",
                "Configured models, by state (loading, ready, failed)",
            ),
            &["state"],
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new(
                "medbox_jobs",
                "Fine-tuning jobs, by state (queued, running, succeeded, failed, cancelled)",
            ),
            &["state"],
        )?;
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(time_per_output_token.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(generation_tokens.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(requests_waiting.clone()),
            Box::new(requests_running.clone()),
            Box::new(engine_steps.clone()),
            Box::new(prefix_cache_tokens.clone()),
            Box::new(preemptions.clone()),
            Box::new(models.clone()),
            Box::new(jobs.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            time_to_first_token,
            time_per_output_token,
            prompt_tokens,
            generation_tokens,
            requests_in_flight,
            requests_waiting,
            requests_running,
            engine_steps,
            prefix_cache_tokens,
            preemptions,
            models,
            jobs,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Brings `counter{model}` up to an engine's own running total. A
    /// total below the exported one means the model was reloaded: the
    /// series restarts, which Prometheus reads as a counter reset.
    pub fn sync_counter(counter: &IntCounterVec, model: &str, total: u64) {
        let series = counter.with_label_values(&[model]);
        let exported = series.get();
        if total < exported {
            series.reset();
            series.inc_by(total);
        } else {
            series.inc_by(total - exported);
        }
    }

    /// Records one finished RPC.
    pub fn observe_request(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .with_label_values(&[method, code_name(code)])
            .inc();
        self.request_duration
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }
}

/// The canonical upper-case name of a gRPC status code, as dashboards show it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` until `shutdown` is cancelled; `refresh` updates
/// the gauges that are read rather than counted (model states) before each scrape.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    refresh: impl Fn(&Metrics) + Clone + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let refresh = refresh.clone();
            async move {
                refresh(&metrics);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
