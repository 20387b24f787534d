//! The manifest of a registered model version: what it is, where it came
//! from, and the SHA-256 of every file, so that a copy can be checked and a
//! changed file found.
//!
//! `manifest.json` sits in the version's folder
//! (`<data_dir>/models/<name>/<version>/`) beside the files it lists; it does
//! not list itself.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    hyperparameters::{Hyperparameters, Method, OutputKind},
    protocol::ModelRef,
};

/// The manifest's file name inside a version folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format, written into every manifest.
pub const MANIFEST_FORMAT: &str = "medbox-model-manifest/1";

/// One file of a version folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the version folder, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// The dataset a version was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDataset {
    pub id: String,
    pub name: String,
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    pub name: String,
    pub version: u32,
    pub kind: OutputKind,
    pub method: Method,
    pub base_model: ModelRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model: Option<ModelRef>,
    pub dataset: ManifestDataset,
    pub hyperparameters: Hyperparameters,
    pub seed: u64,
    /// The trainer's final figures.
    pub metrics: BTreeMap<String, f64>,
    pub job_id: String,
    pub created_at_ms: i64,
    /// Every file but the manifest, sorted by path.
    pub files: Vec<ManifestFile>,
}

impl ModelManifest {
    /// Pretty JSON with a final newline, as written to `manifest.json`.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .unwrap_or_else(|error| unreachable!("a ModelManifest always serializes: {error}"));
        text.push('\n');
        text
    }

    pub fn from_json(text: &str) -> Result<ModelManifest, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// Why a folder cannot be listed, or does not match its manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is a symbolic link or a special file; a model version holds plain files only")]
    NotAPlainFile { path: PathBuf },
    #[error("{path}: the file name is not UTF-8")]
    NonUtf8Name { path: PathBuf },
    #[error("the folder is empty")]
    Empty,
    #[error("`{path}` differs from the manifest ({reason})")]
    Mismatch { path: String, reason: &'static str },
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every plain file under `dir` (recursively) but [`MANIFEST_FILE`] at its
/// top, with size and SHA-256, sorted by path. Blocking: reads every byte.
pub fn hash_folder(dir: &Path) -> Result<Vec<ManifestFile>, ManifestError> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if files.is_empty() {
        return Err(ManifestError::Empty);
    }
    Ok(files)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<ManifestFile>) -> Result<(), ManifestError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Io { path, source }
    };
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_error(&path))?;
        if file_type.is_dir() {
            walk(root, &path, files)?;
            continue;
        }
        if !file_type.is_file() {
            return Err(ManifestError::NotAPlainFile { path });
        }
        let relative = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .components()
            .map(|component| component.as_os_str().to_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ManifestError::NonUtf8Name { path: path.clone() })?
            .join("/");
        if relative == MANIFEST_FILE {
            continue;
        }
        let (bytes, sha256) = hash_file(&path)?;
        files.push(ManifestFile {
            path: relative,
            bytes,
            sha256,
        });
    }
    Ok(())
}

/// Size and SHA-256 of one file, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> Result<(u64, String), ManifestError> {
    let io_error = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0_u8; 1 << 20];
    let mut total = 0_u64;
    loop {
        let read = file.read(&mut buffer).map_err(io_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Checks that `dir` holds exactly the files of `manifest`, unchanged.
pub fn verify_folder(dir: &Path, manifest: &ModelManifest) -> Result<(), ManifestError> {
    let found = hash_folder(dir)?;
    let expected: BTreeMap<&str, &ManifestFile> = manifest
        .files
        .iter()
        .map(|file| (file.path.as_str(), file))
        .collect();
    for file in &found {
        match expected.get(file.path.as_str()) {
            None => {
                return Err(ManifestError::Mismatch {
                    path: file.path.clone(),
                    reason: "not in the manifest",
                });
            }
            Some(listed) if listed.sha256 != file.sha256 || listed.bytes != file.bytes => {
                return Err(ManifestError::Mismatch {
                    path: file.path.clone(),
                    reason: "its SHA-256 changed",
                });
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = manifest
        .files
        .iter()
        .find(|listed| !found.iter().any(|file| file.path == listed.path))
    {
        return Err(ManifestError::Mismatch {
            path: missing.path.clone(),
            reason: "missing",
        });
    }
    Ok(())
}
