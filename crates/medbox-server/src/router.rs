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

use medbox_runtime::{Engine, EngineConfig, ModelInfo};

use crate::{
    config::{ModelKind, ValidModelConfig},
    error::ApiError,
};

/// Where a model is in its life.
#[derive(Clone)]
pub enum ModelState {
    Loading,
    Ready(Engine),
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
    pub info: Option<ModelInfo>,
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
                ModelState::Ready(engine) => {
                    let info = engine.info();
                    tracing::info!(
                        model = %config.name,
                        architecture = %info.architecture,
                        dtype = %info.dtype,
                        device = %info.device,
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

    /// The engine that serves `name` (a model name or alias), ready for `method`.
    pub fn causal_lm(
        &self,
        name: &str,
        method: &'static str,
    ) -> Result<(String, Engine), ApiError> {
        let index = *self
            .names
            .get(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))?;
        let slots = self.read_slots();
        let slot = &slots[index];
        if slot.config.kind != ModelKind::CausalLm {
            return Err(ApiError::WrongModelKind {
                name: slot.config.name.clone(),
                kind: slot.config.kind.as_str(),
                method,
            });
        }
        match &slot.state {
            ModelState::Ready(engine) => Ok((slot.config.name.clone(), engine.clone())),
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
                info: match &slot.state {
                    ModelState::Ready(engine) => Some(engine.info().clone()),
                    _ => None,
                },
            })
            .collect()
    }

    /// Stops every engine after its in-flight work; blocking, so called off the runtime.
    pub fn shutdown_engines(&self) {
        let engines: Vec<Engine> = self
            .write_slots()
            .iter_mut()
            .filter_map(|slot| {
                match std::mem::replace(
                    &mut slot.state,
                    ModelState::Failed("unloaded at shutdown".into()),
                ) {
                    ModelState::Ready(engine) => Some(engine),
                    _ => None,
                }
            })
            .collect();
        for engine in engines {
            engine.shutdown();
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
    if config.kind == ModelKind::Embedding {
        return ModelState::Failed(
            "kind `embedding` is not served by this version of medboxd".to_owned(),
        );
    }
    let started = Instant::now();
    let engine_config = EngineConfig {
        name: config.name.clone(),
        path: config.path.clone(),
        dtype: config.dtype,
        device: config.device,
        max_waiting: config.max_waiting,
    };
    tracing::info!(model = %config.name, path = %config.path.display(), "loading model");
    match tokio::task::spawn_blocking(move || Engine::start(engine_config)).await {
        Ok(Ok(engine)) => {
            tracing::info!(model = %config.name, seconds = started.elapsed().as_secs_f64(), "model loaded");
            ModelState::Ready(engine)
        }
        Ok(Err(err)) => ModelState::Failed(err.to_string()),
        Err(join_error) => ModelState::Failed(format!("the loader crashed: {join_error}")),
    }
}
