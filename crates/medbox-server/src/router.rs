//! Routes each request by model name or alias to the engine that holds it,
//! and keeps every configured model's state (loading, ready, failed).
//!
//! A LoRA adapter folder whose base model is already served is attached to
//! that model's engine (one set of base weights, the adapter's requests
//! batched with the base's); otherwise it loads merged, as its own engine.
//! A base model cannot be unloaded while adapters are attached to it.
//!
//! **Invariant:** the lock is never held across an `.await`; callers get a
//! clone of the engine handle and talk to the engine through its channel.

use std::{
    sync::{Arc, RwLock},
    time::Instant,
};

use medbox_runtime::{DType, Device, Embedder, Engine, EngineConfig, EngineLoadSnapshot};

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
                    load: Some(engine.load()),
                }
            }
            LoadedModel::Embedding(embedder) => {
                let info = embedder.info();
                ModelDetails {
                    architecture: info.architecture.clone(),
                    dtype: info.dtype,
                    device: info.device,
                    max_context: info.max_tokens,
                    load: None,
                }
            }
        }
    }

    /// Stops the engine thread after its in-flight work (blocking).
    pub fn shutdown(self) {
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
    /// Waiting and running generations (causal-LM engines only).
    pub load: Option<EngineLoadSnapshot>,
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
    /// For an adapter attached to a served model: that model.
    pub base_model: Option<String>,
}

struct Slot {
    config: ValidModelConfig,
    state: ModelState,
    /// The model whose engine this adapter is attached to.
    base: Option<String>,
}

impl Slot {
    fn answers_to(&self, name: &str) -> bool {
        self.config.name == name || self.config.aliases.iter().any(|alias| alias == name)
    }
}

/// Why a model cannot be loaded or unloaded live.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(
        "model `{0}` is already loaded from another folder; unload it first or use another name"
    )]
    AlreadyLoaded(String),
    #[error("model `{0}` is still loading")]
    StillLoading(String),
    #[error("`{alias}` is the name of another model and cannot be an alias")]
    AliasIsAModel { alias: String },
    #[error("model `{0}` is not loaded")]
    NotLoaded(String),
    #[error("model `{name}` failed to load: {error}")]
    LoadFailed { name: String, error: String },
    #[error("model `{name}` serves the adapters {adapters}; unload them first")]
    ServesAdapters { name: String, adapters: String },
}

/// The table of served models. Names and aliases are looked up by a scan:
/// a box serves a handful of models, and one table has nothing to keep in step.
pub struct ModelRouter {
    /// Served models, in the order they were configured or loaded.
    slots: RwLock<Vec<Slot>>,
}

impl ModelRouter {
    pub fn new(models: Vec<ValidModelConfig>) -> ModelRouter {
        let slots = models
            .into_iter()
            .map(|config| Slot {
                config,
                state: ModelState::Loading,
                base: None,
            })
            .collect();
        ModelRouter {
            slots: RwLock::new(slots),
        }
    }

    /// Loads every configured model, one after the other so that peak memory
    /// stays near the largest model's; a model that fails is marked failed
    /// and the others go on.
    pub async fn load_all(self: &Arc<Self>) {
        let configs: Vec<ValidModelConfig> = self
            .read_slots()
            .iter()
            .filter(|slot| matches!(slot.state, ModelState::Loading))
            .map(|slot| slot.config.clone())
            .collect();
        for config in configs {
            let bases = self.base_candidates(&config);
            let (state, base) = load_one(config.clone(), bases).await;
            log_outcome(&config.name, &state);
            if let Some(slot) = self
                .write_slots()
                .iter_mut()
                .find(|slot| slot.config.name == config.name)
            {
                slot.state = state;
                slot.base = base;
            }
        }
    }

