//! Who may call what: a tower layer in front of every gRPC service.
//!
//! Health checking and reflection stay open; every other RPC needs
//! `authorization: Bearer <key>` with the scope of its service (`admin`
//! grants every scope). The secret is checked by the store in constant time
//! against its SHA-256; nothing is cached, so a revoked key fails on the very
//! next request. A denied call is written to the audit trail like any other.
//! After authentication the per-key rate limits apply.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use medbox_store::{KeyCheck, Store};
use tonic::{Status, body::Body, transport::server::TcpConnectInfo};
use tower::{Layer, Service};

use crate::{deadline::RequestId, limits::KeyLimiter, request_log::RequestLogger};

/// The four scopes a key can carry.
pub const SCOPES: [&str; 4] = ["inference", "agents", "finetune", "admin"];

/// The authenticated caller, put in the request's extensions for the services.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub label: String,
    pub tenant: Option<String>,
}

/// What a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checking and reflection: no key.
    Open,
    /// A valid key with this scope (or `admin`).
    Scope(&'static str),
}

/// The access rule for a gRPC path such as `/medbox.v1.Inference/Generate`.
pub fn access_for(path: &str) -> Access {
    // Changing the catalogue is an administrator's work.
    if matches!(
        path,
        "/medbox.v1.Agents/CreateAgent" | "/medbox.v1.Agents/UpdateAgent"
    ) {
        return Access::Scope("admin");
    }
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Access::Open,
        "medbox.v1.Inference" => Access::Scope("inference"),
        "medbox.v1.Agents" => Access::Scope("agents"),
        "medbox.v1.FineTuning" => Access::Scope("finetune"),
        // Reading the knowledge base is what agents do; changing it is for
        // administrators.
        "medbox.v1.Knowledge" => match path.rsplit('/').next() {
            Some("Search" | "ListDocuments") => Access::Scope("agents"),
            _ => Access::Scope("admin"),
        },
        // Admin, and any path no service knows: only administrators.
        _ => Access::Scope("admin"),
    }
}

/// Everything the layer needs to decide.
pub struct Gatekeeper {
    pub store: Store,
    /// `false` only on a loopback listener (checked at start).
    pub enabled: bool,
    pub log: RequestLogger,
    pub limiter: Arc<KeyLimiter>,
}

/// Why a call is refused.
#[derive(Debug)]
enum Denial {
    MissingKey,
    MalformedHeader,
    UnknownKey,
    Revoked(String),
    Expired(String),
    MissingScope {
        key_id: String,
        scope: &'static str,
    },
    RateLimited {
        key_id: String,
        retry_after: Duration,
        what: &'static str,
    },
    StoreUnavailable,
}

impl Denial {
    fn kind(&self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_key",
            Denial::MalformedHeader => "malformed_authorization",
            Denial::UnknownKey => "unknown_key",
            Denial::Revoked(_) => "revoked_key",
            Denial::Expired(_) => "expired_key",
            Denial::MissingScope { .. } => "missing_scope",
            Denial::RateLimited { .. } => "rate_limited",
            Denial::StoreUnavailable => "store_unavailable",
        }
    }

    fn status(&self, path: &str) -> Status {
        match self {
            Denial::MissingKey => Status::unauthenticated(
                "missing API key: send metadata `authorization: Bearer <key>`",
            ),
            Denial::MalformedHeader => {
                Status::unauthenticated("the authorization metadata must be `Bearer <key>`")
            }
            Denial::UnknownKey => Status::unauthenticated("the API key is not valid"),
            Denial::Revoked(id) => Status::unauthenticated(format!("API key `{id}` was revoked")),
            Denial::Expired(id) => Status::unauthenticated(format!("API key `{id}` has expired")),
            Denial::MissingScope { key_id, scope } => Status::permission_denied(format!(
                "API key `{key_id}` lacks the scope `{scope}` needed for {}",
                path.trim_start_matches('/')
            )),
            Denial::RateLimited {
                key_id,
                retry_after,
                what,
            } => {
                let seconds = retry_after.as_secs_f64().max(0.001);
                let mut status = Status::resource_exhausted(format!(
                    "API key `{key_id}` is over its {what} limit; retry in {seconds:.3} s"
                ));
                if let Ok(value) = format!("{}", retry_after.as_millis().max(1)).parse() {
                    status.metadata_mut().insert("retry-after-ms", value);
                }
                status
            }
            Denial::StoreUnavailable => {
                Status::unavailable("cannot check the API key right now; retry shortly")
            }
        }
    }
}

impl Gatekeeper {
    async fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, (Denial, Option<Caller>)> {
        let Access::Scope(scope) = access_for(path) else {
            return Ok(None);
        };
        if !self.enabled {
            return Ok(None);
        }
        let secret = bearer_secret(headers).map_err(|denial| (denial, None))?;
        let record = match self.store.authenticate_api_key(secret, now_ms()).await {
            Ok(KeyCheck::Valid(record)) => record,
            Ok(KeyCheck::Unknown) => return Err((Denial::UnknownKey, None)),
            Ok(KeyCheck::Revoked(record)) => {
                let caller = caller_of(&record);
                return Err((Denial::Revoked(record.id), Some(caller)));
            }
            Ok(KeyCheck::Expired(record)) => {
                let caller = caller_of(&record);
                return Err((Denial::Expired(record.id), Some(caller)));
            }
            Err(err) => {
                tracing::error!(error = %err, "API key check failed");
                return Err((Denial::StoreUnavailable, None));
            }
        };
        let caller = caller_of(&record);
        let allowed = record
            .scopes
            .iter()
            .any(|held| held == scope || held == "admin");
        if !allowed {
            return Err((
                Denial::MissingScope {
                    key_id: record.id,
                    scope,
                },
                Some(caller),
            ));
        }
        if let Err(limited) = self.limiter.admit(&record.id) {
            return Err((
                Denial::RateLimited {
                    key_id: record.id,
                    retry_after: limited.retry_after,
                    what: limited.what,
                },
                Some(caller),
            ));
        }
        Ok(Some(caller))
    }
}

