//! Dataset uploads on disk: the raw upload's temporary file, and the
//! blocking pipeline that turns it into a stored dataset (validate every
//! line, de-identify, split, write the folder by temporary name and rename).
//!
//! Layout under `<data_dir>/datasets/`:
//! - `.upload-<id>`: the raw upload while it arrives and is checked (mode
//!   0600); removed as soon as the upload is processed, and at start-up.
//! - `.tmp-<id>/`: an accepted dataset's folder being written; removed at start-up.
//! - `<id>/`: an accepted dataset: `dataset.jsonl` (every example,
//!   de-identified, canonical JSON), `train.jsonl`, `eval.jsonl`.
//!
//! A rejected dataset leaves no file: it is never de-identified, so none of
//! its text may stay on disk.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use medbox_deid::Deidentifier;
use medbox_finetune::{
    DatasetFormat, DeidentifiedDataset, Limits, SplitConfig, Verdict, deidentify_dataset,
    parse_dataset, split_dataset,
};
use medbox_store::{DatasetState, NewDataset};
use serde_json::json;

/// The folder of the datasets inside `data_dir`.
pub const DATASETS_DIR: &str = "datasets";
/// Every example of an accepted dataset, de-identified.
pub const DATASET_FILE: &str = "dataset.jsonl";
pub const TRAIN_FILE: &str = "train.jsonl";
pub const EVAL_FILE: &str = "eval.jsonl";
/// The split seed when the upload names none.
pub const DEFAULT_SPLIT_SEED: u64 = 42;

const UPLOAD_PREFIX: &str = ".upload-";
const TEMPORARY_PREFIX: &str = ".tmp-";

/// A checked upload header.
#[derive(Debug, Clone)]
pub struct ValidHeader {
    pub name: String,
    pub format: DatasetFormat,
    pub split: SplitConfig,
}

/// Why an upload could not be processed (the dataset's own faults are not
/// errors: they make a rejected dataset).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("reading the upload {path}: {source}")]
    ReadUpload {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing the dataset folder {path}: {source}")]
    WriteFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("splitting: {0}")]
    Split(#[from] medbox_finetune::SplitError),
}

/// The path of an upload's temporary file.
pub fn upload_path(datasets_dir: &Path, id: &str) -> PathBuf {
    datasets_dir.join(format!("{UPLOAD_PREFIX}{id}"))
}

