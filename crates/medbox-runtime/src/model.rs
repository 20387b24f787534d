//! The decoder: one implementation of the Llama family driven by
//! `DecoderSettings` (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k
//! RMS norm; grouped-query attention; tied or untied embeddings). It reads
//! top-down: `RmsNorm`, `Linear`, `RotaryEmbedding`, `KvCache`, `Attention`,
//! `Mlp`, `Block`, `Model`, each with `load` and `forward`. Weight names mirror
//! the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`).
//! LoRA adapters served unmerged (`adapters`) add their low-rank update to
//! the rows of the sequences that name them, inside each block's projections.
//!
//! Shapes in comments: B batch, L new tokens, T cached + new tokens, H query
//! heads, K key/value heads, D head_dim, E hidden size, V vocabulary.
//! Everything here returns `Result<_, TchError>` through the fallible `f_*`
//! ops; callers hold a `no_grad_guard`.

use tch::{Kind, TchError, Tensor};

use crate::config::{DecoderSettings, RopeScaling};
use crate::error::LoadError;
use crate::matmul_policy::{Kernel, KernelChoice, MatmulPolicy, quantize_rows};
use crate::matvec;
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
    weight: LinearWeight,
    bias: Option<Tensor>,
    policy: MatmulPolicy,
}

enum LinearWeight {
    /// (out, in) in the model's dtype.
    Dense(Tensor),
    /// (out, in) int8 and one f32 scale per output row: `w ≈ q · scale`.
    Int8 { weight: Tensor, scales: Tensor },
}

impl Linear {
    fn load(
        weights: &Weights,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, LoadError> {
        let weight_name = format!("{name}.weight");
        let weight = weights.get(&weight_name, &[out_features, in_features])?;
        Ok(Linear {
            weight: if weights.quantize_linears() {
                quantize(&weight).map_err(|error| LoadError::Tensor {
                    path: "model weights".into(),
                    tensor: weight_name,
                    message: format!("int8 quantization: {error}"),
                })?
            } else {
                LinearWeight::Dense(weight)
            },
            bias: if bias {
                Some(weights.get(&format!("{name}.bias"), &[out_features])?)
            } else {
                None
            },
            policy: weights.matmul_policy(),
        })
    }

    /// (out, in).
    fn shape(&self) -> (i64, i64) {
        let size = match &self.weight {
            LinearWeight::Dense(weight) => weight.size(),
            LinearWeight::Int8 { weight, .. } => weight.size(),
        };
        (size[0], size[1])
    }

    /// A dense layer over an existing tensor (a tied output head).
    fn dense(weight: Tensor, policy: MatmulPolicy) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias: None,
            policy,
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        // Rows of the product: every leading dimension (a training batch is
        // (B, L, E)).
        let rows = xs.numel() as i64 / xs.size().last().copied().unwrap_or(1).max(1);
        let (weight, scales) = match &self.weight {
            LinearWeight::Dense(weight) => (weight, None),
            LinearWeight::Int8 { weight, scales } => (weight, Some(scales)),
        };
        // `matvec` has no gradient: training passes that need one go
        // through libtorch.
        if self.policy.kernel(rows) == Kernel::Matvec
            && !xs.requires_grad()
            && !weight.requires_grad()
        {
            let out = matvec::linear(xs, weight, scales)?;
            return match &self.bias {
                Some(bias) => out.f_add(bias),
                None => Ok(out),
            };
        }
        self.policy
            .libtorch(xs, weight, scales, self.bias.as_ref(), rows)
    }
}

fn quantize(weight: &Tensor) -> Result<LinearWeight, TchError> {
    let (weight, scales) = quantize_rows(weight)?;
    Ok(LinearWeight::Int8 { weight, scales })
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

    /// The cos and sin rows of `positions` (N,), shaped (N, 1, D) to
    /// broadcast over the heads.
    fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        Ok((
            self.cos.f_index_select(0, positions)?.f_unsqueeze(1)?,
            self.sin.f_index_select(0, positions)?.f_unsqueeze(1)?,
        ))
    }
}