fn caller_of(record: &medbox_store::ApiKeyRecord) -> Caller {
    Caller {
        key_id: record.id.clone(),
        label: record.label.clone(),
        tenant: record.tenant.clone(),
    }
}

fn bearer_secret(headers: &http::HeaderMap) -> Result<&str, Denial> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(Denial::MissingKey)?;
    let text = value.to_str().map_err(|_| Denial::MalformedHeader)?;
    let secret = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or(Denial::MalformedHeader)?
        .trim();
    if secret.is_empty() {
        return Err(Denial::MissingKey);
    }
    Ok(secret)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The tower layer.
#[derive(Clone)]
pub struct AuthLayer {
    gatekeeper: Arc<Gatekeeper>,
}

impl AuthLayer {
    pub fn new(gatekeeper: Arc<Gatekeeper>) -> AuthLayer {
        AuthLayer { gatekeeper }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            gatekeeper: self.gatekeeper.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    gatekeeper: Arc<Gatekeeper>,
}

impl<S> Service<http::Request<Body>> for AuthService<S>
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
        // The clone that was polled ready is the one that must serve.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gatekeeper = self.gatekeeper.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            match gatekeeper.admit(&path, request.headers()).await {
                Ok(caller) => {
                    if let Some(caller) = caller {
                        request.extensions_mut().insert(caller);
                    }
                    inner.call(request).await
                }
                Err((denial, caller)) => {
                    let remote = request
                        .extensions()
                        .get::<TcpConnectInfo>()
                        .and_then(TcpConnectInfo::remote_addr)
                        .or_else(|| remote_addr_of_tls(&request));
                    tracing::info!(
                        method = %path,
                        key_id = caller.as_ref().map(|c| c.key_id.as_str()).unwrap_or(""),
                        reason = denial.kind(),
                        "request denied"
                    );
                    let status = denial.status(&path);
                    let record = gatekeeper.log.begin(
                        path.trim_start_matches('/').to_owned(),
                        remote,
                        caller.as_ref(),
                        request.extensions().get::<RequestId>(),
                    );
                    record.finish(status.code(), Some(denial.kind()));
                    Ok(status.into_http())
                }
            }
        })
    }
}

fn remote_addr_of_tls(request: &http::Request<Body>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.get_ref().remote_addr())
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn every_service_maps_to_its_scope() {
        let check = |path: &str, expect: Access| assert_eq!(access_for(path), expect, "{path}");
        check("/grpc.health.v1.Health/Check", Access::Open);
        check("/grpc.health.v1.Health/Watch", Access::Open);
        check(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Access::Open,
        );
        check(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            Access::Open,
        );
        check("/medbox.v1.Inference/Generate", Access::Scope("inference"));
        check("/medbox.v1.Agents/RunAgent", Access::Scope("agents"));
        check("/medbox.v1.Agents/CreateAgent", Access::Scope("admin"));
        check("/medbox.v1.FineTuning/CreateJob", Access::Scope("finetune"));
        check("/medbox.v1.Admin/Status", Access::Scope("admin"));
        check("/medbox.v1.Knowledge/Search", Access::Scope("agents"));
        check(
            "/medbox.v1.Knowledge/ListDocuments",
            Access::Scope("agents"),
        );
        check("/medbox.v1.Knowledge/AddDocument", Access::Scope("admin"));
        check(
            "/medbox.v1.Knowledge/DeleteDocument",
            Access::Scope("admin"),
        );
        check("/medbox.v1.Knowledge/Unknown", Access::Scope("admin"));
        check("/some.other.Service/Call", Access::Scope("admin"));
    }

    #[test]
    fn the_bearer_header_is_parsed_strictly() {
        let headers = |value: &str| {
            let mut map = http::HeaderMap::new();
            map.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            map
        };
        assert_eq!(bearer_secret(&headers("Bearer abc")).ok(), Some("abc"));
        assert!(matches!(
            bearer_secret(&headers("Basic abc")),
            Err(Denial::MalformedHeader)
        ));
        assert!(matches!(
            bearer_secret(&headers("Bearer ")),
            Err(Denial::MissingKey)
        ));
        assert!(matches!(
            bearer_secret(&http::HeaderMap::new()),
            Err(Denial::MissingKey)
        ));
        let path = "/medbox.v1.Inference/Generate";
        assert_eq!(
            Denial::MissingKey.status(path).code(),
            Code::Unauthenticated
        );
        let scope = Denial::MissingScope {
            key_id: "mbk_1".into(),
            scope: "inference",
        };
        let status = scope.status(path);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("`inference`"));
    }
}
