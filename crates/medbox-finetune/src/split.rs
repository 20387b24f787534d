//! The seeded train/eval split of a de-identified dataset.
//!
//! Each example gets a key, SHA-256 of the seed and its canonical JSON line;
//! the examples with the smallest keys (ties broken by position) are the eval
//! set. So the split depends only on the seed and the examples' content: the
//! same seed gives the same split on every machine and every run, and
//! reordering the lines moves no example to the other side. Identical lines
//! have identical keys, so duplicates sit next to each other in key order and
//! a group of duplicates straddles the cut at most once (not yet prevented).

use sha2::{Digest, Sha256};

use crate::dataset::DeidentifiedDataset;

/// The eval share when none is given, in percent.
pub const DEFAULT_EVAL_PERCENT: u8 = 5;

/// How to split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitConfig {
    /// Percent of examples held out for evaluation, 1 to 50.
    pub eval_percent: u8,
    pub seed: u64,
}

impl SplitConfig {
    /// [`DEFAULT_EVAL_PERCENT`] with the given seed.
    pub fn with_seed(seed: u64) -> SplitConfig {
        SplitConfig {
            eval_percent: DEFAULT_EVAL_PERCENT,
            seed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("`eval_percent` must be between 1 and 50, got {0}")]
    EvalPercent(u8),
    #[error("the dataset has no examples to split")]
    EmptyDataset,
}

/// A split: indices into [`DeidentifiedDataset::examples`], each side in
/// ascending order, with the dataset's SHA-256 and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSplit {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
    pub dataset_sha256: String,
    pub eval_percent: u8,
    pub seed: u64,
}

/// The number of eval examples for `n_examples`: the share rounded to the
/// nearest whole example, at least 1 when there are at least 2 examples, and
/// never all of them.
pub fn eval_size(n_examples: usize, eval_percent: u8) -> usize {
    if n_examples < 2 {
        return 0;
    }
    let rounded = (n_examples * usize::from(eval_percent) + 50) / 100;
    rounded.clamp(1, n_examples - 1)
}

/// Splits `dataset` as `config` says.
pub fn split_dataset(
    dataset: &DeidentifiedDataset,
    config: &SplitConfig,
) -> Result<DatasetSplit, SplitError> {
    if !(1..=50).contains(&config.eval_percent) {
        return Err(SplitError::EvalPercent(config.eval_percent));
    }
    if dataset.is_empty() {
        return Err(SplitError::EmptyDataset);
    }
    let mut keyed: Vec<([u8; 32], usize)> = dataset
        .examples()
        .iter()
        .enumerate()
        .map(|(index, example)| {
            let mut hasher = Sha256::new();
            hasher.update(config.seed.to_le_bytes());
            hasher.update(example.canonical_json().as_bytes());
            (hasher.finalize().into(), index)
        })
        .collect();
    keyed.sort_unstable();
    let n_eval = eval_size(dataset.len(), config.eval_percent);
    let mut eval: Vec<usize> = keyed[..n_eval].iter().map(|(_, index)| *index).collect();
    let mut train: Vec<usize> = keyed[n_eval..].iter().map(|(_, index)| *index).collect();
    eval.sort_unstable();
    train.sort_unstable();
    Ok(DatasetSplit {
        train,
        eval,
        dataset_sha256: dataset.sha256().to_owned(),
        eval_percent: config.eval_percent,
        seed: config.seed,
    })
}
