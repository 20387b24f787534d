//! The decoder: one implementation of the Llama family driven by
//! `DecoderSettings` (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k
//! RMS norm; grouped-query attention; tied or untied embeddings). It reads
//! top-down: `RmsNorm`, `Linear`, `RotaryEmbedding`, `KvCache`, `Attention`,
//! `Mlp`, `Block`, `Model`, each with `load` and `forward`. Weight names mirror
//! the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`).
//!
//! Shapes in comments: B batch, L new tokens, T cached + new tokens, H query
//! heads, K key/value heads, D head_dim, E hidden size, V vocabulary.
//! Everything here returns `Result<_, TchError>` through the fallible `f_*`
//! ops; callers hold a `no_grad_guard`.

use tch::{Kind, TchError, Tensor};

use crate::config::{DecoderSettings, RopeScaling};
use crate::error::LoadError;
use crate::weights::Weights;

/// Root-mean-square norm, computed in f32 as transformers does.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(weights: &Weights, name: &str, size: usize, eps: f64) -> Result<Self, LoadError> {
        Ok(RmsNorm {
            weight: weights.get(&format!("{name}.weight"), &[size])?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let kind = xs.f_kind()?;
        let xs = xs.f_to_kind(Kind::Float)?;
        let variance = xs.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, None)?;
        let normed = xs.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        self.weight.f_mul(&normed.f_to_kind(kind)?)
    }
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        weights: &Weights,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, LoadError> {
        Ok(Linear {
            weight: weights.get(&format!("{name}.weight"), &[out_features, in_features])?,
            bias: if bias {
                Some(weights.get(&format!("{name}.bias"), &[out_features])?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.weight, self.bias.as_ref())
    }
}

/// Precomputed cos and sin tables for every position up to the context.
struct RotaryEmbedding {
    /// (max_position, D) each, in the model's dtype.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(settings: &DecoderSettings, kind: Kind, device: tch::Device) -> Result<Self, TchError> {
        let dim = settings.head_dim as i64;
        // inv_freq = 1 / theta^(2i / D), as transformers computes it, in f32.
        let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, tch::Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let inv_freq = Tensor::f_pow_scalar(settings.rope_theta, &exponents)?.f_reciprocal()?;
        let inv_freq: Vec<f32> = Vec::<f32>::try_from(&inv_freq)?;
        let inv_freq = scale_inverse_frequencies(inv_freq, settings.rope_scaling);
        let inv_freq = Tensor::f_from_slice(&inv_freq)?;
        let positions = Tensor::f_arange(
            settings.max_position_embeddings as i64,
            (Kind::Float, tch::Device::Cpu),
        )?;
        let frequencies = positions.f_outer(&inv_freq)?; // (max_position, D/2)
        let angles = Tensor::f_cat(&[&frequencies, &frequencies], -1)?; // (max_position, D)
        Ok(RotaryEmbedding {
            cos: angles.f_cos()?.f_to_kind(kind)?.f_to_device(device)?,
            sin: angles.f_sin()?.f_to_kind(kind)?.f_to_device(device)?,
        })
    }

    /// Rotates `xs` (B, heads, L, D) for positions offset..offset+L.
    fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor, TchError> {
        let length = xs.size()[2];
        let cos = self.cos.f_narrow(0, offset as i64, length)?;
        let sin = self.sin.f_narrow(0, offset as i64, length)?;
        let half = xs.size()[3] / 2;
        let first = xs.f_narrow(-1, 0, half)?;
        let second = xs.f_narrow(-1, half, half)?;
        let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], -1)?;
        xs.f_mul(&cos)?.f_add(&rotated.f_mul(&sin)?)
    }
}

/// Applies `linear` or `llama3` scaling to the inverse frequencies, following
/// the transformers rope initialisation functions.
fn scale_inverse_frequencies(inv_freq: Vec<f32>, scaling: RopeScaling) -> Vec<f32> {
    match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq
            .into_iter()
            .map(|frequency| frequency / factor as f32)
            .collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelength = old_context / low_freq_factor;
            let high_freq_wavelength = old_context / high_freq_factor;
            inv_freq
                .into_iter()
                .map(|frequency| {
                    let frequency = frequency as f64;
                    let wavelength = 2.0 * std::f64::consts::PI / frequency;
                    let scaled = if wavelength > low_freq_wavelength {
                        frequency / factor
                    } else if wavelength < high_freq_wavelength {
                        frequency
                    } else {
                        let smooth = (old_context / wavelength - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * frequency / factor + smooth * frequency
                    };
                    scaled as f32
                })
                .collect()
        }
    }
}

/// Keys and values of every layer for one sequence; grows by concatenation.
pub(crate) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    length: usize,
}

