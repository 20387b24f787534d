//! The encoder: `BertModel` as transformers defines it (post-norm blocks,
//! absolute positions, exact-erf GELU), for sentence embeddings. It reads
//! top-down like `model`: `BertConfig`, `LayerNorm`, `Linear`, `Embeddings`,
//! `SelfAttention`, `Layer`, `BertModel`. Weight names mirror the checkpoint
//! (`encoder.layer.{i}.attention.self.query.weight`), with or without the
//! `bert.` prefix that `BertFor*` checkpoints add.
//!
//! Shapes in comments: B batch, L tokens (padded), H heads, D head size,
//! E hidden size, I intermediate size. Everything returns
//! `Result<_, TchError>` through the fallible `f_*` ops; callers hold a
//! `no_grad_guard`.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, TchError, Tensor};

use crate::config::DType;
use crate::error::LoadError;
use crate::weights::Weights;

/// `config.json` of a BERT checkpoint, Hugging Face field names.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct BertConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

/// The architectures `BertModel` loads (heads, if any, are ignored).
pub(crate) const SUPPORTED: &str = "BertModel";

impl BertConfig {
    pub(crate) fn read(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: BertConfig =
            serde_json::from_str(&text).map_err(|error| LoadError::InvalidConfig {
                path: path.to_path_buf(),
                message: error.to_string(),
            })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), LoadError> {
        let architecture = self.architectures.first().map(String::as_str);
        if let Some(architecture) = architecture
            && !matches!(
                architecture,
                "BertModel" | "BertForMaskedLM" | "BertForPreTraining"
            )
        {
            return Err(LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: architecture.to_string(),
                supported: SUPPORTED,
            });
        }
        let unsupported = |setting: String| LoadError::Unsupported {
            path: path.to_path_buf(),
            setting,
        };
        if self.hidden_act != "gelu" {
            return Err(unsupported(format!(
                "hidden_act `{}` (supported: gelu)",
                self.hidden_act
            )));
        }
        if let Some(kind) = &self.position_embedding_type
            && kind != "absolute"
        {
            return Err(unsupported(format!(
                "position_embedding_type `{kind}` (supported: absolute)"
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(unsupported(format!(
                "hidden_size {} not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// The dtype the checkpoint says it holds, if it names a known one.
    pub(crate) fn checkpoint_dtype(&self) -> Option<DType> {
        self.dtype.as_deref().and_then(|text| text.parse().ok())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    size: i64,
    eps: f64,
}

impl LayerNorm {
    fn load(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<Self, LoadError> {
        Ok(LayerNorm {
            weight: weights.get(&format!("{name}.weight"), &[size])?,
            bias: weights.get(&format!("{name}.bias"), &[size])?,
            size: size as i64,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_layer_norm(
            [self.size],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(
        weights: &Weights,
        name: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self, LoadError> {
        Ok(Linear {
            weight: weights.get(&format!("{name}.weight"), &[out_features, in_features])?,
            bias: weights.get(&format!("{name}.bias"), &[out_features])?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.weight, Some(&self.bias))
    }
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn load(weights: &Weights, prefix: &str, config: &BertConfig) -> Result<Self, LoadError> {
        let hidden = config.hidden_size;
        Ok(Embeddings {
            word: weights.get(
                &format!("{prefix}word_embeddings.weight"),
                &[config.vocab_size, hidden],
            )?,
            position: weights.get(
                &format!("{prefix}position_embeddings.weight"),
                &[config.max_position_embeddings, hidden],
            )?,
            token_type: weights.get(
                &format!("{prefix}token_type_embeddings.weight"),
                &[config.type_vocab_size, hidden],
            )?,
            layer_norm: LayerNorm::load(
                weights,
                &format!("{prefix}LayerNorm"),
                hidden,
                config.layer_norm_eps,
            )?,
        })
    }

    /// ids, type_ids: (B, L) int64 → (B, L, E).
    fn forward(&self, ids: &Tensor, type_ids: &Tensor) -> Result<Tensor, TchError> {
        let length = ids.size()[1];
        let positions = Tensor::f_arange(length, (Kind::Int64, ids.device()))?.f_unsqueeze(0)?;
        let words = Tensor::f_embedding(&self.word, ids, -1, false, false)?;
        let positions = Tensor::f_embedding(&self.position, &positions, -1, false, false)?;
        let types = Tensor::f_embedding(&self.token_type, type_ids, -1, false, false)?;
        self.layer_norm
            .forward(&words.f_add(&types)?.f_add(&positions)?)
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    output_norm: LayerNorm,
    num_heads: i64,
    head_size: i64,
}

impl SelfAttention {
    fn load(weights: &Weights, prefix: &str, config: &BertConfig) -> Result<Self, LoadError> {
        let hidden = config.hidden_size;
        let linear =
            |name: &str| Linear::load(weights, &format!("{prefix}.{name}"), hidden, hidden);
        Ok(SelfAttention {
            query: linear("self.query")?,
            key: linear("self.key")?,
            value: linear("self.value")?,
            output: linear("output.dense")?,
            output_norm: LayerNorm::load(
                weights,
                &format!("{prefix}.output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
            )?,
            num_heads: config.num_attention_heads as i64,
            head_size: (hidden / config.num_attention_heads) as i64,
        })
    }

    /// xs: (B, L, E), mask: (B, 1, 1, L) bool, true where a key is a real token.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
        let (batch, length) = (xs.size()[0], xs.size()[1]);
        let heads = |projection: &Linear| {
            projection
                .forward(xs)?
                .f_view([batch, length, self.num_heads, self.head_size])?
                .f_transpose(1, 2) // (B, H, L, D)
        };
        let attended = Tensor::f_scaled_dot_product_attention(
            &heads(&self.query)?,
            &heads(&self.key)?,
            &heads(&self.value)?,
            Some(mask),
            0.0,
            false,
            None,
            false,
        )?;
        let merged = attended.f_transpose(1, 2)?.f_reshape([
            batch,
            length,
            self.num_heads * self.head_size,
        ])?;
        self.output_norm
            .forward(&self.output.forward(&merged)?.f_add(xs)?)
    }
}

struct Layer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn load(weights: &Weights, prefix: &str, config: &BertConfig) -> Result<Self, LoadError> {
        let (hidden, intermediate) = (config.hidden_size, config.intermediate_size);
        Ok(Layer {
            attention: SelfAttention::load(weights, &format!("{prefix}.attention"), config)?,
            intermediate: Linear::load(
                weights,
                &format!("{prefix}.intermediate.dense"),
                hidden,
                intermediate,
            )?,
            output: Linear::load(
                weights,
                &format!("{prefix}.output.dense"),
                intermediate,
                hidden,
            )?,
            output_norm: LayerNorm::load(
                weights,
                &format!("{prefix}.output.LayerNorm"),
                hidden,
                config.layer_norm_eps,
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
        let attended = self.attention.forward(xs, mask)?;
        // transformers' "gelu" is the exact erf form.
        let hidden = self.intermediate.forward(&attended)?.f_gelu("none")?;
        self.output_norm
            .forward(&self.output.forward(&hidden)?.f_add(&attended)?)
    }
}

pub(crate) struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    max_position_embeddings: usize,
    device: tch::Device,
}

impl BertModel {
    pub(crate) fn load(
        weights: &Weights,
        config: &BertConfig,
        device: tch::Device,
    ) -> Result<Self, LoadError> {
        let prefix = if weights.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let embeddings = Embeddings::load(weights, &format!("{prefix}embeddings."), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|index| Layer::load(weights, &format!("{prefix}encoder.layer.{index}"), config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BertModel {
            embeddings,
            layers,
            max_position_embeddings: config.max_position_embeddings,
            device,
        })
    }

    /// The last hidden state (B, L, E) of a padded batch: `ids` and
    /// `type_ids` are B rows of L, `mask` is 1 for real tokens and 0 for
    /// padding. Returned on the model's device, in its dtype.
    pub(crate) fn forward(
        &self,
        ids: &[i64],
        type_ids: &[i64],
        mask: &[i64],
        batch: usize,
    ) -> Result<Tensor, TchError> {
        let length = ids.len().checked_div(batch).unwrap_or(0);
        if batch == 0 || length == 0 || ids.len() != batch * length {
            return Err(TchError::Shape(format!(
                "encoder needs a non-empty batch of equal rows (got {} ids in {batch} rows)",
                ids.len()
            )));
        }
        if type_ids.len() != ids.len() || mask.len() != ids.len() {
            return Err(TchError::Shape(
                "ids, type ids and mask differ in length".into(),
            ));
        }
        if length > self.max_position_embeddings {
            return Err(TchError::Shape(format!(
                "{length} tokens exceed max_position_embeddings {}",
                self.max_position_embeddings
            )));
        }
        let shape = [batch as i64, length as i64];
        let tensor = |values: &[i64]| {
            Tensor::f_from_slice(values)?
                .f_view(shape)?
                .f_to_device(self.device)
        };
        let ids = tensor(ids)?;
        let type_ids = tensor(type_ids)?;
        let attend = tensor(mask)?
            .f_ne(0)?
            .f_view([batch as i64, 1, 1, length as i64])?;
        let mut xs = self.embeddings.forward(&ids, &type_ids)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &attend)?;
        }
        Ok(xs)
    }
}