    /// Loads a model while the others keep serving. Its aliases move to it
    /// only once it is ready, so `medical` keeps answering from the old
    /// version until the new one can. Loading a name that is already ready
    /// from the same folder only moves the aliases (that is how IT rolls back).
    pub async fn load_live(&self, config: ValidModelConfig) -> Result<ModelView, ManageError> {
        {
            let mut slots = self.write_slots();
            for alias in &config.aliases {
                if slots
                    .iter()
                    .any(|slot| slot.config.name == *alias && slot.config.name != config.name)
                {
                    return Err(ManageError::AliasIsAModel {
                        alias: alias.clone(),
                    });
                }
            }
            match slots
                .iter()
                .position(|slot| slot.config.name == config.name)
            {
                Some(index) => match &slots[index].state {
                    ModelState::Loading => return Err(ManageError::StillLoading(config.name)),
                    ModelState::Ready(_) if slots[index].config.path != config.path => {
                        return Err(ManageError::AlreadyLoaded(config.name));
                    }
                    ModelState::Ready(_) => {
                        move_aliases(&mut slots, &config.name, &config.aliases);
                        return Ok(view_of(&slots[index]));
                    }
                    ModelState::Failed(_) => {
                        slots[index] = Slot {
                            config: without_aliases(&config),
                            state: ModelState::Loading,
                            base: None,
                        };
                    }
                },
                None => slots.push(Slot {
                    config: without_aliases(&config),
                    state: ModelState::Loading,
                    base: None,
                }),
            }
        }
        let bases = self.base_candidates(&config);
        let (state, base) = load_one(config.clone(), bases).await;
        log_outcome(&config.name, &state);
        let mut slots = self.write_slots();
        let Some(index) = slots
            .iter()
            .position(|slot| slot.config.name == config.name)
        else {
            // Unloaded while it was loading.
            return Err(ManageError::NotLoaded(config.name));
        };
        if let ModelState::Failed(error) = &state {
            let error = error.clone();
            slots[index].state = state;
            return Err(ManageError::LoadFailed {
                name: config.name,
                error,
            });
        }
        slots[index].state = state;
        slots[index].base = base;
        move_aliases(&mut slots, &config.name, &config.aliases);
        Ok(view_of(&slots[index]))
    }

