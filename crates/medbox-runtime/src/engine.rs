//! The engine: one OS thread per model that owns the weights and the KV
//! cache, fed by a bounded command channel. `Engine` is the cheap-to-clone
//! handle the server keeps; it validates and tokenizes on the caller's
//! thread and sends `ValidGenerateRequest`s to the engine thread.
//!
//! The thread batches continuously (`Worker::run`): every step is one
//! forward pass over one new token of each decoding sequence plus chunks of
//! prompts being prefilled, so a request joins the running batch at the next
//! step and leaves it as soon as it finishes or its caller drops the stream.
//! The KV cache is a pool of fixed-size blocks (`kv_blocks`) with prefix
//! reuse: a prompt that starts with blocks another request computed (an
//! agent's system prompt, a chat's earlier turns) takes them instead of
//! recomputing them.
//!
//! LoRA adapters of the engine's model can be attached while it serves
//! (`Engine::attach_adapter`): the handle it returns submits under the
//! adapter's name, and its sequences join the same batches as the base
//! model's, each computed with its own adapter (`model::adapters`). Cached
//! prefix blocks are never shared across adapters.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use llguidance::toktrie::SimpleVob;

use crate::chat::{self, ChatRequest, ChatTemplate};
use crate::constraint::ConstraintState;
use crate::detokenize::IncrementalDecoder;
use crate::error::{EngineError, LoadError, RuntimeError, ValidationError};
use crate::kv_blocks::{BlockAllocator, BlockTable};
use crate::loader::{self, LoadedModel};
use crate::lora::{self, AdapterFile};
use crate::model::{ChunkInput, KvPool, Model, ServedAdapter};
use crate::model_thread;
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use crate::validation::{GenerateRequest, ValidGenerateRequest, Validator};
use crate::{BatchingConfig, EngineConfig, ModelInfo};

/// One token of a tokenized text: its id and its piece as the tokenizer names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    pub text: String,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
    /// The caller dropped its stream (never seen by that caller).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// What a `GenerationStream` yields: deltas, then exactly one `Finished` or
/// `Failed`. Joining the deltas' `text` (and `token_ids`) gives the whole
/// answer. `token_ids` are every generated token, so their count is
/// `usage.completion_tokens`: they include a final end-of-sequence token
/// (whose text is empty) and the tokens that formed a stop string (whose text
/// is not returned). A delta's text may be empty while its tokens complete a
/// character or a possible stop string.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    Delta { text: String, token_ids: Vec<u32> },
    Finished { reason: FinishReason, usage: Usage },
    Failed(EngineError),
}

/// The receiving end of one generation. Dropping it cancels the sequence at
/// the engine's next step.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::Receiver<GenerationEvent>,
}

impl GenerationStream {
    /// The next event, or `None` after the last one.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// The blocking twin of `next`, for callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }
}

/// `EngineConfig::max_waiting` is capped here.
pub const MAX_WAITING_LIMIT: usize = 65_536;

enum Command {
    Generate(Box<Submission>),
    /// Reads the adapter in `dir` and serves it as `id`.
    Attach {
        id: u64,
        name: String,
        dir: PathBuf,
        reply: SyncSender<Result<(), LoadError>>,
    },
    /// Stops serving adapter `id` to new requests; its sequences finish.
    Detach {
        id: u64,
        reply: Option<SyncSender<()>>,
    },
    Shutdown,
}

struct Submission {
    id: u64,
    request: ValidGenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
    /// The adapter the request is served with.
    adapter: Option<Arc<AdapterView>>,
}

/// What a handle bound to an attached adapter knows of it. The adapter is
/// detached when the last such handle is dropped (or by `Engine::shutdown`).
struct AdapterView {
    /// The adapter's id on the engine thread, and its prefix-cache namespace.
    id: u64,
    /// The base model's info under the adapter's name.
    info: ModelInfo,
    validator: Validator,
    commands: SyncSender<Command>,
}

impl Drop for AdapterView {
    fn drop(&mut self) {
        // Best effort: an engine that stopped has nothing to detach.
        let _ = self.commands.try_send(Command::Detach {
            id: self.id,
            reply: None,
        });
    }
}

