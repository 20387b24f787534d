//! The decoder's training pass: the same `Model` as inference, run over
//! whole (right-padded) sequences at once, causally, with no KV cache and
//! autograd on, optionally with LoRA adapters beside its linear layers.
//!
//! One model code path: the layers, norms, rotary tables and weights are the
//! inference ones; only the attention's bookkeeping differs (a batch of full
//! sequences instead of the paged cache).
//!
//! Shapes: B sequences, L positions, H query heads, K key/value heads, D
//! head_dim, E hidden size, V vocabulary.

use std::collections::HashMap;

use tch::{Kind, TchError, Tensor};

use super::{Attention, Block, Linear, LinearWeight, Mlp, Model, Projection, RmsNorm};

/// One LoRA adapter on a linear layer: `y = W x + scale · B (A dropout(x))`.
pub(crate) struct LoraPair {
    /// (r, in).
    pub a: Tensor,
    /// (out, r).
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
}

/// What the training pass adds to the plain forward.
pub(crate) struct TrainingPass<'a> {
    /// Adapters by module name (`model.layers.0.self_attn.q_proj`).
    pub adapters: &'a HashMap<String, LoraPair>,
    /// Dropout on each adapter's input (training only).
    pub lora_dropout: f64,
    /// Dropout is applied only while training (not for evaluation).
    pub train: bool,
}

/// A linear layer of the decoder, by the module name PEFT uses.
pub(crate) struct LinearModule {
    pub name: String,
    pub in_features: i64,
    pub out_features: i64,
}

impl Linear {
    fn forward_adapted(
        &self,
        xs: &Tensor,
        name: &str,
        pass: &TrainingPass<'_>,
    ) -> Result<Tensor, TchError> {
        let base = self.forward(xs)?;
        let Some(pair) = pass.adapters.get(name) else {
            return Ok(base);
        };
        let dropped = if pass.train && pass.lora_dropout > 0.0 {
            xs.f_dropout(pass.lora_dropout, true)?
        } else {
            xs.shallow_clone()
        };
        // The adapters may be kept in f32 over a bf16 model; autograd
        // carries the cast.
        let kind = xs.f_kind()?;
        let delta = dropped
            .f_linear(&pair.a.f_to_kind(kind)?, None::<Tensor>)?
            .f_linear(&pair.b.f_to_kind(kind)?, None::<Tensor>)?
            .f_mul_scalar(pair.scale)?;
        base.f_add(&delta)
    }

    /// (out, in) of a dense layer; `None` for int8.
    fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(weight) => Some(weight),
            LinearWeight::Int8 { .. } => None,
        }
    }
}

/// Rotates (B, L, heads, D) by cos and sin shaped (1, L, 1, D).
fn rotate_sequence(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let dim = *xs.size().last().unwrap_or(&0);
    let half = dim / 2;
    let first = xs.f_narrow(-1, 0, half)?;
    let second = xs.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], -1)?;
    xs.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}

