//! `medbox-trainer`'s work: one job, from `job.json` to the output folder,
//! reporting [`TrainerEvent`]s as it goes (see [`crate::protocol`]).
//!
//! The loop: examples are encoded once (chat turns through the model's own
//! template, loss on assistant turns only); each epoch visits them in an
//! order drawn from the job's seed and the epoch; each optimizer step runs
//! `gradient_accumulation_steps` micro-batches, averages the loss over the
//! step's target tokens, clips the gradients and applies AdamW at the
//! warm-up + cosine learning rate. torch's generator (LoRA dropout) is
//! reseeded from the seed and the step before each step, so that the data
//! position and the random state both follow from the step alone: a job
//! resumed from a checkpoint repeats the loss curve of an uninterrupted one.
//!
//! **Architecture Invariant:** nothing here writes patient text anywhere:
//! logs carry counts, steps and losses; failure reasons name what to change.

pub mod checkpoint;
pub mod distill;
pub mod optimizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use medbox_deid::SplitMix64;
use medbox_runtime::train::{
    DistillMix, EncodedExample, Trainable, TrainableModel, TrainingOptions,
};
use medbox_runtime::{ChatMessage, DType, Device};
use tch::TchError;

use crate::hyperparameters::{Hyperparameters, Method};
use crate::protocol::{CHECKPOINTS_DIR, JobSpec, TrainerEvent};
use checkpoint::{CheckpointError, TrainingState};
use distill::Objective;
use optimizer::{AdamW, clip_gradients, learning_rate, zero_gradients};

/// Why a run ended without success.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// SIGTERM: stop, write nothing, report nothing.
    #[error("cancelled")]
    Cancelled,
    /// stdout is closed: `medboxd` is gone.
    #[error("stdout is closed")]
    Disconnected,
    /// The job cannot succeed; the text is for the administrator.
    #[error("{reason}")]
    Failed {
        reason: String,
        /// For the log only (may name paths).
        detail: String,
    },
}

impl TrainerError {
    fn failed(reason: impl Into<String>, detail: impl std::fmt::Display) -> TrainerError {
        TrainerError::Failed {
            reason: reason.into(),
            detail: detail.to_string(),
        }
    }
}

fn tensor_failure(error: TchError) -> TrainerError {
    TrainerError::failed(
        "a tensor operation failed during training (see the trainer log)",
        error,
    )
}

/// Where events go: the protocol's stdout lines. An error means stdout is
/// closed.
pub trait EventSink {
    fn emit(&mut self, event: &TrainerEvent) -> Result<(), TrainerError>;
}

impl<F: FnMut(&TrainerEvent) -> std::io::Result<()>> EventSink for F {
    fn emit(&mut self, event: &TrainerEvent) -> Result<(), TrainerError> {
        self(event).map_err(|_| TrainerError::Disconnected)
    }
}

/// A dataset line: `{"messages":[…]}` or `{"text":…}`.
enum Sample {
    Chat(Vec<ChatMessage>),
    Text(String),
}