struct Shared {
    info: ModelInfo,
    tokenizer: Arc<tokenizers::Tokenizer>,
    validator: Validator,
    chat_template: Option<ChatTemplate>,
    thinks: bool,
    commands: SyncSender<Command>,
    max_waiting: usize,
    max_running: usize,
    next_id: AtomicU64,
    /// Ids for attached adapters; 0 is the base model.
    next_adapter: AtomicU64,
    /// The model folder, canonical, that adapters must name as their base;
    /// `None` when the engine serves a merged adapter (nothing attaches to it).
    base_dir: Option<PathBuf>,
    load: Arc<EngineLoad>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// How busy an engine is, counted where work changes hands.
#[derive(Debug, Default)]
struct EngineLoad {
    /// Submitted and not running (queued, or preempted and queued again).
    waiting: AtomicUsize,
    /// In the running batch.
    running: AtomicUsize,
    /// Submitted and not finished: what `submit` bounds.
    accepted: AtomicUsize,
    /// Forward passes run so far.
    steps: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of computed.
    reused_tokens: AtomicU64,
    /// Sequences sent back to the queue because the KV cache was full.
    preemptions: AtomicU64,
}

impl EngineLoad {
    /// A sequence ended (finished, failed or cancelled).
    fn leave(&self, was_waiting: bool) {
        self.accepted.fetch_sub(1, Ordering::Relaxed);
        if was_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The scheduler's limits, resolved at load.
#[derive(Debug, Clone, Copy)]
struct Budget {
    max_running: usize,
    max_batch_tokens: usize,
}

/// Cache blocks hold this many positions each.
const BLOCK_SIZE: usize = 16;
/// The default KV cache is at most this large.
const DEFAULT_KV_CACHE_LIMIT: usize = 2 << 30;
/// … and sized for this many tokens per running sequence (less when the
/// model's context is shorter).
const DEFAULT_KV_TOKENS_PER_SEQUENCE: usize = 2048;

/// A snapshot of an engine's load, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLoadSnapshot {
    /// Requests queued (never run, or preempted and queued again).
    pub waiting: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// Forward passes (engine steps) so far.
    pub steps: u64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub reused_tokens: u64,
    /// Sequences preempted because the KV cache was full.
    pub preemptions: u64,
}

/// What the engine thread hands back once the model is loaded.
struct Ready {
    info: ModelInfo,
    tokenizer: Arc<tokenizers::Tokenizer>,
    validator: Validator,
    chat_template: Option<ChatTemplate>,
    thinks: bool,
}

/// A handle to one loaded model's engine thread. Clones share the thread.
///
/// Shutdown: `shutdown` processes everything submitted before it, then stops
/// and joins the thread. Without it, the thread stops by itself once every
/// handle is dropped and the queued work is done (it is not joined then).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    /// Set on a handle that serves an attached adapter.
    adapter: Option<Arc<AdapterView>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Engine")
            .field("model", &self.info().name)
            .finish()
    }
}

impl Engine {
    /// Blocking: spawns the engine thread, which loads the weights (tensors
    /// never leave that thread), and returns once the model is ready or
    /// failed to load. Call it from `spawn_blocking` in async code.
    #[instrument(skip_all, fields(model = %config.name))]
    pub fn start(config: EngineConfig) -> Result<Engine, LoadError> {
        let max_waiting = config.max_waiting.min(MAX_WAITING_LIMIT);
        let batching = config.batching.clone();
        let max_running = batching.max_running_sequences.max(1);
        // Every accepted request may sit in the channel before the thread
        // drains it; the channel preallocates its slots, hence the cap.
        let (commands, command_receiver) =
            std::sync::mpsc::sync_channel((max_waiting + max_running).min(MAX_WAITING_LIMIT));
        let load = Arc::new(EngineLoad::default());
        let worker_load = Arc::clone(&load);
        let thread_name = format!("medbox-engine-{}", config.name);
        let base_dir = (!lora::is_adapter_folder(&config.path))
            .then(|| std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone()));
        let EngineConfig {
            name,
            path,
            dtype,
            device,
            max_waiting: _,
            batching: _,
        } = config;
        let load_model = move || {
            let started = std::time::Instant::now();
            let LoadedModel {
                model,
                tokenizer,
                info,
                mut validator,
                chat_template,
                thinks,
            } = loader::load(&name, &path, dtype, device)?;
            let (pool, blocks, capacity) = kv_cache(&model, &info, &batching)?;
            // A request must fit the cache alone: the context shrinks to it.
            let mut info = info;
            info.max_context = info.max_context.min(capacity);
            validator.max_context = info.max_context;
            info!(
                model = %info.name,
                architecture = %info.architecture,
                dtype = %info.dtype,
                device = %info.device,
                kv_cache_tokens = capacity,
                max_running_sequences = max_running,
                max_batch_tokens = batching.max_batch_tokens,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            let worker = Worker {
                model,
                pool,
                blocks,
                tokenizer: Arc::clone(&tokenizer),
                info: info.clone(),
                budget: Budget {
                    max_running,
                    max_batch_tokens: batching.max_batch_tokens.max(max_running),
                },
                waiting: VecDeque::new(),
                running: Vec::new(),
                adapters: HashMap::new(),
                load: worker_load,
                stopping: false,
            };
            let ready = Ready {
                info,
                tokenizer,
                validator,
                chat_template,
                thinks,
            };
            Ok((ready, worker))
        };
        let (
            Ready {
                info,
                tokenizer,
                validator,
                chat_template,
                thinks,
            },
            thread,
        ) = model_thread::spawn_loaded(
            thread_name,
            "engine",
            load_model,
            move |worker: Worker| worker.run(command_receiver),
        )?;
        Ok(Engine {
            shared: Arc::new(Shared {
                info,
                tokenizer,
                validator,
                chat_template,
                thinks,
                commands,
                max_waiting,
                max_running,
                next_id: AtomicU64::new(0),
                next_adapter: AtomicU64::new(1),
                base_dir,
                load,
                thread: Mutex::new(Some(thread)),
            }),
            adapter: None,
        })
    }