/// Rotates `xs` (N, heads, D) by the angles `at` gave for its rows.
fn rotate(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let half = xs.size()[2] / 2;
    let first = xs.f_narrow(-1, 0, half)?;
    let second = xs.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], -1)?;
    xs.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
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

    /// xs: (N, E), the new tokens of every sequence in the batch, one row
    /// each → (N, E). Writes this step's keys and values into the layer's
    /// pool rows, then attends each sequence to its own rows.
    fn forward(
        &self,
        xs: &Tensor,
        rotation: &(Tensor, Tensor),
        layout: &BatchLayout,
        adapters: LayerAdapters<'_>,
        keys_pool: &mut Tensor,
        values_pool: &mut Tensor,
    ) -> Result<Tensor, TchError> {
        let rows = xs.size()[0];
        let (cos, sin) = rotation;
        let heads =
            |linear: &Linear, projection: Projection, heads: i64, norm: &Option<RmsNorm>| {
                let states = adapters.project(linear, projection, xs)?.f_view([
                    rows,
                    heads,
                    self.head_dim,
                ])?;
                match norm {
                    Some(norm) => norm.forward(&states),
                    None => Ok(states),
                }
            };
        let query = rotate(
            &heads(&self.q_proj, Projection::Q, self.num_heads, &self.q_norm)?,
            cos,
            sin,
        )?;
        let key = rotate(
            &heads(&self.k_proj, Projection::K, self.num_kv_heads, &self.k_norm)?,
            cos,
            sin,
        )?;
        let value = heads(&self.v_proj, Projection::V, self.num_kv_heads, &None)?; // (N, K, D)
        // In place; the returned handle is the pool itself.
        let _pool = keys_pool.f_index_copy_(0, &layout.write_rows, &key)?;
        let _pool = values_pool.f_index_copy_(0, &layout.write_rows, &value)?;
        let grouped = self.num_heads != self.num_kv_heads;
        let mut outputs = Vec::with_capacity(layout.prefills.len() + 1);
        if let Some(decode) = &layout.decode {
            let count = decode.count;
            // On a CPU without native bf16/f16 arithmetic, libtorch's
            // attention kernels in those dtypes are several times slower
            // than in f32 (7.4 ms against 1.0 ms per layer for 32 sequences
            // of 192 positions, measured here), while the casts cost little:
            // reduced-precision models attend in f32 and cast back.
            let compute = |tensor: Tensor| match decode.compute_kind {
                Some(kind) => tensor.f_to_kind(kind),
                None => Ok(tensor),
            };
            let query = compute(query.f_narrow(0, 0, count)?.f_unsqueeze(2)?)?; // (B, H, 1, D)
            let gathered = |pool: &Tensor| {
                compute(
                    pool.f_index_select(0, &decode.gather)?
                        .f_view([count, decode.span, self.num_kv_heads, self.head_dim])?
                        .f_transpose(1, 2)?, // (B, K, T, D)
                )
            };
            let attended = Tensor::f_scaled_dot_product_attention(
                &query,
                &gathered(keys_pool)?,
                &gathered(values_pool)?,
                decode.mask.as_ref(),
                0.0,
                false,
                None,
                grouped,
            )?; // (B, H, 1, D)
            let attended = match decode.compute_kind {
                Some(_) => attended.f_to_kind(key.kind())?,
                None => attended,
            };
            outputs.push(attended.f_reshape([count, self.num_heads * self.head_dim])?);
        }
        for chunk in &layout.prefills {
            let query = query
                .f_narrow(0, chunk.start, chunk.length)?
                .f_transpose(0, 1)?
                .f_unsqueeze(0)?; // (1, H, L, D)
            let (chunk_keys, chunk_values) = match &chunk.gather {
                Some(gather) => (
                    keys_pool.f_index_select(0, gather)?,
                    values_pool.f_index_select(0, gather)?,
                ),
                None => (
                    key.f_narrow(0, chunk.start, chunk.length)?,
                    value.f_narrow(0, chunk.start, chunk.length)?,
                ),
            }; // (T, K, D)
            let attended = Tensor::f_scaled_dot_product_attention(
                &query,
                &chunk_keys.f_transpose(0, 1)?.f_unsqueeze(0)?,
                &chunk_values.f_transpose(0, 1)?.f_unsqueeze(0)?,
                chunk.mask.as_ref(),
                0.0,
                chunk.causal,
                None,
                grouped,
            )?; // (1, H, L, D)
            outputs.push(
                attended
                    .f_squeeze_dim(0)?
                    .f_transpose(0, 1)?
                    .f_reshape([chunk.length, self.num_heads * self.head_dim])?,
            );
        }
        let merged = if outputs.len() == 1 {
            outputs.swap_remove(0)
        } else {
            Tensor::f_cat(&outputs, 0)?
        };
        adapters.project(&self.o_proj, Projection::O, &merged)
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

    fn forward(&self, xs: &Tensor, adapters: LayerAdapters<'_>) -> Result<Tensor, TchError> {
        let gate = adapters
            .project(&self.gate_proj, Projection::Gate, xs)?
            .f_silu()?;
        let up = adapters.project(&self.up_proj, Projection::Up, xs)?;
        adapters.project(&self.down_proj, Projection::Down, &gate.f_mul(&up)?)
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
        rotation: &(Tensor, Tensor),
        layout: &BatchLayout,
        adapters: LayerAdapters<'_>,
        keys_pool: &mut Tensor,
        values_pool: &mut Tensor,
    ) -> Result<Tensor, TchError> {
        let attended = self.self_attn.forward(
            &self.input_layernorm.forward(xs)?,
            rotation,
            layout,
            adapters,
            keys_pool,
            values_pool,
        )?;
        let xs = xs.f_add(&attended)?;
        let transformed = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?, adapters)?;
        xs.f_add(&transformed)
    }

    /// The block's linear layer `projection`.
    fn linear(&self, projection: Projection) -> &Linear {
        match projection {
            Projection::Q => &self.self_attn.q_proj,
            Projection::K => &self.self_attn.k_proj,
            Projection::V => &self.self_attn.v_proj,
            Projection::O => &self.self_attn.o_proj,
            Projection::Gate => &self.mlp.gate_proj,
            Projection::Up => &self.mlp.up_proj,
            Projection::Down => &self.mlp.down_proj,
        }
    }
}

