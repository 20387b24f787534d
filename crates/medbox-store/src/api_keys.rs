//! API keys: who may call medboxd, with which scopes.
//!
//! A key has a public id (`mbk_` + 12 hex digits) and a secret handed to the
//! client once, at creation: `mbx_<12 hex digits of the id>_<64 hex digits>`
//! (32 bytes from the operating system's CSPRNG). Only the secret's SHA-256 is
//! stored; [`Store::authenticate_api_key`] finds the key by the id embedded in
//! the secret and compares hashes in constant time. The secret carries 256
//! random bits, so a plain (unsalted, fast) hash is enough.

use std::fmt;

use rand::{TryRngCore, rngs::OsRng};
use sha2::{Digest, Sha256};
use sqlx::{Row, any::AnyRow};
use subtle::ConstantTimeEq;

use crate::{Store, StoreError, now_ms};

/// Every scope a key can hold, in the order they are stored.
pub const SCOPES: [&str; 4] = ["inference", "agents", "finetune", "admin"];
/// The scope that allows administration (creating and revoking keys, …).
pub const ADMIN_SCOPE: &str = "admin";

const KEY_ID_PREFIX: &str = "mbk_";
const SECRET_PREFIX: &str = "mbx_";
/// Random bytes in a key id (shown as twice as many hex digits).
const KEY_ID_BYTES: usize = 6;
/// Random bytes in a secret (shown as twice as many hex digits).
const SECRET_BYTES: usize = 32;
/// Attempts at a fresh id when a random one is already taken (48 bits: practically never).
const ID_ATTEMPTS: usize = 4;

/// A key to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewApiKey {
    /// Who or what the key is for, e.g. `radiology reporting`.
    pub label: String,
    /// Names from [`SCOPES`]; at least one. Duplicates are dropped.
    pub scopes: Vec<String>,
    /// The department or tenant the key belongs to, if any.
    pub tenant: Option<String>,
    /// When the key stops working (unix milliseconds), if ever.
    pub expires_at_ms: Option<i64>,
}

/// A stored key, without its secret or the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Public: safe to log and show (`mbk_…`).
    pub id: String,
    pub label: String,
    /// In [`SCOPES`] order.
    pub scopes: Vec<String>,
    pub tenant: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

impl ApiKeyRecord {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|held| held == scope)
    }

    /// Neither revoked nor expired at `now_ms` (a key expires at its `expires_at_ms`).
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|expiry| expiry > now_ms)
    }
}

/// A newly created key and its secret, which is never available again.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedApiKey {
    pub record: ApiKeyRecord,
    /// `mbx_…`: give it to the client once; only its hash is stored.
    pub secret: String,
}

