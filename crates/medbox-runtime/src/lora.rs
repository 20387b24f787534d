//! LoRA adapters in PEFT's folder format: `adapter_config.json` and
//! `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight` (r, in) and `….lora_B.weight`
//! (out, r), the update scaled by `lora_alpha / r`.
//!
//! Serving, two ways. The base model is the folder named by the adapter's
//! `base_model_name_or_path`.
//! - **Merged**: an adapter folder loads as its own model by merging
//!   `scale · B A` into the base model's weights as they are read (so int8
//!   quantizes the merged weights); one engine per adapter.
//! - **Attached**: `Engine::attach_adapter` serves the adapter on an engine
//!   that already runs its base model. The base weights are shared; each
//!   sequence in a batch names its adapter (or none), and the adapter's
//!   low-rank update is added to its rows only (`model::adapters`).
//!
//! **Architecture Invariant:** only this module knows PEFT's file layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, TchError, Tensor};

use crate::error::LoadError;
use crate::model::LoraPair;

/// The adapter's settings file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every adapter tensor name.
const PEFT_PREFIX: &str = "base_model.model.";
/// `target_modules` entry meaning every linear layer of the decoder blocks.
pub const ALL_LINEAR: &str = "all-linear";

/// How LoRA adapters are shaped and trained.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, `down_proj`, …) or `all-linear`.
    pub target_modules: Vec<String>,
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Whether the module `name` (`model.layers.0.self_attn.q_proj`) gets an adapter.
    pub(crate) fn targets(&self, name: &str) -> bool {
        let short = name.rsplit('.').next().unwrap_or(name);
        self.target_modules
            .iter()
            .any(|target| target == ALL_LINEAR || target == short || target == name)
    }
}

/// The fields of PEFT's `adapter_config.json` medbox writes and reads.
#[derive(Debug, Serialize, Deserialize)]
struct AdapterConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: i64,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    target_modules: serde_json::Value,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default = "no_bias")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    inference_mode: bool,
}

fn no_bias() -> String {
    "none".to_owned()
}

/// Whether `dir` holds an adapter rather than a whole model.
pub fn is_adapter_folder(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file() && !dir.join("config.json").is_file()
}

/// An adapter folder as read: its base model's folder, and each module's
/// halves (`A` (r, in), `B` (out, r)) with `B` already scaled, in f32 on the
/// CPU.
pub(crate) struct AdapterFile {
    pub base_dir: PathBuf,
    /// The safetensors file, for messages.
    pub weights_path: PathBuf,
    /// By module name (`model.layers.0.self_attn.q_proj`), sorted.
    pub modules: Vec<(String, Tensor, Tensor)>,
}

/// The settings of the adapter in `dir`, checked, with its base model's folder.
fn read_config(dir: &Path) -> Result<(AdapterConfig, PathBuf), LoadError> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let invalid = |message: String| LoadError::InvalidConfig {
        path: config_path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|source| LoadError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: AdapterConfig =
        serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
    if config.peft_type != "LORA" {
        return Err(invalid(format!(
            "`peft_type` is {}; only LORA adapters are supported",
            config.peft_type
        )));
    }
    if config.r <= 0 {
        return Err(invalid(format!("`r` must be > 0, got {}", config.r)));
    }
    if config.bias != "none" || config.fan_in_fan_out || config.use_dora {
        return Err(invalid(
            "only plain LoRA is supported (`bias` none, no `fan_in_fan_out`, no DoRA)".into(),
        ));
    }
    let base = config
        .base_model_name_or_path
        .as_deref()
        .filter(|base| !base.is_empty())
        .ok_or_else(|| {
            invalid("`base_model_name_or_path` must name the base model's folder".into())
        })?;
    let base_dir = if Path::new(base).is_absolute() {
        PathBuf::from(base)
    } else {
        dir.join(base)
    };
    if !base_dir.join("config.json").is_file() {
        return Err(invalid(format!(
            "the base model folder `{}` has no config.json",
            base_dir.display()
        )));
    }
    Ok((config, base_dir))
}

/// The folder of the base model the adapter in `dir` was trained on, from
/// its `adapter_config.json` (tensors are not read).
pub fn base_model_dir(dir: &Path) -> Result<PathBuf, LoadError> {
    read_config(dir).map(|(_, base_dir)| base_dir)
}

