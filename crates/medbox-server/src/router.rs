//! Routes each request by model name or alias to the engine that holds it,
//! and keeps every configured model's state (loading, ready, failed).
//!
//! **Invariant:** the lock is never held across an `.await`; callers get a
//! clone of the engine handle and talk to the engine through its channel.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use medbox_runtime::{DType, Device, Embedder, Engine, EngineConfig};

use crate::{
    config::{ModelKind, ValidModelConfig},
    error::ApiError,
};

/// A loaded model's handle, by kind.
#[derive(Clone)]
pub enum LoadedModel {
    CausalLm(Engine),
    Embedding(Embedder),
}

impl LoadedModel {
    fn details(&self) -> ModelDetails {
        match self {
            LoadedModel::CausalLm(engine) => {
                let info = engine.info();
                ModelDetails {
                    architecture: info.architecture.clone(),
                    dtype: info.dtype,
                    device: info.device,
                    max_context: info.max_context,
                }
            }
            LoadedModel::Embedding(embedder) => {
                let info = embedder.info();
                ModelDetails {
                    architecture: info.architecture.clone(),
                    dtype: info.dtype,
                    device: info.device,
                    max_context: info.max_tokens,
                }
            }
        }
    }

    /// Stops the engine thread after its in-flight work (blocking).
    fn shutdown(self) {
        match self {
            LoadedModel::CausalLm(engine) => engine.shutdown(),
            LoadedModel::Embedding(embedder) => embedder.shutdown(),
        }
    }
}

/// What a loaded model reports about itself.
#[derive(Clone)]
pub struct ModelDetails {
    pub architecture: String,
    pub dtype: DType,
    pub device: Device,
    pub max_context: usize,
}

/// Where a model is in its life.
#[derive(Clone)]
pub enum ModelState {
    Loading,
    Ready(LoadedModel),
    Failed(String),
}

impl ModelState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready(_) => "ready",
            ModelState::Failed(_) => "failed",
        }
    }
}

/// A model's state as shown to clients and IT.
pub struct ModelView {
    pub name: String,
    pub aliases: Vec<String>,
    pub kind: ModelKind,
    pub state: &'static str,
    pub error: Option<String>,
    pub details: Option<ModelDetails>,
}

struct Slot {
    config: ValidModelConfig,
    state: ModelState,
}

/// The table of served models.
pub struct ModelRouter {
    /// Served models in configuration order.
    slots: RwLock<Vec<Slot>>,
    /// Name or alias → index into `slots`.
    names: HashMap<String, usize>,
}

impl ModelRouter {
    pub fn new(models: Vec<ValidModelConfig>) -> ModelRouter {
        let mut names = HashMap::new();
        for (index, model) in models.iter().enumerate() {
            names.insert(model.name.clone(), index);
            for alias in &model.aliases {
                names.insert(alias.clone(), index);
            }
        }
        let slots = models
            .into_iter()
            .map(|config| Slot {
                config,
                state: ModelState::Loading,
            })
            .collect();
        ModelRouter {
            slots: RwLock::new(slots),
            names,
        }
    }

    /// Loads every model, one after the other so that peak memory stays near
    /// the largest model's; a model that fails is marked failed and the
    /// others go on.
    pub async fn load_all(self: &Arc<Self>) {
        let count = self.read_slots().len();
        for index in 0..count {
            let config = self.read_slots()[index].config.clone();
            let state = load_one(config.clone()).await;
            match &state {
                ModelState::Ready(model) => {
                    let details = model.details();
                    tracing::info!(
                        model = %config.name,
                        architecture = %details.architecture,
                        dtype = %details.dtype,
                        device = %details.device,
                        "model ready"
                    );
                }
                ModelState::Failed(error) => {
                    tracing::error!(model = %config.name, %error, "model failed to load");
                }
                ModelState::Loading => {}
            }
            self.write_slots()[index].state = state;
        }
    }