/// Removes what an interrupted upload or write left behind. Blocking.
pub fn remove_leftovers(datasets_dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(datasets_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(UPLOAD_PREFIX) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        } else if name.starts_with(TEMPORARY_PREFIX) {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Validates, de-identifies, splits and writes an upload. Blocking: reads
/// the whole file and writes the dataset's folder. Returns the row to record.
pub fn process_upload(
    datasets_dir: &Path,
    id: &str,
    header: &ValidHeader,
    deidentifier: &Deidentifier,
) -> Result<NewDataset, DatasetError> {
    let upload = upload_path(datasets_dir, id);
    let bytes = std::fs::read(&upload).map_err(|source| DatasetError::ReadUpload {
        path: upload.clone(),
        source,
    })?;
    let report = parse_dataset(&bytes, header.format, &Limits::STANDARD);
    let summary = &report.summary;
    let mut dataset = NewDataset {
        name: header.name.clone(),
        format: header.format.name().to_owned(),
        state: DatasetState::Rejected,
        sha256: None,
        path: None,
        bytes: bytes.len() as u64,
        lines: summary.lines as u64,
        blank_lines: summary.blank_lines as u64,
        valid_lines: summary.valid as u64,
        invalid_lines: summary.invalid as u64,
        train_examples: 0,
        eval_examples: 0,
        eval_percent: header.split.eval_percent,
        split_seed: header.split.seed,
        deid_counts_json: "{}".to_owned(),
        report_json: String::new(),
    };
    let invalid_by_kind: BTreeMap<&str, usize> = summary
        .invalid_by_reason
        .iter()
        .map(|(kind, count)| (kind.key(), *count))
        .collect();
    let valid = match report.verdict {
        Verdict::Rejected(rejection) => {
            let errors: Vec<serde_json::Value> = rejection
                .first_errors
                .iter()
                .map(|error| {
                    json!({
                        "line": error.line,
                        "kind": error.reason.kind().key(),
                        "reason": error.reason.to_string(),
                    })
                })
                .collect();
            dataset.report_json = json!({
                "errors": errors,
                "invalid_by_kind": invalid_by_kind,
                "no_examples": rejection.no_examples,
            })
            .to_string();
            return Ok(dataset);
        }
        Verdict::Accepted(valid) => valid,
    };
    drop(bytes);
    let deidentified = deidentify_dataset(valid, deidentifier);
    let split = split_dataset(&deidentified, &header.split)?;
    let folder = datasets_dir.join(id);
    write_folder(datasets_dir, id, &deidentified, &split.train, &split.eval)?;
    let counts: BTreeMap<&str, usize> = deidentified
        .counts()
        .iter()
        .map(|(category, count)| (category.key(), *count))
        .collect();
    dataset.state = DatasetState::Accepted;
    dataset.sha256 = Some(deidentified.sha256().to_owned());
    dataset.path = Some(folder.display().to_string());
    dataset.train_examples = split.train.len() as u64;
    dataset.eval_examples = split.eval.len() as u64;
    dataset.deid_counts_json = json!(counts).to_string();
    dataset.report_json = json!({
        "errors": [],
        "invalid_by_kind": invalid_by_kind,
        "no_examples": false,
    })
    .to_string();
    Ok(dataset)
}

/// Writes `<id>/` by way of `.tmp-<id>/`: every file written and synced,
/// then one rename, so that a dataset folder is complete or absent.
fn write_folder(
    datasets_dir: &Path,
    id: &str,
    dataset: &DeidentifiedDataset,
    train: &[usize],
    eval: &[usize],
) -> Result<(), DatasetError> {
    let temporary = datasets_dir.join(format!("{TEMPORARY_PREFIX}{id}"));
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::WriteFolder { path, source }
    };
    std::fs::create_dir_all(&temporary).map_err(write_error(&temporary))?;
    let lines = |indices: &[usize]| -> String {
        let mut text = String::new();
        for &index in indices {
            text.push_str(&dataset.examples()[index].canonical_json());
            text.push('\n');
        }
        text
    };
    for (name, text) in [
        (DATASET_FILE, dataset.canonical_jsonl().to_owned()),
        (TRAIN_FILE, lines(train)),
        (EVAL_FILE, lines(eval)),
    ] {
        let path = temporary.join(name);
        let mut file = std::fs::File::create(&path).map_err(write_error(&path))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_error(&path))?;
    }
    let folder = datasets_dir.join(id);
    std::fs::rename(&temporary, &folder).map_err(write_error(&folder))?;
    Ok(())
}

/// The validation report as stored: the first bad lines and the counts by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredReport {
    pub errors: Vec<(u64, String, String)>,
    pub invalid_by_kind: BTreeMap<String, u64>,
    pub no_examples: bool,
}

impl StoredReport {
    /// Reads a `report` column back; anything unreadable reads as empty.
    pub fn parse(text: &str) -> StoredReport {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
            return StoredReport::default();
        };
        let errors = value["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|error| {
                        (
                            error["line"].as_u64().unwrap_or(0),
                            error["kind"].as_str().unwrap_or_default().to_owned(),
                            error["reason"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        StoredReport {
            errors,
            invalid_by_kind: counts(&value["invalid_by_kind"]),
            no_examples: value["no_examples"].as_bool().unwrap_or(false),
        }
    }
}

/// A JSON object of counts, as a map; anything else reads as empty.
pub fn counts(value: &serde_json::Value) -> BTreeMap<String, u64> {
    value
        .as_object()
        .map(|object| {
            object
                .iter()
                .filter_map(|(key, count)| Some((key.clone(), count.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}