/// Keeps the secret out of logs.
impl fmt::Debug for CreatedApiKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("CreatedApiKey")
            .field("record", &self.record)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What [`Store::authenticate_api_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The secret matches an active key.
    Valid(ApiKeyRecord),
    /// Malformed, no such key, or the wrong secret for the key (indistinguishable to callers).
    Unknown,
    /// The secret matches a revoked key (whether or not it has also expired).
    Revoked(ApiKeyRecord),
    /// The secret matches a key whose `expires_at_ms` is at or before now.
    Expired(ApiKeyRecord),
}

const KEY_COLUMNS: &str =
    "id, label, scopes, tenant, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms";

impl Store {
    /// Creates a key with a fresh id and secret; stores only the secret's hash.
    pub async fn create_api_key(&self, new: &NewApiKey) -> Result<CreatedApiKey, StoreError> {
        let scopes = encode_scopes(&new.scopes)?;
        let created_at_ms = now_ms();
        for _ in 0..ID_ATTEMPTS {
            let id_part = random_hex(KEY_ID_BYTES)?;
            let secret = format!("{SECRET_PREFIX}{id_part}_{}", random_hex(SECRET_BYTES)?);
            let sql = format!(
                "INSERT INTO api_keys (id, label, scopes, tenant, secret_hash, created_at_ms, expires_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (id) DO NOTHING \
                 RETURNING {KEY_COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(format!("{KEY_ID_PREFIX}{id_part}"))
                .bind(&new.label)
                .bind(&scopes)
                .bind(new.tenant.as_deref())
                .bind(secret_hash(&secret))
                .bind(created_at_ms)
                .bind(new.expires_at_ms)
                .fetch_optional(self.pool())
                .await
                .map_err(StoreError::query("creating an API key"))?;
            if let Some(row) = row {
                let record =
                    key_from_row(&row).map_err(StoreError::query("reading a created API key"))?;
                return Ok(CreatedApiKey { record, secret });
            }
            tracing::debug!("random API key id already taken; drawing another");
        }
        Err(StoreError::Randomness {
            message: format!("{ID_ATTEMPTS} random API key ids in a row were already taken"),
        })
    }

    /// Checks a secret as presented by a client (`Bearer` token) at `now_ms`.
    ///
    /// Does not record the use; call [`Store::touch_api_key`] for that.
    pub async fn authenticate_api_key(
        &self,
        secret: &str,
        now_ms: i64,
    ) -> Result<KeyCheck, StoreError> {
        let Some(id) = key_id_of_secret(secret) else {
            return Ok(KeyCheck::Unknown);
        };
        let sql = format!("SELECT {KEY_COLUMNS}, secret_hash FROM api_keys WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(&id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up an API key"))?;
        let Some(row) = row else {
            return Ok(KeyCheck::Unknown);
        };
        let stored_hash: String = row
            .try_get("secret_hash")
            .map_err(StoreError::query("reading an API key"))?;
        let matches: bool = secret_hash(secret)
            .as_bytes()
            .ct_eq(stored_hash.as_bytes())
            .into();
        if !matches {
            return Ok(KeyCheck::Unknown);
        }
        let record = key_from_row(&row).map_err(StoreError::query("reading an API key"))?;
        Ok(if record.revoked_at_ms.is_some() {
            KeyCheck::Revoked(record)
        } else if !record.is_active(now_ms) {
            KeyCheck::Expired(record)
        } else {
            KeyCheck::Valid(record)
        })
    }

    /// Revokes the key at `now_ms`. Returns `true` when the key existed and was
    /// not already revoked (an expired key is revoked too, and counts);
    /// `false` when there is no such key or it was revoked before (its
    /// `revoked_at_ms` is kept).
    pub async fn revoke_api_key(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL",
        )
        .bind(id)
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(StoreError::query("revoking an API key"))?;
        Ok(result.rows_affected() > 0)
    }

    /// Every key, revoked and expired ones included, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms, id");
        let rows = sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing API keys"))?;
        rows.iter()
            .map(key_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the API key list"))
    }

    /// The key with this public id.
    pub async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up an API key"))?;
        row.as_ref()
            .map(key_from_row)
            .transpose()
            .map_err(StoreError::query("reading an API key"))
    }

    /// Keys with the `admin` scope that are neither revoked nor expired at `now_ms`
    /// (so that the last one is not revoked by mistake, and installation knows to create one).
    pub async fn count_active_admin_keys(&self, now_ms: i64) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys \
             WHERE revoked_at_ms IS NULL \
               AND (expires_at_ms IS NULL OR expires_at_ms > $1) \
               AND (',' || scopes || ',') LIKE $2",
        )
        .bind(now_ms)
        .bind(format!("%,{ADMIN_SCOPE},%"))
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::query("counting admin API keys"))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Records that the key was used at `now_ms` (never moves `last_used_at_ms` back).
    /// One write per call: callers on the request path may want to throttle it.
    pub async fn touch_api_key(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at_ms = $2 \
             WHERE id = $1 AND (last_used_at_ms IS NULL OR last_used_at_ms < $2)",
        )
        .bind(id)
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(StoreError::query("recording an API key's use"))?;
        Ok(())
    }
}

fn key_from_row(row: &AnyRow) -> Result<ApiKeyRecord, sqlx::Error> {
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        label: row.try_get("label")?,
        scopes: decode_scopes(row.try_get("scopes")?),
        tenant: row.try_get("tenant")?,
        created_at_ms: row.try_get("created_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        last_used_at_ms: row.try_get("last_used_at_ms")?,
    })
}

/// Checks every scope name and stores them comma-separated in [`SCOPES`] order.
fn encode_scopes(scopes: &[String]) -> Result<String, StoreError> {
    if let Some(unknown) = scopes
        .iter()
        .find(|scope| !SCOPES.contains(&scope.as_str()))
    {
        return Err(StoreError::UnknownScope {
            scope: unknown.clone(),
        });
    }
    let held: Vec<&str> = SCOPES
        .into_iter()
        .filter(|known| scopes.iter().any(|scope| scope == known))
        .collect();
    if held.is_empty() {
        return Err(StoreError::NoScopes);
    }
    Ok(held.join(","))
}

fn decode_scopes(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|scope| !scope.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `mbx_<12 hex>_<64 hex>` → `mbk_<12 hex>`; `None` for anything else.
fn key_id_of_secret(secret: &str) -> Option<String> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (id_part, random_part) = rest.split_once('_')?;
    let is_hex = |text: &str, bytes: usize| {
        text.len() == bytes * 2
            && text
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    };
    (is_hex(id_part, KEY_ID_BYTES) && is_hex(random_part, SECRET_BYTES))
        .then(|| format!("{KEY_ID_PREFIX}{id_part}"))
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buffer = vec![0_u8; bytes];
    OsRng
        .try_fill_bytes(&mut buffer)
        .map_err(|error| StoreError::Randomness {
            message: error.to_string(),
        })?;
    Ok(hex::encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    #[test]
    fn scopes_are_checked_deduplicated_and_ordered() {
        assert_eq!(
            encode_scopes(&strings(&["admin", "inference", "admin"])).expect("valid"),
            "inference,admin"
        );
        assert_eq!(
            decode_scopes("inference,admin"),
            strings(&["inference", "admin"])
        );
        let error = encode_scopes(&strings(&["inference", "root"])).expect_err("unknown");
        assert_eq!(error.kind(), "unknown_scope");
        assert_eq!(
            error.to_string(),
            "unknown API key scope `root`: scopes are inference, agents, finetune and admin"
        );
        assert_eq!(encode_scopes(&[]).expect_err("empty").kind(), "no_scopes");
    }

    #[test]
    fn the_key_id_is_read_from_the_secret() {
        let random = "ab".repeat(32);
        assert_eq!(
            key_id_of_secret(&format!("mbx_0123456789ab_{random}")).as_deref(),
            Some("mbk_0123456789ab")
        );
        for malformed in [
            String::new(),
            "mbx_".to_owned(),
            format!("mbk_0123456789ab_{random}"),
            format!("mbx_0123456789AB_{random}"),
            format!("mbx_0123456789a_{random}"),
            format!("mbx_0123456789ab_{random}0"),
            format!("mbx_0123456789ab{random}"),
            format!("mbx_0123456789ab_{random}_"),
        ] {
            assert_eq!(key_id_of_secret(&malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let first = random_hex(SECRET_BYTES).expect("random");
        let second = random_hex(SECRET_BYTES).expect("random");
        assert_eq!(first.len(), 64);
        assert_ne!(first, second);
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