    /// The causal-LM engine that serves `name` (a model name or alias), with the model's name.
    pub fn causal_lm(
        &self,
        name: &str,
        method: &'static str,
    ) -> Result<(String, Engine), ApiError> {
        match self.ready(name, ModelKind::CausalLm, method)? {
            (model, LoadedModel::CausalLm(engine)) => Ok((model, engine)),
            (model, LoadedModel::Embedding(_)) => Err(ApiError::WrongModelKind {
                name: model,
                kind: ModelKind::Embedding.as_str(),
                method,
            }),
        }
    }

    /// The embedding model that serves `name`, with the model's name.
    pub fn embedding(
        &self,
        name: &str,
        method: &'static str,
    ) -> Result<(String, Embedder), ApiError> {
        match self.ready(name, ModelKind::Embedding, method)? {
            (model, LoadedModel::Embedding(embedder)) => Ok((model, embedder)),
            (model, LoadedModel::CausalLm(_)) => Err(ApiError::WrongModelKind {
                name: model,
                kind: ModelKind::CausalLm.as_str(),
                method,
            }),
        }
    }

    fn ready(
        &self,
        name: &str,
        kind: ModelKind,
        method: &'static str,
    ) -> Result<(String, LoadedModel), ApiError> {
        let index = *self
            .names
            .get(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))?;
        let slots = self.read_slots();
        let slot = &slots[index];
        if slot.config.kind != kind {
            return Err(ApiError::WrongModelKind {
                name: slot.config.name.clone(),
                kind: slot.config.kind.as_str(),
                method,
            });
        }
        match &slot.state {
            ModelState::Ready(model) => Ok((slot.config.name.clone(), model.clone())),
            ModelState::Loading => Err(ApiError::ModelLoading(slot.config.name.clone())),
            ModelState::Failed(_) => Err(ApiError::ModelFailed {
                name: slot.config.name.clone(),
            }),
        }
    }

    pub fn views(&self) -> Vec<ModelView> {
        self.read_slots()
            .iter()
            .map(|slot| ModelView {
                name: slot.config.name.clone(),
                aliases: slot.config.aliases.clone(),
                kind: slot.config.kind,
                state: slot.state.as_str(),
                error: match &slot.state {
                    ModelState::Failed(error) => Some(error.clone()),
                    _ => None,
                },
                details: match &slot.state {
                    ModelState::Ready(model) => Some(model.details()),
                    _ => None,
                },
            })
            .collect()
    }

    /// Stops every engine after its in-flight work; blocking, so called off the runtime.
    pub fn shutdown_engines(&self) {
        let models: Vec<LoadedModel> = self
            .write_slots()
            .iter_mut()
            .filter_map(|slot| {
                match std::mem::replace(
                    &mut slot.state,
                    ModelState::Failed("unloaded at shutdown".into()),
                ) {
                    ModelState::Ready(model) => Some(model),
                    _ => None,
                }
            })
            .collect();
        for model in models {
            model.shutdown();
        }
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Slot>> {
        self.slots
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn load_one(config: ValidModelConfig) -> ModelState {
    let started = Instant::now();
    let kind = config.kind;
    let engine_config = EngineConfig {
        name: config.name.clone(),
        path: config.path.clone(),
        dtype: config.dtype,
        device: config.device,
        max_waiting: config.max_waiting,
    };
    tracing::info!(model = %config.name, kind = kind.as_str(), path = %config.path.display(), "loading model");
    let loaded = tokio::task::spawn_blocking(move || match kind {
        ModelKind::CausalLm => Engine::start(engine_config).map(LoadedModel::CausalLm),
        ModelKind::Embedding => Embedder::start(engine_config).map(LoadedModel::Embedding),
    })
    .await;
    match loaded {
        Ok(Ok(model)) => {
            tracing::info!(model = %config.name, seconds = started.elapsed().as_secs_f64(), "model loaded");
            ModelState::Ready(model)
        }
        Ok(Err(err)) => ModelState::Failed(err.to_string()),
        Err(join_error) => ModelState::Failed(format!("the loader crashed: {join_error}")),
    }
}
