//! Training support for `medbox-trainer`: a decoder loaded with its
//! trainable parameters (LoRA adapters, or every weight), examples encoded
//! with the model's own chat template (loss on the assistant turns only),
//! the summed token loss of a batch, and the result written as a PEFT
//! adapter or a whole model folder.
//!
//! The model is the inference `Model` (one code path); the training pass is
//! `Model::forward_sequences`. The optimizer, the schedule and checkpoints
//! belong to the trainer (`medbox-finetune`).
//!
//! **Architecture Invariant:** a `TrainableModel` and its tensors stay on the
//! thread that loaded it (the trainer has one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Reduction, TchError, Tensor};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::{DType, Device};
use crate::error::LoadError;
use crate::lora::{AdapterWriteError, LoraSettings, write_adapter};
use crate::matmul_policy::KernelChoice;
use crate::model::{LoraPair, Model, TrainingPass};
use crate::weights::Weights;

/// Labels of positions that carry no loss.
pub const IGNORED_LABEL: i64 = -100;

/// What a job trains.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// LoRA adapters beside the linear layers; the base weights stay frozen.
    Lora(LoraSettings),
    /// Every weight.
    Full,
    /// Nothing: a distillation teacher, only ever run without gradients.
    Frozen,
}

/// The distillation loss's mix: `(1-ratio)·CE + ratio·T²·KL(teacher‖student)`,
/// both distributions softened by the temperature `T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillMix {
    pub ratio: f64,
    pub temperature: f64,
}

/// How to load a model for training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingOptions {
    /// f32 or bf16 (int8 cannot be trained).
    pub dtype: DType,
    pub device: Device,
    pub trainable: Trainable,
}

/// One example as token ids and labels of equal length: a label is the id
/// the model should predict at that position ([`IGNORED_LABEL`] where no
/// loss is taken). Labels are not shifted: position `i`'s logits are scored
/// against label `i + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedExample {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl EncodedExample {
    /// Positions that carry loss (the first position never does).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&label| label != IGNORED_LABEL)
            .count()
    }
}

/// Why an example cannot be encoded. Messages never quote the example.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the model has no chat template, so `messages` examples cannot be rendered")]
    NoChatTemplate,
    #[error("the chat template failed: {0}")]
    Template(String),
    #[error(
        "the chat template does not render a conversation as a prefix of its continuation, so assistant turns cannot be located"
    )]
    NotIncremental,
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
}

/// Why a trained result cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot write `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Adapter(#[from] AdapterWriteError),
    #[error("cannot write the weights: {0}")]
    Tensor(#[from] TchError),
    #[error("this model trains LoRA adapters; there is no adapter to write for full training")]
    NotLora,
}

/// A decoder ready to train.
pub struct TrainableModel {
    model: Model,
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    /// The model folder it was loaded from.
    dir: PathBuf,
    device: tch::Device,
    lora: Option<LoraSettings>,
    adapters: HashMap<String, LoraPair>,
    /// What the optimizer updates, by name, in a stable order.
    parameters: Vec<(String, Tensor)>,
}

