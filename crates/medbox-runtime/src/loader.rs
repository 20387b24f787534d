//! Loading a model folder: config, tokenizer, generation defaults and
//! weights, checked against each other. Runs on the engine's own thread (or
//! the caller's, for `debug`), so the tensors it makes stay there.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::ModelInfo;
use crate::chat::ChatTemplate;
use crate::config::{DType, Device, GenerationConfig, ModelConfig, ModelFiles, TokenizerConfig};
use crate::constraint::ConstraintCompiler;
use crate::error::LoadError;
use crate::lora::MergeDeltas;
use crate::matmul_policy::KernelChoice;
use crate::model::Model;
use crate::validation::Validator;
use crate::weights::Weights;

pub(crate) struct LoadedModel {
    pub model: Model,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub info: ModelInfo,
    pub validator: Validator,
    /// The model's compiled chat template, if it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Whether answers may contain `<think>…</think>`.
    pub thinks: bool,
}

/// Everything but the weights: cheap, and enough to validate requests.
pub(crate) struct ModelMetadata {
    pub settings: crate::config::DecoderSettings,
    pub tokenizer: tokenizers::Tokenizer,
    pub generation: GenerationConfig,
    pub eos_token_ids: Vec<u32>,
}

pub(crate) fn read_metadata(dir: &Path) -> Result<ModelMetadata, LoadError> {
    let files = ModelFiles::new(dir);
    let settings = ModelConfig::read(&files.config)?.resolve(&files.config)?;
    let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer).map_err(|error| {
        LoadError::Tokenizer {
            path: files.tokenizer.clone(),
            message: error.to_string(),
        }
    })?;
    let highest_id = tokenizer.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    if highest_id >= settings.vocab_size {
        return Err(LoadError::VocabMismatch {
            path: files.tokenizer.clone(),
            tokenizer_vocab: highest_id + 1,
            model_vocab: settings.vocab_size,
        });
    }
    let generation = GenerationConfig::read_optional(&files.generation_config)?;
    let tokenizer_config = TokenizerConfig::read_optional(&files.tokenizer_config)?;
    // End tokens from every place a checkpoint may name them, in that order.
    let mut eos_token_ids: Vec<u32> = generation
        .eos_token_id
        .as_ref()
        .map(|ids| ids.to_vec())
        .unwrap_or_default();
    eos_token_ids.extend(&settings.eos_token_ids);
    if let Some(id) = tokenizer_config
        .eos_token
        .as_ref()
        .and_then(|token| tokenizer.token_to_id(token.content()))
    {
        eos_token_ids.push(id);
    }
    let mut seen = HashSet::new();
    eos_token_ids.retain(|id| seen.insert(*id));
    Ok(ModelMetadata {
        settings,
        tokenizer,
        generation,
        eos_token_ids,
    })
}

pub(crate) fn check_device(device: Device) -> Result<(), LoadError> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    let available = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    if (index as i64) < available {
        Ok(())
    } else {
        Err(LoadError::DeviceUnavailable {
            device: device.to_string(),
            message: format!("{available} CUDA devices are visible"),
        })
    }
}

pub(crate) fn load(
    name: &str,
    dir: &Path,
    dtype: Option<DType>,
    device: Device,
) -> Result<LoadedModel, LoadError> {
    let _no_grad = tch::no_grad_guard();
    check_device(device)?;
    // An adapter folder loads as its base model with the adapter merged.
    let adapter = if crate::lora::is_adapter_folder(dir) {
        Some(MergeDeltas::read(dir)?)
    } else {
        None
    };
    let adapter_dir = dir;
    let base_dir = adapter.as_ref().map(|adapter| adapter.base_dir.clone());
    let dir = base_dir.as_deref().unwrap_or(dir);
    let metadata = read_metadata(dir)?;
    let chat_template = ChatTemplate::load(dir)?;
    let thinks = metadata.tokenizer.token_to_id("<think>").is_some()
        || chat_template
            .as_ref()
            .is_some_and(ChatTemplate::mentions_think);
    let settings = &metadata.settings;
    let dtype = dtype.or(settings.checkpoint_dtype).unwrap_or(DType::F32);
    let mut weights = Weights::read(dir, dtype, device.to_tch())?;
    if let Some(adapter) = adapter {
        weights = weights.with_adapter(adapter);
    }
    let model = Model::load(
        &weights,
        settings,
        dtype.kind(),
        device.to_tch(),
        KernelChoice::Measured,
    )?;
    if let Some(unused) = weights.unused_adapter_weights().first() {
        return Err(LoadError::MissingTensor {
            path: dir.to_path_buf(),
            tensor: format!(
                "{unused} (named by the adapter in {})",
                adapter_dir.display()
            ),
        });
    }
    if !settings.tie_word_embeddings && !weights.contains("lm_head.weight") {
        return Err(LoadError::MissingTensor {
            path: dir.to_path_buf(),
            tensor: "lm_head.weight".into(),
        });
    }
    let info = ModelInfo {
        name: name.to_string(),
        architecture: settings.architecture.hf_name().to_string(),
        vocab_size: settings.vocab_size,
        max_context: settings.max_position_embeddings,
        dtype,
        device,
        eos_token_ids: metadata.eos_token_ids.clone(),
    };
    let tokenizer = Arc::new(metadata.tokenizer);
    let constraints = ConstraintCompiler::new(
        Arc::clone(&tokenizer),
        settings.vocab_size,
        &metadata.eos_token_ids,
    )
    .map(Arc::new);
    if let Err(reason) = &constraints {
        tracing::warn!(model = name, %reason, "constrained decoding is not available");
    }
    let validator = Validator {
        model_name: name.to_string(),
        max_context: settings.max_position_embeddings,
        defaults: metadata.generation,
        constraints,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        info,
        validator,
        chat_template,
        thinks,
    })
}
