//! Sentence embeddings: a `BertModel` folder as sentence-transformers saves
//! it, served by one OS thread like the decoder's engine.
//!
//! The folder is read the way sentence-transformers reads it: `modules.json`
//! lists the modules; the `Transformer` module's folder holds `config.json`,
//! the weights and `tokenizer.json`, and its `sentence_bert_config.json`
//! gives `max_seq_length` (texts are stripped and cut to that many tokens,
//! special tokens included); the `Pooling` module's `config.json` chooses
//! mean (over the attention mask), CLS, max or mean-sqrt-len pooling; a
//! `Normalize` module L2-normalises. A plain BERT folder without
//! `modules.json` gets mean pooling, no normalisation and
//! `max_position_embeddings` tokens.
//!
//! `Embedder` is the cheap-to-clone handle; its thread owns the tensors and
//! the tokenizer, takes one request at a time from a bounded queue, and
//! answers through a oneshot channel. A request whose caller has gone is
//! skipped.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Deserialize;
use tch::{Kind, TchError, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};
use tokio::sync::oneshot;
use tracing::{debug, info, instrument, warn};

use crate::EngineConfig;
use crate::bert::{BertConfig, BertModel};
use crate::config::{DType, Device};
use crate::engine::MAX_WAITING_LIMIT;
use crate::error::{EngineError, LoadError, ValidationError};
use crate::loader::check_device;
use crate::weights::Weights;

/// The most texts one `embed` call may carry.
pub const MAX_EMBED_TEXTS: usize = 256;
/// Texts run through the encoder together, at most.
const SUB_BATCH: usize = 32;

/// What a loaded embedding model is.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingInfo {
    pub name: String,
    /// The `architectures` entry of `config.json`, e.g. `BertModel`.
    pub architecture: String,
    /// Length of every vector.
    pub dimensions: usize,
    /// Tokens per text (special tokens included); longer texts are truncated.
    pub max_tokens: usize,
    /// Whether vectors are L2-normalised.
    pub normalized: bool,
    /// `mean`, `cls`, `max` or `mean_sqrt_len`.
    pub pooling: String,
    pub dtype: DType,
    pub device: Device,
}

/// Why `embed` failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Invalid(ValidationError),
    #[error(transparent)]
    Engine(EngineError),
}

impl EmbedError {
    /// A short label for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            EmbedError::Invalid(error) => error.kind(),
            EmbedError::Engine(error) => error.kind(),
        }
    }
}

impl From<ValidationError> for EmbedError {
    fn from(error: ValidationError) -> Self {
        EmbedError::Invalid(error)
    }
}

impl From<EngineError> for EmbedError {
    fn from(error: EngineError) -> Self {
        EmbedError::Engine(error)
    }
}

