//! medbox's model runtime: decoder models on tch (libtorch), their tokenizer,
//! sampling, and the engine thread that serves one model.
//!
//! # Module map
//! - `config`: the public `DType` and `Device`, and the serde view of a
//!   checkpoint's `config.json` / `generation_config.json` /
//!   `tokenizer_config.json` (transformers 4.x and 5.x keys alike).
//! - `weights`: safetensors reading, single file or sharded index, one
//!   tensor at a time straight into its final dtype and device.
//! - `bert`, `embedding`: the `BertModel` encoder and the `Embedder` handle
//!   that serves sentence-transformers embeddings from its own thread.
//! - `model`: the decoder (`RmsNorm`, `RotaryEmbedding`, `KvCache`,
//!   `Attention`, `Mlp`, `Block`, `Model`), one implementation driven by
//!   config for Llama, Mistral, Qwen2 and Qwen3.
//! - `matmul_policy`, `matvec`: which kernel multiplies a linear layer, by
//!   the number of rows, measured at load; `matvec` is the decode step's
//!   own product on the CPU (AVX2 loops on libtorch's OpenMP team, f32, bf16
//!   and int8 weights read once per step for every row).
//! - `loader`: a model folder → checked model, tokenizer and `ModelInfo`.
//! - `validation`: `GenerateRequest` → `ValidGenerateRequest`.
//! - `chat`, `reasoning`: chat prompts rendered with the model's own Jinja
//!   template (`Engine::validate_chat`), and the `ReasoningSplitter` that
//!   separates `<think>…</think>` from the answer, streamed or whole.
//! - `sampling`, `detokenize`, `stop`: token choice, UTF-8-safe incremental
//!   decoding and stop-string hold-back, all plain Rust and unit-tested
//!   without a model.
//! - `engine`: the `Engine` handle, its thread and the per-request
//!   `GenerationStream`.
//! - `lora`: LoRA adapters in PEFT's folder format; an adapter folder loads
//!   as its own model, merged into its base model's weights at load, or is
//!   attached to an engine serving its base (`Engine::attach_adapter`), so
//!   one batch mixes the base model and several adapters (`model::adapters`).
//! - `train`: `TrainableModel` for `medbox-trainer`: the same decoder with
//!   LoRA adapters or every weight trainable, the training pass
//!   (`Model::forward_sequences`: whole sequences, causal, no KV cache,
//!   autograd on), chat examples with loss on assistant turns only.
//! - `debug`: a small hidden entry point the parity tests use to read logits.
//!
//! # Invariants
//! - **Architecture Invariant:** tensors never leave the engine thread that
//!   loaded them; handles, requests and events carry only ids and strings.
//! - Every forward pass runs under `tch::no_grad_guard()` and uses the
//!   fallible `f_*` ops, so a tensor error fails one request, not the process.
//! - Dtype and device are chosen once, at load; unsupported configs are
//!   rejected then, with the file at fault named.
//! - The engine accepts only `ValidGenerateRequest`, which only
//!   `Engine::validate` makes.
//! - A sequence whose `GenerationStream` is dropped is removed before the
//!   engine's next step. The engine never blocks on a client: each request's
//!   event channel holds all of its events.
//! - Streamed text never contains part of a stop string nor half a UTF-8
//!   character; joining the deltas gives the full answer.
//! - **API Boundary:** this crate knows nothing of gRPC, SQL or serialisation;
//!   its public types are not `Serialize`.
//!
//! # Testing
//! `source scripts/env.sh && cargo test --release -p medbox-runtime`. The
//! integration tests (`tests/it`) build the tiny model with
//! `scripts/make-tiny-model` (cached in `$MEDBOX_CACHE/models`) and compare
//! logits and greedy tokens with transformers through `tests/it/reference.py`.

mod bert;
mod chat;
mod config;
mod constraint;
mod detokenize;
mod embedding;
mod engine;
mod error;
mod kv_blocks;
mod loader;
pub mod lora;
mod matmul_policy;
mod matvec;
mod model;
mod model_thread;
mod reasoning;
mod sampling;
mod stop;
pub mod train;
mod validation;
mod weights;

use std::path::PathBuf;

pub use chat::{ChatMessage, ChatRequest};
pub use config::{Architecture, DType, Device};
pub use constraint::Constraint;
pub use embedding::{EmbedError, Embedder, EmbeddingInfo, MAX_EMBED_TEXTS};
pub use engine::{
    Engine, EngineLoadSnapshot, FinishReason, GenerationEvent, GenerationStream, MAX_WAITING_LIMIT,
    Token, Usage,
};
pub use error::{EngineError, LoadError, RuntimeError, ValidationError};
pub use reasoning::{ReasoningDelta, ReasoningSplitter};
pub use validation::{GenerateRequest, SamplingParams, ValidGenerateRequest};

