//! The engine: one OS thread per model that owns the weights and every
//! sequence's KV cache, fed by a bounded command channel. `Engine` is the
//! cheap-to-clone handle the server keeps; it validates and tokenizes on the
//! caller's thread and sends `ValidGenerateRequest`s to the engine thread.
//!
//! The thread's loop: take the next request when idle, then call `step`
//! until the running sequence finishes. One sequence runs at a time for now;
//! continuous batching will turn `running` into a batch and let the loop take
//! new requests between steps. Before each step the thread checks whether the
//! caller dropped its `GenerationStream` and, if so, drops the sequence.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tracing::{debug, info, instrument, warn};

use crate::chat::{self, ChatRequest, ChatTemplate};
use crate::detokenize::IncrementalDecoder;
use crate::error::{EngineError, LoadError, RuntimeError, ValidationError};
use crate::loader::{self, LoadedModel};
use crate::model::{KvCache, Model};
use crate::model_thread;
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use crate::validation::{GenerateRequest, ValidGenerateRequest, Validator};
use crate::{EngineConfig, ModelInfo};

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
    Shutdown,
}

struct Submission {
    id: u64,
    request: ValidGenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
}

struct Shared {
    info: ModelInfo,
    tokenizer: Arc<tokenizers::Tokenizer>,
    validator: Validator,
    chat_template: Option<ChatTemplate>,
    thinks: bool,
    commands: SyncSender<Command>,
    max_waiting: usize,
    next_id: AtomicU64,
    load: Arc<EngineLoad>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// How busy an engine is, counted where work changes hands.
#[derive(Debug, Default)]
struct EngineLoad {
    /// Submitted, not yet taken by the engine thread.
    waiting: AtomicUsize,
    /// Taken by the engine thread and not finished.
    running: AtomicUsize,
}

/// A snapshot of an engine's load, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLoadSnapshot {
    pub waiting: usize,
    pub running: usize,
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
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Engine")
            .field("model", &self.shared.info.name)
            .finish()
    }
}