/// Checks the texts of one `embed` call.
pub(crate) fn validate_texts(texts: &[String]) -> Result<(), ValidationError> {
    if texts.is_empty() {
        return Err(ValidationError::EmptyTexts);
    }
    if texts.len() > MAX_EMBED_TEXTS {
        return Err(ValidationError::TooManyTexts {
            max: MAX_EMBED_TEXTS,
            got: texts.len(),
        });
    }
    if let Some(index) = texts.iter().position(|text| text.trim().is_empty()) {
        return Err(ValidationError::EmptyText { index });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

impl Pooling {
    fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::MeanSqrtLen => "mean_sqrt_len",
        }
    }

    /// hidden: (B, L, E), mask: (B, L) of 0/1 → (B, E) in f32.
    fn apply(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
        let hidden = hidden.f_to_kind(Kind::Float)?;
        let mask = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?; // (B, L, 1)
        match self {
            Pooling::Cls => hidden.f_select(1, 0),
            Pooling::Max => {
                // sentence-transformers sets padding to -1e9 before the max.
                let padding = mask.f_eq(0.0)?;
                hidden
                    .f_masked_fill(&padding, -1e9)?
                    .f_amax([1].as_slice(), false)
            }
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let summed = hidden.f_mul(&mask)?.f_sum_dim_intlist(1, false, None)?;
                let counts = mask.f_sum_dim_intlist(1, false, None)?.f_clamp_min(1e-9)?;
                if self == Pooling::Mean {
                    summed.f_div(&counts)
                } else {
                    summed.f_div(&counts.f_sqrt()?)
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
        path: path.to_path_buf(),
        message: error.to_string(),
    })
}

/// The sentence-transformers pipeline around the encoder.
struct Pipeline {
    /// The folder with `config.json`, the weights and `tokenizer.json`.
    transformer_dir: PathBuf,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: Option<usize>,
    lower_case: bool,
}

impl Pipeline {
    fn read(dir: &Path) -> Result<Self, LoadError> {
        let modules_path = dir.join("modules.json");
        if !modules_path.is_file() {
            return Ok(Pipeline {
                transformer_dir: dir.to_path_buf(),
                pooling: Pooling::Mean,
                normalize: false,
                max_seq_length: None,
                lower_case: false,
            });
        }
        let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
        let find = |suffix: &str| {
            modules
                .iter()
                .find(|module| module.kind.rsplit('.').next() == Some(suffix))
        };
        let unsupported = |setting: String| LoadError::Unsupported {
            path: modules_path.clone(),
            setting,
        };
        for module in &modules {
            let name = module.kind.rsplit('.').next().unwrap_or_default();
            if !matches!(name, "Transformer" | "Pooling" | "Normalize") {
                return Err(unsupported(format!(
                    "module `{}` (supported: Transformer, Pooling, Normalize)",
                    module.kind
                )));
            }
        }
        let transformer =
            find("Transformer").ok_or_else(|| unsupported("no Transformer module".into()))?;
        let transformer_dir = dir.join(&transformer.path);
        let sentence_config_path = transformer_dir.join("sentence_bert_config.json");
        let sentence_config = if sentence_config_path.is_file() {
            read_json::<SentenceBertConfig>(&sentence_config_path)?
        } else {
            SentenceBertConfig {
                max_seq_length: None,
                do_lower_case: false,
            }
        };
        let pooling = match find("Pooling") {
            None => Pooling::Mean,
            Some(module) => {
                let path = dir.join(&module.path).join("config.json");
                let config: PoolingConfig = read_json(&path)?;
                let modes = [
                    (config.pooling_mode_mean_tokens, Some(Pooling::Mean)),
                    (config.pooling_mode_cls_token, Some(Pooling::Cls)),
                    (config.pooling_mode_max_tokens, Some(Pooling::Max)),
                    (
                        config.pooling_mode_mean_sqrt_len_tokens,
                        Some(Pooling::MeanSqrtLen),
                    ),
                    (config.pooling_mode_weightedmean_tokens, None),
                    (config.pooling_mode_lasttoken, None),
                ];
                let chosen: Vec<Option<Pooling>> = modes
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, pooling)| *pooling)
                    .collect();
                match chosen.as_slice() {
                    [Some(pooling)] => *pooling,
                    _ => {
                        return Err(LoadError::Unsupported {
                            path,
                            setting: "pooling: exactly one of mean, cls, max or mean_sqrt_len \
                                      must be on"
                                .into(),
                        });
                    }
                }
            }
        };
        Ok(Pipeline {
            transformer_dir,
            pooling,
            normalize: find("Normalize").is_some(),
            max_seq_length: sentence_config.max_seq_length,
            lower_case: sentence_config.do_lower_case,
        })
    }
}

/// A loaded embedding model, owned by one thread.
struct LoadedEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    lower_case: bool,
    info: EmbeddingInfo,
}

fn load(
    name: &str,
    dir: &Path,
    dtype: Option<DType>,
    device: Device,
) -> Result<LoadedEncoder, LoadError> {
    let _no_grad = tch::no_grad_guard();
    check_device(device)?;
    let pipeline = Pipeline::read(dir)?;
    let model_dir = &pipeline.transformer_dir;
    let config_path = model_dir.join("config.json");
    let config = BertConfig::read(&config_path)?;
    let max_tokens = pipeline
        .max_seq_length
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let tokenizer_path = model_dir.join("tokenizer.json");
    let tokenizer = prepare_tokenizer(&tokenizer_path, max_tokens, config.vocab_size)?;
    let dtype = dtype.or(config.checkpoint_dtype()).unwrap_or(DType::F32);
    let weights = Weights::read(model_dir, dtype, device.to_tch())?;
    let model = BertModel::load(&weights, &config, device.to_tch())?;
    let info = EmbeddingInfo {
        name: name.to_string(),
        architecture: config
            .architectures
            .first()
            .cloned()
            .unwrap_or_else(|| "BertModel".into()),
        dimensions: config.hidden_size,
        max_tokens,
        normalized: pipeline.normalize,
        pooling: pipeline.pooling.as_str().to_string(),
        dtype,
        device,
    };
    Ok(LoadedEncoder {
        model,
        tokenizer,
        pooling: pipeline.pooling,
        normalize: pipeline.normalize,
        lower_case: pipeline.lower_case,
        info,
    })
}