impl TrainableModel {
    /// Loads the model in `dir`. LoRA adapters are initialised as PEFT does
    /// (A Kaiming-uniform, B zero) from torch's global generator: seed it
    /// first for a reproducible start.
    pub fn load(dir: &Path, options: &TrainingOptions) -> Result<TrainableModel, LoadError> {
        let unsupported = |setting: &str| LoadError::Unsupported {
            path: dir.to_path_buf(),
            setting: setting.to_owned(),
        };
        if options.dtype == DType::Int8 {
            return Err(unsupported("dtype int8 for training (use f32 or bf16)"));
        }
        crate::loader::check_device(options.device)?;
        let device = options.device.to_tch();
        let metadata = crate::loader::read_metadata(dir)?;
        let chat_template = ChatTemplate::load(dir)?;
        let (model, adapters, parameters, lora) = {
            let _no_grad = tch::no_grad_guard();
            let weights = Weights::read(dir, options.dtype, device)?;
            // Reproducible kernels: a resumed job repeats the uninterrupted
            // one's losses to the last bit.
            let model = Model::load(
                &weights,
                &metadata.settings,
                options.dtype.kind(),
                device,
                KernelChoice::Reproducible,
            )?;
            let tensor_error = |tensor: &str, error: TchError| LoadError::Tensor {
                path: dir.to_path_buf(),
                tensor: tensor.to_owned(),
                message: error.to_string(),
            };
            let mut adapters = HashMap::new();
            let mut parameters = Vec::new();
            let lora = match &options.trainable {
                Trainable::Lora(settings) => {
                    if settings.r <= 0 {
                        return Err(unsupported("LoRA rank r ≤ 0"));
                    }
                    for module in model.linear_modules() {
                        if !settings.targets(&module.name) {
                            continue;
                        }
                        let pair = new_lora_pair(
                            module.in_features,
                            module.out_features,
                            settings,
                            device,
                        )
                        .map_err(|error| tensor_error(&module.name, error))?;
                        parameters
                            .push((format!("{}.lora_A", module.name), pair.a.shallow_clone()));
                        parameters
                            .push((format!("{}.lora_B", module.name), pair.b.shallow_clone()));
                        adapters.insert(module.name, pair);
                    }
                    if adapters.is_empty() {
                        return Err(unsupported(
                            "LoRA `target_modules` that match no linear layer of the model",
                        ));
                    }
                    Some(settings.clone())
                }
                Trainable::Full => {
                    for (name, mut weight) in model
                        .named_weights()
                        .map_err(|error| tensor_error("model weights", error))?
                    {
                        let _same_tensor = weight
                            .f_requires_grad_(true)
                            .map_err(|error| tensor_error(&name, error))?;
                        parameters.push((name, weight));
                    }
                    None
                }
                Trainable::Frozen => None,
            };
            (model, adapters, parameters, lora)
        };
        Ok(TrainableModel {
            model,
            tokenizer: metadata.tokenizer,
            chat_template,
            dir: dir.to_path_buf(),
            device,
            lora,
            adapters,
            parameters,
        })
    }

