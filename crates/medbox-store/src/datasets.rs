//! Fine-tuning datasets: one row per upload, accepted or rejected.

use std::{fmt, str::FromStr};

use sqlx::{Row, any::AnyRow};

use crate::{Store, StoreError, random_id};

const DATASET_ID_PREFIX: &str = "ds_";

/// Whether an upload may be trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DatasetState {
    /// Every line valid; de-identified, split and stored.
    Accepted,
    /// At least one bad line (or none at all); only its report is kept.
    Rejected,
}

impl DatasetState {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetState::Accepted => "accepted",
            DatasetState::Rejected => "rejected",
        }
    }
}

impl fmt::Display for DatasetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetState {
    type Err = String;
    fn from_str(text: &str) -> Result<DatasetState, String> {
        match text {
            "accepted" => Ok(DatasetState::Accepted),
            "rejected" => Ok(DatasetState::Rejected),
            other => Err(format!("unknown dataset state `{other}`")),
        }
    }
}

/// An upload to record. Counts are what validation saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDataset {
    pub name: String,
    /// `messages`, `alpaca` or `text`.
    pub format: String,
    pub state: DatasetState,
    /// Accepted only: SHA-256 of the canonical de-identified JSONL.
    pub sha256: Option<String>,
    /// Accepted only: the folder holding its files.
    pub path: Option<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    pub lines: u64,
    pub blank_lines: u64,
    pub valid_lines: u64,
    pub invalid_lines: u64,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub eval_percent: u8,
    pub split_seed: u64,
    /// JSON object: identifiers replaced per category.
    pub deid_counts_json: String,
    /// JSON document: the validation report.
    pub report_json: String,
}

/// A stored dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRecord {
    /// `ds_` + 12 hex digits.
    pub id: String,
    pub name: String,
    pub format: String,
    pub state: DatasetState,
    pub sha256: Option<String>,
    pub path: Option<String>,
    pub bytes: u64,
    pub lines: u64,
    pub blank_lines: u64,
    pub valid_lines: u64,
    pub invalid_lines: u64,
    pub train_examples: u64,
    pub eval_examples: u64,
    pub eval_percent: u8,
    pub split_seed: u64,
    pub deid_counts_json: String,
    pub report_json: String,
    pub created_at_ms: i64,
}

const DATASET_COLUMNS: &str = "id, name, format, state, sha256, path, bytes, lines, blank_lines, \
     valid_lines, invalid_lines, train_examples, eval_examples, eval_percent, split_seed, \
     deid_counts, report, created_at_ms";

impl Store {
    /// A fresh dataset id (`ds_` + 12 hex digits), for naming its folder before it is recorded.
    pub fn new_dataset_id(&self) -> Result<String, StoreError> {
        random_id(DATASET_ID_PREFIX)
    }

    /// Records an upload under `id` (from [`Store::new_dataset_id`]) at `now_ms`.
    pub async fn create_dataset(
        &self,
        id: &str,
        dataset: &NewDataset,
        now_ms: i64,
    ) -> Result<DatasetRecord, StoreError> {
        let sql = format!(
            "INSERT INTO datasets ({DATASET_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             RETURNING {DATASET_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(&dataset.name)
            .bind(&dataset.format)
            .bind(dataset.state.as_str())
            .bind(dataset.sha256.as_deref())
            .bind(dataset.path.as_deref())
            .bind(to_i64(dataset.bytes))
            .bind(to_i64(dataset.lines))
            .bind(to_i64(dataset.blank_lines))
            .bind(to_i64(dataset.valid_lines))
            .bind(to_i64(dataset.invalid_lines))
            .bind(to_i64(dataset.train_examples))
            .bind(to_i64(dataset.eval_examples))
            .bind(i32::from(dataset.eval_percent))
            .bind(seed_to_column(dataset.split_seed))
            .bind(&dataset.deid_counts_json)
            .bind(&dataset.report_json)
            .bind(now_ms)
            .fetch_one(self.pool())
            .await
            .map_err(StoreError::query("recording a dataset"))?;
        dataset_from_row(&row).map_err(StoreError::query("reading a recorded dataset"))
    }

    /// The dataset with this id, or else the newest one with this name.
    pub async fn find_dataset(
        &self,
        id_or_name: &str,
    ) -> Result<Option<DatasetRecord>, StoreError> {
        let sql = format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE id = $1 OR name = $1 \
             ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END, created_at_ms DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(id_or_name)
            .fetch_optional(self.pool())
            .await
            .map_err(StoreError::query("looking up a dataset"))?;
        row.as_ref()
            .map(dataset_from_row)
            .transpose()
            .map_err(StoreError::query("reading a dataset"))
    }

    /// Every dataset, newest first.
    pub async fn list_datasets(&self) -> Result<Vec<DatasetRecord>, StoreError> {
        let sql =
            format!("SELECT {DATASET_COLUMNS} FROM datasets ORDER BY created_at_ms DESC, id DESC");
        let rows = sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(StoreError::query("listing datasets"))?;
        rows.iter()
            .map(dataset_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::query("reading the dataset list"))
    }
}

fn dataset_from_row(row: &AnyRow) -> Result<DatasetRecord, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let eval_percent: i32 = row.try_get("eval_percent")?;
    Ok(DatasetRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        format: row.try_get("format")?,
        state: state.parse().map_err(decode_error("state"))?,
        sha256: row.try_get("sha256")?,
        path: row.try_get("path")?,
        bytes: to_u64(row.try_get("bytes")?),
        lines: to_u64(row.try_get("lines")?),
        blank_lines: to_u64(row.try_get("blank_lines")?),
        valid_lines: to_u64(row.try_get("valid_lines")?),
        invalid_lines: to_u64(row.try_get("invalid_lines")?),
        train_examples: to_u64(row.try_get("train_examples")?),
        eval_examples: to_u64(row.try_get("eval_examples")?),
        eval_percent: u8::try_from(eval_percent)
            .map_err(|_| decode_error("eval_percent")(format!("{eval_percent} is out of range")))?,
        split_seed: seed_from_column(row.try_get("split_seed")?),
        deid_counts_json: row.try_get("deid_counts")?,
        report_json: row.try_get("report")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

/// A column whose text is not one of the values the schema allows.
pub(crate) fn decode_error(column: &'static str) -> impl FnOnce(String) -> sqlx::Error {
    move |message| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: message.into(),
    }
}

/// Counts are `u64` in Rust and `BIGINT` in SQL; a count past `i64::MAX` is stored as the maximum.
pub(crate) fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A negative count read back (never written) reads as 0.
pub(crate) fn to_u64(count: i64) -> u64 {
    u64::try_from(count).unwrap_or(0)
}

/// Seeds use all 64 bits: stored as the `BIGINT` with the same bits.
pub(crate) fn seed_to_column(seed: u64) -> i64 {
    i64::from_ne_bytes(seed.to_ne_bytes())
}

pub(crate) fn seed_from_column(column: i64) -> u64 {
    u64::from_ne_bytes(column.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_keep_all_64_bits() {
        for seed in [0, 1, 42, u64::MAX, 1 << 63, (1 << 63) - 1] {
            assert_eq!(seed_from_column(seed_to_column(seed)), seed);
        }
        assert_eq!(seed_to_column(u64::MAX), -1);
    }

    #[test]
    fn dataset_states_round_trip() {
        for state in [DatasetState::Accepted, DatasetState::Rejected] {
            assert_eq!(state.as_str().parse(), Ok(state));
        }
        assert_eq!(
            "pending".parse::<DatasetState>(),
            Err("unknown dataset state `pending`".to_owned())
        );
    }
}