    /// The model this handle serves: the engine's, or for a handle from
    /// `attach_adapter`, the same under the adapter's name.
    pub fn info(&self) -> &ModelInfo {
        match &self.adapter {
            Some(view) => &view.info,
            None => &self.shared.info,
        }
    }

    /// The name of the engine's own model, which an attached adapter adapts.
    pub fn base_name(&self) -> &str {
        &self.shared.info.name
    }

    fn validator(&self) -> &Validator {
        match &self.adapter {
            Some(view) => &view.validator,
            None => &self.shared.validator,
        }
    }

    /// Blocking: serves the LoRA adapter in `dir` (PEFT's folder format) on
    /// this engine as model `name`, beside the base model and any other
    /// adapters, and returns the handle that submits with it. The adapter's
    /// `base_model_name_or_path` must be this engine's model folder. The
    /// tensors are read on the engine thread, between two steps. Call it
    /// from `spawn_blocking` in async code.
    #[instrument(skip_all, fields(model = %self.shared.info.name, adapter = %name))]
    pub fn attach_adapter(&self, name: &str, dir: &Path) -> Result<Engine, LoadError> {
        let config_path = dir.join(lora::ADAPTER_CONFIG_FILE);
        let wrong_base = |message: String| LoadError::InvalidConfig {
            path: config_path.clone(),
            message,
        };
        let base = &self.shared.info.name;
        if self.adapter.is_some() {
            return Err(wrong_base(format!(
                "model `{}` is itself an adapter of `{base}`; attach to `{base}`",
                self.info().name
            )));
        }
        let Some(base_dir) = &self.shared.base_dir else {
            return Err(wrong_base(format!(
                "model `{base}` serves a merged adapter; adapters attach only to a base model"
            )));
        };
        let wanted = canonical_base_dir(dir)?;
        if &wanted != base_dir {
            return Err(wrong_base(format!(
                "the adapter's base model is `{}`, but model `{base}` serves `{}`",
                wanted.display(),
                base_dir.display()
            )));
        }
        let id = self.shared.next_adapter.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let stopped = || LoadError::EngineStopped {
            model: base.clone(),
        };
        // A blocking send: waits for room when the queue is full.
        self.shared
            .commands
            .send(Command::Attach {
                id,
                name: name.to_owned(),
                dir: dir.to_path_buf(),
                reply,
            })
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())??;
        let mut info = self.shared.info.clone();
        info.name = name.to_owned();
        let mut validator = self.shared.validator.clone();
        validator.model_name = name.to_owned();
        Ok(Engine {
            shared: Arc::clone(&self.shared),
            adapter: Some(Arc::new(AdapterView {
                id,
                info,
                validator,
                commands: self.shared.commands.clone(),
            })),
        })
    }

    /// Blocking (reads `adapter_config.json`): whether the adapter in `dir`
    /// was trained on the model this engine serves, so that
    /// `attach_adapter` would take it.
    pub fn is_base_of(&self, dir: &Path) -> bool {
        self.adapter.is_none()
            && self.shared.base_dir.as_ref().is_some_and(|base_dir| {
                canonical_base_dir(dir).is_ok_and(|wanted| &wanted == base_dir)
            })
    }

    /// Requests waiting for the engine and sequences it is running now.
    pub fn load(&self) -> EngineLoadSnapshot {
        let load = &self.shared.load;
        EngineLoadSnapshot {
            waiting: load.waiting.load(Ordering::Relaxed),
            running: load.running.load(Ordering::Relaxed),
            steps: load.steps.load(Ordering::Relaxed),
            reused_tokens: load.reused_tokens.load(Ordering::Relaxed),
            preemptions: load.preemptions.load(Ordering::Relaxed),
        }
    }

    /// Tokenizes `text` as a prompt would be (special tokens included).
    pub fn tokenize(&self, text: &str) -> Result<Vec<Token>, RuntimeError> {
        let encoding = self
            .shared
            .tokenizer
            .encode(text, true)
            .map_err(|error| RuntimeError::Tokenizer(error.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .map(|(&id, piece)| Token {
                id,
                text: piece.clone(),
            })
            .collect())
    }

    /// Checks `request` against this model and resolves its defaults.
    pub fn validate(
        &self,
        request: GenerateRequest,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let tokenizer = &self.shared.tokenizer;
        self.validator().validate(request, |prompt| {
            tokenizer
                .encode(prompt, true)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|error| error.to_string())
        })
    }

    /// Checks a chat request against this model: the roles, then the
    /// messages rendered with the model's chat template (generation prompt
    /// added, special tokens written by the template, so none are added when
    /// tokenising), then everything `validate` checks.
    pub fn validate_chat(
        &self,
        request: ChatRequest,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let ChatRequest {
            messages,
            sampling,
            constraint,
        } = request;
        chat::check_messages(&messages)?;
        let template =
            self.shared
                .chat_template
                .as_ref()
                .ok_or_else(|| ValidationError::NoChatTemplate {
                    model: self.info().name.clone(),
                })?;
        let prompt = chat::render_messages(template, &messages)?;
        let starts_in_reasoning = chat::ends_in_reasoning(&prompt);
        let tokenizer = &self.shared.tokenizer;
        let mut valid = self.validator().validate(
            GenerateRequest {
                prompt,
                sampling,
                constraint,
            },
            |prompt| {
                tokenizer
                    .encode(prompt, false)
                    .map(|encoding| encoding.get_ids().to_vec())
                    .map_err(|error| error.to_string())
            },
        )?;
        valid.starts_in_reasoning = starts_in_reasoning;
        valid.may_open_reasoning = self.shared.thinks;
        Ok(valid)
    }

    /// Whether this model's answers may contain `<think>…</think>`: its
    /// tokenizer has a `<think>` token or its chat template writes one.
    /// Split them with `ReasoningSplitter`.
    pub fn thinks(&self) -> bool {
        self.shared.thinks
    }

    /// Queues a request; never blocks. `QueueFull` when `max_waiting`
    /// requests already wait, `Stopped` after shutdown.
    #[instrument(skip_all, fields(model = %self.info().name))]
    pub fn submit(&self, request: ValidGenerateRequest) -> Result<GenerationStream, EngineError> {
        // Room for one delta per token, a final flush and the Finished event,
        // so the engine never waits on a slow client.
        let capacity = request.max_tokens as usize + 2;
        let (events, receiver) = mpsc::channel(capacity);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let submission = Submission {
            id,
            request,
            events,
            adapter: self.adapter.clone(),
        };
        // At most `max_running` run and `max_waiting` more wait. Counted
        // before the send, so the engine thread never takes it below zero.
        let load = &self.shared.load;
        let limit = self.shared.max_running + self.shared.max_waiting;
        let admitted =
            load.accepted
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |accepted| {
                    (accepted < limit).then_some(accepted + 1)
                });
        if admitted.is_err() {
            return Err(EngineError::QueueFull {
                model: self.info().name.clone(),
                max_waiting: self.shared.max_waiting,
            });
        }
        load.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .shared
            .commands
            .try_send(Command::Generate(Box::new(submission)));
        if sent.is_err() {
            load.leave(true);
        }
        match sent {
            Ok(()) => Ok(GenerationStream { events: receiver }),
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull {
                model: self.info().name.clone(),
                max_waiting: self.shared.max_waiting,
            }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped {
                model: self.info().name.clone(),
            }),
        }
    }

    /// Blocking: lets the thread finish everything submitted so far, then
    /// stops and joins it. Other handles get `Stopped` afterwards.
    ///
    /// On a handle from `attach_adapter`, only the adapter stops: it is
    /// detached once everything submitted with it so far has been taken in
    /// (those sequences still finish); the engine goes on serving the rest.
    #[instrument(skip_all, fields(model = %self.info().name))]
    pub fn shutdown(self) {
        if let Some(view) = &self.adapter {
            let (reply, detached) = std::sync::mpsc::sync_channel(1);
            let command = Command::Detach {
                id: view.id,
                reply: Some(reply),
            };
            if self.shared.commands.send(command).is_ok() {
                let _stopped_engines_answer_nothing = detached.recv();
            }
            return;
        }
        // A blocking send: waits for room if the queue is full.
        let _ = self.shared.commands.send(Command::Shutdown);
        let thread = match self.shared.thread.lock() {
            Ok(mut thread) => thread.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            warn!("engine thread panicked");
        }
    }
}

