//! The model registry: one row per model name, from the config file or an administrator.

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError, now_ms};

/// A model to register or update; `name` is the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModel {
    pub name: String,
    pub path: String,
    pub kind: String,
    /// Other names the model answers to; each non-empty and without commas.
    pub aliases: Vec<String>,
    pub dtype: Option<String>,
    pub device: String,
    /// `"config"` (from medboxd's configuration) or `"admin"` (registered at run time).
    pub source: String,
}

/// A registered model as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRecord {
    pub id: i64,
    pub name: String,
    pub path: String,
    pub kind: String,
    pub aliases: Vec<String>,
    pub dtype: Option<String>,
    pub device: String,
    pub source: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const MODEL_COLUMNS: &str =
    "id, name, path, kind, aliases, dtype, device, source, created_at_ms, updated_at_ms";

impl Store {
    /// Inserts the model, or updates every field of the one with the same name
    /// (keeping its `id` and `created_at_ms`). Returns the stored row.
    pub async fn upsert_model(&self, model: &NewModel) -> Result<ModelRecord, StoreError> {
        let aliases = encode_aliases(&model.name, &model.aliases)?;
        let now = now_ms();
        let sql = format!(
            "INSERT INTO models (name, path, kind, aliases, dtype, device, source, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (name) DO UPDATE SET \
                 path = excluded.path, kind = excluded.kind, aliases = excluded.aliases, \
                 dtype = excluded.dtype, device = excluded.device, source = excluded.source, \
                 updated_at_ms = excluded.updated_at_ms \
             RETURNING {MODEL_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&model.name)
            .bind(&model.path)
            .bind(&model.kind)
            .bind(aliases)
            .bind(model.dtype.as_deref())
            .bind(&model.device)
            .bind(&model.source)
            .bind(now)
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::query("registering a model"))?;
        model_from_row(&row).map_err(StoreError::query("reading a registered model"))
    }

    /// Every registered model, sorted by name.
    pub async fn list_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name");
        let rows = sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing models"))?;
        rows.iter()
            .map(model_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the model list"))
    }

    /// The model registered under `name` (aliases are not looked up here).
    pub async fn get_model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up a model"))?;
        row.as_ref()
            .map(model_from_row)
            .transpose()
            .map_err(StoreError::query("reading a model"))
    }
}

fn model_from_row(row: &AnyRow) -> Result<ModelRecord, sqlx::Error> {
    Ok(ModelRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        path: row.try_get("path")?,
        kind: row.try_get("kind")?,
        aliases: decode_aliases(row.try_get("aliases")?),
        dtype: row.try_get("dtype")?,
        device: row.try_get("device")?,
        source: row.try_get("source")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// Aliases are stored as one comma-separated column; an empty list is `""`.
fn encode_aliases(model: &str, aliases: &[String]) -> Result<String, StoreError> {
    if let Some(alias) = aliases
        .iter()
        .find(|alias| alias.is_empty() || alias.contains(','))
    {
        return Err(StoreError::InvalidAlias {
            model: model.to_owned(),
            alias: alias.clone(),
        });
    }
    Ok(aliases.join(","))
}

fn decode_aliases(column: &str) -> Vec<String> {
    if column.is_empty() {
        return Vec::new();
    }
    column.split(',').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_round_trip(aliases: &[&str], column: &str) {
        let aliases: Vec<String> = aliases.iter().map(|alias| alias.to_string()).collect();
        let encoded = encode_aliases("m", &aliases).expect("valid aliases");
        assert_eq!(encoded, column);
        assert_eq!(decode_aliases(&encoded), aliases);
    }

    fn check_rejected(aliases: &[&str], expected: &str) {
        let aliases: Vec<String> = aliases.iter().map(|alias| alias.to_string()).collect();
        let error = encode_aliases("m", &aliases).expect_err("invalid aliases");
        assert_eq!(error.kind(), "invalid_alias");
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn aliases_round_trip_through_one_column() {
        check_round_trip(&[], "");
        check_round_trip(&["qwen"], "qwen");
        check_round_trip(
            &["qwen", "qwen3-0.6b", "small model"],
            "qwen,qwen3-0.6b,small model",
        );
    }

    #[test]
    fn aliases_that_would_not_round_trip_are_refused() {
        check_rejected(
            &["a,b"],
            "alias `a,b` of model `m` is invalid: aliases must be non-empty and cannot contain commas",
        );
        check_rejected(
            &["ok", ""],
            "alias `` of model `m` is invalid: aliases must be non-empty and cannot contain commas",
        );
    }
}