fn read_samples(path: &Path, which: &str) -> Result<Vec<Sample>, TrainerError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        TrainerError::failed(
            format!("the dataset's {which} split could not be read; upload the dataset again"),
            format!("{}: {error}", path.display()),
        )
    })?;
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| {
            TrainerError::failed(
                format!(
                    "line {} of the dataset's {which} split is not canonical JSONL ({what}); upload the dataset again",
                    index + 1
                ),
                "bad canonical line",
            )
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|_| bad("bad JSON"))?;
        if let Some(messages) = value.get("messages").and_then(|value| value.as_array()) {
            let messages = messages
                .iter()
                .map(|message| {
                    Some(ChatMessage {
                        role: message.get("role")?.as_str()?.to_owned(),
                        content: message.get("content")?.as_str()?.to_owned(),
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("a message without role or content"))?;
            samples.push(Sample::Chat(messages));
        } else if let Some(text) = value.get("text").and_then(|value| value.as_str()) {
            samples.push(Sample::Text(text.to_owned()));
        } else {
            return Err(bad("neither `messages` nor `text`"));
        }
    }
    Ok(samples)
}

fn encode_all(
    model: &TrainableModel,
    samples: &[Sample],
    max_tokens: usize,
) -> Result<Vec<EncodedExample>, TrainerError> {
    let mut encoded = Vec::with_capacity(samples.len());
    for sample in samples {
        let example = match sample {
            Sample::Chat(messages) => model.encode_chat(messages, max_tokens),
            Sample::Text(text) => model.encode_text(text, max_tokens),
        }
        .map_err(|error| TrainerError::failed(error.to_string(), "encoding examples"))?;
        // An example whose answer was cut off entirely teaches nothing.
        if example.target_tokens() > 0 {
            encoded.push(example);
        }
    }
    Ok(encoded)
}

/// The order examples are visited in during `epoch` (Fisher–Yates over
/// SplitMix64, whose sequence never changes between builds).
pub fn epoch_order(count: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut generator = SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    let mut order: Vec<usize> = (0..count).collect();
    for index in (1..count).rev() {
        let other = (generator.next_u64() % (index as u64 + 1)) as usize;
        order.swap(index, other);
    }
    order
}

/// The seed of torch's generator for optimizer step `step`.
fn step_seed(seed: u64, step: u64) -> i64 {
    let mut generator = SplitMix64::new(seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (generator.next_u64() >> 1) as i64
}

/// How the examples fall into optimizer steps.
struct Plan {
    batch_size: usize,
    accumulation: usize,
    batches_per_epoch: usize,
    steps_per_epoch: u64,
    total_steps: u64,
}

impl Plan {
    fn new(examples: usize, hyperparameters: &Hyperparameters) -> Plan {
        let batch_size = hyperparameters.batch_size.max(1) as usize;
        let accumulation = hyperparameters.gradient_accumulation_steps.max(1) as usize;
        let batches_per_epoch = examples.div_ceil(batch_size);
        let steps_per_epoch = batches_per_epoch.div_ceil(accumulation) as u64;
        Plan {
            batch_size,
            accumulation,
            batches_per_epoch,
            steps_per_epoch,
            total_steps: steps_per_epoch * u64::from(hyperparameters.epochs),
        }
    }

    /// The examples of each micro-batch of optimizer step `step` (1-based).
    fn micro_batches(&self, step: u64, examples: usize, seed: u64) -> Vec<Vec<usize>> {
        let epoch = (step - 1) / self.steps_per_epoch;
        let step_in_epoch = ((step - 1) % self.steps_per_epoch) as usize;
        let order = epoch_order(examples, seed, epoch);
        let first_batch = step_in_epoch * self.accumulation;
        let last_batch = (first_batch + self.accumulation).min(self.batches_per_epoch);
        (first_batch..last_batch)
            .map(|batch| {
                let start = batch * self.batch_size;
                let end = (start + self.batch_size).min(examples);
                order[start..end].to_vec()
            })
            .collect()
    }
}

/// Mean loss per target token over `examples`, without gradients.
fn evaluate(
    model: &TrainableModel,
    examples: &[EncodedExample],
    batch_size: usize,
) -> Result<f64, TchError> {
    let _no_grad = tch::no_grad_guard();
    let (mut total, mut tokens) = (0.0, 0i64);
    for batch in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&EncodedExample> = batch.iter().collect();
        let (loss, count) = model.loss_sum(&refs, false)?;
        total += loss.f_double_value(&[])?;
        tokens += count;
    }
    Ok(total / tokens.max(1) as f64)
}

/// Runs the job in `job_dir` to its end. `stop` is set on SIGTERM.
pub fn run(
    job_dir: &Path,
    events: &mut dyn EventSink,
    stop: &AtomicBool,
) -> Result<(), TrainerError> {
    let spec_path = JobSpec::path_in(job_dir);
    let text = std::fs::read_to_string(&spec_path).map_err(|error| {
        TrainerError::failed(
            "the job spec (job.json) could not be read",
            format!("{}: {error}", spec_path.display()),
        )
    })?;
    let spec = JobSpec::from_json(&text)
        .map_err(|error| TrainerError::failed(error.to_string(), "job.json"))?;
    tracing::info!(job_id = %spec.job_id, method = %spec.method, "job spec read");
    let hyperparameters = &spec.hyperparameters;
    let trainable = match spec.method {
        Method::Lora => {
            let lora = hyperparameters.lora.as_ref().ok_or_else(|| {
                TrainerError::failed("method lora needs LoRA settings in the job", "no lora")
            })?;
            Trainable::Lora(medbox_runtime::lora::LoraSettings {
                r: i64::from(lora.r),
                alpha: lora.alpha,
                dropout: lora.dropout,
                target_modules: lora.target_modules.clone(),
            })
        }
        // The student of a distillation learns every weight.
        Method::Full | Method::Distill => Trainable::Full,
    };
    let device: Device = spec.device.parse().map_err(|error: String| {
        TrainerError::failed(format!("`device` {}: {error}", spec.device), "device")
    })?;
    let dtype = match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
    };
    let mut train_samples = read_samples(&spec.dataset.train_file, "train")?;
    let eval_samples = read_samples(&spec.dataset.eval_file, "eval")?;
    // The adapters' initialisation draws from torch's generator.
    tch::manual_seed(step_seed(spec.seed, 0));
    let model = TrainableModel::load(
        &spec.base_model.path,
        &TrainingOptions {
            dtype,
            device,
            trainable,
        },
    )
    .map_err(|error| {
        TrainerError::failed(
            format!(
                "the base model `{}` could not be loaded for training",
                spec.base_model.name
            ),
            error,
        )
    })?;
    let max_tokens = hyperparameters.max_seq_len as usize;
    let objective = match spec.method {
        Method::Distill => {
            let (teacher, mix) = teacher_of(&spec, dtype, device)?;
            if model.shares_vocabulary_with(&teacher) {
                tracing::info!(
                    "distilling token by token: the teacher shares the student's vocabulary"
                );
                Objective::Distill {
                    teacher: Box::new(teacher),
                    mix,
                }
            } else {
                tracing::info!(
                    "the teacher's tokenizer differs from the student's: distilling at the sequence level, on the teacher's answers"
                );
                drop(teacher);
                let reference = spec.teacher_model.as_ref().ok_or_else(no_teacher)?;
                train_samples = distill::teacher_answers(
                    reference,
                    device,
                    train_samples,
                    hyperparameters.max_seq_len,
                    job_dir,
                    stop,
                )?;
                Objective::CrossEntropy
            }
        }
        Method::Lora | Method::Full => Objective::CrossEntropy,
    };
    let train = encode_all(&model, &train_samples, max_tokens)?;
    let eval = encode_all(&model, &eval_samples, max_tokens)?;
    if train.is_empty() {
        return Err(TrainerError::failed(
            "no training example has a token to learn within max_seq_len; raise max_seq_len or check the dataset",
            "empty train split",
        ));
    }
    let plan = Plan::new(train.len(), hyperparameters);
    tracing::info!(
        train_examples = train.len(),
        eval_examples = eval.len(),
        parameters = model.parameters().len(),
        total_steps = plan.total_steps,
        "examples encoded"
    );
    let parameters = model.parameters();
    let mut optimizer =
        AdamW::new(parameters, hyperparameters.weight_decay).map_err(tensor_failure)?;
    let checkpoints_dir = if spec.checkpoints_dir.as_os_str().is_empty() {
        job_dir.join(CHECKPOINTS_DIR)
    } else {
        spec.checkpoints_dir.clone()
    };
    let newest = checkpoint::list(&checkpoints_dir)
        .map_err(|error| checkpoint_failure(&error))?
        .pop();
    let mut state = match newest {
        Some((step, folder)) => {
            let state = checkpoint::restore(&folder, parameters, &mut optimizer)
                .map_err(|error| checkpoint_failure(&error))?;
            tracing::info!(step, "resumed from checkpoint");
            state
        }
        None => TrainingState {
            step: 0,
            total_steps: plan.total_steps,
            best_eval_loss: None,
            evaluations_since_best: 0,
            last_eval_loss: None,
            last_train_loss: None,
            early_stopped: false,
            next_epoch: 0,
            next_batch: 0,
        },
    };
    if state.total_steps != plan.total_steps {
        return Err(TrainerError::failed(
            "the job's checkpoints do not match its data (a different number of steps); start a new job",
            format!(
                "checkpoint total {} vs plan {}",
                state.total_steps, plan.total_steps
            ),
        ));
    }
    events.emit(&TrainerEvent::Started {
        total_steps: plan.total_steps,
        resumed_from_step: state.step,
    })?;
    let eval_every = u64::from(hyperparameters.eval_every.max(1));
    let checkpoint_every = u64::from(spec.checkpoint_every.max(1));
    let patience = hyperparameters.early_stopping_patience;
    while state.step < plan.total_steps && !state.early_stopped {
        let step = state.step + 1;
        let started = Instant::now();
        tch::manual_seed(step_seed(spec.seed, step));
        let micro_batches = plan.micro_batches(step, train.len(), spec.seed);
        let step_targets: i64 = micro_batches
            .iter()
            .flatten()
            .map(|&index| train[index].target_tokens() as i64)
            .sum();
        let mut loss_total = 0.0;
        let mut tokens_seen = 0usize;
        for batch in &micro_batches {
            if stop.load(Ordering::SeqCst) {
                return Err(TrainerError::Cancelled);
            }
            let refs: Vec<&EncodedExample> = batch.iter().map(|&index| &train[index]).collect();
            tokens_seen += refs.iter().map(|example| example.ids.len()).sum::<usize>();
            let (loss, _) = objective
                .loss_sum(&model, &refs, true)
                .map_err(tensor_failure)?;
            let scaled = loss
                .f_div_scalar(step_targets.max(1) as f64)
                .map_err(tensor_failure)?;
            scaled.f_backward().map_err(tensor_failure)?;
            loss_total += loss.f_double_value(&[]).map_err(tensor_failure)?;
        }
        clip_gradients(parameters, hyperparameters.max_grad_norm).map_err(tensor_failure)?;
        let rate = learning_rate(
            hyperparameters.learning_rate,
            hyperparameters.warmup_ratio,
            step,
            plan.total_steps,
        );
        optimizer
            .step(parameters, rate, step)
            .map_err(tensor_failure)?;
        zero_gradients(parameters).map_err(tensor_failure)?;
        let loss = loss_total / step_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainerError::failed(
                format!("the training loss diverged at step {step}; lower learning_rate"),
                "non-finite loss",
            ));
        }
        state.step = step;
        state.last_train_loss = Some(loss);
        state.next_epoch = step / plan.steps_per_epoch;
        state.next_batch = (step % plan.steps_per_epoch) * plan.accumulation as u64;
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        events.emit(&TrainerEvent::Progress {
            step,
            total_steps: plan.total_steps,
            epoch: step as f64 / plan.steps_per_epoch as f64,
            loss,
            learning_rate: rate,
            tokens_per_second: tokens_seen as f64 / seconds,
        })?;
        if !eval.is_empty() && (step % eval_every == 0 || step == plan.total_steps) {
            let eval_loss = evaluate(&model, &eval, plan.batch_size).map_err(tensor_failure)?;
            state.last_eval_loss = Some(eval_loss);
            if state.best_eval_loss.is_none_or(|best| eval_loss < best) {
                state.best_eval_loss = Some(eval_loss);
                state.evaluations_since_best = 0;
            } else {
                state.evaluations_since_best += 1;
            }
            if patience > 0 && state.evaluations_since_best >= patience {
                state.early_stopped = true;
                tracing::info!(step, "early stopping: the eval loss stopped improving");
            }
            events.emit(&TrainerEvent::Eval { step, eval_loss })?;
        }
        if step % checkpoint_every == 0 || step == plan.total_steps || state.early_stopped {
            let folder = checkpoint::save(&checkpoints_dir, parameters, &optimizer, &state)
                .map_err(|error| checkpoint_failure(&error))?;
            let path = folder
                .strip_prefix(job_dir)
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| PathBuf::from(CHECKPOINTS_DIR).join(format!("step-{step}")));
            events.emit(&TrainerEvent::Checkpoint {
                step,
                path: path.display().to_string(),
            })?;
        }
    }
    if stop.load(Ordering::SeqCst) {
        return Err(TrainerError::Cancelled);
    }
    write_output(&spec, &model)?;
    let mut metrics = BTreeMap::new();
    if let Some(loss) = state.last_train_loss {
        metrics.insert("train_loss".to_owned(), loss);
    }
    if let Some(loss) = state.last_eval_loss {
        metrics.insert("eval_loss".to_owned(), loss);
    }
    metrics.insert("steps".to_owned(), state.step as f64);
    metrics.insert(
        "early_stopped".to_owned(),
        if state.early_stopped { 1.0 } else { 0.0 },
    );
    events.emit(&TrainerEvent::Succeeded {
        output_dir: spec.output_dir.display().to_string(),
        metrics,
    })
}