/// The canonical folder of the base model the adapter in `dir` names.
fn canonical_base_dir(dir: &Path) -> Result<PathBuf, LoadError> {
    let wanted = lora::base_model_dir(dir)?;
    Ok(std::fs::canonicalize(&wanted).unwrap_or(wanted))
}

/// Allocates the KV cache pool from the batching budget. Returns it with
/// its allocator and its capacity in tokens.
fn kv_cache(
    model: &Model,
    info: &ModelInfo,
    batching: &BatchingConfig,
) -> Result<(KvPool, BlockAllocator, usize), LoadError> {
    let per_token = model.kv_bytes_per_token().max(1);
    let bytes = batching.kv_cache_bytes.unwrap_or_else(|| {
        let tokens = info.max_context.min(DEFAULT_KV_TOKENS_PER_SEQUENCE)
            * batching.max_running_sequences.max(1);
        (tokens * per_token)
            .min(DEFAULT_KV_CACHE_LIMIT)
            .max(info.max_context * per_token)
    });
    let num_blocks = bytes / (per_token * BLOCK_SIZE);
    // One more token than the longest prompt must fit, and a block spare.
    if num_blocks < 2 {
        return Err(LoadError::KvCache(format!(
            "kv_cache_bytes {bytes} holds fewer than two blocks of {BLOCK_SIZE} tokens \
             ({per_token} bytes each); raise it"
        )));
    }
    let pool = model
        .new_pool(num_blocks, BLOCK_SIZE)
        .map_err(|error| LoadError::KvCache(format!("allocating {bytes} bytes: {error}")))?;
    let capacity = (num_blocks - 1) * BLOCK_SIZE;
    Ok((pool, BlockAllocator::new(num_blocks, BLOCK_SIZE), capacity))
}