    /// What the optimizer updates, by name (adapters: `<module>.lora_A` and
    /// `<module>.lora_B`; full: checkpoint names), in a stable order. The
    /// tensors are the model's own: update them in place under `no_grad`.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.parameters
    }

    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// A conversation, rendered with the model's chat template; labels on
    /// the assistant turns only (each turn's text and what the template
    /// closes it with, e.g. `<|im_end|>`). The rendering before each
    /// assistant turn is tokenized as one piece, as a prompt is at inference.
    /// Truncated to `max_tokens`.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<EncodedExample, EncodeError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(EncodeError::NoChatTemplate)?;
        let render = |count: usize, generation_prompt: bool| {
            template
                .render_with(&messages[..count], generation_prompt)
                .map_err(|error| EncodeError::Template(error.to_string()))
        };
        // Pieces of text in order, each with whether it carries loss.
        let mut pieces: Vec<(String, bool)> = Vec::new();
        let mut rendered = String::new();
        for (index, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let prompt = render(index, true)?;
            let answered = render(index + 1, false)?;
            let (Some(context), Some(answer)) = (
                prompt.strip_prefix(rendered.as_str()),
                answered.strip_prefix(prompt.as_str()),
            ) else {
                return Err(EncodeError::NotIncremental);
            };
            pieces.push((context.to_owned(), false));
            pieces.push((answer.to_owned(), true));
            rendered = answered;
        }
        let whole = render(messages.len(), false)?;
        let rest = whole
            .strip_prefix(rendered.as_str())
            .ok_or(EncodeError::NotIncremental)?;
        pieces.push((rest.to_owned(), false));
        let mut example = EncodedExample {
            ids: Vec::new(),
            labels: Vec::new(),
        };
        for (text, learned) in pieces {
            if text.is_empty() {
                continue;
            }
            for id in self.encode(&text, false)? {
                example.ids.push(id);
                example
                    .labels
                    .push(if learned { id } else { IGNORED_LABEL });
            }
        }
        example.ids.truncate(max_tokens);
        example.labels.truncate(max_tokens);
        Ok(example)
    }

    /// Plain text, loss on every token; the tokenizer adds its special
    /// tokens (BOS) as it does for a prompt. Truncated to `max_tokens`.
    pub fn encode_text(
        &self,
        text: &str,
        max_tokens: usize,
    ) -> Result<EncodedExample, EncodeError> {
        let mut ids = self.encode(text, true)?;
        ids.truncate(max_tokens);
        Ok(EncodedExample {
            labels: ids.clone(),
            ids,
        })
    }

    fn encode(&self, text: &str, special_tokens: bool) -> Result<Vec<i64>, EncodeError> {
        let encoding = self
            .tokenizer
            .encode(text, special_tokens)
            .map_err(|error| EncodeError::Tokenizer(error.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// Whether `other` reads and writes the same tokens: the same
    /// tokenizer vocabulary and the same number of logits. Token-level
    /// distillation needs it.
    pub fn shares_vocabulary_with(&self, other: &TrainableModel) -> bool {
        self.model.vocab_size() == other.model.vocab_size()
            && self.tokenizer.get_vocab(true) == other.tokenizer.get_vocab(true)
    }

    /// The summed next-token cross-entropy of `examples` (one right-padded
    /// batch) and the number of positions it sums over. With `train`, LoRA
    /// dropout is on (from torch's global generator) and the graph is kept
    /// for `backward`; call it under `no_grad` to evaluate.
    pub fn loss_sum(
        &self,
        examples: &[&EncodedExample],
        train: bool,
    ) -> Result<(Tensor, i64), TchError> {
        let batch = self.batch_logits(examples, train)?;
        let loss = batch.cross_entropy_sum()?;
        Ok((loss, batch.targets))
    }

    /// [`TrainableModel::loss_sum`] for distillation: over the target
    /// positions, `(1-r)·CE + r·T²·KL(teacher‖student)` summed, where the
    /// teacher (same vocabulary, see
    /// [`TrainableModel::shares_vocabulary_with`]) runs without gradients.
    pub fn distill_loss_sum(
        &self,
        teacher: &TrainableModel,
        examples: &[&EncodedExample],
        mix: DistillMix,
        train: bool,
    ) -> Result<(Tensor, i64), TchError> {
        let batch = self.batch_logits(examples, train)?;
        let teacher_logits = {
            let _no_grad = tch::no_grad_guard();
            teacher.batch_logits(examples, false)?.predicted
        };
        let cross_entropy = batch.cross_entropy_sum()?;
        let temperature = mix.temperature;
        let student = batch
            .predicted
            .f_to_kind(Kind::Float)?
            .f_div_scalar(temperature)?
            .f_log_softmax(-1, Kind::Float)?;
        let teacher = teacher_logits
            .f_to_kind(Kind::Float)?
            .f_div_scalar(temperature)?
            .f_log_softmax(-1, Kind::Float)?;
        // KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), summed over positions.
        let kl = teacher
            .f_exp()?
            .f_mul(&teacher.f_sub(&student)?)?
            .f_sum(Kind::Float)?;
        let loss = cross_entropy
            .f_mul_scalar(1.0 - mix.ratio)?
            .f_add(&kl.f_mul_scalar(mix.ratio * temperature * temperature)?)?;
        Ok((loss, batch.targets))
    }

    /// One right-padded batch through the model: the logits of every
    /// position whose next token is a target, (N, V), and those targets.
    fn batch_logits(
        &self,
        examples: &[&EncodedExample],
        train: bool,
    ) -> Result<BatchLogits, TchError> {
        let length = examples
            .iter()
            .map(|example| example.ids.len())
            .max()
            .unwrap_or(0);
        if length < 2 {
            return Err(TchError::Shape(
                "a batch needs an example of at least 2 tokens".into(),
            ));
        }
        let mut ids = Vec::with_capacity(examples.len() * length);
        // Flat positions (row · L + t) whose next token is a target, and
        // those targets.
        let mut rows = Vec::new();
        let mut expected = Vec::new();
        for (row, example) in examples.iter().enumerate() {
            let padding = length - example.ids.len();
            ids.extend(&example.ids);
            ids.extend(std::iter::repeat_n(0, padding));
            for (position, &label) in example.labels.iter().enumerate().skip(1) {
                if label != IGNORED_LABEL {
                    rows.push((row * length + position - 1) as i64);
                    expected.push(label);
                }
            }
        }
        let targets = expected.len() as i64;
        let batch = examples.len() as i64;
        let ids = Tensor::f_from_slice(&ids)?
            .f_view([batch, length as i64])?
            .f_to_device(self.device)?;
        let rows = Tensor::f_from_slice(&rows)?.f_to_device(self.device)?;
        let expected = Tensor::f_from_slice(&expected)?.f_to_device(self.device)?;
        let pass = TrainingPass {
            adapters: &self.adapters,
            lora_dropout: self.lora.as_ref().map_or(0.0, |lora| lora.dropout),
            train,
        };
        Ok(BatchLogits {
            predicted: self.model.forward_sequences(&ids, &rows, &pass)?, // (N, V)
            expected,
            targets,
        })
    }

    /// Writes the adapters into `dir` (which must exist) in PEFT's format,
    /// naming this model's folder as the base.
    pub fn save_adapter(&self, dir: &Path) -> Result<(), SaveError> {
        let settings = self.lora.as_ref().ok_or(SaveError::NotLora)?;
        let base = std::fs::canonicalize(&self.dir).map_err(|source| SaveError::Io {
            path: self.dir.clone(),
            source,
        })?;
        write_adapter(dir, settings, &base, &self.adapters)?;
        Ok(())
    }

    /// Writes the whole model into `dir` (which must exist) as
    /// `save_pretrained` does: `model.safetensors` with every weight (LoRA
    /// merged when training adapters), and the base folder's config,
    /// generation config, tokenizer and chat template files.
    pub fn save_full(&self, dir: &Path) -> Result<(), SaveError> {
        let _no_grad = tch::no_grad_guard();
        let mut tensors = Vec::new();
        for (name, weight) in self.model.named_weights()? {
            let mut weight = weight.f_detach()?.f_to_device(tch::Device::Cpu)?;
            if let Some(module) = name.strip_suffix(".weight")
                && let Some(pair) = self.adapters.get(module)
            {
                let kind = weight.f_kind()?;
                let delta = pair
                    .b
                    .f_to_kind(Kind::Float)?
                    .f_matmul(&pair.a.f_to_kind(Kind::Float)?)?
                    .f_mul_scalar(pair.scale)?
                    .f_to_device(tch::Device::Cpu)?;
                weight = weight
                    .f_to_kind(Kind::Float)?
                    .f_add(&delta)?
                    .f_to_kind(kind)?;
            }
            tensors.push((name, weight.f_contiguous()?));
        }
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
        for file in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            let source = self.dir.join(file);
            if !source.is_file() {
                continue;
            }
            let target = dir.join(file);
            std::fs::copy(&source, &target).map_err(|source| SaveError::Io {
                path: target,
                source,
            })?;
        }
        Ok(())
    }
}

/// A batch's logits at the positions that carry loss, and their targets.
struct BatchLogits {
    /// (N, V)
    predicted: Tensor,
    /// (N,)
    expected: Tensor,
    /// N.
    targets: i64,
}

impl BatchLogits {
    /// The summed next-token cross-entropy.
    fn cross_entropy_sum(&self) -> Result<Tensor, TchError> {
        self.predicted.f_cross_entropy_loss(
            &self.expected,
            None::<Tensor>,
            Reduction::Sum,
            IGNORED_LABEL,
            0.0,
        )
    }
}

/// A fresh adapter: A (r, in) uniform in ±1/√in (PEFT's Kaiming-uniform
/// with a = √5), B (out, r) zero, so training starts from the base model.
fn new_lora_pair(
    in_features: i64,
    out_features: i64,
    settings: &LoraSettings,
    device: tch::Device,
) -> Result<LoraPair, TchError> {
    let bound = 1.0 / (in_features as f64).sqrt();
    let mut a = Tensor::f_empty([settings.r, in_features], (Kind::Float, device))?;
    let _ = a.f_uniform_(-bound, bound)?;
    let mut b = Tensor::f_zeros([out_features, settings.r], (Kind::Float, device))?;
    let _ = a.f_requires_grad_(true)?;
    let _ = b.f_requires_grad_(true)?;
    Ok(LoraPair {
        a,
        b,
        scale: settings.scale(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_tokens_skip_the_first_position_and_ignored_labels() {
        let example = EncodedExample {
            ids: vec![5, 6, 7, 8],
            labels: vec![5, IGNORED_LABEL, 7, 8],
        };
        assert_eq!(example.target_tokens(), 2);
    }
}
