//! Configuration: the public `DType` and `Device` choices, and the serde
//! `ModelConfig` read from a checkpoint's `config.json` with Hugging Face field
//! names. Both generations of keys are accepted: transformers 4.x writes
//! `rope_theta`, `rope_scaling` and `torch_dtype`; 5.x writes
//! `rope_parameters` and `dtype`. `ModelConfig::resolve` turns the raw file
//! into `DecoderSettings`, rejecting what the decoder cannot run, once, at load.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::error::LoadError;

/// The element type weights and activations are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// Weight-only int8: every linear layer's weights (and the output head)
    /// quantized at load with one scale per output channel; embeddings,
    /// norms, activations and the KV cache stay f32.
    Int8,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::Int8 => "int8",
        }
    }

    /// The kind tensors are stored and computed in (for `Int8`, everything
    /// but the quantized linear weights).
    pub(crate) fn kind(self) -> tch::Kind {
        match self {
            DType::F32 | DType::Int8 => tch::Kind::Float,
            DType::BF16 => tch::Kind::BFloat16,
            DType::F16 => tch::Kind::Half,
        }
    }
}

impl FromStr for DType {
    type Err = String;

    /// Accepts the short names (`f32`, `bf16`, `f16`) and the names
    /// `config.json` uses (`float32`, `bfloat16`, `float16`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "int8" | "i8" => Ok(DType::Int8),
            other => Err(format!(
                "unknown dtype `{other}` (expected f32, bf16, f16 or int8)"
            )),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Where a model's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    pub(crate) fn to_tch(self) -> tch::Device {
        match self {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(index) => tch::Device::Cuda(index),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(Device::Cuda(index)),
                _ => Err(format!(
                    "unknown device `{text}` (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => formatter.write_str("cpu"),
            Device::Cuda(index) => write!(formatter, "cuda:{index}"),
        }
    }
}

/// A token id or a list of them (`eos_token_id` is either in the wild).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE settings as either `rope_scaling` (4.x) or `rope_parameters` (5.x)
/// spell them. Older files say `type` where newer say `rope_type`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// `config.json` of a decoder checkpoint, Hugging Face field names.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_position_embeddings() -> usize {
    2048
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// The decoder variants one `Model` covers, switched by config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub(crate) const SUPPORTED: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";

    fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Everything the decoder needs, checked and defaulted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecoderSettings {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` covers it).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMS norm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Each token attends to at most this many tokens (itself included).
    pub sliding_window: Option<usize>,
    /// The checkpoint's own dtype, if it names one.
    pub checkpoint_dtype: Option<DType>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub(crate) fn read(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, LoadError> {
        serde_json::from_str(text).map_err(|error| LoadError::InvalidConfig {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
    }

    /// Checks the config against what the decoder supports.
    pub(crate) fn resolve(&self, path: &Path) -> Result<DecoderSettings, LoadError> {
        let unsupported = |setting: String| LoadError::Unsupported {
            path: path.to_path_buf(),
            setting,
        };
        let invalid = |message: String| LoadError::InvalidConfig {
            path: path.to_path_buf(),
            message,
        };
        let architecture_name = self.architectures.first().cloned().unwrap_or_default();
        let architecture = Architecture::from_hf_name(&architecture_name).ok_or_else(|| {
            LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: architecture_name.clone(),
                supported: Architecture::SUPPORTED,
            }
        })?;
        if let Some(activation) = &self.hidden_act
            && activation != "silu"
        {
            return Err(unsupported(format!(
                "hidden_act = {activation:?} (only \"silu\")"
            )));
        }
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(invalid(
                "num_attention_heads, num_hidden_layers and vocab_size must be > 0".into(),
            ));
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_key_value_heads})",
                self.num_attention_heads
            )));
        }
        let head_dim = match self.head_dim {
            Some(head_dim) => head_dim,
            None if self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return Err(invalid(format!(
                    "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                )));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head_dim ({head_dim}) must be even for RoPE"
            )));
        }
        let checkpoint_dtype = match &self.dtype {
            None => None,
            Some(name) => Some(
                name.parse::<DType>()
                    .map_err(|message| unsupported(format!("dtype: {message}")))?,
            ),
        };
        let (rope_theta, rope_scaling) = self.resolve_rope().map_err(unsupported)?;
        let sliding_window = match architecture {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window == Some(true) => {
                return Err(unsupported(
                    "use_sliding_window = true (Qwen per-layer sliding windows)".into(),
                ));
            }
            _ => None,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(DecoderSettings {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            checkpoint_dtype,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        })
    }

    fn resolve_rope(&self) -> Result<(f64, RopeScaling), String> {
        let parameters = self.rope_parameters.as_ref();
        let theta = parameters
            .and_then(|parameters| parameters.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        // 5.x folds scaling into rope_parameters; 4.x keeps rope_scaling.
        let scaling = match parameters {
            Some(parameters) if !is_default_rope(parameters) => Some(parameters),
            _ => self.rope_scaling.as_ref(),
        };
        let Some(scaling) = scaling else {
            return Ok((theta, RopeScaling::None));
        };
        let rope_type = scaling.rope_type.as_deref().unwrap_or("default");
        let factor = || {
            scaling
                .factor
                .filter(|factor| *factor > 0.0)
                .ok_or_else(|| format!("rope scaling `{rope_type}` needs a factor > 0"))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: scaling.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: scaling.high_freq_factor.unwrap_or(4.0),
                // transformers falls back to the model's own context length.
                original_max_position_embeddings: scaling
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings),
            },
            other => {
                return Err(format!(
                    "rope type `{other}` (supported: default, linear, llama3)"
                ));
            }
        };
        Ok((theta, scaling))
    }
}

fn is_default_rope(parameters: &RopeParameters) -> bool {
    matches!(parameters.rope_type.as_deref(), None | Some("default"))
}

/// The files of a model folder the runtime reads.
pub(crate) struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: PathBuf,
    pub generation_config: PathBuf,
}

impl ModelFiles {
    pub(crate) fn new(dir: &Path) -> Self {
        ModelFiles {
            config: dir.join("config.json"),
            tokenizer: dir.join("tokenizer.json"),
            tokenizer_config: dir.join("tokenizer_config.json"),
            generation_config: dir.join("generation_config.json"),
        }
    }
}

/// The sampling defaults and end tokens of `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct GenerationConfig {
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

impl GenerationConfig {
    /// Reads the file if present; a missing file means no defaults.
    pub(crate) fn read_optional(path: &Path) -> Result<Self, LoadError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
                path: path.to_path_buf(),
                message: error.to_string(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(LoadError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// A special token in `tokenizer_config.json`: a string or an object with `content`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    pub(crate) fn content(&self) -> &str {
        match self {
            SpecialToken::Text(text) => text,
            SpecialToken::Object { content } => content,
        }
    }
}

/// The part of `tokenizer_config.json` the runtime uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct TokenizerConfig {
    #[serde(default)]
    pub eos_token: Option<SpecialToken>,
}

impl TokenizerConfig {
    pub(crate) fn read_optional(path: &Path) -> Result<Self, LoadError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
                path: path.to_path_buf(),
                message: error.to_string(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(LoadError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<DecoderSettings, LoadError> {
        let path = Path::new("config.json");
        ModelConfig::parse(json, path)?.resolve(path)
    }

    const BASE: &str = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2"#;

    fn check_rope(extra: &str, expect_theta: f64, expect_scaling: RopeScaling) {
        let json = format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, {extra}}}"#);
        let resolved = settings(&json).unwrap();
        assert_eq!(
            (resolved.rope_theta, resolved.rope_scaling),
            (expect_theta, expect_scaling)
        );
    }

    #[test]
    fn rope_keys_of_both_generations() {
        // transformers 4.x
        check_rope(
            r#""rope_theta": 500000.0, "rope_scaling": null"#,
            500000.0,
            RopeScaling::None,
        );
        check_rope(
            r#""rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}"#,
            10000.0,
            RopeScaling::Linear { factor: 2.0 },
        );
        check_rope(
            r#""rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        );
        // transformers 5.x
        check_rope(
            r#""rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}"#,
            1000000.0,
            RopeScaling::None,
        );
        check_rope(
            r#""rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}"#,
            10000.0,
            RopeScaling::Linear { factor: 4.0 },
        );
        // Neither: the Llama default.
        check_rope(r#""rms_norm_eps": 1e-5"#, 10000.0, RopeScaling::None);
    }

    #[test]
    fn dtype_keys_of_both_generations() {
        let old = format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "torch_dtype": "bfloat16"}}"#
        );
        let new =
            format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "dtype": "float32"}}"#);
        assert_eq!(settings(&old).unwrap().checkpoint_dtype, Some(DType::BF16));
        assert_eq!(settings(&new).unwrap().checkpoint_dtype, Some(DType::F32));
    }