/// A sequence owned by the engine thread, waiting or running.
///
/// `tokens` holds the prompt and what was generated; the first `computed`
/// of them have their keys and values in the cache blocks of `blocks`.
/// Each step feeds `tokens[computed..]` (or a chunk of it, for a long
/// prompt); once the last one is fed, its logits give the next token.
struct Sequence {
    id: u64,
    events: mpsc::Sender<GenerationEvent>,
    request: ValidGenerateRequest,
    tokens: Vec<u32>,
    computed: usize,
    blocks: BlockTable,
    completion_tokens: u32,
    /// Generated ids not yet sent with a delta.
    unsent_ids: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// The request's constraint, advanced with every sampled token.
    constraint: Option<ConstraintState>,
    submitted: Instant,
    /// Prompt tokens found in the prefix cache at the last admission.
    reused: usize,
    /// The adapter the sequence is computed with, and its id (0: none),
    /// which is also its prefix-cache namespace.
    adapter: Option<Rc<ServedAdapter>>,
    adapter_id: u64,
}

impl Sequence {
    /// Fails (with the events sender back) when the constraint cannot start.
    fn new(
        submission: Submission,
        adapter: Option<Rc<ServedAdapter>>,
    ) -> Result<Self, (mpsc::Sender<GenerationEvent>, String)> {
        let Submission {
            id,
            request,
            events,
            adapter: view,
        } = submission;
        let constraint = match &request.constraint {
            Some(compiled) => match ConstraintState::new(
                compiled,
                request.starts_in_reasoning,
                request.may_open_reasoning,
            ) {
                Ok(state) => Some(state),
                Err(error) => return Err((events, error)),
            },
            None => None,
        };
        Ok(Sequence {
            id,
            events,
            tokens: request.prompt_tokens.clone(),
            computed: 0,
            blocks: BlockTable::default(),
            completion_tokens: 0,
            unsent_ids: Vec::new(),
            sampler: Sampler::new(request.sampling.clone()),
            decoder: IncrementalDecoder::new(&request.prompt_tokens),
            stop: StopMatcher::new(request.stop.clone()),
            constraint,
            submitted: Instant::now(),
            reused: 0,
            adapter,
            adapter_id: view.map_or(0, |view| view.id),
            request,
        })
    }

    /// Tokens still to feed before the next token can be sampled.
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

enum StepResult {
    Continue,
    Done,
}

/// What a forward pass reads of one sequence: its tokens, how many are
/// cached, its blocks, its adapter.
type FeedView<'a> = (&'a [u32], usize, &'a [u32], Option<&'a ServedAdapter>);

/// One sequence's share of a step: feed `count` tokens from `computed`.
struct Planned {
    index: usize,
    count: usize,
    /// The chunk reaches the last token, so the step samples the next.
    samples: bool,
}

