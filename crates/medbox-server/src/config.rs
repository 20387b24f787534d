//! The appliance's one TOML file, with every key overridable from the
//! environment as `MEDBOX__SECTION__KEY` (for example
//! `MEDBOX__STORAGE__DATA_DIR=/srv/medbox`).
//!
//! Relative paths are resolved against the working directory of `medboxd`
//! (the systemd unit sets it to the data directory's parent).
//! Unknown keys are refused, so that a typo never silently falls back to a
//! default.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use medbox_runtime::{BatchingConfig, DType, Device};
use serde::Deserialize;

/// Everything `medboxd` reads at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS for the gRPC port; absent means plaintext (loopback only, unless
    /// `server.allow_plaintext`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
    #[serde(default)]
    pub knowledge: KnowledgeConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

/// The agent catalogue (`[agents]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// The folder of agent spec files (`*.toml`) loaded at start. Unset: the
    /// folder `agents` in the working directory, if there is one; a folder
    /// that is set must exist. A bad spec stops the start, naming the file,
    /// the field and the reason.
    #[serde(default)]
    pub specs_dir: Option<PathBuf>,
    /// The model (name or alias) for any step whose route is not loaded.
    #[serde(default = "default_agents_model")]
    pub default_model: String,
    /// Turns of a session's history a run sees (the oldest are left out).
    #[serde(default = "default_max_session_turns")]
    pub max_session_turns: usize,
    /// Sampling temperature of agent steps; 0 is greedy (reproducible).
    #[serde(default)]
    pub temperature: f32,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            specs_dir: None,
            default_model: default_agents_model(),
            max_session_turns: default_max_session_turns(),
            temperature: 0.0,
        }
    }
}

fn default_agents_model() -> String {
    "medical".to_owned()
}

fn default_max_session_turns() -> usize {
    20
}

/// The specs folder used when `[agents] specs_dir` is not set.
pub const DEFAULT_AGENT_SPECS_DIR: &str = "agents";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM.
    pub cert: PathBuf,
    /// The server's private key, PEM.
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; when
    /// set, every client must present one (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys on every RPC but health and reflection. `false` is accepted
    /// only on a loopback listener. With no admin key in the store, medboxd
    /// creates one at start and writes it to `<data_dir>/admin.key` (0600).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// What the audit trail keeps besides who called what, when, with what result.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Also keep each generation's prompt and answer text in its audit event.
    /// Off by default: the trail is append-only, so text kept there is kept forever.
    #[serde(default)]
    pub store_text: bool,
}

/// Fine-tuning: dataset uploads and the job runner (`[finetune]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// `false` is the inference-only profile: UploadDataset and CreateJob are
    /// refused with FAILED_PRECONDITION and no trainer is ever started.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Trainer processes running at once; later jobs wait in order.
    #[serde(default = "default_max_concurrent_jobs")]
    pub max_concurrent_jobs: usize,
    /// Jobs that may wait; CreateJob is refused with RESOURCE_EXHAUSTED beyond.
    #[serde(default = "default_max_queued_jobs")]
    pub max_queued_jobs: usize,
    /// The `medbox-trainer` program; default: the one next to `medboxd`.
    #[serde(default)]
    pub trainer_path: Option<PathBuf>,
    /// Optimizer steps between checkpoints, written into each new job.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u32,
    /// After SIGTERM (cancel, shutdown), how long a trainer may take to exit
    /// before SIGKILL.
    #[serde(default = "default_cancel_grace_seconds")]
    pub cancel_grace_seconds: u64,
    /// Largest dataset upload accepted.
    #[serde(default = "default_max_dataset_bytes")]
    pub max_dataset_bytes: u64,
    /// Where trainers run: `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Optional name dictionary for de-identification, one name per line
    /// (names found anywhere in a dataset are masked).
    #[serde(default)]
    pub deid_names_file: Option<PathBuf>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            enabled: true,
            max_concurrent_jobs: default_max_concurrent_jobs(),
            max_queued_jobs: default_max_queued_jobs(),
            trainer_path: None,
            checkpoint_every: default_checkpoint_every(),
            cancel_grace_seconds: default_cancel_grace_seconds(),
            max_dataset_bytes: default_max_dataset_bytes(),
            device: default_device(),
            deid_names_file: None,
        }
    }
}

