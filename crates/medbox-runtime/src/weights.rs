//! Reading a checkpoint's safetensors: one `model.safetensors`, or the shards
//! named by `model.safetensors.index.json`. Each tensor remembers the file it
//! came from so that errors name both.
//!
//! Memory: only the headers are read up front. `get` reads one tensor's bytes
//! straight from its file, in chunks of at most `CHUNK_BYTES`, into a tensor
//! already allocated in the engine's dtype on its device, so loading never
//! holds more than the loaded weights plus one chunk (no whole-file buffer,
//! no checkpoint-dtype copy beside the converted one). Plain positioned reads
//! rather than a memory map: copying out of a map leaves every touched page of
//! the file in the process's resident set until it is unmapped, which would
//! bring the peak back to twice the weights.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::config::DType;
use crate::error::LoadError;
use crate::lora::MergeDeltas;
use crate::matmul_policy::MatmulPolicy;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// The most bytes of a tensor held outside the tensor itself while loading.
const CHUNK_BYTES: usize = 8 << 20;
/// A header larger than this is refused as corrupt.
const MAX_HEADER_BYTES: u64 = 100 << 20;

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Where one tensor's bytes are and what they hold.
struct Entry {
    /// Index into `Weights::files`.
    file: usize,
    kind: Kind,
    element_size: usize,
    shape: Vec<i64>,
    /// Absolute offset of the first byte in the file.
    offset: u64,
}

/// The checkpoint's tensors by name, read on demand.
pub(crate) struct Weights {
    entries: HashMap<String, Entry>,
    files: Vec<(PathBuf, File)>,
    /// What errors about a missing tensor name: the file or the index.
    source: PathBuf,
    kind: Kind,
    device: tch::Device,
    /// Linear layers are quantized to int8 at load.
    quantize_linears: bool,
    /// The kernel choice every linear layer loaded from here takes
    /// (set by the model once measured, before its layers load).
    matmul_policy: Cell<MatmulPolicy>,
    /// The one read buffer (at most `CHUNK_BYTES`), reused by every `get` so
    /// that the allocator is not left holding freed chunks.
    buffer: RefCell<Vec<u8>>,
    /// A LoRA adapter merged into the weights as they are read.
    adapter: Option<RefCell<MergeDeltas>>,
}