pub(crate) struct Model {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// The output head: `lm_head.weight`, or the embeddings when tied
    /// (quantized separately for int8, so the lookup stays exact).
    lm_head: Linear,
    rotary: RotaryEmbedding,
    sliding_window: Option<usize>,
    max_position_embeddings: usize,
    num_kv_heads: i64,
    head_dim: i64,
    kind: Kind,
    device: tch::Device,
}

impl Model {
    pub(crate) fn load(
        weights: &Weights,
        settings: &DecoderSettings,
        kind: Kind,
        device: tch::Device,
        kernels: KernelChoice,
    ) -> Result<Self, LoadError> {
        let (vocab, hidden) = (settings.vocab_size, settings.hidden_size);
        let weight_kind = if weights.quantize_linears() {
            Kind::Int8
        } else {
            kind
        };
        let policy = match kernels {
            // The MLP's up projection is the model's typical product.
            KernelChoice::Measured => MatmulPolicy::calibrate(
                weight_kind,
                kind,
                device,
                hidden,
                settings.intermediate_size,
            )
            .map_err(|error| LoadError::Tensor {
                path: "model weights".into(),
                tensor: "kernel calibration".into(),
                message: error.to_string(),
            })?,
            KernelChoice::Reproducible => MatmulPolicy::NATIVE,
        };
        weights.set_matmul_policy(policy);
        let embed_tokens = weights.get("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..settings.num_hidden_layers)
            .map(|index| Block::load(weights, &format!("model.layers.{index}"), settings))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(weights, "model.norm", hidden, settings.rms_norm_eps)?;
        // Some tied checkpoints still store lm_head.weight; a tied model uses
        // the embeddings regardless, as transformers does.
        let lm_head = if !settings.tie_word_embeddings {
            Linear::load(weights, "lm_head", hidden, vocab, false)?
        } else if weights.quantize_linears() {
            Linear {
                weight: quantize(&embed_tokens).map_err(|error| LoadError::Tensor {
                    path: "model weights".into(),
                    tensor: "model.embed_tokens.weight".into(),
                    message: format!("int8 quantization: {error}"),
                })?,
                bias: None,
                policy: weights.matmul_policy(),
            }
        } else {
            Linear::dense(embed_tokens.shallow_clone(), weights.matmul_policy())
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
            num_kv_heads: settings.num_key_value_heads as i64,
            head_dim: settings.head_dim as i64,
            kind,
            device,
        })
    }

