//! The request log: one append-only row per RPC medboxd served.

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError};

/// Rows returned by [`Store::list_requests`] when the filter's `limit` is 0.
pub const DEFAULT_REQUEST_LIMIT: u32 = 100;
/// The most rows one [`Store::list_requests`] call returns.
pub const MAX_REQUEST_LIMIT: u32 = 10_000;

/// One finished RPC, as the server hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequestLog {
    pub started_at_ms: i64,
    /// The gRPC method, e.g. `medbox.v1.Inference/Generate`.
    pub method: String,
    pub model: Option<String>,
    /// The client's `request_id`, when it sent one.
    pub request_id: Option<String>,
    /// The gRPC status code (0 = OK).
    pub status_code: i32,
    /// The error's kind label when the RPC failed.
    pub error_kind: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: f64,
    pub client_addr: Option<String>,
}

/// A stored request log row.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLog {
    pub id: i64,
    pub started_at_ms: i64,
    pub method: String,
    pub model: Option<String>,
    pub request_id: Option<String>,
    pub status_code: i32,
    pub error_kind: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: f64,
    pub client_addr: Option<String>,
}

/// Which rows [`Store::list_requests`] returns, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only requests started at or after this time (unix milliseconds).
    pub since_ms: Option<i64>,
    /// Only this exact method.
    pub method: Option<String>,
    /// At most this many rows; 0 means [`DEFAULT_REQUEST_LIMIT`], and more than
    /// [`MAX_REQUEST_LIMIT`] is capped.
    pub limit: u32,
}

impl RequestFilter {
    fn effective_limit(&self) -> i64 {
        match self.limit {
            0 => i64::from(DEFAULT_REQUEST_LIMIT),
            limit => i64::from(limit.min(MAX_REQUEST_LIMIT)),
        }
    }
}

const REQUEST_COLUMNS: &str = "id, started_at_ms, method, model, request_id, status_code, \
     error_kind, prompt_tokens, completion_tokens, latency_ms, client_addr";

impl Store {
    /// Appends one row and returns its id.
    pub async fn record_request(&self, entry: &NewRequestLog) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO request_log (started_at_ms, method, model, request_id, status_code, \
                 error_kind, prompt_tokens, completion_tokens, latency_ms, client_addr) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             RETURNING id",
        )
        .bind(entry.started_at_ms)
        .bind(&entry.method)
        .bind(entry.model.as_deref())
        .bind(entry.request_id.as_deref())
        .bind(entry.status_code)
        .bind(entry.error_kind.as_deref())
        .bind(entry.prompt_tokens)
        .bind(entry.completion_tokens)
        .bind(entry.latency_ms)
        .bind(entry.client_addr.as_deref())
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::query("recording a request"))?;
        row.try_get("id")
            .map_err(StoreError::query("reading a recorded request's id"))
    }

    /// Requests matching `filter`, newest first (by start time, then id).
    pub async fn list_requests(
        &self,
        filter: &RequestFilter,
    ) -> Result<Vec<RequestLog>, StoreError> {
        let mut conditions = Vec::new();
        let mut parameter = 0;
        let mut next_parameter = || {
            parameter += 1;
            parameter
        };
        if filter.since_ms.is_some() {
            conditions.push(format!("started_at_ms >= ${}", next_parameter()));
        }
        if filter.method.is_some() {
            conditions.push(format!("method = ${}", next_parameter()));
        }
        let where_clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM request_log {where_clause} \
             ORDER BY started_at_ms DESC, id DESC LIMIT ${}",
            next_parameter()
        );

        // Bind in the order the placeholders were numbered above.
        let mut query = sqlx::query(&sql);
        if let Some(since_ms) = filter.since_ms {
            query = query.bind(since_ms);
        }
        if let Some(method) = &filter.method {
            query = query.bind(method.as_str());
        }
        let rows = query
            .bind(filter.effective_limit())
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing requests"))?;
        rows.iter()
            .map(request_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the request list"))
    }
}

fn request_from_row(row: &AnyRow) -> Result<RequestLog, sqlx::Error> {
    Ok(RequestLog {
        id: row.try_get("id")?,
        started_at_ms: row.try_get("started_at_ms")?,
        method: row.try_get("method")?,
        model: row.try_get("model")?,
        request_id: row.try_get("request_id")?,
        status_code: row.try_get("status_code")?,
        error_kind: row.try_get("error_kind")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        latency_ms: row.try_get("latency_ms")?,
        client_addr: row.try_get("client_addr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_zero_means_default_and_large_limits_are_capped() {
        let check = |limit: u32, expected: i64| {
            let filter = RequestFilter {
                limit,
                ..RequestFilter::default()
            };
            assert_eq!(filter.effective_limit(), expected, "limit {limit}");
        };
        check(0, 100);
        check(1, 1);
        check(10_000, 10_000);
        check(u32::MAX, 10_000);
    }
}
