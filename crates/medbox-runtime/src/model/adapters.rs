//! LoRA adapters served beside their base model's weights, several in one
//! batch: each sequence of a batched pass names its adapter (or none), and a
//! linear layer adds `B A x` to the rows of each adapter's sequences only,
//! after the shared base product. The base weights are never changed, so one
//! engine serves the base model and any number of its adapters at once.
//!
//! Cost: per adapter in the batch and per adapted layer, two thin products
//! (rank r) over that adapter's rows; nothing when no sequence has one.

use std::collections::HashMap;

use tch::{TchError, Tensor};

use super::{Linear, Model};
use crate::error::LoadError;
use crate::lora::AdapterFile;

/// The decoder block's linear layers, in the order `ServedAdapter` keeps
/// them (and the trainer lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub(crate) const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module's name within a block, as PEFT writes it.
    pub(crate) fn module(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }
}

/// One adapter's halves for one linear layer, on the model's device: `A`
/// (r, in) and `scale · B` (out, r). In the model's dtype, except for a
/// bf16/f16 model on the CPU, whose thin products are several times faster
/// in f32 there (libtorch has no fast reduced-precision kernel for them).
struct LowRank {
    a: Tensor,
    b: Tensor,
}

/// An adapter ready to serve on one model: per decoder block, per
/// projection, its low-rank update (or none).
pub(crate) struct ServedAdapter {
    layers: Vec<[Option<LowRank>; 7]>,
}

impl ServedAdapter {
    fn update(&self, layer: usize, projection: Projection) -> Option<&LowRank> {
        self.layers.get(layer)?[projection as usize].as_ref()
    }
}

impl Model {
    /// Checks `file` against this model (every module it names is a linear
    /// layer of a decoder block, with that layer's sizes) and moves it to
    /// the model's device (and dtype, see `LowRank`).
    pub(crate) fn serve_adapter(&self, file: AdapterFile) -> Result<ServedAdapter, LoadError> {
        let mut by_name: HashMap<String, (usize, Projection)> = HashMap::new();
        for layer in 0..self.layers.len() {
            for projection in Projection::ALL {
                by_name.insert(
                    format!("model.layers.{layer}.{}", projection.module()),
                    (layer, projection),
                );
            }
        }
        let mut layers: Vec<[Option<LowRank>; 7]> = (0..self.layers.len())
            .map(|_| std::array::from_fn(|_| None))
            .collect();
        let AdapterFile {
            weights_path,
            modules,
            ..
        } = file;
        for (module, a, b) in modules {
            let tensor_error = |message: String| LoadError::Tensor {
                path: weights_path.clone(),
                tensor: module.clone(),
                message,
            };
            let &(layer, projection) = by_name.get(&module).ok_or_else(|| {
                tensor_error(
                    "is not a linear layer of the model's decoder blocks; only those can be \
                     served beside the base model (such an adapter is served merged)"
                        .into(),
                )
            })?;
            let (out_features, in_features) = self.layers[layer].linear(projection).shape();
            let (a_size, b_size) = (a.size(), b.size());
            if a_size[1] != in_features || b_size[0] != out_features {
                return Err(tensor_error(format!(
                    "lora_A is {a_size:?} and lora_B {b_size:?}, but the layer is \
                     ({out_features}, {in_features}): the adapter belongs to another model"
                )));
            }
            let kind = if self.device == tch::Device::Cpu {
                tch::Kind::Float
            } else {
                self.kind
            };
            let place = |tensor: Tensor| -> Result<Tensor, TchError> {
                tensor
                    .f_to_kind(kind)?
                    .f_to_device(self.device)?
                    .f_contiguous()
            };
            let update = (|| {
                Ok::<_, TchError>(LowRank {
                    a: place(a)?,
                    b: place(b)?,
                })
            })()
            .map_err(|error| tensor_error(error.to_string()))?;
            layers[layer][projection as usize] = Some(update);
        }
        Ok(ServedAdapter { layers })
    }
}

/// The adapters of one batched pass: each adapter used, with the runs of
/// consecutive batch rows (start, length) of its sequences. The engine
/// orders a batch's sequences by adapter, so an adapter has a run among the
/// decoding sequences and one among the prefill chunks at most.
#[derive(Default)]
pub(crate) struct BatchAdapters<'a> {
    groups: Vec<(&'a ServedAdapter, Vec<(i64, i64)>)>,
}

impl<'a> BatchAdapters<'a> {
    /// `rows[i]` is the adapter of batch row `i`.
    pub(crate) fn new(rows: &[Option<&'a ServedAdapter>]) -> Self {
        let mut groups: Vec<(&'a ServedAdapter, Vec<(i64, i64)>)> = Vec::new();
        for (row, adapter) in rows.iter().enumerate() {
            let Some(adapter) = adapter else { continue };
            let row = row as i64;
            let runs = match groups
                .iter_mut()
                .find(|(known, _)| std::ptr::eq(*known, *adapter))
            {
                Some((_, runs)) => runs,
                None => {
                    groups.push((adapter, Vec::new()));
                    &mut groups.last_mut().expect("just pushed").1
                }
            };
            match runs.last_mut() {
                Some((start, length)) if *start + *length == row => *length += 1,
                _ => runs.push((row, 1)),
            }
        }
        BatchAdapters { groups }
    }

    /// The view one decoder block uses.
    pub(crate) fn layer(&self, layer: usize) -> LayerAdapters<'_> {
        LayerAdapters {
            groups: &self.groups,
            layer,
        }
    }
}

/// The adapters of one batched pass, seen from one decoder block.
#[derive(Clone, Copy)]
pub(crate) struct LayerAdapters<'a> {
    groups: &'a [(&'a ServedAdapter, Vec<(i64, i64)>)],
    layer: usize,
}

impl LayerAdapters<'_> {
    /// `linear(xs)` plus, on each adapter's rows, that adapter's update.
    pub(crate) fn project(
        &self,
        linear: &Linear,
        projection: Projection,
        xs: &Tensor,
    ) -> Result<Tensor, TchError> {
        let out = linear.forward(xs)?;
        for (adapter, runs) in self.groups {
            let Some(update) = adapter.update(self.layer, projection) else {
                continue;
            };
            for &(start, length) in runs {
                let rows = xs.f_narrow(0, start, length)?;
                let delta = rows
                    .f_to_kind(update.a.kind())?
                    .f_linear(&update.a, None::<Tensor>)?
                    .f_linear(&update.b, None::<Tensor>)?
                    .f_to_kind(rows.kind())?;
                // In place on a view of the product's rows.
                let _rows = out.f_narrow(0, start, length)?.f_add_(&delta)?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_by_adapter_in_runs() {
        let first = ServedAdapter { layers: Vec::new() };
        let second = ServedAdapter { layers: Vec::new() };
        let batch = BatchAdapters::new(&[
            Some(&first),
            Some(&first),
            None,
            Some(&second),
            Some(&first),
            Some(&second),
        ]);
        let runs: Vec<&[(i64, i64)]> = batch.groups.iter().map(|(_, runs)| &runs[..]).collect();
        assert_eq!(runs, [&[(0, 2), (4, 1)][..], &[(3, 1), (5, 1)][..]]);
        assert!(std::ptr::eq(batch.groups[0].0, &first));
        assert!(BatchAdapters::new(&[None, None]).groups.is_empty());
    }
}
