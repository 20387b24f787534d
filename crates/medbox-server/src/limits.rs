//! Per-key limits and the global admission gate.
//!
//! Per key: requests per second with a burst, and generated tokens per
//! minute, each a token bucket. Tokens are charged when a generation
//! finishes, so a key may overdraw once; it is then refused until the bucket
//! refills. Globally: at most `max_concurrent_requests` RPCs in flight, and
//! the next one is shed at once with RESOURCE_EXHAUSTED rather than queued.
//!
//! The buckets sit behind a plain mutex held for a few arithmetic operations,
//! never across an `.await`.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

/// Limits that apply to every key, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct KeyLimits {
    pub requests_per_second: f64,
    pub burst: f64,
    /// `None`: no limit on generated tokens.
    pub tokens_per_minute: Option<f64>,
}

/// Why a key was refused, and when to come back.
pub struct Limited {
    pub retry_after: Duration,
    pub what: &'static str,
}

struct Bucket {
    level: f64,
    capacity: f64,
    per_second: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: f64, per_second: f64, now: Instant) -> Bucket {
        Bucket {
            level: capacity,
            capacity,
            per_second,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// Time until the level reaches `needed`.
    fn wait_for(&self, needed: f64) -> Duration {
        if self.per_second <= 0.0 {
            return Duration::from_secs(3600);
        }
        Duration::from_secs_f64(((needed - self.level) / self.per_second).max(0.0))
    }
}

struct KeyState {
    requests: Bucket,
    tokens: Option<Bucket>,
}

/// The buckets of every key seen since start.
pub struct KeyLimiter {
    limits: KeyLimits,
    keys: Mutex<HashMap<String, KeyState>>,
}

impl KeyLimiter {
    pub fn new(limits: KeyLimits) -> KeyLimiter {
        KeyLimiter {
            limits,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn with_key<T>(&self, key_id: &str, now: Instant, f: impl FnOnce(&mut KeyState) -> T) -> T {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let limits = self.limits;
        let state = keys.entry(key_id.to_owned()).or_insert_with(|| KeyState {
            requests: Bucket::full(limits.burst, limits.requests_per_second, now),
            tokens: limits
                .tokens_per_minute
                .map(|per_minute| Bucket::full(per_minute, per_minute / 60.0, now)),
        });
        f(state)
    }

    /// Takes one request from the key's bucket, or says when to retry.
    pub fn admit(&self, key_id: &str) -> Result<(), Limited> {
        self.admit_at(key_id, Instant::now())
    }

    fn admit_at(&self, key_id: &str, now: Instant) -> Result<(), Limited> {
        self.with_key(key_id, now, |state| {
            if let Some(tokens) = &mut state.tokens {
                tokens.refill(now);
                if tokens.level <= 0.0 {
                    return Err(Limited {
                        retry_after: tokens.wait_for(1.0),
                        what: "generated tokens per minute",
                    });
                }
            }
            state.requests.refill(now);
            if state.requests.level < 1.0 {
                return Err(Limited {
                    retry_after: state.requests.wait_for(1.0),
                    what: "requests per second",
                });
            }
            state.requests.level -= 1.0;
            Ok(())
        })
    }

    /// Charges generated tokens to the key (after the fact).
    pub fn charge_tokens(&self, key_id: &str, tokens: u32) {
        let now = Instant::now();
        self.with_key(key_id, now, |state| {
            if let Some(bucket) = &mut state.tokens {
                bucket.refill(now);
                bucket.level -= f64::from(tokens);
            }
        });
    }
}

/// The global concurrency gate as a tower layer: the permit lives as long as
/// the response body, so a stream holds its place until its last chunk.
#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl AdmissionLayer {
    pub fn new(max_concurrent_requests: usize) -> AdmissionLayer {
        AdmissionLayer {
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            limit: max_concurrent_requests,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService {
            inner,
            permits: self.permits.clone(),
            limit: self.limit,
        }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S> Service<http::Request<Body>> for AdmissionService<S>
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
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let limit = self.limit;
            tracing::warn!(
                limit,
                path = request.uri().path(),
                "over the concurrency limit; request shed"
            );
            let status = Status::resource_exhausted(format!(
                "medboxd is serving its maximum of {limit} concurrent requests; retry shortly"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(response.map(|body| {
                Body::new(PermitBody {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body that releases its admission permit when it is dropped.
struct PermitBody {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_bucket_refills_at_its_rate() {
        let limiter = KeyLimiter::new(KeyLimits {
            requests_per_second: 2.0,
            burst: 3.0,
            tokens_per_minute: None,
        });
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.admit_at("k", start).is_ok());
        }
        let refused = limiter.admit_at("k", start).unwrap_err();
        assert_eq!(refused.what, "requests per second");
        assert!((refused.retry_after.as_secs_f64() - 0.5).abs() < 1e-6);
        // Another key has its own bucket.
        assert!(limiter.admit_at("other", start).is_ok());
        assert!(
            limiter
                .admit_at("k", start + Duration::from_millis(500))
                .is_ok()
        );
    }

    #[test]
    fn generated_tokens_are_charged_after_the_fact() {
        let limiter = KeyLimiter::new(KeyLimits {
            requests_per_second: 100.0,
            burst: 100.0,
            tokens_per_minute: Some(600.0),
        });
        assert!(limiter.admit("k").is_ok());
        limiter.charge_tokens("k", 700);
        let refused = limiter.admit("k").unwrap_err();
        assert_eq!(refused.what, "generated tokens per minute");
        // 100 tokens overdrawn at 10 tokens/s: about 10 s.
        assert!(refused.retry_after > Duration::from_secs(9));
    }
}