fn no_teacher() -> TrainerError {
    TrainerError::failed(
        "method distill needs a teacher model in the job",
        "no teacher_model",
    )
}

/// The teacher of a distillation, frozen, and the loss's mix.
fn teacher_of(
    spec: &JobSpec,
    dtype: DType,
    device: Device,
) -> Result<(TrainableModel, DistillMix), TrainerError> {
    let reference = spec.teacher_model.as_ref().ok_or_else(no_teacher)?;
    let settings = spec.hyperparameters.distill.as_ref().ok_or_else(|| {
        TrainerError::failed(
            "method distill needs its ratio and temperature in the job",
            "no distill settings",
        )
    })?;
    let teacher = TrainableModel::load(
        &reference.path,
        &TrainingOptions {
            dtype,
            device,
            trainable: Trainable::Frozen,
        },
    )
    .map_err(|error| {
        TrainerError::failed(
            format!("the teacher model `{}` could not be loaded", reference.name),
            error,
        )
    })?;
    Ok((
        teacher,
        DistillMix {
            ratio: settings.ratio,
            temperature: settings.temperature,
        },
    ))
}

fn checkpoint_failure(error: &CheckpointError) -> TrainerError {
    TrainerError::failed(
        "a checkpoint could not be written or read (is the disk full?)",
        error,
    )
}

