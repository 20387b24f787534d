//! Fine-tuning datasets: the dataset side of `medbox-trainer`.
//!
//! The pipeline is three steps, each producing a type the next one requires:
//! 1. [`parse_dataset`] reads every line of an uploaded JSONL file in one of the
//!    formats users bring (chat `messages`, `alpaca`, plain `text`), reports
//!    each bad line by number and reason with a summary, and gives a
//!    [`ValidDataset`] only when no line is bad ([`Verdict::Accepted`]); a
//!    dataset with any error is [`Verdict::Rejected`], never half-used.
//! 2. [`deidentify_dataset`] runs every text field through `medbox-deid` (one
//!    record key per line, so all dates of a line move by the same number of
//!    days) and gives a [`DeidentifiedDataset`] with counts per category, its
//!    canonical JSONL and that JSONL's SHA-256.
//! 3. [`split_dataset`] makes a seeded train/eval split of a
//!    [`DeidentifiedDataset`], recording the dataset's SHA-256.
//!
//! **Architecture Invariant:** patient identifiers never reach disk un-masked:
//! de-identification happens before storage. [`ValidDataset`] holds the raw
//! text and has no way to be written out; only [`DeidentifiedDataset`] exposes
//! bytes to store ([`DeidentifiedDataset::canonical_jsonl`]). Validation
//! reports never quote a line's content (a role name is shown only when it is a
//! short identifier-like word).
//!
//! **Architecture Invariant:** deterministic. The same bytes, format, limits,
//! de-identification config and seed give the same examples, the same SHA-256
//! and the same split.
//!
//! Around the datasets, the job side that `medboxd` and `medbox-trainer`
//! share: [`protocol`] (the process contract: `job.json`, the event lines on
//! the trainer's stdout, the job folder's layout), [`hyperparameters`] (the
//! methods, their defaults and checks) and [`manifest`] (the SHA-256 manifest
//! of a registered model version).
//!
//! [`trainer`] is `medbox-trainer`'s work (LoRA and full fine-tuning on
//! `medbox-runtime`'s decoder, AdamW, checkpoints, resume); the binary
//! `src/bin/medbox-trainer.rs` is its thin shell (arguments, SIGTERM, stdout).
//!
//! **Architecture Invariant:** no sockets here. tch only in [`trainer`]
//! (besides `medbox-runtime`, the one crate allowed to link it).
//!
//! **Architecture Invariant:** the protocol types are the only `Serialize`
//! types of the crate: they are a wire format between two processes, written
//! and read by the same code on both sides.

pub mod dataset;
pub mod hyperparameters;
pub mod manifest;
pub mod protocol;
pub mod split;
pub mod synthetic;
pub mod trainer;
pub mod validation;

pub use dataset::{
    ChatTurn, DatasetFormat, DeidentifiedDataset, Example, Role, UnknownFormat, deidentify_dataset,
};
pub use hyperparameters::{
    DistillParameters, HyperparameterError, HyperparameterOverrides, Hyperparameters,
    LoraParameters, Method, OutputKind, UnknownMethod,
};
pub use manifest::{ManifestError, ManifestFile, ModelManifest};
pub use protocol::{DatasetRef, JobSpec, ModelRef, ProtocolError, TrainerEvent};
pub use split::{DEFAULT_EVAL_PERCENT, DatasetSplit, SplitConfig, SplitError, split_dataset};
pub use validation::{
    DatasetReport, DatasetSummary, ErrorKind, Limits, LineError, LineErrorReason, Rejection,
    ValidDataset, Verdict, parse_dataset,
};

#[cfg(test)]
mod tests;