/// Loads `tokenizer.json` and sets it up as sentence-transformers calls it:
/// truncation to `max_tokens` (longest first, from the right) and padding to
/// the longest text of the batch, whatever the file says.
fn prepare_tokenizer(
    path: &Path,
    max_tokens: usize,
    vocab_size: usize,
) -> Result<Tokenizer, LoadError> {
    let broken = |message: String| LoadError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|error| broken(error.to_string()))?;
    let highest_id = tokenizer.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    if highest_id >= vocab_size {
        return Err(LoadError::VocabMismatch {
            path: path.to_path_buf(),
            tokenizer_vocab: highest_id + 1,
            model_vocab: vocab_size,
        });
    }
    let (pad_id, pad_type_id, pad_token) = match tokenizer.get_padding() {
        Some(padding) => (
            padding.pad_id,
            padding.pad_type_id,
            padding.pad_token.clone(),
        ),
        None => {
            let token = "[PAD]";
            let id = tokenizer
                .token_to_id(token)
                .ok_or_else(|| broken("no padding set and no [PAD] token".into()))?;
            (id, 0, token.to_string())
        }
    };
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id,
        pad_token,
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|error| broken(error.to_string()))?;
    Ok(tokenizer)
}

impl LoadedEncoder {
    /// Embeds `texts` (already validated), `SUB_BATCH` at a time, in order.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        let mut vectors = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(SUB_BATCH) {
            let inputs: Vec<String> = chunk
                .iter()
                .map(|text| {
                    let text = text.trim();
                    if self.lower_case {
                        text.to_lowercase()
                    } else {
                        text.to_string()
                    }
                })
                .collect();
            let encodings = self
                .tokenizer
                .encode_batch(inputs, true)
                .map_err(|error| format!("tokenizer failed: {error}"))?;
            let mut ids = Vec::new();
            let mut type_ids = Vec::new();
            let mut mask = Vec::new();
            for encoding in &encodings {
                ids.extend(encoding.get_ids().iter().map(|&id| id as i64));
                type_ids.extend(encoding.get_type_ids().iter().map(|&id| id as i64));
                mask.extend(encoding.get_attention_mask().iter().map(|&on| on as i64));
            }
            let batch = encodings.len();
            let pooled = self
                .model
                .forward(&ids, &type_ids, &mask, batch)
                .and_then(|hidden| {
                    let length = (ids.len() / batch) as i64;
                    let mask = Tensor::f_from_slice(&mask)?
                        .f_view([batch as i64, length])?
                        .f_to_device(hidden.device())?;
                    let pooled = self.pooling.apply(&hidden, &mask)?;
                    let pooled = if self.normalize {
                        // F.normalize: x / max(‖x‖, 1e-12).
                        let norms = pooled
                            .f_norm_scalaropt_dim(2, [1].as_slice(), true)?
                            .f_clamp_min(1e-12)?;
                        pooled.f_div(&norms)?
                    } else {
                        pooled
                    };
                    Vec::<Vec<f32>>::try_from(&pooled.f_to_device(tch::Device::Cpu)?)
                })
                .map_err(|error| error.to_string())?;
            vectors.extend(pooled);
        }
        Ok(vectors)
    }
}

enum Command {
    Embed(Job),
    Shutdown,
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

struct Shared {
    info: EmbeddingInfo,
    commands: SyncSender<Command>,
    max_waiting: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle to one embedding model's thread. Clones share the thread.
///
/// Shutdown: `shutdown` answers everything queued before it, then stops and
/// joins the thread. Without it, the thread stops by itself once every handle
/// is dropped and the queued work is done.
#[derive(Clone)]
pub struct Embedder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Embedder")
            .field("model", &self.shared.info.name)
            .finish()
    }
}

