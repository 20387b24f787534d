//! The process contract between `medboxd`'s job runner and `medbox-trainer`.
//!
//! Both sides use these types, so the contract is checked by the compiler
//! rather than by two readings of a document (`docs/finetune.md` tells the
//! same story in prose).
//!
//! - `medboxd` starts `medbox-trainer --job-dir <data_dir>/jobs/<id>`, in a
//!   process group of its own, with stdin closed.
//! - `<job-dir>/job.json` ([`JOB_SPEC_FILE`]) holds the [`JobSpec`]: written
//!   once, before the first start, by `medboxd`; the trainer only reads it.
//! - The trainer writes checkpoints under [`JobSpec::checkpoints_dir`] (each
//!   to a temporary name, renamed when complete) and resumes by itself from
//!   the newest complete one: a job started again after a crash, a `SIGKILL`
//!   or a restart of `medboxd` carries on where its last checkpoint left it.
//! - On stdout the trainer writes one [`TrainerEvent`] per line, as JSON
//!   (`{"event":"progress","step":…}`), and nothing else; its logs go to
//!   stderr, which `medboxd` saves to `<job-dir>/trainer.log`
//!   ([`TRAINER_LOG_FILE`]). Neither carries patient text.
//! - On success it writes the result into [`JobSpec::output_dir`], reports
//!   [`TrainerEvent::Succeeded`], and exits with status 0. Any other exit
//!   status is a failure; before failing it reports [`TrainerEvent::Failed`]
//!   when it can say why.
//! - `SIGTERM` means cancel: the trainer stops promptly (within seconds; a
//!   checkpoint being written is either finished or left under its temporary
//!   name), writes no output, and exits. `medboxd` follows up with `SIGKILL`
//!   after a grace period.
//! - When its stdout is closed (`medboxd` is gone) the trainer exits at its
//!   next event; `medboxd` starts it again later and it resumes.
//!
//! **Architecture Invariant:** the protocol is versioned by
//! [`PROTOCOL_VERSION`]; a trainer refuses a spec of another version (it
//! reports `failed` and exits non-zero) rather than guessing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{dataset::DatasetFormat, hyperparameters::Hyperparameters, hyperparameters::Method};

/// The version of this contract; [`JobSpec::protocol_version`] carries it.
pub const PROTOCOL_VERSION: u32 = 1;
/// The trainer's program name; `medboxd` looks for it next to its own executable.
pub const TRAINER_PROGRAM: &str = "medbox-trainer";
/// The one command-line argument, followed by the job folder.
pub const JOB_DIR_ARG: &str = "--job-dir";
/// The job spec inside the job folder.
pub const JOB_SPEC_FILE: &str = "job.json";
/// The trainer's stderr, appended to across restarts.
pub const TRAINER_LOG_FILE: &str = "trainer.log";
/// The process id of the trainer `medboxd` started last, so that a restarted
/// `medboxd` can stop a trainer it lost track of before starting another.
pub const TRAINER_PID_FILE: &str = "trainer.pid";
/// Checkpoints, one folder each, inside the job folder.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Where the trainer writes its result, inside the job folder.
pub const OUTPUT_DIR: &str = "output";
/// Longest stdout line `medboxd` reads; longer lines are discarded.
pub const MAX_EVENT_LINE_BYTES: usize = 64 * 1024;

/// A model on the box, by the name it is registered under and its folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    /// A Hugging Face style folder (`config.json`, `*.safetensors`, `tokenizer.json`).
    pub path: PathBuf,
}

/// The de-identified dataset a job trains on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    pub id: String,
    pub name: String,
    /// SHA-256 of the dataset's canonical de-identified JSONL.
    pub sha256: String,
    /// The format it was uploaded in (informative: the files below are canonical).
    pub format: String,
    /// Canonical JSONL, one example a line: `{"messages":[{"role","content"},…]}`
    /// (loss on assistant turns only) or `{"text":…}` (loss on every token).
    pub train_file: PathBuf,
    /// The held-out examples, same shape; may be empty (a one-example dataset).
    pub eval_file: PathBuf,
    pub train_examples: u64,
    pub eval_examples: u64,
}

/// `job.json`: everything the trainer needs to run (and resume) a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// [`PROTOCOL_VERSION`] of the `medboxd` that wrote it.
    pub protocol_version: u32,
    pub job_id: String,
    pub method: Method,
    /// The model to train (the student, for distillation).
    pub base_model: ModelRef,
    /// The teacher (method `distill` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model: Option<ModelRef>,
    pub dataset: DatasetRef,
    pub hyperparameters: Hyperparameters,
    /// Seeds data order, dropout and initialisation: the same seed gives the
    /// same loss curve, resumed or not.
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps (and at the end).
    pub checkpoint_every: u32,
    /// `cpu` or `cuda:N`; bf16 on CUDA, f32 on CPU.
    pub device: String,
    /// Where checkpoints go: `<job-dir>/checkpoints`.
    pub checkpoints_dir: PathBuf,
    /// Where the result goes: `<job-dir>/output`. An adapter (method `lora`):
    /// `adapter_config.json` + `adapter_model.safetensors` in PEFT's format; a
    /// full model (`full`, `distill`): what `save_pretrained` writes,
    /// tokenizer files included.
    pub output_dir: PathBuf,
    /// The model version's name once registered (informative: `medboxd` registers it).
    pub output_name: String,
}

