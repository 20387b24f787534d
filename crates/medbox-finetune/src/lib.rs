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
//! **Architecture Invariant:** no sockets and no tch here (the trainer will add
//! tch; it will still open no socket).

pub mod dataset;
pub mod split;
pub mod validation;

pub use dataset::{
    ChatTurn, DatasetFormat, DeidentifiedDataset, Example, Role, UnknownFormat, deidentify_dataset,
};
pub use split::{DEFAULT_EVAL_PERCENT, DatasetSplit, SplitConfig, SplitError, split_dataset};
pub use validation::{
    DatasetReport, DatasetSummary, ErrorKind, Limits, LineError, LineErrorReason, Rejection,
    ValidDataset, Verdict, parse_dataset,
};

#[cfg(test)]
mod tests;