    #[test]
    fn architecture_switches() {
        let resolve = |name: &str| {
            settings(&format!(
                r#"{{"architectures": ["{name}"], {BASE}, "tie_word_embeddings": true}}"#
            ))
        };
        let qwen2 = resolve("Qwen2ForCausalLM").unwrap();
        assert!(qwen2.qkv_bias && !qwen2.o_bias && !qwen2.qk_norm && qwen2.tie_word_embeddings);
        let qwen3 = resolve("Qwen3ForCausalLM").unwrap();
        assert!(!qwen3.qkv_bias && qwen3.qk_norm);
        let llama = resolve("LlamaForCausalLM").unwrap();
        assert!(!llama.qkv_bias && !llama.qk_norm && llama.head_dim == 16);
        assert_eq!(llama.num_key_value_heads, 2);
        let error = resolve("GPT2LMHeadModel").unwrap_err();
        assert_eq!(error.kind(), "unsupported_architecture");
        assert!(error.to_string().contains("GPT2LMHeadModel"), "{error}");
    }

    #[test]
    fn rejects_unsupported_settings() {
        let check = |extra: &str, expect: &str| {
            let json = format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, {extra}}}"#);
            let message = settings(&json).unwrap_err().to_string();
            assert!(
                message.contains(expect),
                "{message} should contain {expect}"
            );
        };
        check(r#""hidden_act": "gelu""#, "hidden_act");
        check(
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
            "yarn",
        );
        check(r#""torch_dtype": "int4""#, "dtype");
        check(r#""num_key_value_heads": 3"#, "num_key_value_heads");
    }

    #[test]
    fn eos_one_or_many() {
        let one =
            format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "eos_token_id": 7}}"#);
        let many =
            format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "eos_token_id": [7, 9]}}"#);
        assert_eq!(settings(&one).unwrap().eos_token_ids, vec![7]);
        assert_eq!(settings(&many).unwrap().eos_token_ids, vec![7, 9]);
    }

    #[test]
    fn dtype_and_device_round_trip() {
        for text in ["f32", "bf16", "f16"] {
            assert_eq!(text.parse::<DType>().unwrap().to_string(), text);
        }
        for text in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<Device>().unwrap().to_string(), text);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert!("tpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("int3".parse::<DType>().is_err());
    }
}