/// The engine thread's state. Only this thread touches tensors.
///
/// The scheduling loop (`run`): take new submissions (waiting for one only
/// when there is nothing else to do), drop cancelled sequences, admit
/// waiting ones first come first served while a running slot and cache
/// blocks for their prompt are free, then run one step: one token for every
/// decoding sequence and, in what is left of `max_batch_tokens`, the next
/// chunk of each prefilling prompt, all in one forward pass. When a decoding
/// sequence needs a new cache block and none is left, the most recently
/// admitted sequence is preempted: its blocks are released and it goes back
/// to the front of the queue, to be recomputed (mostly from the prefix
/// cache) when there is room. Running work is never failed for room.
struct Worker {
    model: Model,
    pool: KvPool,
    blocks: BlockAllocator,
    tokenizer: Arc<tokenizers::Tokenizer>,
    info: ModelInfo,
    budget: Budget,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Attached adapters by id. Sequences hold their own reference, so a
    /// detached adapter lives until its last sequence ends.
    adapters: HashMap<u64, Rc<ServedAdapter>>,
    load: Arc<EngineLoad>,
    stopping: bool,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        let _no_grad = tch::no_grad_guard();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.stopping {
                    break;
                }
                match commands.recv() {
                    Ok(command) => self.take(command),
                    Err(_) => break,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.take(command);
            }
            self.drop_cancelled();
            self.admit_waiting();
            if !self.running.is_empty() {
                self.step();
            }
            self.load
                .running
                .store(self.running.len(), Ordering::Relaxed);
        }
        info!(model = %self.info.name, "engine stopped");
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Generate(submission) => {
                let adapter = match &submission.adapter {
                    None => None,
                    Some(view) => match self.adapters.get(&view.id) {
                        Some(adapter) => Some(Rc::clone(adapter)),
                        None => {
                            // Detached between the caller's submit and now.
                            let stopped = EngineError::Stopped {
                                model: view.info.name.clone(),
                            };
                            let _ = submission.events.try_send(GenerationEvent::Failed(stopped));
                            self.load.leave(true);
                            return;
                        }
                    },
                };
                let sequence = match Sequence::new(*submission, adapter) {
                    Ok(sequence) => sequence,
                    Err((events, error)) => {
                        warn!(%error, "constraint could not start");
                        let _ = events.try_send(GenerationEvent::Failed(EngineError::Model(error)));
                        self.load.leave(true);
                        return;
                    }
                };
                debug!(
                    sequence = sequence.id,
                    adapter = sequence.adapter_id,
                    prompt_tokens = sequence.tokens.len(),
                    "sequence queued"
                );
                self.waiting.push_back(sequence);
            }
            Command::Attach {
                id,
                name,
                dir,
                reply,
            } => {
                let started = Instant::now();
                let served =
                    AdapterFile::read(&dir).and_then(|file| self.model.serve_adapter(file));
                let result = served.map(|adapter| {
                    self.adapters.insert(id, Rc::new(adapter));
                    info!(
                        model = %self.info.name,
                        adapter = %name,
                        adapter_id = id,
                        attached = self.adapters.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "adapter attached"
                    );
                });
                if let Err(error) = &result {
                    warn!(model = %self.info.name, adapter = %name, %error, "adapter not attached");
                }
                let _caller_may_be_gone = reply.send(result);
            }
            Command::Detach { id, reply } => {
                if self.adapters.remove(&id).is_some() {
                    info!(model = %self.info.name, adapter_id = id, "adapter detached");
                }
                if let Some(reply) = reply {
                    let _caller_may_be_gone = reply.send(());
                }
            }
            Command::Shutdown => self.stopping = true,
        }
    }

    /// Removes sequences whose caller dropped its stream, freeing their
    /// slot and blocks before the next step.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|sequence| !sequence.events.is_closed());
        for _ in self.waiting.len()..before {
            self.load.leave(true);
        }
        let mut index = 0;
        while index < self.running.len() {
            if self.running[index].events.is_closed() {
                let mut sequence = self.running.remove(index);
                debug!(
                    sequence = sequence.id,
                    reason = FinishReason::Cancelled.as_str(),
                    "sequence dropped"
                );
                self.end(&mut sequence, false);
            } else {
                index += 1;
            }
        }
    }

    /// First come, first served: the head of the queue is admitted when a
    /// running slot and blocks for its whole prompt (less what the prefix
    /// cache holds) plus one token are free; the others wait behind it.
    fn admit_waiting(&mut self) {
        while self.running.len() < self.budget.max_running {
            let Some(sequence) = self.waiting.front_mut() else {
                break;
            };
            let limit = sequence.tokens.len() - 1;
            let (table, cached) =
                self.blocks
                    .match_prefix(&sequence.tokens, limit, sequence.adapter_id);
            sequence.blocks = table;
            if !self
                .blocks
                .grow(&mut sequence.blocks, sequence.tokens.len() + 1)
            {
                self.blocks.release(&mut sequence.blocks);
                break;
            }
            sequence.computed = cached;
            sequence.reused = cached;
            self.load
                .reused_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            let Some(sequence) = self.waiting.pop_front() else {
                break;
            };
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            debug!(
                sequence = sequence.id,
                prompt_tokens = sequence.tokens.len(),
                reused_tokens = cached,
                queued_ms = sequence.submitted.elapsed().as_millis() as u64,
                "sequence admitted"
            );
            self.running.push(sequence);
        }
    }

    /// Gives every decoding sequence a block for its next position,
    /// preempting the most recently admitted sequence while none is free.
    fn make_room(&mut self) {
        let mut index = 0;
        while index < self.running.len() {
            let sequence = &mut self.running[index];
            let needed = sequence.tokens.len();
            if self.blocks.grow(&mut sequence.blocks, needed) {
                index += 1;
                continue;
            }
            let Some(mut newest) = self.running.pop() else {
                break;
            };
            debug!(
                sequence = newest.id,
                computed = newest.computed,
                "sequence preempted: KV cache full"
            );
            self.blocks.release(&mut newest.blocks);
            newest.computed = 0;
            self.load.preemptions.fetch_add(1, Ordering::Relaxed);
            self.load.waiting.fetch_add(1, Ordering::Relaxed);
            self.waiting.push_front(newest);
        }
    }

    /// Decodes first (one token each), then prefill chunks in admission
    /// order within what is left of the token budget. Within each part the
    /// sequences are then ordered by adapter, so that each adapter's rows
    /// of the batch are consecutive.
    fn plan(&self) -> Vec<Planned> {
        let mut budget = self.budget.max_batch_tokens;
        let mut plan = Vec::with_capacity(self.running.len());
        for (index, sequence) in self.running.iter().enumerate() {
            if sequence.pending() == 1 && budget > 0 {
                plan.push(Planned {
                    index,
                    count: 1,
                    samples: true,
                });
                budget -= 1;
            }
        }
        let decodes = plan.len();
        for (index, sequence) in self.running.iter().enumerate() {
            let pending = sequence.pending();
            if pending > 1 && budget > 0 {
                let count = pending.min(budget);
                plan.push(Planned {
                    index,
                    count,
                    samples: count == pending,
                });
                budget -= count;
            }
        }
        let adapter = |planned: &Planned| self.running[planned.index].adapter_id;
        plan[..decodes].sort_by_key(adapter);
        plan[decodes..].sort_by_key(adapter);
        plan
    }

    /// One forward pass for the planned share of every running sequence,
    /// then one sampled token for each sequence whose input is all fed.
    fn step(&mut self) {
        self.make_room();
        let plan = self.plan();
        if plan.is_empty() {
            return;
        }
        // Split each running sequence into what the forward pass reads
        // (tokens, blocks) and its constraint, whose next mask depends only
        // on committed tokens: it is computed on a second thread meanwhile.
        let mut inputs: Vec<FeedView<'_>> = Vec::new();
        let mut constraints: Vec<Option<&mut ConstraintState>> = Vec::new();
        for sequence in self.running.iter_mut() {
            inputs.push((
                &sequence.tokens,
                sequence.computed,
                &sequence.blocks.blocks,
                sequence.adapter.as_deref(),
            ));
            constraints.push(sequence.constraint.as_mut());
        }
        let chunks: Vec<ChunkInput<'_>> = plan
            .iter()
            .map(|planned| {
                let (tokens, computed, blocks, adapter) = inputs[planned.index];
                ChunkInput {
                    tokens: &tokens[computed..computed + planned.count],
                    offset: computed,
                    blocks,
                    logits: usize::from(planned.samples),
                    adapter,
                }
            })
            .collect();
        let mut masked: Vec<(usize, &mut ConstraintState)> = Vec::new();
        for planned in plan.iter().filter(|planned| planned.samples) {
            if let Some(state) = constraints[planned.index].take() {
                masked.push((planned.index, state));
            }
        }
        let (model, pool) = (&self.model, &mut self.pool);
        let (logits, masks) = std::thread::scope(|scope| {
            let masker = (!masked.is_empty()).then(|| {
                scope.spawn(move || {
                    masked
                        .into_iter()
                        .map(|(index, state)| (index, state.next_mask()))
                        .collect::<Vec<(usize, Result<SimpleVob, String>)>>()
                })
            });
            let logits = model.forward_batch(&chunks, pool).and_then(|logits| {
                let rows = logits.size()[0];
                Vec::<f32>::try_from(&logits.f_view([-1])?).map(|flat| (flat, rows))
            });
            let masks = masker.map(|masker| masker.join()).transpose();
            (logits, masks)
        });
        drop(chunks);
        drop(inputs);
        self.load.steps.fetch_add(1, Ordering::Relaxed);
        let mut masks: Vec<(usize, Result<SimpleVob, String>)> = match masks {
            Ok(masks) => masks.unwrap_or_default(),
            Err(_) => plan
                .iter()
                .map(|planned| (planned.index, Err("constraint mask panicked".to_owned())))
                .collect(),
        };
        let (logits, rows) = match logits {
            Ok(logits) => logits,
            Err(error) => {
                warn!(%error, sequences = plan.len(), "forward failed");
                let mut failed: Vec<usize> = plan.iter().map(|planned| planned.index).collect();
                failed.sort_unstable();
                self.finish_indices(&failed, |_, sequence| {
                    fail_sequence(sequence, error.to_string());
                });
                return;
            }
        };
        let vocab = if rows > 0 {
            logits.len() / rows as usize
        } else {
            0
        };
        let mut row = 0;
        let mut done = Vec::new();
        for planned in &plan {
            let sequence = &mut self.running[planned.index];
            sequence.computed += planned.count;
            self.blocks.register_full_blocks(
                &mut sequence.blocks,
                &sequence.tokens,
                sequence.computed,
            );
            if !planned.samples {
                continue;
            }
            let mut scores = logits[row * vocab..(row + 1) * vocab].to_vec();
            row += 1;
            let mask = masks
                .iter()
                .position(|(index, _)| *index == planned.index)
                .map(|at| masks.swap_remove(at).1);
            let result = match mask {
                Some(Ok(mask)) => advance(
                    &self.info,
                    &self.tokenizer,
                    sequence,
                    &mut scores,
                    Some(&mask),
                ),
                Some(Err(error)) => fail_sequence(sequence, error),
                None => advance(&self.info, &self.tokenizer, sequence, &mut scores, None),
            };
            if let StepResult::Done = result {
                done.push(planned.index);
            }
        }
        done.sort_unstable();
        self.finish_indices(&done, |_, _| {});
    }

    /// Removes the running sequences at `indices` (ascending), after
    /// calling `last` on each, and releases their blocks.
    fn finish_indices(&mut self, indices: &[usize], last: impl Fn(&Worker, &Sequence)) {
        for &index in indices.iter().rev() {
            let mut sequence = self.running.remove(index);
            last(self, &sequence);
            self.end(&mut sequence, false);
        }
    }

    fn end(&mut self, sequence: &mut Sequence, waiting: bool) {
        self.blocks.release(&mut sequence.blocks);
        self.load.leave(waiting);
    }
}

