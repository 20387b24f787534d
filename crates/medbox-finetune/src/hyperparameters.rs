//! Training methods and their hyper-parameters: the defaults of each method,
//! and the checks that turn a request's overrides into [`Hyperparameters`].
//!
//! Defaults follow what LLaMA-Factory and PEFT users expect: LoRA r 16,
//! alpha 32, dropout 0.05 on every linear layer with a learning rate of 2e-4;
//! full fine-tuning at 1e-5; distillation `(1-r)·CE + r·T²·KL(teacher‖student)`
//! with r 0.5 and T 2, on full weights at 1e-5. AdamW with a cosine schedule
//! after a linear warm-up is implied by the protocol, not chosen here.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// How a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Low-rank adapters on the base model's linear layers; the result is an
    /// adapter (PEFT's folder format).
    Lora,
    /// Every weight; the result is a full model folder.
    Full,
    /// A student (the base model, every weight) learns from a teacher model on
    /// the box; the result is a full model folder.
    Distill,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Full => "full",
            Method::Distill => "distill",
        }
    }

    /// What a successful job of this method produces.
    pub fn output_kind(self) -> OutputKind {
        match self {
            Method::Lora => OutputKind::Adapter,
            Method::Full | Method::Distill => OutputKind::Merged,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A method name that is not `lora`, `full` or `distill`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`method` must be one of lora, full, distill; got `{0}`")]
pub struct UnknownMethod(pub String);

impl FromStr for Method {
    type Err = UnknownMethod;
    fn from_str(name: &str) -> Result<Method, UnknownMethod> {
        match name {
            "lora" => Ok(Method::Lora),
            "full" => Ok(Method::Full),
            "distill" => Ok(Method::Distill),
            other => Err(UnknownMethod(other.to_owned())),
        }
    }
}

/// What a finished job leaves in its output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `adapter_config.json` + `adapter_model.safetensors` (PEFT), served on its base model.
    Adapter,
    /// A whole model folder (`config.json`, `*.safetensors`, tokenizer files), as
    /// `save_pretrained` writes it.
    Merged,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Adapter => "adapter",
            OutputKind::Merged => "merged",
        }
    }

    /// The file whose presence marks a complete output folder of this kind.
    pub fn marker_file(self) -> &'static str {
        match self {
            OutputKind::Adapter => "adapter_config.json",
            OutputKind::Merged => "config.json",
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// LoRA settings (method `lora` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    /// The rank of each adapter.
    pub r: u32,
    /// The scale numerator: updates are scaled by `alpha / r`.
    pub alpha: f64,
    pub dropout: f64,
    /// Which modules get adapters; `["all-linear"]` means every linear layer
    /// of the decoder (attention and MLP projections, not the LM head).
    pub target_modules: Vec<String>,
}

/// Distillation settings (method `distill` only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillParameters {
    /// `r` in `(1-r)·CE + r·T²·KL(teacher‖student)`.
    pub ratio: f64,
    /// `T`, the softmax temperature of both distributions in the KL term.
    pub temperature: f64,
}

/// Every hyper-parameter of a job, defaults filled in. Written into the job
/// spec (`job.json`) and stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub epochs: u32,
    /// The peak learning rate (after warm-up, before the cosine decay).
    pub learning_rate: f64,
    /// Examples per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: u32,
    /// Longer examples are truncated to this many tokens.
    pub max_seq_len: u32,
    /// Share of the optimizer steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradients are clipped to this global L2 norm.
    pub max_grad_norm: f64,
    /// Evaluate on the eval split every this many optimizer steps (and at the end).
    pub eval_every: u32,
    /// Stop when the eval loss has not improved for this many evaluations; 0 = never.
    pub early_stopping_patience: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillParameters>,
}

/// What a request may set; `None` takes the method's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HyperparameterOverrides {
    pub epochs: Option<u32>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<u32>,
    pub gradient_accumulation_steps: Option<u32>,
    pub max_seq_len: Option<u32>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub eval_every: Option<u32>,
    pub early_stopping_patience: Option<u32>,
    pub lora_r: Option<u32>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub distill_ratio: Option<f64>,
    pub distill_temperature: Option<f64>,
}

/// A hyper-parameter out of its range, or set for a method that has no use for it.
/// Each message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HyperparameterError {
    #[error("`{field}` must be {range}, got {value}")]
    OutOfRange {
        field: &'static str,
        /// For example `between 1 and 1000` or `> 0 and ≤ 1`.
        range: String,
        value: f64,
    },
    #[error("`{field}` applies only to method {applies_to}, and this job's method is {method}")]
    NotForMethod {
        field: &'static str,
        applies_to: Method,
        method: Method,
    },
}

/// Optimizer steps between evaluations when the request sets none.
pub const DEFAULT_EVAL_EVERY: u32 = 100;

impl Hyperparameters {
    /// The defaults of `method`.
    pub fn defaults(method: Method) -> Hyperparameters {
        let learning_rate = match method {
            Method::Lora => 2e-4,
            Method::Full | Method::Distill => 1e-5,
        };
        Hyperparameters {
            epochs: 3,
            learning_rate,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            max_seq_len: 2048,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_every: DEFAULT_EVAL_EVERY,
            early_stopping_patience: 0,
            lora: (method == Method::Lora).then(|| LoraParameters {
                r: 16,
                alpha: 32.0,
                dropout: 0.05,
                target_modules: vec!["all-linear".to_owned()],
            }),
            distill: (method == Method::Distill).then_some(DistillParameters {
                ratio: 0.5,
                temperature: 2.0,
            }),
        }
    }