impl KvCache {
    pub(crate) fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            length: 0,
        }
    }

    /// Tokens already in the cache (the position of the next token).
    pub(crate) fn len(&self) -> usize {
        self.length
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(
        weights: &Weights,
        prefix: &str,
        settings: &DecoderSettings,
    ) -> Result<Self, LoadError> {
        let hidden = settings.hidden_size;
        let head_dim = settings.head_dim;
        let query_size = settings.num_attention_heads * head_dim;
        let kv_size = settings.num_key_value_heads * head_dim;
        let qkv_bias = settings.qkv_bias;
        let norm = |name: &str| {
            RmsNorm::load(
                weights,
                &format!("{prefix}.{name}"),
                head_dim,
                settings.rms_norm_eps,
            )
        };
        Ok(Attention {
            q_proj: Linear::load(
                weights,
                &format!("{prefix}.q_proj"),
                hidden,
                query_size,
                qkv_bias,
            )?,
            k_proj: Linear::load(
                weights,
                &format!("{prefix}.k_proj"),
                hidden,
                kv_size,
                qkv_bias,
            )?,
            v_proj: Linear::load(
                weights,
                &format!("{prefix}.v_proj"),
                hidden,
                kv_size,
                qkv_bias,
            )?,
            o_proj: Linear::load(
                weights,
                &format!("{prefix}.o_proj"),
                query_size,
                hidden,
                settings.o_bias,
            )?,
            q_norm: if settings.qk_norm {
                Some(norm("q_norm")?)
            } else {
                None
            },
            k_norm: if settings.qk_norm {
                Some(norm("k_norm")?)
            } else {
                None
            },
            num_heads: settings.num_attention_heads as i64,
            num_kv_heads: settings.num_key_value_heads as i64,
            head_dim: head_dim as i64,
        })
    }

    /// xs: (B, L, E) → (B, L, E). Appends this step's keys and values to `cache`.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryEmbedding,
        cache: &mut Option<(Tensor, Tensor)>,
        offset: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        let (batch, length) = (xs.size()[0], xs.size()[1]);
        let heads = |projection: &Linear, heads: i64, norm: &Option<RmsNorm>| {
            let states = projection
                .forward(xs)?
                .f_view([batch, length, heads, self.head_dim])?;
            let states = match norm {
                Some(norm) => norm.forward(&states)?,
                None => states,
            };
            states.f_transpose(1, 2) // (B, heads, L, D)
        };
        let query = rotary.apply(&heads(&self.q_proj, self.num_heads, &self.q_norm)?, offset)?;
        let key = rotary.apply(
            &heads(&self.k_proj, self.num_kv_heads, &self.k_norm)?,
            offset,
        )?;
        let value = heads(&self.v_proj, self.num_kv_heads, &None)?;
        let (key, value) = match cache.take() {
            Some((past_key, past_value)) => (
                Tensor::f_cat(&[&past_key, &key], 2)?,
                Tensor::f_cat(&[&past_value, &value], 2)?,
            ),
            None => (key, value),
        }; // (B, K, T, D)
        *cache = Some((key.shallow_clone(), value.shallow_clone()));
        let repeats = self.num_heads / self.num_kv_heads;
        let (key, value) = if repeats > 1 {
            (
                key.f_repeat_interleave_self_int(repeats, 1, None)?,
                value.f_repeat_interleave_self_int(repeats, 1, None)?,
            )
        } else {
            (key, value)
        }; // (B, H, T, D)
        let attended = Tensor::f_scaled_dot_product_attention(
            &query, &key, &value, mask, 0.0, false, None, false,
        )?; // (B, H, L, D)
        let merged = attended.f_transpose(1, 2)?.f_reshape([
            batch,
            length,
            self.num_heads * self.head_dim,
        ])?;
        self.o_proj.forward(&merged)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(
        weights: &Weights,
        prefix: &str,
        settings: &DecoderSettings,
    ) -> Result<Self, LoadError> {
        let (hidden, intermediate, bias) = (
            settings.hidden_size,
            settings.intermediate_size,
            settings.mlp_bias,
        );
        Ok(Mlp {
            gate_proj: Linear::load(
                weights,
                &format!("{prefix}.gate_proj"),
                hidden,
                intermediate,
                bias,
            )?,
            up_proj: Linear::load(
                weights,
                &format!("{prefix}.up_proj"),
                hidden,
                intermediate,
                bias,
            )?,
            down_proj: Linear::load(
                weights,
                &format!("{prefix}.down_proj"),
                intermediate,
                hidden,
                bias,
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let gate = self.gate_proj.forward(xs)?.f_silu()?;
        self.down_proj
            .forward(&gate.f_mul(&self.up_proj.forward(xs)?)?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(
        weights: &Weights,
        prefix: &str,
        settings: &DecoderSettings,
    ) -> Result<Self, LoadError> {
        let (hidden, eps) = (settings.hidden_size, settings.rms_norm_eps);
        Ok(Block {
            input_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.input_layernorm"),
                hidden,
                eps,
            )?,
            self_attn: Attention::load(weights, &format!("{prefix}.self_attn"), settings)?,
            post_attention_layernorm: RmsNorm::load(
                weights,
                &format!("{prefix}.post_attention_layernorm"),
                hidden,
                eps,
            )?,
            mlp: Mlp::load(weights, &format!("{prefix}.mlp"), settings)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryEmbedding,
        cache: &mut Option<(Tensor, Tensor)>,
        offset: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        let attended = self.self_attn.forward(
            &self.input_layernorm.forward(xs)?,
            rotary,
            cache,
            offset,
            mask,
        )?;
        let xs = xs.f_add(&attended)?;
        let transformed = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs.f_add(&transformed)
    }
}

pub(crate) struct Model {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    rotary: RotaryEmbedding,
    sliding_window: Option<usize>,
    max_position_embeddings: usize,
    device: tch::Device,
}

impl Model {
    pub(crate) fn load(
        weights: &Weights,
        settings: &DecoderSettings,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self, LoadError> {
        let (vocab, hidden) = (settings.vocab_size, settings.hidden_size);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..settings.num_hidden_layers)
            .map(|index| Block::load(weights, &format!("model.layers.{index}"), settings))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(weights, "model.norm", hidden, settings.rms_norm_eps)?;
        // Some tied checkpoints still store lm_head.weight; a tied model uses
        // the embeddings regardless, as transformers does.
        let lm_head = if settings.tie_word_embeddings {
            None
        } else {
            Some(weights.get("lm_head.weight", &[vocab, hidden])?)
        };
        let rotary =
            RotaryEmbedding::new(settings, kind, device).map_err(|error| LoadError::Tensor {
                path: "config.json".into(),
                tensor: "rotary embedding tables".into(),
                message: error.to_string(),
            })?;
        Ok(Model {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            sliding_window: settings.sliding_window,
            max_position_embeddings: settings.max_position_embeddings,
            device,
        })
    }

    pub(crate) fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Runs `tokens` (the next tokens of one sequence) through the decoder
    /// after what `cache` holds, and returns the logits of the last
    /// `num_logits` positions as (num_logits, V) in f32 on the CPU.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        num_logits: usize,
    ) -> Result<Tensor, TchError> {
        let offset = cache.length;
        let length = tokens.len();
        if length == 0 || num_logits == 0 || num_logits > length {
            return Err(TchError::Shape(format!(
                "forward needs 1 ≤ num_logits ({num_logits}) ≤ tokens ({length})"
            )));
        }
        if offset + length > self.max_position_embeddings {
            return Err(TchError::Shape(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                offset + length,
                self.max_position_embeddings
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&id| id as i64).collect();
        let ids = Tensor::f_from_slice(&ids)?
            .f_to_device(self.device)?
            .f_unsqueeze(0)?; // (1, L)
        let mask = self.attention_mask(offset, length)?;
        let mut xs = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?; // (1, L, E)
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            xs = layer.forward(&xs, &self.rotary, layer_cache, offset, mask.as_ref())?;
        }
        cache.length = offset + length;
        let last = xs.f_narrow(1, (length - num_logits) as i64, num_logits as i64)?;
        let last = self.norm.forward(&last)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        last.f_linear(head, None::<Tensor>)?
            .f_squeeze_dim(0)?
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)
    }

    /// A boolean (L, T) mask, true where a query may attend, or `None` when
    /// every cached and new key is visible (a single new token, no window).
    fn attention_mask(&self, offset: usize, length: usize) -> Result<Option<Tensor>, TchError> {
        let total = offset + length;
        let window = self.sliding_window.filter(|&window| window < total);
        if length == 1 && window.is_none() {
            return Ok(None);
        }
        let mut allowed = Vec::with_capacity(length * total);
        for query in 0..length {
            let position = offset + query;
            for key in 0..total {
                let visible =
                    key <= position && window.is_none_or(|window| position - key < window);
                allowed.push(visible);
            }
        }
        let mask = Tensor::f_from_slice(&allowed)?
            .f_view([length as i64, total as i64])?
            .f_to_device(self.device)?;
        Ok(Some(mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // Wavelengths: 2π (high, kept), 2π·10⁴ (low, divided by 8).
        let scaled = scale_inverse_frequencies(vec![1.0, 1e-4], scaling);
        assert_eq!(scaled[0], 1.0);
        assert!((scaled[1] - 1.25e-5).abs() < 1e-10, "{scaled:?}");
        let linear = scale_inverse_frequencies(vec![1.0, 0.5], RopeScaling::Linear { factor: 2.0 });
        assert_eq!(linear, vec![0.5, 0.25]);
    }
}