impl Engine {
    /// Blocking: spawns the engine thread, which loads the weights (tensors
    /// never leave that thread), and returns once the model is ready or
    /// failed to load. Call it from `spawn_blocking` in async code.
    #[instrument(skip_all, fields(model = %config.name))]
    pub fn start(config: EngineConfig) -> Result<Engine, LoadError> {
        // `max_waiting` bounds the queue; the thread only takes a request
        // from it when it can run it, so what sits there is what waits.
        // The channel preallocates its slots, hence the cap.
        let max_waiting = config.max_waiting.min(MAX_WAITING_LIMIT);
        let (commands, command_receiver) = std::sync::mpsc::sync_channel(max_waiting);
        let load = Arc::new(EngineLoad::default());
        let worker_load = Arc::clone(&load);
        let thread_name = format!("medbox-engine-{}", config.name);
        let EngineConfig {
            name,
            path,
            dtype,
            device,
            max_waiting: _,
        } = config;
        let load_model = move || {
            let started = std::time::Instant::now();
            let LoadedModel {
                model,
                tokenizer,
                info,
                validator,
                chat_template,
                thinks,
            } = loader::load(&name, &path, dtype, device)?;
            info!(
                model = %info.name,
                architecture = %info.architecture,
                dtype = %info.dtype,
                device = %info.device,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            let worker = Worker {
                model,
                tokenizer: Arc::clone(&tokenizer),
                info: info.clone(),
                running: None,
                load: worker_load,
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
                next_id: AtomicU64::new(0),
                load,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Requests waiting for the engine and sequences it is running now.
    pub fn load(&self) -> EngineLoadSnapshot {
        EngineLoadSnapshot {
            waiting: self.shared.load.waiting.load(Ordering::Relaxed),
            running: self.shared.load.running.load(Ordering::Relaxed),
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
        self.shared.validator.validate(request, |prompt| {
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
                    model: self.shared.info.name.clone(),
                })?;
        let prompt = chat::render_messages(template, &messages)?;
        let starts_in_reasoning = chat::ends_in_reasoning(&prompt);
        let tokenizer = &self.shared.tokenizer;
        let mut valid = self.shared.validator.validate(
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
    #[instrument(skip_all, fields(model = %self.shared.info.name))]
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
        };
        // Counted before the send, so the engine thread never takes it below zero.
        self.shared.load.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .shared
            .commands
            .try_send(Command::Generate(Box::new(submission)));
        if sent.is_err() {
            self.shared.load.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => Ok(GenerationStream { events: receiver }),
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull {
                model: self.shared.info.name.clone(),
                max_waiting: self.shared.max_waiting,
            }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped {
                model: self.shared.info.name.clone(),
            }),
        }
    }

    /// Blocking: lets the thread finish everything submitted so far, then
    /// stops and joins it. Other handles get `Stopped` afterwards.
    #[instrument(skip_all, fields(model = %self.shared.info.name))]
    pub fn shutdown(self) {
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

/// A sequence being generated, owned by the engine thread.
struct Sequence {
    id: u64,
    events: mpsc::Sender<GenerationEvent>,
    request: ValidGenerateRequest,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    completion_tokens: u32,
    /// Generated ids not yet sent with a delta.
    unsent_ids: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

enum StepResult {
    Continue,
    Done,
}

/// The engine thread's state. Only this thread touches tensors.
struct Worker {
    model: Model,
    tokenizer: Arc<tokenizers::Tokenizer>,
    info: ModelInfo,
    running: Option<Sequence>,
    load: Arc<EngineLoad>,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        let _no_grad = tch::no_grad_guard();
        loop {
            self.load
                .running
                .store(usize::from(self.running.is_some()), Ordering::Relaxed);
            if self.running.is_none() {
                match commands.recv() {
                    Ok(Command::Generate(submission)) => {
                        self.load.waiting.fetch_sub(1, Ordering::Relaxed);
                        self.admit(*submission);
                    }
                    Ok(Command::Shutdown) | Err(_) => break,
                }
                continue;
            }
            if let Some(mut sequence) = self.running.take()
                && let StepResult::Continue = self.step(&mut sequence)
            {
                self.running = Some(sequence);
            }
        }
        info!(model = %self.info.name, "engine stopped");
    }

    fn admit(&mut self, submission: Submission) {
        let Submission {
            id,
            request,
            events,
        } = submission;
        debug!(
            sequence = id,
            prompt_tokens = request.prompt_tokens.len(),
            "sequence admitted"
        );
        self.running = Some(Sequence {
            id,
            events,
            tokens: request.prompt_tokens.clone(),
            completion_tokens: 0,
            unsent_ids: Vec::new(),
            cache: self.model.new_cache(),
            sampler: Sampler::new(request.sampling.clone()),
            decoder: IncrementalDecoder::new(&request.prompt_tokens),
            stop: StopMatcher::new(request.stop.clone()),
            request,
        });
    }

    /// Generates one token for `sequence` and sends what it settles.
    #[instrument(skip_all, fields(sequence = sequence.id))]
    fn step(&mut self, sequence: &mut Sequence) -> StepResult {
        if sequence.events.is_closed() {
            debug!(
                reason = FinishReason::Cancelled.as_str(),
                "sequence dropped"
            );
            return StepResult::Done;
        }
        // Prefill the prompt on the first step, then one token at a time.
        let input = if sequence.cache.len() == 0 {
            &sequence.tokens[..]
        } else {
            &sequence.tokens[sequence.tokens.len() - 1..]
        };
        let logits = self
            .model
            .forward(input, &mut sequence.cache, 1)
            .and_then(|logits| Vec::<f32>::try_from(&logits.f_view([-1])?));
        let mut logits = match logits {
            Ok(logits) => logits,
            Err(error) => {
                warn!(%error, "forward failed");
                let _ = sequence
                    .events
                    .try_send(GenerationEvent::Failed(EngineError::Model(
                        error.to_string(),
                    )));
                return StepResult::Done;
            }
        };
        let token = sequence.sampler.sample(&mut logits, &sequence.tokens);
        sequence.tokens.push(token);
        sequence.completion_tokens += 1;
        sequence.unsent_ids.push(token);

        if !sequence.request.ignore_eos && self.info.eos_token_ids.contains(&token) {
            return self.finish(sequence, FinishReason::Stop, true);
        }
        let piece = match sequence.decoder.push(self.tokenizer.as_ref(), token) {
            Ok(piece) => piece,
            Err(error) => return self.fail(sequence, error),
        };
        let outcome = sequence.stop.push(&piece);
        if outcome.stopped {
            if !self.send_delta(sequence, outcome.release) {
                return StepResult::Done;
            }
            return self.finish(sequence, FinishReason::Stop, false);
        }
        if !outcome.release.is_empty() && !self.send_delta(sequence, outcome.release) {
            return StepResult::Done;
        }
        let at_max_tokens = sequence.completion_tokens >= sequence.request.max_tokens;
        let at_context_end = sequence.tokens.len() >= self.info.max_context;
        if at_max_tokens || at_context_end {
            return self.finish(sequence, FinishReason::Length, true);
        }
        StepResult::Continue
    }

    /// Sends `text` with the ids generated since the last delta. False when
    /// the caller is gone.
    fn send_delta(&self, sequence: &mut Sequence, text: String) -> bool {
        let token_ids = std::mem::take(&mut sequence.unsent_ids);
        self.send(sequence, GenerationEvent::Delta { text, token_ids })
    }

    fn send(&self, sequence: &Sequence, event: GenerationEvent) -> bool {
        match sequence.events.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(
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
        &self,
        sequence: &mut Sequence,
        mut reason: FinishReason,
        release_held: bool,
    ) -> StepResult {
        let mut text = String::new();
        if release_held {
            let rest = match sequence.decoder.flush(self.tokenizer.as_ref()) {
                Ok(rest) => rest,
                Err(error) => return self.fail(sequence, error),
            };
            let outcome = sequence.stop.push(&rest);
            text.push_str(&outcome.release);
            if outcome.stopped {
                reason = FinishReason::Stop;
            } else {
                text.push_str(&sequence.stop.flush());
            }
        }
        if (!text.is_empty() || !sequence.unsent_ids.is_empty()) && !self.send_delta(sequence, text)
        {
            return StepResult::Done;
        }
        let usage = Usage {
            prompt_tokens: sequence.request.prompt_tokens.len() as u32,
            completion_tokens: sequence.completion_tokens,
        };
        debug!(
            reason = reason.as_str(),
            completion_tokens = usage.completion_tokens,
            "sequence finished"
        );
        self.send(sequence, GenerationEvent::Finished { reason, usage });
        StepResult::Done
    }

    fn fail(&self, sequence: &Sequence, error: String) -> StepResult {
        warn!(%error, "sequence failed");
        self.send(sequence, GenerationEvent::Failed(EngineError::Model(error)));
        StepResult::Done
    }
}