/// Writes the result under a temporary name beside `output_dir`, then
/// renames it into place (replacing an output left by an earlier run).
fn write_output(spec: &JobSpec, model: &TrainableModel) -> Result<(), TrainerError> {
    let output = &spec.output_dir;
    let temporary = output.with_file_name(".tmp-output");
    let failure = |detail: String| {
        TrainerError::failed(
            "the result could not be written (is the disk full?)",
            detail,
        )
    };
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary).map_err(|error| failure(error.to_string()))?;
    }
    std::fs::create_dir_all(&temporary).map_err(|error| failure(error.to_string()))?;
    match spec.method {
        Method::Lora => model.save_adapter(&temporary),
        Method::Full | Method::Distill => model.save_full(&temporary),
    }
    .map_err(|error| failure(error.to_string()))?;
    if output.exists() {
        std::fs::remove_dir_all(output).map_err(|error| failure(error.to_string()))?;
    }
    std::fs::rename(&temporary, output).map_err(|error| failure(error.to_string()))?;
    tracing::info!("result written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let first = epoch_order(10, 42, 0);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(first, epoch_order(10, 42, 0));
        assert_ne!(first, epoch_order(10, 42, 1));
        assert_ne!(first, epoch_order(10, 43, 0));
    }

    #[test]
    fn plan_splits_epochs_into_steps_of_micro_batches() {
        let mut hyperparameters = Hyperparameters::defaults(Method::Lora);
        hyperparameters.batch_size = 4;
        hyperparameters.gradient_accumulation_steps = 2;
        hyperparameters.epochs = 3;
        // 10 examples: 3 batches (4, 4, 2), 2 steps per epoch (2 + 1 batches).
        let plan = Plan::new(10, &hyperparameters);
        assert_eq!((plan.steps_per_epoch, plan.total_steps), (2, 6));
        let sizes = |step| {
            plan.micro_batches(step, 10, 7)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1), [4, 4]);
        assert_eq!(sizes(2), [2]);
        let mut epoch: Vec<usize> = [1, 2]
            .into_iter()
            .flat_map(|step| plan.micro_batches(step, 10, 7).concat())
            .collect();
        epoch.sort();
        assert_eq!(epoch, (0..10).collect::<Vec<_>>());
    }
}