    /// Rows of the embedding table: the ids the model reads.
    pub(crate) fn vocab_size(&self) -> i64 {
        self.embed_tokens.size()[0]
    }

    /// Bytes of keys and values one cached token takes, over all layers.
    pub(crate) fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len()
            * (self.num_kv_heads * self.head_dim) as usize
            * self.kind.elt_size_in_bytes()
    }

    /// The whole KV cache: `num_blocks` blocks of `block_size` positions
    /// per layer, allocated once.
    pub(crate) fn new_pool(
        &self,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<KvPool, TchError> {
        let rows = (num_blocks * block_size) as i64;
        let shape = [rows, self.num_kv_heads, self.head_dim];
        let mut keys = Vec::with_capacity(self.layers.len());
        let mut values = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            keys.push(Tensor::f_zeros(shape, (self.kind, self.device))?);
            values.push(Tensor::f_zeros(shape, (self.kind, self.device))?);
        }
        Ok(KvPool {
            keys,
            values,
            block_size,
        })
    }

    /// One decoder pass over the new tokens of several sequences at once
    /// (continuous batching: each `ChunkInput` is one sequence's next
    /// tokens after what its blocks already hold). Keys and values are
    /// written into `pool`. Returns the logits of the last `logits`
    /// positions of each chunk, in order, as (rows, V) in f32 on the CPU.
    ///
    /// One-token chunks at the front are attended as one batch; put decode
    /// steps first and prefill chunks after them.
    pub(crate) fn forward_batch(
        &self,
        chunks: &[ChunkInput<'_>],
        pool: &mut KvPool,
    ) -> Result<Tensor, TchError> {
        let layout = self.layout(chunks, pool.block_size)?;
        let ids = Tensor::f_from_slice(&layout.ids)?.f_to_device(self.device)?;
        let rotation = self.rotary.at(&layout.positions)?;
        let row_adapters: Vec<Option<&ServedAdapter>> = chunks
            .iter()
            .flat_map(|chunk| std::iter::repeat_n(chunk.adapter, chunk.tokens.len()))
            .collect();
        let adapters = BatchAdapters::new(&row_adapters);
        let mut xs = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?; // (N, E)
        for (index, ((layer, keys), values)) in self
            .layers
            .iter()
            .zip(pool.keys.iter_mut())
            .zip(pool.values.iter_mut())
            .enumerate()
        {
            xs = layer.forward(&xs, &rotation, &layout, adapters.layer(index), keys, values)?;
        }
        let last = xs.f_index_select(0, &layout.logit_rows)?;
        let last = self.norm.forward(&last)?;
        self.lm_head
            .forward(&last)?
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)
    }

    /// Checks the chunks and builds the index tensors every layer shares.
    fn layout(
        &self,
        chunks: &[ChunkInput<'_>],
        block_size: usize,
    ) -> Result<BatchLayout, TchError> {
        let row_of = |blocks: &[u32], position: usize| -> i64 {
            (blocks[position / block_size] as usize * block_size + position % block_size) as i64
        };
        let total: usize = chunks.iter().map(|chunk| chunk.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut write_rows = Vec::with_capacity(total);
        let mut logit_rows = Vec::new();
        for chunk in chunks {
            let (length, end) = (chunk.tokens.len(), chunk.offset + chunk.tokens.len());
            if length == 0 || chunk.logits > length {
                return Err(TchError::Shape(format!(
                    "a chunk needs 1 ≤ tokens ({length}) and logits ({}) ≤ tokens",
                    chunk.logits
                )));
            }
            if end > self.max_position_embeddings {
                return Err(TchError::Shape(format!(
                    "sequence of {end} tokens exceeds max_position_embeddings {}",
                    self.max_position_embeddings
                )));
            }
            if end > chunk.blocks.len() * block_size {
                return Err(TchError::Shape(format!(
                    "{} cache blocks cannot hold {end} positions",
                    chunk.blocks.len()
                )));
            }
            let start = ids.len();
            ids.extend(chunk.tokens.iter().map(|&id| id as i64));
            positions.extend((chunk.offset..end).map(|position| position as i64));
            write_rows.extend((chunk.offset..end).map(|position| row_of(chunk.blocks, position)));
            logit_rows
                .extend((start + length - chunk.logits..start + length).map(|row| row as i64));
        }
        let leading_decodes = chunks
            .iter()
            .take_while(|chunk| chunk.tokens.len() == 1)
            .count();
        let decode = if leading_decodes > 0 {
            Some(self.decode_group(&chunks[..leading_decodes], &row_of)?)
        } else {
            None
        };
        let mut prefills = Vec::new();
        let mut start = leading_decodes as i64;
        for chunk in &chunks[leading_decodes..] {
            prefills.push(self.prefill_chunk(chunk, start, &row_of)?);
            start += chunk.tokens.len() as i64;
        }
        let device = self.device;
        let indices = |values: &[i64]| Tensor::f_from_slice(values)?.f_to_device(device);
        Ok(BatchLayout {
            ids,
            positions: indices(&positions)?,
            write_rows: indices(&write_rows)?,
            logit_rows: indices(&logit_rows)?,
            decode,
            prefills,
        })
    }

    /// One new token per sequence: gather each one's rows, padded to the
    /// longest, with a mask hiding the padding (and what a sliding window
    /// hides).
    fn decode_group(
        &self,
        chunks: &[ChunkInput<'_>],
        row_of: &dyn Fn(&[u32], usize) -> i64,
    ) -> Result<DecodeGroup, TchError> {
        let span = chunks
            .iter()
            .map(|chunk| chunk.offset + 1)
            .max()
            .unwrap_or(1);
        let mut gather = Vec::with_capacity(chunks.len() * span);
        let mut visible = Vec::with_capacity(chunks.len() * span);
        for chunk in chunks {
            let position = chunk.offset;
            for key in 0..span {
                let seen = key <= position
                    && self
                        .sliding_window
                        .is_none_or(|window| position - key < window);
                visible.push(seen);
                // Padding reads the sequence's first row; the mask hides it.
                gather.push(row_of(chunk.blocks, if key <= position { key } else { 0 }));
            }
        }
        let compute_kind =
            (self.kind != Kind::Float && self.device == tch::Device::Cpu).then_some(Kind::Float);
        let mask = if visible.iter().all(|&seen| seen) {
            None
        } else {
            Some(self.additive_mask(
                &visible,
                &[chunks.len() as i64, 1, 1, span as i64],
                compute_kind.unwrap_or(self.kind),
            )?)
        };
        Ok(DecodeGroup {
            count: chunks.len() as i64,
            span: span as i64,
            gather: Tensor::f_from_slice(&gather)?.f_to_device(self.device)?,
            mask,
            compute_kind,
        })
    }

    /// Several new tokens of one sequence: causal attention to its cached
    /// rows and to each other.
    fn prefill_chunk(
        &self,
        chunk: &ChunkInput<'_>,
        start: i64,
        row_of: &dyn Fn(&[u32], usize) -> i64,
    ) -> Result<PrefillChunk, TchError> {
        let (offset, length) = (chunk.offset, chunk.tokens.len());
        let total = offset + length;
        let window = self.sliding_window.filter(|&window| window < total);
        if offset == 0 && window.is_none() {
            // Nothing cached: attend to the chunk's own keys, causally.
            return Ok(PrefillChunk {
                start,
                length: length as i64,
                gather: None,
                mask: None,
                causal: length > 1,
            });
        }
        let gather: Vec<i64> = (0..total)
            .map(|position| row_of(chunk.blocks, position))
            .collect();
        let mut visible = Vec::with_capacity(length * total);
        for query in 0..length {
            let position = offset + query;
            for key in 0..total {
                visible
                    .push(key <= position && window.is_none_or(|window| position - key < window));
            }
        }
        Ok(PrefillChunk {
            start,
            length: length as i64,
            gather: Some(Tensor::f_from_slice(&gather)?.f_to_device(self.device)?),
            mask: Some(self.additive_mask(&visible, &[length as i64, total as i64], self.kind)?),
            causal: false,
        })
    }

    /// 0 where visible, −∞ where hidden, in `kind`.
    fn additive_mask(
        &self,
        visible: &[bool],
        shape: &[i64],
        kind: Kind,
    ) -> Result<Tensor, TchError> {
        let values: Vec<f32> = visible
            .iter()
            .map(|&seen| if seen { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        Tensor::f_from_slice(&values)?
            .f_view(shape)?
            .f_to_kind(kind)?
            .f_to_device(self.device)
    }
}

/// Every layer's keys and values, for all blocks: (blocks × block_size, K, D)
/// per layer. Block `b` holds rows `b * block_size ..`; `kv_blocks` says
/// which sequence owns which block.
pub(crate) struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
}

/// One sequence's part of a batched forward pass.
pub(crate) struct ChunkInput<'a> {
    /// The tokens to run now, at positions `offset..offset + tokens.len()`.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in its cache blocks.
    pub offset: usize,
    /// The sequence's blocks, enough for `offset + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Logits are returned for this many last positions of the chunk.
    pub logits: usize,
    /// The LoRA adapter the sequence is served with, if any.
    pub adapter: Option<&'a ServedAdapter>,
}

/// The index tensors of one batched pass, shared by every layer.
struct BatchLayout {
    ids: Vec<i64>,
    /// (N,) positions of the new tokens, for the rotary tables.
    positions: Tensor,
    /// (N,) pool rows the new keys and values go to.
    write_rows: Tensor,
    /// Rows of the batch whose logits are wanted.
    logit_rows: Tensor,
    decode: Option<DecodeGroup>,
    prefills: Vec<PrefillChunk>,
}

struct DecodeGroup {
    /// Sequences in the group: the first `count` rows of the batch.
    count: i64,
    /// Key positions attended, padded to the longest sequence.
    span: i64,
    /// (count × span,) pool rows.
    gather: Tensor,
    /// (count, 1, 1, span), additive, in the compute kind; `None` when
    /// nothing is hidden.
    mask: Option<Tensor>,
    /// The kind attention is computed in when it differs from the model's.
    compute_kind: Option<Kind>,
}

struct PrefillChunk {
    /// The chunk's first row in the batch.
    start: i64,
    length: i64,
    /// Pool rows of every position up to the chunk's end; `None` when
    /// nothing was cached before it (its own keys are used).
    gather: Option<Tensor>,
    /// (L, T) additive mask, with `gather`.
    mask: Option<Tensor>,
    causal: bool,
}

mod adapters;
mod training;
pub(crate) use adapters::ServedAdapter;
use adapters::{BatchAdapters, LayerAdapters, Projection};
pub(crate) use training::{LoraPair, TrainingPass};

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