impl Attention {
    /// xs: (B, L, E) → (B, L, E).
    fn forward_sequence(
        &self,
        xs: &Tensor,
        rotation: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        prefix: &str,
        pass: &TrainingPass<'_>,
    ) -> Result<Tensor, TchError> {
        let (batch, length, _) = xs.size3()?;
        let (cos, sin) = rotation;
        let heads = |projection: &Linear, name: &str, heads: i64, norm: &Option<RmsNorm>| {
            let states = projection
                .forward_adapted(xs, &format!("{prefix}.{name}"), pass)?
                .f_view([batch, length, heads, self.head_dim])?;
            match norm {
                Some(norm) => norm.forward(&states),
                None => Ok(states),
            }
        };
        let query = rotate_sequence(
            &heads(&self.q_proj, "q_proj", self.num_heads, &self.q_norm)?,
            cos,
            sin,
        )?
        .f_transpose(1, 2)?; // (B, H, L, D)
        let key = rotate_sequence(
            &heads(&self.k_proj, "k_proj", self.num_kv_heads, &self.k_norm)?,
            cos,
            sin,
        )?
        .f_transpose(1, 2)?; // (B, K, L, D)
        let value = heads(&self.v_proj, "v_proj", self.num_kv_heads, &None)?.f_transpose(1, 2)?;
        // Grouped heads are repeated explicitly: every attention backend
        // has a backward pass for that.
        let (key, value) = if self.num_heads != self.num_kv_heads {
            let repeats = self.num_heads / self.num_kv_heads;
            (
                key.f_repeat_interleave_self_int(repeats, Some(1), None)?,
                value.f_repeat_interleave_self_int(repeats, Some(1), None)?,
            )
        } else {
            (key, value)
        };
        let attended = Tensor::f_scaled_dot_product_attention(
            &query,
            &key,
            &value,
            mask,
            0.0,
            mask.is_none(),
            None,
            false,
        )?; // (B, H, L, D)
        let merged = attended.f_transpose(1, 2)?.f_reshape([
            batch,
            length,
            self.num_heads * self.head_dim,
        ])?;
        self.o_proj
            .forward_adapted(&merged, &format!("{prefix}.o_proj"), pass)
    }
}

impl Mlp {
    fn forward_sequence(
        &self,
        xs: &Tensor,
        prefix: &str,
        pass: &TrainingPass<'_>,
    ) -> Result<Tensor, TchError> {
        let gate = self
            .gate_proj
            .forward_adapted(xs, &format!("{prefix}.gate_proj"), pass)?
            .f_silu()?;
        let up = self
            .up_proj
            .forward_adapted(xs, &format!("{prefix}.up_proj"), pass)?;
        self.down_proj
            .forward_adapted(&gate.f_mul(&up)?, &format!("{prefix}.down_proj"), pass)
    }
}

impl Block {
    fn forward_sequence(
        &self,
        xs: &Tensor,
        rotation: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        prefix: &str,
        pass: &TrainingPass<'_>,
    ) -> Result<Tensor, TchError> {
        let attended = self.self_attn.forward_sequence(
            &self.input_layernorm.forward(xs)?,
            rotation,
            mask,
            &format!("{prefix}.self_attn"),
            pass,
        )?;
        let xs = xs.f_add(&attended)?;
        let transformed = self.mlp.forward_sequence(
            &self.post_attention_layernorm.forward(&xs)?,
            &format!("{prefix}.mlp"),
            pass,
        )?;
        xs.f_add(&transformed)
    }
}