impl AdapterFile {
    /// Reads the adapter in `dir`; every problem names the file at fault.
    pub(crate) fn read(dir: &Path) -> Result<AdapterFile, LoadError> {
        let (config, base_dir) = read_config(dir)?;
        let scale = if config.use_rslora {
            config.lora_alpha / (config.r as f64).sqrt()
        } else {
            config.lora_alpha / config.r as f64
        };
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let tensor_error = |tensor: &str, message: String| LoadError::Tensor {
            path: weights_path.clone(),
            tensor: tensor.to_owned(),
            message,
        };
        let tensors =
            Tensor::read_safetensors(&weights_path).map_err(|error| LoadError::Safetensors {
                path: weights_path.clone(),
                message: error.to_string(),
            })?;
        let mut halves: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, tensor) in tensors {
            let module = name
                .strip_prefix(PEFT_PREFIX)
                .and_then(|rest| {
                    rest.strip_suffix(".lora_A.weight")
                        .map(|module| (module, true))
                        .or_else(|| {
                            rest.strip_suffix(".lora_B.weight")
                                .map(|module| (module, false))
                        })
                })
                .ok_or_else(|| tensor_error(&name, "not a LoRA tensor name PEFT writes".into()))?;
            let (module, is_a) = module;
            let entry = halves.entry(module.to_owned()).or_default();
            if is_a {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let mut modules = Vec::with_capacity(halves.len());
        for (module, pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(tensor_error(
                    &module,
                    "has only one of lora_A and lora_B".into(),
                ));
            };
            let halves = || -> Result<(Tensor, Tensor), TchError> {
                let cpu =
                    |tensor: &Tensor| tensor.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu);
                let (a, b) = (cpu(&a)?, cpu(&b)?.f_mul_scalar(scale)?);
                let (a_size, b_size) = (a.size(), b.size());
                if a_size.len() != 2 || b_size.len() != 2 || a_size[0] != b_size[1] {
                    return Err(TchError::Shape(format!(
                        "lora_A is {a_size:?} and lora_B {b_size:?}; expected (r, in) and (out, r)"
                    )));
                }
                Ok((a, b))
            };
            let (a, b) = halves().map_err(|error| tensor_error(&module, error.to_string()))?;
            modules.push((module, a, b));
        }
        modules.sort_by(|left, right| left.0.cmp(&right.0));
        Ok(AdapterFile {
            base_dir,
            weights_path,
            modules,
        })
    }
}

/// An adapter read for merging: its base model's folder and, per weight
/// name (`model.layers.0.self_attn.q_proj.weight`), `scale · B A` in f32 on
/// the CPU.
pub(crate) struct MergeDeltas {
    pub base_dir: PathBuf,
    deltas: HashMap<String, Tensor>,
}

impl MergeDeltas {
    /// Reads the adapter in `dir`; every problem names the file at fault.
    pub(crate) fn read(dir: &Path) -> Result<MergeDeltas, LoadError> {
        let file = AdapterFile::read(dir)?;
        let mut deltas = HashMap::new();
        for (module, a, b) in &file.modules {
            let delta = b.f_matmul(a).map_err(|error| LoadError::Tensor {
                path: file.weights_path.clone(),
                tensor: module.clone(),
                message: error.to_string(),
            })?;
            deltas.insert(format!("{module}.weight"), delta);
        }
        Ok(MergeDeltas {
            base_dir: file.base_dir,
            deltas,
        })
    }

    /// Takes the update of weight `name`, if the adapter has one.
    pub(crate) fn take(&mut self, name: &str) -> Option<Tensor> {
        self.deltas.remove(name)
    }

    /// Weights the adapter names that the model never read.
    pub(crate) fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> = self.deltas.keys().cloned().collect();
        names.sort();
        names
    }
}

/// What writing an adapter folder can fail on.
#[derive(Debug, thiserror::Error)]
pub enum AdapterWriteError {
    #[error("cannot write `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the adapter tensors: {0}")]
    Tensor(#[from] TchError),
}

/// Writes `adapters` into `dir` (which must exist) in PEFT's format.
pub(crate) fn write_adapter(
    dir: &Path,
    settings: &LoraSettings,
    base_dir: &Path,
    adapters: &HashMap<String, LoraPair>,
) -> Result<(), AdapterWriteError> {
    let mut modules: Vec<&String> = adapters.keys().collect();
    modules.sort();
    let mut tensors = Vec::with_capacity(modules.len() * 2);
    for module in &modules {
        let pair = &adapters[*module];
        let cpu = |tensor: &Tensor| -> Result<Tensor, TchError> {
            tensor
                .f_detach()?
                .f_to_kind(Kind::Float)?
                .f_to_device(tch::Device::Cpu)?
                .f_contiguous()
        };
        tensors.push((
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            cpu(&pair.a)?,
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
            cpu(&pair.b)?,
        ));
    }
    let mut short_names: Vec<String> = modules
        .iter()
        .map(|module| module.rsplit('.').next().unwrap_or(module).to_owned())
        .collect();
    short_names.sort();
    short_names.dedup();
    let config = AdapterConfig {
        peft_type: "LORA".to_owned(),
        task_type: Some("CAUSAL_LM".to_owned()),
        r: settings.r,
        lora_alpha: settings.alpha,
        lora_dropout: settings.dropout,
        target_modules: serde_json::Value::from(short_names),
        base_model_name_or_path: Some(base_dir.display().to_string()),
        bias: no_bias(),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        inference_mode: true,
    };
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    Tensor::write_safetensors(&tensors, &weights_path)?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(&config)
        .unwrap_or_else(|error| unreachable!("an adapter config always serializes: {error}"));
    text.push('\n');
    std::fs::write(&config_path, text).map_err(|source| AdapterWriteError::Io {
        path: config_path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_by_short_name_full_name_or_all_linear() {
        let settings = |targets: &[&str]| LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|name| name.to_string()).collect(),
        };
        let q = "model.layers.0.self_attn.q_proj";
        let down = "model.layers.1.mlp.down_proj";
        let check = |targets: &[&str], expect: [bool; 2]| {
            let settings = settings(targets);
            assert_eq!(
                [settings.targets(q), settings.targets(down)],
                expect,
                "{targets:?}"
            );
        };
        check(&["all-linear"], [true, true]);
        check(&["q_proj", "v_proj"], [true, false]);
        check(&[down], [false, true]);
        assert_eq!(settings(&["q_proj"]).scale(), 2.0);
    }
}
