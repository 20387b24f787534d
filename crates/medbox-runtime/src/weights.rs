//! Reading a checkpoint's safetensors: one `model.safetensors`, or the shards
//! named by `model.safetensors.index.json`. Each tensor remembers the file it
//! came from so that errors name both. Tensors are cast to the engine's dtype
//! and moved to its device once, as the model takes them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::Tensor;

use crate::config::DType;
use crate::error::LoadError;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The checkpoint's tensors, as stored, by name.
pub(crate) struct Weights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// What errors about a missing tensor name: the file or the index.
    source: PathBuf,
    kind: tch::Kind,
    device: tch::Device,
}

impl Weights {
    pub(crate) fn read(dir: &Path, dtype: DType, device: tch::Device) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        let (files, source) = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
                    path: index_path.clone(),
                    message: error.to_string(),
                })?;
            let mut files: Vec<PathBuf> = index
                .weight_map
                .values()
                .map(|file| dir.join(file))
                .collect();
            files.sort();
            files.dedup();
            (files, index_path)
        } else {
            let path = dir.join(SINGLE_FILE);
            (vec![path.clone()], path)
        };
        let mut tensors = HashMap::new();
        for file in files {
            check_safetensors_file(&file)?;
            let named =
                Tensor::read_safetensors(&file).map_err(|error| LoadError::Safetensors {
                    path: file.clone(),
                    message: error.to_string(),
                })?;
            for (name, tensor) in named {
                tensors.insert(name, (tensor, file.clone()));
            }
        }
        Ok(Weights {
            tensors,
            source,
            kind: dtype.kind(),
            device,
        })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`, in the engine's dtype and
    /// on its device.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let (tensor, path) = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.source.clone(),
                tensor: name.to_string(),
            })?;
        let expected: Vec<i64> = shape.iter().map(|&size| size as i64).collect();
        let actual = tensor.size();
        if actual != expected {
            return Err(LoadError::WrongShape {
                path: path.clone(),
                tensor: name.to_string(),
                expected,
                actual,
            });
        }
        tensor
            .f_to_kind(self.kind)
            .and_then(|tensor| tensor.f_to_device(self.device))
            .map_err(|error| LoadError::Tensor {
                path: path.clone(),
                tensor: name.to_string(),
                message: error.to_string(),
            })
    }
}

#[derive(Deserialize)]
struct HeaderEntry {
    #[serde(default)]
    data_offsets: Option<[u64; 2]>,
}

/// Reads only the header, so that a truncated file names the first tensor
/// whose bytes are missing (the safetensors parser only says "incomplete").
fn check_safetensors_file(path: &Path) -> Result<(), LoadError> {
    let io_error = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let broken = |message: String| LoadError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let file_length = file.metadata().map_err(io_error)?.len();
    let mut length_bytes = [0u8; 8];
    file.read_exact(&mut length_bytes).map_err(|_| {
        broken(format!(
            "file is {file_length} bytes, too short for a header"
        ))
    })?;
    let header_length = u64::from_le_bytes(length_bytes);
    if header_length > file_length.saturating_sub(8) || header_length > 100 << 20 {
        return Err(broken(format!(
            "header claims {header_length} bytes but the file is {file_length} bytes"
        )));
    }
    let mut header = vec![0u8; header_length as usize];
    file.read_exact(&mut header).map_err(io_error)?;
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|error| broken(format!("bad header: {error}")))?;
    let data_length = file_length - 8 - header_length;
    let mut truncated: Vec<(u64, &str)> = entries
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(name, value)| {
            let entry: HeaderEntry = serde_json::from_value(value.clone()).ok()?;
            let [_, end] = entry.data_offsets?;
            (end > data_length).then_some((end, name.as_str()))
        })
        .collect();
    truncated.sort();
    if let Some((end, name)) = truncated.first() {
        return Err(LoadError::Tensor {
            path: path.to_path_buf(),
            tensor: (*name).to_string(),
            message: format!(
                "file is truncated: the tensor's data ends at byte {end} of {data_length} data bytes"
            ),
        });
    }
    Ok(())
}