impl Weights {
    pub(crate) fn read(dir: &Path, dtype: DType, device: tch::Device) -> Result<Self, LoadError> {
        let index_path = dir.join(INDEX_FILE);
        let (paths, source) = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| LoadError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
                    path: index_path.clone(),
                    message: error.to_string(),
                })?;
            let mut paths: Vec<PathBuf> = index
                .weight_map
                .values()
                .map(|file| dir.join(file))
                .collect();
            paths.sort();
            paths.dedup();
            (paths, index_path)
        } else {
            let path = dir.join(SINGLE_FILE);
            (vec![path.clone()], path)
        };
        let mut entries = HashMap::new();
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let (file, header) = read_header(&path, files.len())?;
            entries.extend(header);
            files.push((path, file));
        }
        Ok(Weights {
            entries,
            files,
            source,
            kind: dtype.kind(),
            device,
            quantize_linears: dtype == DType::Int8,
            matmul_policy: Cell::new(MatmulPolicy::NATIVE),
            buffer: RefCell::new(Vec::new()),
            adapter: None,
        })
    }

    /// Merges `adapter`'s updates into the weights it names as they are read.
    pub(crate) fn with_adapter(mut self, adapter: MergeDeltas) -> Self {
        self.adapter = Some(RefCell::new(adapter));
        self
    }

    /// Weights the adapter updates that no `get` asked for (a mismatch
    /// between adapter and model).
    pub(crate) fn unused_adapter_weights(&self) -> Vec<String> {
        self.adapter
            .as_ref()
            .map(|adapter| adapter.borrow().unused())
            .unwrap_or_default()
    }

    /// Whether linear layers are to be quantized to int8 (`DType::Int8`).
    pub(crate) fn quantize_linears(&self) -> bool {
        self.quantize_linears
    }

    /// The kernel choice for linear layers loaded from now on.
    pub(crate) fn matmul_policy(&self) -> MatmulPolicy {
        self.matmul_policy.get()
    }

    pub(crate) fn set_matmul_policy(&self, policy: MatmulPolicy) {
        self.matmul_policy.set(policy);
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`, in the engine's dtype and
    /// on its device.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.source.clone(),
                tensor: name.to_string(),
            })?;
        let (path, file) = &self.files[entry.file];
        let expected: Vec<i64> = shape.iter().map(|&size| size as i64).collect();
        if entry.shape != expected {
            return Err(LoadError::WrongShape {
                path: path.clone(),
                tensor: name.to_string(),
                expected,
                actual: entry.shape.clone(),
            });
        }
        let tensor = self
            .read_tensor(entry, file)
            .map_err(|message| LoadError::Tensor {
                path: path.clone(),
                tensor: name.to_string(),
                message,
            })?;
        let delta = self
            .adapter
            .as_ref()
            .and_then(|adapter| adapter.borrow_mut().take(name));
        let Some(delta) = delta else {
            return Ok(tensor);
        };
        // Merged in f32, then back to the engine's dtype.
        let merged = || -> Result<Tensor, tch::TchError> {
            if delta.size() != tensor.size() {
                return Err(tch::TchError::Shape(format!(
                    "the adapter's update is {:?}, the weight {:?}",
                    delta.size(),
                    tensor.size()
                )));
            }
            tensor
                .f_to_kind(Kind::Float)?
                .f_add(&delta.f_to_device(self.device)?)?
                .f_to_kind(self.kind)
        };
        merged().map_err(|error| LoadError::Tensor {
            path: path.clone(),
            tensor: name.to_string(),
            message: format!("merging the adapter: {error}"),
        })
    }

    fn read_tensor(&self, entry: &Entry, mut file: &File) -> Result<Tensor, String> {
        let text = |error: tch::TchError| error.to_string();
        let numel: i64 = entry.shape.iter().product();
        let per_chunk = (CHUNK_BYTES / entry.element_size).max(1) as i64;
        let mut buffer = self.buffer.borrow_mut();
        let chunk_bytes = (per_chunk.min(numel).max(0) as usize) * entry.element_size;
        if buffer.len() < chunk_bytes {
            buffer.resize(chunk_bytes, 0);
        }
        file.seek(SeekFrom::Start(entry.offset))
            .map_err(|error| format!("cannot seek: {error}"))?;
        if numel <= per_chunk {
            // One read; converted (a copy) only when the dtype or device differs.
            let bytes = &mut buffer[..chunk_bytes];
            file.read_exact(bytes)
                .map_err(|error| format!("cannot read: {error}"))?;
            let tensor = Tensor::f_from_data_size(bytes, &entry.shape, entry.kind).map_err(text)?;
            return tensor
                .f_to_kind(self.kind)
                .and_then(|tensor| tensor.f_to_device(self.device))
                .map_err(text);
        }
        // Larger tensors are filled chunk by chunk in their final dtype and place.
        let target = Tensor::f_empty(&entry.shape, (self.kind, self.device)).map_err(text)?;
        let flat = target.f_view([-1]).map_err(text)?;
        let mut done = 0i64;
        while done < numel {
            let count = per_chunk.min(numel - done);
            let bytes = &mut buffer[..count as usize * entry.element_size];
            file.read_exact(bytes)
                .map_err(|error| format!("cannot read: {error}"))?;
            let source = Tensor::f_from_data_size(bytes, &[count], entry.kind).map_err(text)?;
            let mut part = flat.f_narrow(0, done, count).map_err(text)?;
            part.f_copy_(&source).map_err(text)?;
            done += count;
        }
        Ok(target)
    }
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The tch kind and element size of a safetensors dtype.
fn element_type(dtype: &str) -> Option<(Kind, usize)> {
    Some(match dtype {
        "F64" => (Kind::Double, 8),
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// Opens `path` and reads only its header, checking every entry against the
/// file: a truncated file names the first tensor whose bytes are missing, an
/// entry whose byte range disagrees with its shape and dtype names itself.
fn read_header(path: &Path, file_index: usize) -> Result<(File, Vec<(String, Entry)>), LoadError> {
    let io_error = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let broken = |message: String| LoadError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let bad_tensor = |name: &str, message: String| LoadError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let file_length = file.metadata().map_err(io_error)?.len();
    let mut length_bytes = [0u8; 8];
    file.read_exact(&mut length_bytes).map_err(|_| {
        broken(format!(
            "file is {file_length} bytes, too short for a header"
        ))
    })?;
    let header_length = u64::from_le_bytes(length_bytes);
    if header_length > file_length.saturating_sub(8) || header_length > MAX_HEADER_BYTES {
        return Err(broken(format!(
            "header claims {header_length} bytes but the file is {file_length} bytes"
        )));
    }
    let mut header = vec![0u8; header_length as usize];
    file.read_exact(&mut header).map_err(io_error)?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|error| broken(format!("bad header: {error}")))?;
    let data_start = 8 + header_length;
    let data_length = file_length - data_start;
    let mut parsed = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|error| broken(format!("bad header entry `{name}`: {error}")))?;
        parsed.push((name, entry));
    }
    // The first tensor (by position) whose bytes lie past the end.
    if let Some((name, entry)) = parsed
        .iter()
        .filter(|(_, entry)| entry.data_offsets[1] > data_length)
        .min_by_key(|(_, entry)| entry.data_offsets[1])
    {
        return Err(bad_tensor(
            name,
            format!(
                "file is truncated: the tensor's data ends at byte {} of {data_length} data bytes",
                entry.data_offsets[1]
            ),
        ));
    }
    let mut entries = Vec::with_capacity(parsed.len());
    for (name, entry) in parsed {
        let (kind, element_size) = element_type(&entry.dtype)
            .ok_or_else(|| bad_tensor(&name, format!("unsupported dtype {}", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        let numel = entry
            .shape
            .iter()
            .try_fold(1u64, |total, &size| total.checked_mul(size));
        let expected_bytes = numel.and_then(|numel| numel.checked_mul(element_size as u64));
        if begin > end || expected_bytes != Some(end - begin) {
            return Err(bad_tensor(
                &name,
                format!(
                    "shape {:?} of {} needs {} bytes but the header gives bytes {begin}..{end}",
                    entry.shape,
                    entry.dtype,
                    expected_bytes.map_or("too many".to_string(), |bytes| bytes.to_string()),
                ),
            ));
        }
        let shape = entry.shape.iter().map(|&size| size as i64).collect();
        entries.push((
            name,
            Entry {
                file: file_index,
                kind,
                element_size,
                shape,
                offset: data_start + begin,
            },
        ));
    }
    Ok((file, entries))
}