impl Embedder {
    /// Blocking: spawns the thread, which loads the model (tensors never
    /// leave it), and returns once it is ready or failed to load. Call it
    /// from `spawn_blocking` in async code.
    #[instrument(skip_all, fields(model = %config.name))]
    pub fn start(config: EngineConfig) -> Result<Embedder, LoadError> {
        let max_waiting = config.max_waiting.min(MAX_WAITING_LIMIT);
        let (commands, command_receiver) = std::sync::mpsc::sync_channel(max_waiting);
        let thread_name = format!("medbox-embed-{}", config.name);
        let EngineConfig {
            name,
            path,
            dtype,
            device,
            max_waiting: _,
            batching: _,
        } = config;
        let load_encoder = move || {
            let started = std::time::Instant::now();
            let encoder = load(&name, &path, dtype, device)?;
            info!(
                model = %encoder.info.name,
                architecture = %encoder.info.architecture,
                dimensions = encoder.info.dimensions,
                dtype = %encoder.info.dtype,
                device = %encoder.info.device,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "embedding model loaded"
            );
            Ok((encoder.info.clone(), encoder))
        };
        let (info, thread) = crate::model_thread::spawn_loaded(
            thread_name,
            "embedding",
            load_encoder,
            move |encoder| run(encoder, command_receiver),
        )?;
        Ok(Embedder {
            shared: Arc::new(Shared {
                info,
                commands,
                max_waiting,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn info(&self) -> &EmbeddingInfo {
        &self.shared.info
    }

    /// Validates (non-empty list, at most `MAX_EMBED_TEXTS` texts, no blank
    /// text) then embeds every text, in order: one vector of
    /// `info().dimensions` per text. Never blocks the caller's thread:
    /// `QueueFull` when `max_waiting` requests already wait.
    #[instrument(skip_all, fields(model = %self.shared.info.name, texts = texts.len()))]
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        validate_texts(&texts)?;
        let (reply, answer) = oneshot::channel();
        let stopped = || EngineError::Stopped {
            model: self.shared.info.name.clone(),
        };
        match self
            .shared
            .commands
            .try_send(Command::Embed(Job { texts, reply }))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(EngineError::QueueFull {
                    model: self.shared.info.name.clone(),
                    max_waiting: self.shared.max_waiting,
                }
                .into());
            }
            Err(TrySendError::Disconnected(_)) => return Err(stopped().into()),
        }
        match answer.await {
            Ok(result) => result.map_err(EmbedError::Engine),
            Err(_) => Err(stopped().into()),
        }
    }

    /// Blocking: answers everything queued so far, then stops and joins the
    /// thread. Other handles get `Stopped` afterwards.
    #[instrument(skip_all, fields(model = %self.shared.info.name))]
    pub fn shutdown(self) {
        let _ = self.shared.commands.send(Command::Shutdown);
        let thread = match self.shared.thread.lock() {
            Ok(mut thread) => thread.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            warn!("embedding thread panicked");
        }
    }
}

/// The embedding thread's loop. Only this thread touches tensors.
fn run(encoder: LoadedEncoder, commands: Receiver<Command>) {
    let _no_grad = tch::no_grad_guard();
    while let Ok(Command::Embed(job)) = commands.recv() {
        if job.reply.is_closed() {
            debug!("caller gone; request skipped");
            continue;
        }
        let started = std::time::Instant::now();
        let result = encoder.embed(&job.texts).map_err(|error| {
            warn!(%error, "embedding failed");
            EngineError::Model(error)
        });
        debug!(
            texts = job.texts.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "embedded"
        );
        let _ = job.reply.send(result);
    }
    info!(model = %encoder.info.name, "embedding model stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|text| text.to_string()).collect()
    }

    #[test]
    fn validation_names_the_field() {
        let empty = validate_texts(&[]).unwrap_err();
        assert_eq!(empty, ValidationError::EmptyTexts);
        assert!(empty.to_string().starts_with("texts "), "{empty}");
        let blank = validate_texts(&texts(&["fine", "  "])).unwrap_err();
        assert_eq!(blank, ValidationError::EmptyText { index: 1 });
        assert!(blank.to_string().starts_with("texts[1] "), "{blank}");
        let many = validate_texts(&vec!["x".to_string(); MAX_EMBED_TEXTS + 1]).unwrap_err();
        assert_eq!(many.kind(), "too_many_texts");
        assert!(many.to_string().starts_with("texts "), "{many}");
        assert!(validate_texts(&vec!["x".to_string(); MAX_EMBED_TEXTS]).is_ok());
    }

    #[test]
    fn pooling_modes() {
        let _no_grad = tch::no_grad_guard();
        // Two tokens of two features; the second is padding.
        let hidden = Tensor::from_slice(&[1.0f32, 2.0, 5.0, -7.0]).view([1, 2, 2]);
        let mask = Tensor::from_slice(&[1i64, 0]).view([1, 2]);
        let pooled = |pooling: Pooling| {
            Vec::<Vec<f32>>::try_from(&pooling.apply(&hidden, &mask).unwrap()).unwrap()
        };
        assert_eq!(pooled(Pooling::Mean), vec![vec![1.0, 2.0]]);
        assert_eq!(pooled(Pooling::Cls), vec![vec![1.0, 2.0]]);
        assert_eq!(pooled(Pooling::Max), vec![vec![1.0, 2.0]]);
        let mask = Tensor::from_slice(&[1i64, 1]).view([1, 2]);
        let mean = Pooling::Mean.apply(&hidden, &mask).unwrap();
        assert_eq!(
            Vec::<Vec<f32>>::try_from(&mean).unwrap(),
            vec![vec![3.0, -2.5]]
        );
        let max = Pooling::Max.apply(&hidden, &mask).unwrap();
        assert_eq!(
            Vec::<Vec<f32>>::try_from(&max).unwrap(),
            vec![vec![5.0, 2.0]]
        );
    }
}