fn default_max_concurrent_jobs() -> usize {
    1
}

fn default_max_queued_jobs() -> usize {
    64
}

fn default_checkpoint_every() -> u32 {
    100
}

fn default_cancel_grace_seconds() -> u64 {
    30
}

fn default_max_dataset_bytes() -> u64 {
    1 << 30
}

impl FinetuneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, zero) in [
            ("max_concurrent_jobs", self.max_concurrent_jobs == 0),
            ("max_queued_jobs", self.max_queued_jobs == 0),
            ("checkpoint_every", self.checkpoint_every == 0),
            ("max_dataset_bytes", self.max_dataset_bytes == 0),
        ] {
            if zero {
                return Err(ConfigError::ZeroFinetuneSetting { key });
            }
        }
        self.device
            .parse::<Device>()
            .map_err(|reason| ConfigError::BadFinetuneDevice { reason })?;
        Ok(())
    }
}

/// The knowledge base (`[knowledge]`): documents, chunking, ranking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeConfig {
    /// A folder of `.md` and `.txt` documents ingested at every start
    /// (sub-folders included); a file whose text is already stored (same
    /// SHA-256) is skipped.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The model (name or alias) of kind `embedding` that embeds chunks and
    /// queries. Without it, AddDocument and Search answer FAILED_PRECONDITION.
    #[serde(default)]
    pub embedding_model: Option<String>,
    /// Most estimated tokens of text in one chunk (the title and section
    /// are embedded with it; MiniLM reads 256 tokens).
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: usize,
    /// Estimated tokens of a chunk's tail repeated at the head of the next.
    #[serde(default = "default_chunk_overlap_tokens")]
    pub chunk_overlap_tokens: usize,
    /// Largest document accepted (AddDocument and files in `dir`).
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: usize,
    /// Weights of the vector and keyword (BM25) rankings' normalised scores
    /// in the hybrid blend.
    #[serde(default = "default_ranking_weight")]
    pub vector_weight: f64,
    #[serde(default = "default_ranking_weight")]
    pub keyword_weight: f64,
    /// Whether the embedding model understands Chinese. When it does not
    /// (MiniLM), a Chinese query is ranked by its keywords.
    #[serde(default)]
    pub multilingual_embeddings: bool,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        KnowledgeConfig {
            dir: None,
            embedding_model: None,
            chunk_tokens: default_chunk_tokens(),
            chunk_overlap_tokens: default_chunk_overlap_tokens(),
            max_document_bytes: default_max_document_bytes(),
            vector_weight: default_ranking_weight(),
            keyword_weight: default_ranking_weight(),
            multilingual_embeddings: false,
        }
    }
}

fn default_chunk_tokens() -> usize {
    160
}

fn default_chunk_overlap_tokens() -> usize {
    32
}

fn default_max_document_bytes() -> usize {
    4 << 20
}

fn default_ranking_weight() -> f64 {
    1.0
}