impl JobSpec {
    /// The job folder's spec file.
    pub fn path_in(job_dir: &Path) -> PathBuf {
        job_dir.join(JOB_SPEC_FILE)
    }

    /// Pretty JSON with a final newline, as written to `job.json`.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .unwrap_or_else(|error| unreachable!("a JobSpec always serializes: {error}"));
        text.push('\n');
        text
    }

    /// Reads a spec, refusing one of another protocol version.
    pub fn from_json(text: &str) -> Result<JobSpec, ProtocolError> {
        let spec: JobSpec = serde_json::from_str(text)
            .map_err(|error| ProtocolError::BadSpec(error.to_string()))?;
        if spec.protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                found: spec.protocol_version,
                expected: PROTOCOL_VERSION,
            });
        }
        Ok(spec)
    }

    /// The format of the files in [`DatasetRef`], parsed.
    pub fn dataset_format(&self) -> Option<DatasetFormat> {
        self.dataset.format.parse().ok()
    }
}

/// One line of the trainer's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainerEvent {
    /// Training is about to start (first line of every run).
    Started {
        /// Optimizer steps of the whole job (all epochs).
        total_steps: u64,
        /// The step of the checkpoint it resumed from; 0 for a fresh start.
        #[serde(default)]
        resumed_from_step: u64,
    },
    /// After an optimizer step (as often as the trainer likes; at least every
    /// few seconds is kind to people watching).
    Progress {
        step: u64,
        total_steps: u64,
        /// Fractional epoch, e.g. 1.25.
        epoch: f64,
        /// Training loss of this step (mean over its micro-batches).
        loss: f64,
        learning_rate: f64,
        tokens_per_second: f64,
    },
    /// An evaluation on the eval split finished.
    Eval { step: u64, eval_loss: f64 },
    /// A checkpoint is complete (renamed into place) at `path`.
    Checkpoint { step: u64, path: String },
    /// The result is complete in `output_dir`; the last line before exit 0.
    Succeeded {
        output_dir: String,
        /// Final figures, e.g. `train_loss`, `eval_loss`, `steps`, `early_stopped`
        /// (1 or 0); whatever the trainer measured.
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
    },
    /// The job cannot succeed; `reason` is shown to the administrator, so it
    /// says what to change and holds no patient text.
    Failed { reason: String },
}

impl TrainerEvent {
    /// The event as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|error| unreachable!("a TrainerEvent always serializes: {error}"))
    }

    /// Reads one stdout line (surrounding whitespace ignored).
    pub fn parse_line(line: &str) -> Result<TrainerEvent, ProtocolError> {
        let event: TrainerEvent = serde_json::from_str(line.trim())
            .map_err(|error| ProtocolError::BadEvent(error.to_string()))?;
        event.check()?;
        Ok(event)
    }

    /// Numbers that cannot be right: a step past the total, negative or
    /// non-finite rates.
    fn check(&self) -> Result<(), ProtocolError> {
        let bad = |what: &str| Err(ProtocolError::BadEvent(what.to_owned()));
        match self {
            TrainerEvent::Progress {
                step,
                total_steps,
                epoch,
                loss,
                learning_rate,
                tokens_per_second,
            } => {
                if step > total_steps {
                    return bad("`step` is past `total_steps`");
                }
                if ![*epoch, *loss, *learning_rate, *tokens_per_second]
                    .iter()
                    .all(|value| value.is_finite())
                {
                    return bad("a progress figure is not a finite number");
                }
                if *epoch < 0.0 || *learning_rate < 0.0 || *tokens_per_second < 0.0 {
                    return bad(
                        "`epoch`, `learning_rate` and `tokens_per_second` cannot be negative",
                    );
                }
                Ok(())
            }
            TrainerEvent::Eval { eval_loss, .. } if !eval_loss.is_finite() => {
                bad("`eval_loss` is not a finite number")
            }
            TrainerEvent::Started {
                total_steps,
                resumed_from_step,
            } if resumed_from_step > total_steps => {
                bad("`resumed_from_step` is past `total_steps`")
            }
            _ => Ok(()),
        }
    }
}

/// A spec or an event line that does not follow the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("job.json is not a valid job spec: {0}")]
    BadSpec(String),
    #[error("job.json is protocol version {found}; this program speaks version {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    #[error("not a trainer event line: {0}")]
    BadEvent(String),
}