    /// The ready causal-LM engines `config` could attach to, when it is an
    /// adapter folder: base models (not attached adapters) on its device,
    /// in its dtype when it names one. Which one is its base is decided off
    /// the runtime, where the folders can be compared.
    fn base_candidates(&self, config: &ValidModelConfig) -> Vec<BaseCandidate> {
        if config.kind != ModelKind::CausalLm {
            return Vec::new();
        }
        self.read_slots()
            .iter()
            .filter(|slot| slot.base.is_none() && slot.config.name != config.name)
            .filter_map(|slot| match &slot.state {
                ModelState::Ready(LoadedModel::CausalLm(engine))
                    if slot.config.device == config.device
                        && config
                            .dtype
                            .is_none_or(|dtype| dtype == engine.info().dtype) =>
                {
                    Some(BaseCandidate {
                        name: slot.config.name.clone(),
                        engine: engine.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Takes a model out of the table: new requests get NOT_FOUND at once;
    /// the returned handle finishes the in-flight ones when shut down.
    pub fn unload(&self, name: &str) -> Result<Option<LoadedModel>, ManageError> {
        let mut slots = self.write_slots();
        let index = slots
            .iter()
            .position(|slot| slot.config.name == name)
            .ok_or_else(|| ManageError::NotLoaded(name.to_owned()))?;
        if matches!(slots[index].state, ModelState::Loading) {
            return Err(ManageError::StillLoading(name.to_owned()));
        }
        let adapters: Vec<String> = slots
            .iter()
            .filter(|slot| slot.base.as_deref() == Some(name))
            .map(|slot| format!("`{}`", slot.config.name))
            .collect();
        if !adapters.is_empty() {
            return Err(ManageError::ServesAdapters {
                name: name.to_owned(),
                adapters: adapters.join(", "),
            });
        }
        let slot = slots.remove(index);
        Ok(match slot.state {
            ModelState::Ready(model) => Some(model),
            _ => None,
        })
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
        let slots = self.read_slots();
        let slot = slots
            .iter()
            .find(|slot| slot.answers_to(name))
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))?;
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
        self.read_slots().iter().map(view_of).collect()
    }

    /// Stops every engine after its in-flight work; blocking, so called off
    /// the runtime. (An engine stops only once its attached adapters'
    /// sequences are done too, so the order does not matter.)
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

fn view_of(slot: &Slot) -> ModelView {
    ModelView {
        name: slot.config.name.clone(),
        aliases: slot.config.aliases.clone(),
        kind: slot.config.kind,
        state: slot.state.as_str(),
        error: match &slot.state {
            ModelState::Failed(error) => Some(error.clone()),
            _ => None,
        },
        details: match &slot.state {
            // An attached adapter's engine load is its base model's.
            ModelState::Ready(model) => {
                let details = model.details();
                Some(ModelDetails {
                    load: details.load.filter(|_| slot.base.is_none()),
                    ..details
                })
            }
            _ => None,
        },
        base_model: slot.base.clone(),
    }
}

fn without_aliases(config: &ValidModelConfig) -> ValidModelConfig {
    ValidModelConfig {
        aliases: Vec::new(),
        ..config.clone()
    }
}

/// Gives `aliases` to model `name`, taking them from whichever model had them.
fn move_aliases(slots: &mut [Slot], name: &str, aliases: &[String]) {
    for slot in slots.iter_mut() {
        if slot.config.name == name {
            for alias in aliases {
                if !slot.config.aliases.contains(alias) {
                    slot.config.aliases.push(alias.clone());
                }
            }
        } else {
            let before = slot.config.aliases.len();
            slot.config.aliases.retain(|alias| !aliases.contains(alias));
            if slot.config.aliases.len() != before {
                tracing::info!(from = %slot.config.name, to = %name, ?aliases, "aliases moved");
            }
        }
    }
}

fn log_outcome(name: &str, state: &ModelState) {
    match state {
        ModelState::Ready(model) => {
            let details = model.details();
            tracing::info!(
                model = %name,
                architecture = %details.architecture,
                dtype = %details.dtype,
                device = %details.device,
                "model ready"
            );
        }
        ModelState::Failed(error) => {
            tracing::error!(model = %name, %error, "model failed to load");
        }
        ModelState::Loading => {}
    }
}

/// A served model that an adapter being loaded may attach to.
struct BaseCandidate {
    name: String,
    engine: Engine,
}

/// Blocking: the engine of the model `adapter`'s folder was trained on,
/// among `bases`, when `adapter` is a LoRA adapter folder and its base is
/// served.
fn find_base(adapter: &std::path::Path, bases: Vec<BaseCandidate>) -> Option<BaseCandidate> {
    if !medbox_runtime::lora::is_adapter_folder(adapter) {
        return None;
    }
    bases
        .into_iter()
        .find(|base| base.engine.is_base_of(adapter))
}

/// Loads `config`: attached to one of `bases` when it is an adapter of a
/// served model, else as its own engine. Returns the state and, when
/// attached, the base model's name.
async fn load_one(
    config: ValidModelConfig,
    bases: Vec<BaseCandidate>,
) -> (ModelState, Option<String>) {
    let started = Instant::now();
    let kind = config.kind;
    let engine_config = EngineConfig {
        name: config.name.clone(),
        path: config.path.clone(),
        dtype: config.dtype,
        device: config.device,
        max_waiting: config.max_waiting,
        batching: config.batching.clone(),
    };
    tracing::info!(model = %config.name, kind = kind.as_str(), path = %config.path.display(), "loading model");
    let loaded = tokio::task::spawn_blocking(move || {
        if let Some(base) = find_base(&engine_config.path, bases) {
            tracing::info!(
                model = %engine_config.name,
                base = %base.name,
                "attaching the adapter to its base model's engine (the base's batching settings apply)"
            );
            match base
                .engine
                .attach_adapter(&engine_config.name, &engine_config.path)
            {
                Ok(engine) => return Ok((LoadedModel::CausalLm(engine), Some(base.name))),
                // An adapter beyond the block's linear layers (an output
                // head, embeddings) still serves merged.
                Err(error) => tracing::warn!(
                    model = %engine_config.name,
                    base = %base.name,
                    %error,
                    "the adapter cannot run on its base's engine; loading it merged, as an engine of its own"
                ),
            }
        }
        match kind {
            ModelKind::CausalLm => Engine::start(engine_config).map(LoadedModel::CausalLm),
            ModelKind::Embedding => Embedder::start(engine_config).map(LoadedModel::Embedding),
        }
        .map(|model| (model, None))
    })
    .await;
    match loaded {
        Ok(Ok((model, base))) => {
            tracing::info!(model = %config.name, seconds = started.elapsed().as_secs_f64(), "model loaded");
            (ModelState::Ready(model), base)
        }
        Ok(Err(err)) => (ModelState::Failed(err.to_string()), None),
        Err(join_error) => (
            ModelState::Failed(format!("the loader crashed: {join_error}")),
            None,
        ),
    }
}