impl KnowledgeConfig {
    fn validate(&self, models: &[ValidModelConfig]) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::BadKnowledge { key, reason };
        if !(16..=4096).contains(&self.chunk_tokens) {
            return Err(bad("chunk_tokens", "must be 16 to 4096".into()));
        }
        if self.chunk_overlap_tokens * 2 > self.chunk_tokens {
            return Err(bad(
                "chunk_overlap_tokens",
                format!(
                    "must be at most half of chunk_tokens ({})",
                    self.chunk_tokens
                ),
            ));
        }
        if self.max_document_bytes == 0 {
            return Err(bad("max_document_bytes", "must be greater than 0".into()));
        }
        for (key, weight) in [
            ("vector_weight", self.vector_weight),
            ("keyword_weight", self.keyword_weight),
        ] {
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(bad(key, "must be a number ≥ 0".into()));
            }
        }
        if self.vector_weight + self.keyword_weight <= 0.0 {
            return Err(bad(
                "vector_weight",
                "must not be 0 when keyword_weight is 0 too".into(),
            ));
        }
        match &self.embedding_model {
            None if self.dir.is_some() => {
                return Err(bad(
                    "embedding_model",
                    "must name a model of kind embedding when knowledge.dir is set".into(),
                ));
            }
            Some(name) if name.trim().is_empty() => {
                return Err(bad("embedding_model", "must not be empty".into()));
            }
            Some(name) => {
                let configured = models.iter().find(|model| {
                    model.name == *name || model.aliases.iter().any(|alias| alias == name)
                });
                if let Some(model) = configured
                    && model.kind != ModelKind::Embedding
                {
                    return Err(bad(
                        "embedding_model",
                        format!(
                            "`{name}` is a {} model; name a model of kind embedding",
                            model.kind.as_str()
                        ),
                    ));
                }
            }
            None => {}
        }
        if let Some(dir) = &self.dir
            && !dir.is_dir()
        {
            return Err(bad("dir", format!("{} is not a folder", dir.display())));
        }
        Ok(())
    }
}

/// Protection of the box from overload, per key and overall.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per API key: sustained requests per second...
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: f64,
    /// ...and how many may come at once above that rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Per API key: generated tokens per minute; 0 = no limit.
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// RPCs in flight over the whole box; the next one is refused at once
    /// with RESOURCE_EXHAUSTED (load shedding) rather than queued.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Largest request message accepted.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Deadline for an RPC whose client set none (the client's own
    /// `grpc-timeout` is honoured when shorter).
    #[serde(default = "default_request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    /// Per-method deadlines in seconds, keyed `Service.Method` (for example
    /// `"Inference.Embed" = 30`); others get `request_timeout_seconds`, and
    /// quick lookups (Tokenize, ListModels, Status, keys) 30 s.
    #[serde(default)]
    pub method_timeout_seconds: HashMap<String, f64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_second: default_requests_per_second(),
            burst: default_burst(),
            tokens_per_minute: 0,
            max_concurrent_requests: default_max_concurrent_requests(),
            max_request_bytes: default_max_request_bytes(),
            request_timeout_seconds: default_request_timeout_seconds(),
            method_timeout_seconds: HashMap::new(),
        }
    }
}

fn default_requests_per_second() -> f64 {
    50.0
}

fn default_burst() -> u32 {
    100
}

fn default_max_concurrent_requests() -> usize {
    256
}

fn default_max_request_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_request_timeout_seconds() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC, health checking and reflection.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Prometheus `/metrics` over plain HTTP; "" turns it off.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// How long in-flight requests may run on after SIGTERM before they are cut.
    #[serde(default = "default_shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// Serve plaintext gRPC on a non-loopback address (behind a TLS proxy,
    /// say). Without it, such a listener needs `[tls]`.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Log format: "text" (for people) or "json" (one object per line, for collectors).
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            metrics_listen: default_metrics_listen(),
            allow_plaintext: false,
            shutdown_grace_seconds: default_shutdown_grace_seconds(),
            log_format: default_log_format(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:50051".to_owned()
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

fn default_shutdown_grace_seconds() -> u64 {
    15
}

fn default_log_format() -> String {
    "text".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `medbox.db` (SQLite) and the box's files live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Optional `postgres://` URL; when set, PostgreSQL replaces the SQLite file.
    #[serde(default)]
    pub url: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: default_data_dir(),
            url: None,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// A Hugging Face style folder, as `save_pretrained` writes it.
    pub path: PathBuf,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `f32`, `bf16`, `f16` or `int8` (weight-only); default: the checkpoint's.
    #[serde(default)]
    pub dtype: Option<String>,
    /// `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Requests that may wait for this model's engine before new ones are refused.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Sequences decoded together in the running batch (causal-lm).
    #[serde(default = "default_max_running_sequences")]
    pub max_running_sequences: usize,
    /// Tokens one engine step may process (decodes plus prefill chunks).
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Memory for the KV cache in MiB; default: room for
    /// `max_running_sequences` sequences of up to 2,048 tokens, at most 2 GiB.
    #[serde(default)]
    pub kv_cache_mib: Option<usize>,
}

fn default_max_running_sequences() -> usize {
    BatchingConfig::default().max_running_sequences
}

fn default_max_batch_tokens() -> usize {
    BatchingConfig::default().max_batch_tokens
}

impl ModelConfig {
    fn batching(&self, index: usize) -> Result<BatchingConfig, ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::BadBatching {
            index,
            name: self.name.clone(),
            key,
            reason,
        };
        if self.max_running_sequences == 0 {
            return Err(bad("max_running_sequences", "must be at least 1".into()));
        }
        if self.max_batch_tokens < self.max_running_sequences {
            return Err(bad(
                "max_batch_tokens",
                format!(
                    "must be at least max_running_sequences ({}), one token per running sequence",
                    self.max_running_sequences
                ),
            ));
        }
        let kv_cache_bytes = match self.kv_cache_mib {
            None => None,
            Some(0) => return Err(bad("kv_cache_mib", "must be at least 1".into())),
            Some(mib) => Some(
                mib.checked_mul(1 << 20)
                    .ok_or_else(|| bad("kv_cache_mib", format!("{mib} is too large")))?,
            ),
        };
        Ok(BatchingConfig {
            max_running_sequences: self.max_running_sequences,
            max_batch_tokens: self.max_batch_tokens,
            kv_cache_bytes,
        })
    }
}