impl Model {
    /// The training pass: `ids` (B, L) int64 on the model's device, right
    /// padded (causal attention never lets a real token see the padding
    /// after it) → the logits (N, V) in f32 of the N positions `rows` names
    /// (indices into the flattened B·L positions): only the positions a
    /// loss scores go through the output head, which is a large share of a
    /// small model's work. Gradients flow to whatever requires them: the
    /// adapters, or the weights themselves.
    pub(crate) fn forward_sequences(
        &self,
        ids: &Tensor,
        rows: &Tensor,
        pass: &TrainingPass<'_>,
    ) -> Result<Tensor, TchError> {
        let (_, length) = ids.size2()?;
        if length as usize > self.max_position_embeddings {
            return Err(TchError::Shape(format!(
                "sequence of {length} tokens exceeds max_position_embeddings {}",
                self.max_position_embeddings
            )));
        }
        let table = |table: &Tensor| table.f_narrow(0, 0, length)?.f_view([1, length, 1, -1]);
        let rotation = (table(&self.rotary.cos)?, table(&self.rotary.sin)?);
        let mask = match self.sliding_window {
            Some(window) if window < length as usize => Some(self.window_mask(length, window)?),
            _ => None,
        };
        let mut xs = Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)?; // (B, L, E)
        for (index, layer) in self.layers.iter().enumerate() {
            xs = layer.forward_sequence(
                &xs,
                &rotation,
                mask.as_ref(),
                &format!("model.layers.{index}"),
                pass,
            )?;
        }
        let hidden = xs.size().last().copied().unwrap_or(0);
        let xs = xs.f_reshape([-1, hidden])?.f_index_select(0, rows)?; // (N, E)
        let xs = self.norm.forward(&xs)?;
        self.lm_head.forward(&xs)?.f_to_kind(Kind::Float)
    }

    /// (L, L) additive causal mask that also hides keys more than `window`
    /// positions back.
    fn window_mask(&self, length: i64, window: usize) -> Result<Tensor, TchError> {
        let length = length as usize;
        let mut visible = Vec::with_capacity(length * length);
        for query in 0..length {
            for key in 0..length {
                visible.push(key <= query && query - key < window);
            }
        }
        self.additive_mask(&visible, &[length as i64, length as i64], self.kind)
    }

    /// Every linear layer of the decoder blocks (attention and MLP
    /// projections; not the output head), by PEFT's module names.
    pub(crate) fn linear_modules(&self) -> Vec<LinearModule> {
        let mut modules = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            for projection in Projection::ALL {
                if let Some(weight) = layer.linear(projection).dense_weight() {
                    let size = weight.size();
                    modules.push(LinearModule {
                        name: format!("model.layers.{index}.{}", projection.module()),
                        in_features: size[1],
                        out_features: size[0],
                    });
                }
            }
        }
        modules
    }

    /// Every weight by its checkpoint name (handles onto the model's own
    /// tensors, so setting `requires_grad` or updating them in place changes
    /// the model). A tied output head is the embedding and is not listed
    /// twice. Fails for an int8 model, which cannot be trained.
    pub(crate) fn named_weights(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut named = vec![(
            "model.embed_tokens.weight".to_owned(),
            self.embed_tokens.shallow_clone(),
        )];
        let dense = |name: String, linear: &Linear, named: &mut Vec<(String, Tensor)>| {
            let weight = linear.dense_weight().ok_or_else(|| {
                TchError::Kind("an int8 model cannot be trained; load it as f32 or bf16".into())
            })?;
            named.push((format!("{name}.weight"), weight.shallow_clone()));
            if let Some(bias) = &linear.bias {
                named.push((format!("{name}.bias"), bias.shallow_clone()));
            }
            Ok::<(), TchError>(())
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let prefix = format!("model.layers.{index}");
            named.push((
                format!("{prefix}.input_layernorm.weight"),
                layer.input_layernorm.weight.shallow_clone(),
            ));
            let attention = &layer.self_attn;
            for (name, linear) in [
                ("q_proj", &attention.q_proj),
                ("k_proj", &attention.k_proj),
                ("v_proj", &attention.v_proj),
                ("o_proj", &attention.o_proj),
            ] {
                dense(format!("{prefix}.self_attn.{name}"), linear, &mut named)?;
            }
            for (name, norm) in [("q_norm", &attention.q_norm), ("k_norm", &attention.k_norm)] {
                if let Some(norm) = norm {
                    named.push((
                        format!("{prefix}.self_attn.{name}.weight"),
                        norm.weight.shallow_clone(),
                    ));
                }
            }
            named.push((
                format!("{prefix}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.shallow_clone(),
            ));
            let mlp = &layer.mlp;
            for (name, linear) in [
                ("gate_proj", &mlp.gate_proj),
                ("up_proj", &mlp.up_proj),
                ("down_proj", &mlp.down_proj),
            ] {
                dense(format!("{prefix}.mlp.{name}"), linear, &mut named)?;
            }
        }
        named.push((
            "model.norm.weight".to_owned(),
            self.norm.weight.shallow_clone(),
        ));
        // A tied head shares the embedding's storage.
        let tied = self
            .lm_head
            .dense_weight()
            .is_some_and(|weight| weight.data_ptr() == self.embed_tokens.data_ptr());
        if !tied {
            dense("lm_head".to_owned(), &self.lm_head, &mut named)?;
        }
        Ok(named)
    }
}
