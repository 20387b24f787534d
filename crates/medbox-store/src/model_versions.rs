//! Registered model versions: the results of fine-tuning jobs, one row per
//! version of a name. Rows are written by [`Store::complete_job`], together
//! with the job's success.

use sqlx::{Any, Row, Transaction, any::AnyRow};

use crate::{Store, StoreError};

/// A version to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModelVersion {
    pub name: String,
    /// 1, 2, 3, … per name; the pair is unique.
    pub version: u32,
    pub base_model: String,
    /// `adapter` or `merged`.
    pub kind: String,
    /// The version's folder.
    pub path: String,
    /// SHA-256 of its `manifest.json`.
    pub manifest_sha256: String,
    /// JSON object: the trainer's final figures.
    pub metrics_json: String,
    pub job_id: Option<String>,
    pub dataset_id: Option<String>,
}

/// A stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVersionRecord {
    pub id: i64,
    pub name: String,
    pub version: u32,
    pub base_model: String,
    pub kind: String,
    pub path: String,
    pub manifest_sha256: String,
    pub metrics_json: String,
    pub job_id: Option<String>,
    pub dataset_id: Option<String>,
    pub created_at_ms: i64,
}

const VERSION_COLUMNS: &str = "id, name, version, base_model, kind, path, manifest_sha256, \
     metrics, job_id, dataset_id, created_at_ms";

impl Store {
    /// The highest version registered under `name`, if any.
    pub async fn latest_model_version(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let latest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM model_versions WHERE name = $1")
                .bind(name)
                .fetch_one(self.pool())
                .await
                .map_err(StoreError::query("reading the latest model version"))?;
        Ok(latest.map(|version| u32::try_from(version).unwrap_or(u32::MAX)))
    }

    /// Every version of `name` (every version of every name when `None`),
    /// by name, then newest version first.
    pub async fn list_model_versions(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<ModelVersionRecord>, StoreError> {
        let where_clause = if name.is_some() {
            "WHERE name = $1"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM model_versions {where_clause} \
             ORDER BY name, version DESC"
        );
        let mut query = sqlx::query(&sql);
        if let Some(name) = name {
            query = query.bind(name);
        }
        let rows = query
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing model versions"))?;
        rows.iter()
            .map(version_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading model versions"))
    }

    pub async fn get_model_version_by_id(
        &self,
        id: i64,
    ) -> Result<Option<ModelVersionRecord>, StoreError> {
        let sql = format!("SELECT {VERSION_COLUMNS} FROM model_versions WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up a model version"))?;
        row.as_ref()
            .map(version_from_row)
            .transpose()
            .map_err(StoreError::query("reading a model version"))
    }
}

pub(crate) async fn insert_model_version(
    transaction: &mut Transaction<'static, Any>,
    version: &NewModelVersion,
    at_ms: i64,
) -> Result<ModelVersionRecord, sqlx::Error> {
    let sql = format!(
        "INSERT INTO model_versions (name, version, base_model, kind, path, manifest_sha256, \
             metrics, job_id, dataset_id, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         RETURNING {VERSION_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(&version.name)
        .bind(i64::from(version.version))
        .bind(&version.base_model)
        .bind(&version.kind)
        .bind(&version.path)
        .bind(&version.manifest_sha256)
        .bind(&version.metrics_json)
        .bind(version.job_id.as_deref())
        .bind(version.dataset_id.as_deref())
        .bind(at_ms)
        .fetch_one(&mut **transaction)
        .await?;
    version_from_row(&row)
}

fn version_from_row(row: &AnyRow) -> Result<ModelVersionRecord, sqlx::Error> {
    let version: i64 = row.try_get("version")?;
    Ok(ModelVersionRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        version: u32::try_from(version).unwrap_or(u32::MAX),
        base_model: row.try_get("base_model")?,
        kind: row.try_get("kind")?,
        path: row.try_get("path")?,
        manifest_sha256: row.try_get("manifest_sha256")?,
        metrics_json: row.try_get("metrics")?,
        job_id: row.try_get("job_id")?,
        dataset_id: row.try_get("dataset_id")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}