fn default_kind() -> String {
    ModelKind::CausalLm.as_str().to_owned()
}

fn default_device() -> String {
    "cpu".to_owned()
}

fn default_max_waiting() -> usize {
    64
}

/// What a `[[models]]` entry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    CausalLm,
    Embedding,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::CausalLm => "causal-lm",
            ModelKind::Embedding => "embedding",
        }
    }
}

/// A `[[models]]` entry after its strings were checked.
#[derive(Debug, Clone)]
pub struct ValidModelConfig {
    pub name: String,
    pub path: PathBuf,
    pub kind: ModelKind,
    pub aliases: Vec<String>,
    pub dtype: Option<DType>,
    pub device: Device,
    pub max_waiting: usize,
    pub batching: BatchingConfig,
}

/// Why the configuration cannot be used; each message names the key or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("server.listen: `{value}` is not an address such as 127.0.0.1:50051")]
    BadListen { value: String },
    #[error(
        "server.metrics_listen: `{value}` is not an address such as 127.0.0.1:9464 (or \"\" for none)"
    )]
    BadMetricsListen { value: String },
    #[error(
        "auth.enabled = false is accepted only on a loopback listener, and server.listen is {listen}"
    )]
    AuthOffNonLoopback { listen: SocketAddr },
    #[error(
        "server.listen is {listen}, not a loopback address, and there is no [tls]: set tls.cert and tls.key, or server.allow_plaintext = true if a proxy terminates TLS"
    )]
    PlaintextNonLoopback { listen: SocketAddr },
    #[error("models[{index}] (`{name}`).{key} {reason}")]
    BadBatching {
        index: usize,
        name: String,
        key: &'static str,
        reason: String,
    },
    #[error("limits.method_timeout_seconds.\"{method}\" {reason}")]
    BadMethodTimeout { method: String, reason: String },
    #[error("limits.{key} must be greater than 0")]
    ZeroLimit { key: &'static str },
    #[error("finetune.{key} must be greater than 0")]
    ZeroFinetuneSetting { key: &'static str },
    #[error("knowledge.{key}: {reason}")]
    BadKnowledge { key: &'static str, reason: String },
    #[error("finetune.device: {reason}")]
    BadFinetuneDevice { reason: String },
    #[error("server.log_format: `{value}` is not one of text, json")]
    BadLogFormat { value: String },
    #[error("models[{index}].name must not be empty")]
    EmptyModelName { index: usize },
    #[error(
        "models[{index}] (`{name}`): the name or alias `{alias}` is already used by another model"
    )]
    DuplicateName {
        index: usize,
        name: String,
        alias: String,
    },
    #[error("models[{index}] (`{name}`).kind: `{value}` is not one of causal-lm, embedding")]
    BadKind {
        index: usize,
        name: String,
        value: String,
    },
    #[error("models[{index}] (`{name}`).dtype: {reason}")]
    BadDType {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("models[{index}] (`{name}`).device: {reason}")]
    BadDevice {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("models[{index}] (`{name}`).path: {path} is not a model folder (no config.json there)")]
    MissingModelFolder {
        index: usize,
        name: String,
        path: PathBuf,
    },
    #[error("models[{index}] (`{name}`).max_waiting must be at least 1")]
    ZeroMaxWaiting { index: usize, name: String },
}