/// How to start an engine for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The name requests route by, used in messages.
    pub name: String,
    /// A Hugging Face style folder (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub path: PathBuf,
    /// `None`: the checkpoint's own dtype (f32 when it names none).
    pub dtype: Option<DType>,
    pub device: Device,
    /// Requests that may wait while the engine is busy; more get
    /// `EngineError::QueueFull`. With 0, a request is accepted only when a
    /// running slot is free. Capped at `MAX_WAITING_LIMIT`.
    pub max_waiting: usize,
    /// Continuous batching budgets (decoder models only).
    pub batching: BatchingConfig,
}

/// The engine's continuous-batching budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingConfig {
    /// Sequences in the running batch at most; more wait.
    pub max_running_sequences: usize,
    /// Tokens one forward pass may process: one per decoding sequence, the
    /// rest for chunks of prompts being prefilled. Long prompts are split
    /// into chunks of what is left, so running streams keep flowing.
    pub max_batch_tokens: usize,
    /// Memory for keys and values. `None`: room for `max_running_sequences`
    /// sequences of up to 2,048 tokens (at most 2 GiB, at least one full
    /// context). The model's context is cut to what the cache holds.
    pub kv_cache_bytes: Option<usize>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_running_sequences: 32,
            max_batch_tokens: 512,
            kv_cache_bytes: None,
        }
    }
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    /// The `architectures` entry of `config.json`, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub vocab_size: usize,
    /// Prompt plus generated tokens, at most.
    pub max_context: usize,
    pub dtype: DType,
    pub device: Device,
    pub eos_token_ids: Vec<u32>,
}

/// Test support: logits straight from the decoder, for parity checks against
/// transformers. Not part of the stable API.
#[doc(hidden)]
pub mod debug {
    use std::path::Path;

    use crate::{DType, Device, LoadError, RuntimeError, loader, model};

    /// Loads the model in `path` on the calling thread and returns the logits
    /// of every position of `ids` (one row of `vocab_size` per token),
    /// feeding the ids through the KV cache `chunk` tokens at a time
    /// (`chunk == ids.len()`: one prefill; `1`: token by token).
    pub fn prompt_logits(
        path: &Path,
        dtype: DType,
        device: Device,
        ids: &[u32],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, DebugError> {
        logits_of(path, None, dtype, device, ids, chunk)
    }

    /// `prompt_logits` of the base model in `path` with the LoRA adapter in
    /// `adapter` served beside it, unmerged (as `Engine::attach_adapter`
    /// serves it).
    pub fn attached_adapter_logits(
        path: &Path,
        adapter: &Path,
        dtype: DType,
        device: Device,
        ids: &[u32],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, DebugError> {
        logits_of(path, Some(adapter), dtype, device, ids, chunk)
    }

    fn logits_of(
        path: &Path,
        adapter: Option<&Path>,
        dtype: DType,
        device: Device,
        ids: &[u32],
        chunk: usize,
    ) -> Result<Vec<Vec<f32>>, DebugError> {
        let _no_grad = tch::no_grad_guard();
        let loaded = loader::load("debug", path, Some(dtype), device)?;
        let adapter = match adapter {
            Some(dir) => Some(
                loaded
                    .model
                    .serve_adapter(crate::lora::AdapterFile::read(dir)?)?,
            ),
            None => None,
        };
        let block_size = 16;
        let num_blocks = ids.len().div_ceil(block_size).max(1);
        let mut pool = loaded
            .model
            .new_pool(num_blocks, block_size)
            .map_err(RuntimeError::from)?;
        let blocks: Vec<u32> = (0..num_blocks as u32).collect();
        let mut rows = Vec::with_capacity(ids.len());
        let mut offset = 0;
        for piece in ids.chunks(chunk.max(1)) {
            let input = model::ChunkInput {
                tokens: piece,
                offset,
                blocks: &blocks,
                logits: piece.len(),
                adapter: adapter.as_ref(),
            };
            let logits = loaded
                .model
                .forward_batch(&[input], &mut pool)
                .map_err(RuntimeError::from)?;
            let logits: Vec<Vec<f32>> =
                Vec::<Vec<f32>>::try_from(&logits).map_err(RuntimeError::from)?;
            rows.extend(logits);
            offset += piece.len();
        }
        Ok(rows)
    }

    #[derive(Debug, thiserror::Error)]
    pub enum DebugError {
        #[error(transparent)]
        Load(#[from] LoadError),
        #[error(transparent)]
        Runtime(#[from] RuntimeError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn handles_cross_threads() {
        assert_send_sync::<Engine>();
        assert_send_sync::<ModelInfo>();
        assert_send::<GenerationStream>();
        assert_send::<ValidGenerateRequest>();
        assert_send::<GenerationEvent>();
    }

    #[test]
    fn finish_reasons_and_error_kinds() {
        let reasons = [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Cancelled,
        ];
        let names: Vec<&str> = reasons.iter().map(|reason| reason.as_str()).collect();
        assert_eq!(names, ["stop", "length", "cancelled"]);
        let stopped = EngineError::Stopped {
            model: "tiny".into(),
        };
        assert_eq!(
            (stopped.kind(), stopped.to_string().as_str()),
            ("stopped", "model `tiny` is stopped")
        );
    }
}