/// Samples the next token of `sequence` from its logits and sends what it
/// settles: a delta, and `Finished` when it ends.
fn advance(
    info: &ModelInfo,
    tokenizer: &tokenizers::Tokenizer,
    sequence: &mut Sequence,
    logits: &mut [f32],
    mask: Option<&SimpleVob>,
) -> StepResult {
    if let (Some(mask), Some(state)) = (mask, sequence.constraint.as_ref())
        && let Err(error) = state.apply(mask, logits)
    {
        return fail_sequence(sequence, error);
    }
    let token = sequence.sampler.sample(logits, &sequence.tokens);
    sequence.tokens.push(token);
    sequence.completion_tokens += 1;
    sequence.unsent_ids.push(token);

    let mut constraint_done = false;
    if let Some(state) = sequence.constraint.as_mut() {
        if let Err(error) = state.commit(token) {
            return fail_sequence(sequence, error);
        }
        constraint_done = state.is_finished();
    }
    let is_eos = info.eos_token_ids.contains(&token);
    // A constrained answer ends at its end token even with ignore_eos.
    if is_eos && (!sequence.request.ignore_eos || sequence.constraint.is_some()) {
        return finish(tokenizer, sequence, FinishReason::Stop, true);
    }
    let piece = match sequence.decoder.push(tokenizer, token) {
        Ok(piece) => piece,
        Err(error) => return fail_sequence(sequence, error),
    };
    let outcome = sequence.stop.push(&piece);
    if outcome.stopped {
        if !send_delta(sequence, outcome.release) {
            return StepResult::Done;
        }
        return finish(tokenizer, sequence, FinishReason::Stop, false);
    }
    if !outcome.release.is_empty() && !send_delta(sequence, outcome.release) {
        return StepResult::Done;
    }
    if constraint_done {
        return finish(tokenizer, sequence, FinishReason::Stop, true);
    }
    let at_max_tokens = sequence.completion_tokens >= sequence.request.max_tokens;
    let at_context_end = sequence.tokens.len() >= info.max_context;
    if at_max_tokens || at_context_end {
        return finish(tokenizer, sequence, FinishReason::Length, true);
    }
    StepResult::Continue
}