impl Config {
    /// Reads the optional TOML file, then the `MEDBOX__SECTION__KEY` environment overrides.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
                path: path.to_owned(),
                reason: err.to_string(),
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with("MEDBOX__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("MEDBOX")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let merged = builder
            .build()
            .map_err(|err| ConfigError::Parse(err.to_string()))?;
        merged
            .try_deserialize()
            .map_err(|err| ConfigError::Parse(err.to_string()))
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| ConfigError::BadListen {
                value: self.server.listen.clone(),
            })
    }

    /// The metrics address, or `None` when turned off.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.server.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.server
            .metrics_listen
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::BadMetricsListen {
                value: self.server.metrics_listen.clone(),
            })
    }

    /// Checks every `[[models]]` entry; the first fault found is returned.
    pub fn valid_models(&self) -> Result<Vec<ValidModelConfig>, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut valid = Vec::with_capacity(self.models.len());
        for (index, model) in self.models.iter().enumerate() {
            let name = model.name.clone();
            if name.trim().is_empty() {
                return Err(ConfigError::EmptyModelName { index });
            }
            for alias in std::iter::once(&model.name).chain(&model.aliases) {
                if !seen.insert(alias.clone()) {
                    return Err(ConfigError::DuplicateName {
                        index,
                        name,
                        alias: alias.clone(),
                    });
                }
            }
            let kind = match model.kind.as_str() {
                "causal-lm" => ModelKind::CausalLm,
                "embedding" => ModelKind::Embedding,
                other => {
                    return Err(ConfigError::BadKind {
                        index,
                        name,
                        value: other.to_owned(),
                    });
                }
            };
            let dtype = match &model.dtype {
                None => None,
                Some(text) => Some(text.parse::<DType>().map_err(|err| ConfigError::BadDType {
                    index,
                    name: name.clone(),
                    reason: err.to_string(),
                })?),
            };
            let device = model
                .device
                .parse::<Device>()
                .map_err(|err| ConfigError::BadDevice {
                    index,
                    name: name.clone(),
                    reason: err.to_string(),
                })?;
            if !model.path.join("config.json").is_file()
                && !medbox_runtime::lora::is_adapter_folder(&model.path)
            {
                return Err(ConfigError::MissingModelFolder {
                    index,
                    name,
                    path: model.path.clone(),
                });
            }
            if model.max_waiting == 0 {
                return Err(ConfigError::ZeroMaxWaiting { index, name });
            }
            let batching = model.batching(index)?;
            valid.push(ValidModelConfig {
                name,
                // Absolute, as the registry stores it: a trainer runs in its
                // job folder and reads the path from there.
                path: std::path::absolute(&model.path).unwrap_or_else(|_| model.path.clone()),
                kind,
                aliases: model.aliases.clone(),
                dtype,
                device,
                max_waiting: model.max_waiting,
                batching,
            });
        }
        Ok(valid)
    }

    /// Checks what can be checked without binding ports or opening files for writing.
    pub fn validate(&self) -> Result<Vec<ValidModelConfig>, ConfigError> {
        let listen = self.listen_addr()?;
        if !self.auth.enabled && !listen.ip().is_loopback() {
            return Err(ConfigError::AuthOffNonLoopback { listen });
        }
        if self.tls.is_none() && !self.server.allow_plaintext && !listen.ip().is_loopback() {
            return Err(ConfigError::PlaintextNonLoopback { listen });
        }
        let limits = &self.limits;
        for (key, zero) in [
            ("requests_per_second", limits.requests_per_second <= 0.0),
            ("burst", limits.burst == 0),
            (
                "max_concurrent_requests",
                limits.max_concurrent_requests == 0,
            ),
            ("max_request_bytes", limits.max_request_bytes == 0),
            (
                "request_timeout_seconds",
                limits.request_timeout_seconds == 0,
            ),
        ] {
            if zero {
                return Err(ConfigError::ZeroLimit { key });
            }
        }
        for (method, seconds) in &limits.method_timeout_seconds {
            let known = method.split_once('.').is_some_and(|(service, name)| {
                crate::deadline::KNOWN_SERVICES.contains(&service)
                    && !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric())
            });
            if !known {
                return Err(ConfigError::BadMethodTimeout {
                    method: method.clone(),
                    reason: format!(
                        "is not a method name such as \"Inference.Embed\" (services: {})",
                        crate::deadline::KNOWN_SERVICES.join(", ")
                    ),
                });
            }
            if !(seconds.is_finite() && *seconds > 0.0) {
                return Err(ConfigError::BadMethodTimeout {
                    method: method.clone(),
                    reason: "must be a number of seconds greater than 0".into(),
                });
            }
        }
        self.metrics_addr()?;
        self.finetune.validate()?;
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::BadLogFormat {
                value: self.server.log_format.clone(),
            });
        }
        let models = self.valid_models()?;
        self.knowledge.validate(&models)?;
        Ok(models)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("medbox.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_with_env(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_apply_when_the_file_is_empty() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:50051");
        assert_eq!(config.storage.data_dir, PathBuf::from("./data"));
        assert!(config.storage.url.is_none());
        assert!(config.models.is_empty());
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load(
            "[server]\nlisten = \"127.0.0.1:1\"\n[storage]\ndata_dir = \"/a\"\n",
            &[
                ("MEDBOX__SERVER__LISTEN", "127.0.0.1:2"),
                ("MEDBOX__STORAGE__DATA_DIR", "/b"),
                ("OTHER__SERVER__LISTEN", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:2");
        assert_eq!(config.storage.data_dir, PathBuf::from("/b"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load("[server]\nlisten_addr = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = load("[sever]\n", &[]).unwrap_err();
        assert!(err.to_string().contains("sever"), "{err}");
    }

    #[test]
    fn finetune_settings_default_and_are_checked() {
        let config = load("", &[]).unwrap();
        assert!(config.finetune.enabled);
        assert_eq!(config.finetune.max_concurrent_jobs, 1);
        assert_eq!(config.finetune.trainer_path, None);
        let config = load(
            "[finetune]\nenabled = false\nmax_concurrent_jobs = 2\ntrainer_path = \"/opt/t\"\n",
            &[("MEDBOX__FINETUNE__CHECKPOINT_EVERY", "25")],
        )
        .unwrap();
        assert!(!config.finetune.enabled);
        assert_eq!(config.finetune.max_concurrent_jobs, 2);
        assert_eq!(config.finetune.checkpoint_every, 25);
        assert_eq!(
            config.finetune.trainer_path.as_deref(),
            Some(Path::new("/opt/t"))
        );
        config.validate().unwrap();
        let check = |body: &str, expect: &str| {
            let err = load(body, &[]).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(expect), "{err} should contain {expect}");
        };
        check(
            "[finetune]\nmax_concurrent_jobs = 0\n",
            "finetune.max_concurrent_jobs must be greater than 0",
        );
        check("[finetune]\ndevice = \"tpu\"\n", "finetune.device");
        let err = load("[finetune]\nmax_jobs = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("max_jobs"), "{err}");
    }

    #[test]
    fn model_faults_name_the_entry_and_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let folder = dir.path().display().to_string();
        let check = |body: &str, expect: &str| {
            let config = load(body, &[]).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expect), "{err} should contain {expect}");
        };
        check(
            "[[models]]\nname = \"a\"\npath = \"/no/such/folder\"\n",
            "models[0] (`a`).path: /no/such/folder",
        );
        check(
            &format!("[[models]]\nname = \"a\"\npath = \"{folder}\"\nkind = \"vision\"\n"),
            "models[0] (`a`).kind",
        );
        check(
            &format!("[[models]]\nname = \"a\"\npath = \"{folder}\"\ndtype = \"f64\"\n"),
            "models[0] (`a`).dtype",
        );
        check(
            &format!("[[models]]\nname = \"a\"\npath = \"{folder}\"\ndevice = \"tpu\"\n"),
            "models[0] (`a`).device",
        );
        check(
            &format!(
                "[[models]]\nname = \"a\"\npath = \"{folder}\"\n[[models]]\nname = \"b\"\npath = \"{folder}\"\naliases = [\"a\"]\n"
            ),
            "models[1] (`b`): the name or alias `a`",
        );
        check("[server]\nlisten = \"nowhere\"\n", "server.listen");
        check(
            "[server]\nlisten = \"0.0.0.0:50051\"\n[auth]\nenabled = false\n",
            "auth.enabled = false is accepted only on a loopback listener",
        );
        check("[limits]\nburst = 0\n", "limits.burst");
        check(
            "[server]\nlisten = \"0.0.0.0:50051\"\n",
            "there is no [tls]",
        );
    }

    #[test]
    fn knowledge_settings_default_and_are_checked() {
        let config = load("", &[]).unwrap();
        assert_eq!(config.knowledge.dir, None);
        assert_eq!(config.knowledge.embedding_model, None);
        assert_eq!(
            (
                config.knowledge.chunk_tokens,
                config.knowledge.chunk_overlap_tokens
            ),
            (160, 32)
        );
        let model_dir = tempfile::tempdir().unwrap();
        std::fs::write(model_dir.path().join("config.json"), "{}").unwrap();
        let models = format!(
            "[[models]]\nname = \"minilm\"\npath = \"{0}\"\nkind = \"embedding\"\naliases = [\"embedder\"]\n\
             [[models]]\nname = \"tiny\"\npath = \"{0}\"\n",
            model_dir.path().display()
        );
        let documents = model_dir.path().display().to_string();
        let config = load(
            &format!(
                "[knowledge]\ndir = \"{documents}\"\nembedding_model = \"embedder\"\nchunk_tokens = 200\n{models}"
            ),
            &[("MEDBOX__KNOWLEDGE__KEYWORD_WEIGHT", "1.5")],
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.knowledge.keyword_weight, 1.5);
        let check = |body: &str, expect: &str| {
            let err = load(&format!("{body}\n{models}"), &[])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{err} should contain {expect}");
        };
        check(
            "[knowledge]\nembedding_model = \"tiny\"",
            "knowledge.embedding_model: `tiny` is a causal-lm model",
        );
        check(
            &format!("[knowledge]\ndir = \"{documents}\""),
            "knowledge.embedding_model: must name a model",
        );
        check(
            "[knowledge]\nembedding_model = \"minilm\"\ndir = \"/no/such/folder\"",
            "knowledge.dir: /no/such/folder is not a folder",
        );
        check(
            "[knowledge]\nchunk_tokens = 100\nchunk_overlap_tokens = 60",
            "knowledge.chunk_overlap_tokens: must be at most half",
        );
        check(
            "[knowledge]\nchunk_tokens = 4",
            "knowledge.chunk_tokens: must be 16 to 4096",
        );
        check(
            "[knowledge]\nvector_weight = 0\nkeyword_weight = 0",
            "knowledge.vector_weight: must not be 0 when keyword_weight is 0 too",
        );
        let err = load("[knowledge]\nfolder = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("folder"), "{err}");
    }

    #[test]
    fn a_good_model_entry_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let body = format!(
            "[[models]]\nname = \"tiny\"\npath = \"{}\"\naliases = [\"medical\"]\ndtype = \"bf16\"\n",
            dir.path().display()
        );
        let models = load(&body, &[]).unwrap().validate().unwrap();
        assert_eq!(models[0].name, "tiny");
        assert_eq!(models[0].aliases, vec!["medical".to_owned()]);
        assert_eq!(models[0].kind, ModelKind::CausalLm);
        assert_eq!(models[0].dtype, Some(DType::BF16));
    }
}
