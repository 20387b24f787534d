//! Two outer tower layers every RPC passes through first:
//!
//! - `RequestIdLayer` gives the call a request id (the client's
//!   `x-request-id` metadata when it sent a sane one, else a fresh one),
//!   returns it in the `x-request-id` response header, puts it in the request
//!   extensions for the audit record, and runs the call — handler and
//!   response body — inside a `rpc` span carrying it, so that every log line
//!   of the call names it.
//! - `DeadlineLayer` ends a call at its method's default deadline when the
//!   client set none (or a later one): `DEADLINE_EXCEEDED`, before the
//!   response or as the trailers of a stream. Dropping the handler or the
//!   body on expiry drops the engine's stream, which frees the sequence's
//!   place in the batch at the engine's next step. Tonic's own server-wide
//!   timeout stays as the outer cap.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

/// The id of one RPC, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_CLIENT_ID_LENGTH: usize = 64;

#[derive(Clone)]
pub struct RequestIdLayer {
    prefix: Arc<str>,
    counter: Arc<AtomicU64>,
}

impl RequestIdLayer {
    /// Ids are a per-process random prefix and a counter: unique across
    /// restarts without a lookup.
    pub fn new() -> RequestIdLayer {
        RequestIdLayer {
            prefix: format!("{:08x}", rand::random::<u32>()).into(),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    fn next_id(&self) -> String {
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{count:x}", self.prefix)
    }
}

impl Default for RequestIdLayer {
    fn default() -> Self {
        RequestIdLayer::new()
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> RequestIdService<S> {
        RequestIdService {
            inner,
            ids: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: S,
    ids: RequestIdLayer,
}

/// A client-chosen id is kept only when it is short, visible ASCII.
fn client_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let sane = !value.is_empty()
        && value.len() <= MAX_CLIENT_ID_LENGTH
        && value.bytes().all(|byte| byte.is_ascii_graphic());
    sane.then(|| value.to_owned())
}

impl<S> Service<http::Request<Body>> for RequestIdService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let id = client_id(request.headers()).unwrap_or_else(|| self.ids.next_id());
        let span = tracing::info_span!("rpc", request_id = %id, method = %request.uri().path());
        request.extensions_mut().insert(RequestId(id.clone()));
        let body_span = span.clone();
        Box::pin(
            async move {
                let mut response = inner.call(request).await?;
                if let Ok(value) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                Ok(response.map(|body| {
                    Body::new(SpannedBody {
                        body,
                        span: body_span,
                    })
                }))
            }
            .instrument(span),
        )
    }
}

/// A response body polled inside its RPC's span, so that what a stream
/// logs while it runs carries the request id.
struct SpannedBody {
    body: Body,
    span: tracing::Span,
}

impl http_body::Body for SpannedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Default deadlines by method, `Service.Method` (e.g. `Inference.Embed`).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodDeadlines {
    default: Duration,
    per_method: HashMap<String, Duration>,
}

/// Quick methods that should never hang: 30 s unless configured otherwise.
const QUICK_METHODS: &[&str] = &[
    "Inference.Tokenize",
    "Inference.ListModels",
    "Admin.ListModels",
    "Admin.Status",
    "Admin.CreateApiKey",
    "Admin.RevokeApiKey",
    "Admin.ListApiKeys",
    "Knowledge.ListDocuments",
];
const QUICK_DEADLINE: Duration = Duration::from_secs(30);
/// Calls that last as long as their work: watching a training job, and
/// uploading a large dataset.
const LONG_METHODS: &[(&str, Duration)] = &[
    ("FineTuning.WatchJob", Duration::from_secs(7 * 24 * 3600)),
    ("FineTuning.UploadDataset", Duration::from_secs(3600)),
];
/// Services whose methods may be named in `limits.method_timeout_seconds`.
pub const KNOWN_SERVICES: &[&str] = &["Inference", "Admin", "FineTuning", "Agents", "Knowledge"];

impl MethodDeadlines {
    /// `default` for every method not in `QUICK_METHODS` or `configured`.
    pub fn new(default: Duration, configured: &HashMap<String, f64>) -> MethodDeadlines {
        let mut per_method: HashMap<String, Duration> = QUICK_METHODS
            .iter()
            .map(|method| ((*method).to_owned(), QUICK_DEADLINE.min(default)))
            .chain(
                LONG_METHODS
                    .iter()
                    .map(|(method, deadline)| ((*method).to_owned(), (*deadline).max(default))),
            )
            .collect();
        for (method, seconds) in configured {
            per_method.insert(method.clone(), Duration::from_secs_f64(*seconds));
        }
        MethodDeadlines {
            default,
            per_method,
        }
    }

    /// The longest deadline any method has (tonic's outer cap).
    pub fn longest(&self) -> Duration {
        self.per_method
            .values()
            .copied()
            .chain([self.default])
            .max()
            .unwrap_or(self.default)
    }

    /// The deadline of a gRPC path (`/medbox.v1.Inference/Generate`); `None`
    /// for paths outside medbox's services (health, reflection).
    fn for_path(&self, path: &str) -> Option<Duration> {
        let (service, method) = path.strip_prefix("/medbox.v1.")?.split_once('/')?;
        let key = format!("{service}.{method}");
        Some(self.per_method.get(&key).copied().unwrap_or(self.default))
    }
}

/// Parses a `grpc-timeout` header value: digits then one of H M S m u n.
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[derive(Clone)]
pub struct DeadlineLayer {
    deadlines: Arc<MethodDeadlines>,
}

impl DeadlineLayer {
    pub fn new(deadlines: MethodDeadlines) -> DeadlineLayer {
        DeadlineLayer {
            deadlines: Arc::new(deadlines),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> DeadlineService<S> {
        DeadlineService {
            inner,
            deadlines: self.deadlines.clone(),
        }
    }
}

#[derive(Clone)]
pub struct DeadlineService<S> {
    inner: S,
    deadlines: Arc<MethodDeadlines>,
}

impl<S> Service<http::Request<Body>> for DeadlineService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(method_deadline) = self.deadlines.for_path(request.uri().path()) else {
            return Box::pin(inner.call(request));
        };
        // The client's deadline is honoured when it is the sooner one.
        let (deadline, from_client) = match client_timeout(request.headers()) {
            Some(client) if client < method_deadline => (client, true),
            _ => (method_deadline, false),
        };
        let expires = tokio::time::Instant::now() + deadline;
        Box::pin(async move {
            match tokio::time::timeout_at(expires, inner.call(request)).await {
                Ok(response) => Ok(response?.map(|body| {
                    Body::new(DeadlineBody {
                        body: Some(body),
                        sleep: Box::pin(tokio::time::sleep_until(expires)),
                        deadline,
                        from_client,
                    })
                })),
                Err(_elapsed) => Ok(expired(deadline, from_client).into_http()),
            }
        })
    }
}

fn expired(deadline: Duration, from_client: bool) -> Status {
    tracing::info!(
        deadline_ms = deadline.as_millis() as u64,
        from_client,
        "deadline exceeded; the call is ended"
    );
    if from_client {
        Status::deadline_exceeded(format!(
            "deadline of {} ms (the client's) exceeded",
            deadline.as_millis()
        ))
    } else {
        Status::deadline_exceeded(format!(
            "the method's default deadline of {:.1} s was exceeded; send a grpc-timeout to set your own (up to that)",
            deadline.as_secs_f64()
        ))
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers when the
/// deadline passes mid-stream, dropping the inner body (and with it the
/// engine's stream) at once.
struct DeadlineBody {
    body: Option<Body>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    deadline: Duration,
    from_client: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
            if frame.is_none() {
                this.body = None;
            }
            return Poll::Ready(frame);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.body = None;
        let status = expired(this.deadline, this.from_client);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
        if let Ok(message) = HeaderValue::from_str(status.message()) {
            trailers.insert("grpc-message", message);
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|body| body.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse() {
        let header = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(value).unwrap());
            client_timeout(&headers)
        };
        assert_eq!(header("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(header("2S"), Some(Duration::from_secs(2)));
        assert_eq!(header("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(header("5x"), None);
        assert_eq!(header("S"), None);
    }

    #[test]
    fn methods_get_their_deadline() {
        let configured = HashMap::from([("Inference.Embed".to_owned(), 5.0)]);
        let deadlines = MethodDeadlines::new(Duration::from_secs(600), &configured);
        let of = |path| deadlines.for_path(path);
        assert_eq!(
            of("/medbox.v1.Inference/Generate"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            of("/medbox.v1.Inference/Tokenize"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            of("/medbox.v1.Inference/Embed"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            of("/medbox.v1.FineTuning/WatchJob"),
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        assert_eq!(deadlines.longest(), Duration::from_secs(7 * 24 * 3600));
    }

    #[test]
    fn only_sane_client_ids_are_kept() {
        let id = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(REQUEST_ID_HEADER, HeaderValue::from_str(value).unwrap());
            client_id(&headers)
        };
        assert_eq!(id("ward-7/abc"), Some("ward-7/abc".into()));
        assert_eq!(id("has space"), None);
        assert_eq!(id(&"x".repeat(65)), None);
    }
}