    /// The defaults of `method` with `overrides` applied, every value checked.
    pub fn resolve(
        method: Method,
        overrides: &HyperparameterOverrides,
    ) -> Result<Hyperparameters, HyperparameterError> {
        let mut resolved = Hyperparameters::defaults(method);
        let o = overrides;
        resolved.epochs = integer("epochs", o.epochs, resolved.epochs, 1, 1000)?;
        resolved.learning_rate = real(
            "learning_rate",
            o.learning_rate,
            resolved.learning_rate,
            Bound::Above(0.0),
            1.0,
        )?;
        resolved.batch_size = integer("batch_size", o.batch_size, resolved.batch_size, 1, 4096)?;
        resolved.gradient_accumulation_steps = integer(
            "gradient_accumulation_steps",
            o.gradient_accumulation_steps,
            resolved.gradient_accumulation_steps,
            1,
            4096,
        )?;
        resolved.max_seq_len = integer(
            "max_seq_len",
            o.max_seq_len,
            resolved.max_seq_len,
            16,
            1 << 20,
        )?;
        resolved.warmup_ratio = real(
            "warmup_ratio",
            o.warmup_ratio,
            resolved.warmup_ratio,
            Bound::AtLeast(0.0),
            0.5,
        )?;
        resolved.weight_decay = real(
            "weight_decay",
            o.weight_decay,
            resolved.weight_decay,
            Bound::AtLeast(0.0),
            1.0,
        )?;
        resolved.max_grad_norm = real(
            "max_grad_norm",
            o.max_grad_norm,
            resolved.max_grad_norm,
            Bound::Above(0.0),
            1e6,
        )?;
        resolved.eval_every = integer(
            "eval_every",
            o.eval_every,
            resolved.eval_every,
            1,
            1_000_000,
        )?;
        resolved.early_stopping_patience = integer(
            "early_stopping_patience",
            o.early_stopping_patience,
            resolved.early_stopping_patience,
            0,
            1000,
        )?;
        let lora_fields = [
            ("lora_r", o.lora_r.is_some()),
            ("lora_alpha", o.lora_alpha.is_some()),
            ("lora_dropout", o.lora_dropout.is_some()),
        ];
        match &mut resolved.lora {
            Some(lora) => {
                lora.r = integer("lora_r", o.lora_r, lora.r, 1, 1024)?;
                lora.alpha = real(
                    "lora_alpha",
                    o.lora_alpha,
                    lora.alpha,
                    Bound::Above(0.0),
                    1e4,
                )?;
                lora.dropout = real(
                    "lora_dropout",
                    o.lora_dropout,
                    lora.dropout,
                    Bound::AtLeast(0.0),
                    0.9,
                )?;
            }
            None => not_for_method(&lora_fields, Method::Lora, method)?,
        }
        let distill_fields = [
            ("distill_ratio", o.distill_ratio.is_some()),
            ("distill_temperature", o.distill_temperature.is_some()),
        ];
        match &mut resolved.distill {
            Some(distill) => {
                distill.ratio = real(
                    "distill_ratio",
                    o.distill_ratio,
                    distill.ratio,
                    Bound::AtLeast(0.0),
                    1.0,
                )?;
                distill.temperature = real(
                    "distill_temperature",
                    o.distill_temperature,
                    distill.temperature,
                    Bound::Above(0.0),
                    100.0,
                )?;
            }
            None => not_for_method(&distill_fields, Method::Distill, method)?,
        }
        Ok(resolved)
    }
}

fn not_for_method(
    fields: &[(&'static str, bool)],
    applies_to: Method,
    method: Method,
) -> Result<(), HyperparameterError> {
    match fields.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(HyperparameterError::NotForMethod {
            field,
            applies_to,
            method,
        }),
        None => Ok(()),
    }
}

fn integer(
    field: &'static str,
    value: Option<u32>,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, HyperparameterError> {
    let Some(value) = value else {
        return Ok(default);
    };
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(HyperparameterError::OutOfRange {
            field,
            range: format!("between {min} and {max}"),
            value: f64::from(value),
        })
    }
}

/// The lower end of a real range: exclusive (`Above`) or inclusive (`AtLeast`).
#[derive(Clone, Copy)]
enum Bound {
    Above(f64),
    AtLeast(f64),
}

fn real(
    field: &'static str,
    value: Option<f64>,
    default: f64,
    low: Bound,
    max: f64,
) -> Result<f64, HyperparameterError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let above_low = match low {
        Bound::Above(min) => value > min,
        Bound::AtLeast(min) => value >= min,
    };
    if value.is_finite() && above_low && value <= max {
        return Ok(value);
    }
    let range = match low {
        Bound::Above(min) => format!("> {min} and ≤ {max}"),
        Bound::AtLeast(min) => format!("between {min} and {max}"),
    };
    Err(HyperparameterError::OutOfRange {
        field,
        range,
        value,
    })
}