/// Sends `text` with the ids generated since the last delta. False when
/// the caller is gone.
fn send_delta(sequence: &mut Sequence, text: String) -> bool {
    let token_ids = std::mem::take(&mut sequence.unsent_ids);
    send(sequence, GenerationEvent::Delta { text, token_ids })
}

fn send(sequence: &Sequence, event: GenerationEvent) -> bool {
    match sequence.events.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            debug!(
                sequence = sequence.id,
                reason = FinishReason::Cancelled.as_str(),
                "sequence dropped"
            );
            false
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            // Cannot happen: the channel holds every event of a sequence.
            warn!(
                sequence = sequence.id,
                "event channel full; dropping the sequence"
            );
            false
        }
    }
}

/// Sends `Finished`, after the held-back text when `release_held` (the
/// text after a stop string is dropped instead).
fn finish(
    tokenizer: &tokenizers::Tokenizer,
    sequence: &mut Sequence,
    mut reason: FinishReason,
    release_held: bool,
) -> StepResult {
    let mut text = String::new();
    if release_held {
        let rest = match sequence.decoder.flush(tokenizer) {
            Ok(rest) => rest,
            Err(error) => return fail_sequence(sequence, error),
        };
        let outcome = sequence.stop.push(&rest);
        text.push_str(&outcome.release);
        if outcome.stopped {
            reason = FinishReason::Stop;
        } else {
            text.push_str(&sequence.stop.flush());
        }
    }
    if (!text.is_empty() || !sequence.unsent_ids.is_empty()) && !send_delta(sequence, text) {
        return StepResult::Done;
    }
    let usage = Usage {
        prompt_tokens: sequence.request.prompt_tokens.len() as u32,
        completion_tokens: sequence.completion_tokens,
    };
    debug!(
        sequence = sequence.id,
        reason = reason.as_str(),
        completion_tokens = usage.completion_tokens,
        reused_tokens = sequence.reused,
        elapsed_ms = sequence.submitted.elapsed().as_millis() as u64,
        "sequence finished"
    );
    send(sequence, GenerationEvent::Finished { reason, usage });
    StepResult::Done
}

fn fail_sequence(sequence: &Sequence, error: String) -> StepResult {
    warn!(sequence = sequence.id, %error, "sequence failed");
    send(sequence, GenerationEvent::Failed(EngineError::Model(error)));
    StepResult::Done
}
