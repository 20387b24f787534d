//! Checkpoints: `<checkpoints_dir>/step-N/`, written under `.tmp-step-N/`
//! and renamed when complete, so a folder named `step-N` is always whole.
//!
//! Each holds the trainable parameters (`parameters.safetensors`), AdamW's
//! moments (`optimizer.safetensors`, `exp_avg.<name>` and
//! `exp_avg_sq.<name>`) and `state.json`: the step (which fixes the data
//! position, since data order is a function of seed and epoch, and the
//! random state, since torch's generator is reseeded from seed and step
//! before every step), the early-stopping state and the last figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor};

use super::optimizer::AdamW;

const PARAMETERS_FILE: &str = "parameters.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
/// Complete checkpoints kept; older ones are deleted after a new one lands.
const KEEP: usize = 2;

/// Everything about the run that is not a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Best eval loss so far and evaluations since it.
    pub best_eval_loss: Option<f64>,
    pub evaluations_since_best: u32,
    pub last_eval_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    /// Early stopping ended the run at `step`.
    pub early_stopped: bool,
    /// Informative: the epoch and the batch within it that comes next.
    pub next_epoch: u64,
    pub next_batch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write or read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint `{path}` is unusable: {message}")]
    Bad { path: PathBuf, message: String },
    #[error(transparent)]
    Tensor(#[from] TchError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The step of a complete checkpoint folder's name.
fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io(dir)(error)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        if let Some(step) = entry.file_name().to_str().and_then(step_of)
            && entry.path().join(STATE_FILE).is_file()
        {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes a checkpoint of step `state.step` and returns its folder.
pub fn save(
    dir: &Path,
    parameters: &[(String, Tensor)],
    optimizer: &AdamW,
    state: &TrainingState,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{}", state.step);
    let temporary = dir.join(format!(".tmp-{name}"));
    let target = dir.join(&name);
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary).map_err(io(&temporary))?;
    }
    std::fs::create_dir(&temporary).map_err(io(&temporary))?;
    let cpu = |tensor: &Tensor| -> Result<Tensor, TchError> {
        tensor
            .f_detach()?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()
    };
    let mut tensors = Vec::with_capacity(parameters.len());
    let mut moments = Vec::with_capacity(parameters.len() * 2);
    for (index, (name, parameter)) in parameters.iter().enumerate() {
        tensors.push((name.clone(), cpu(parameter)?));
        moments.push((format!("exp_avg.{name}"), cpu(&optimizer.exp_avg[index])?));
        moments.push((
            format!("exp_avg_sq.{name}"),
            cpu(&optimizer.exp_avg_sq[index])?,
        ));
    }
    Tensor::write_safetensors(&tensors, temporary.join(PARAMETERS_FILE))?;
    Tensor::write_safetensors(&moments, temporary.join(OPTIMIZER_FILE))?;
    let state_path = temporary.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state)
        .unwrap_or_else(|error| unreachable!("a TrainingState always serializes: {error}"));
    std::fs::write(&state_path, text).map_err(io(&state_path))?;
    for file in [PARAMETERS_FILE, OPTIMIZER_FILE, STATE_FILE] {
        let path = temporary.join(file);
        std::fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(io(&path))?;
    }
    if target.exists() {
        // A checkpoint of this step from an earlier run (it is the same).
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    std::fs::rename(&temporary, &target).map_err(io(&target))?;
    let complete = list(dir)?;
    if complete.len() > KEEP {
        for (_, old) in &complete[..complete.len() - KEEP] {
            std::fs::remove_dir_all(old).map_err(io(old))?;
        }
    }
    Ok(target)
}

/// Restores parameters and optimizer moments from the checkpoint in
/// `folder` and returns its state.
pub fn restore(
    folder: &Path,
    parameters: &[(String, Tensor)],
    optimizer: &mut AdamW,
) -> Result<TrainingState, CheckpointError> {
    let bad = |message: String| CheckpointError::Bad {
        path: folder.to_path_buf(),
        message,
    };
    let state_path = folder.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainingState =
        serde_json::from_str(&text).map_err(|error| bad(error.to_string()))?;
    let read = |file: &str| -> Result<HashMap<String, Tensor>, CheckpointError> {
        Ok(Tensor::read_safetensors(folder.join(file))?
            .into_iter()
            .collect())
    };
    let saved = read(PARAMETERS_FILE)?;
    let moments = read(OPTIMIZER_FILE)?;
    let _no_grad = tch::no_grad_guard();
    let copy = |target: &Tensor, source: Option<&Tensor>, name: &str| {
        let source = source.ok_or_else(|| bad(format!("`{name}` is missing")))?;
        if source.size() != target.size() {
            return Err(bad(format!(
                "`{name}` is {:?}, the model's {:?}",
                source.size(),
                target.size()
            )));
        }
        let mut target = target.shallow_clone();
        target.f_copy_(source)?;
        Ok::<(), CheckpointError>(())
    };
    for (index, (name, parameter)) in parameters.iter().enumerate() {
        copy(parameter, saved.get(name), name)?;
        let first = format!("exp_avg.{name}");
        copy(&optimizer.exp_avg[index], moments.get(&first), &first)?;
        let second = format!("exp_avg_sq.{name}");
        copy(&optimizer.exp_avg_sq[index], moments.get(&second), &second)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_lists_restores_and_keeps_the_newest_two() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::from_slice(&[1.0f32, 2.0]);
        let parameters = vec![("w".to_owned(), weight.shallow_clone())];
        let mut optimizer = AdamW::new(&parameters, 0.0).unwrap();
        let mut state = TrainingState {
            step: 0,
            total_steps: 9,
            best_eval_loss: Some(1.5),
            evaluations_since_best: 1,
            last_eval_loss: Some(1.5),
            last_train_loss: Some(2.0),
            early_stopped: false,
            next_epoch: 0,
            next_batch: 0,
        };
        for step in [3, 6, 9] {
            state.step = step;
            let _ = optimizer.exp_avg[0].fill_(step as f64);
            save(dir.path(), &parameters, &optimizer, &state).unwrap();
        }
        // An interrupted write is not a checkpoint.
        std::fs::create_dir(dir.path().join(".tmp-step-12")).unwrap();
        let steps: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [6, 9]);
        let other = Tensor::from_slice(&[0.0f32, 0.0]);
        let restored_parameters = vec![("w".to_owned(), other.shallow_clone())];
        let mut fresh = AdamW::new(&restored_parameters, 0.0).unwrap();
        let restored =
            restore(&dir.path().join("step-9"), &restored_parameters, &mut fresh).unwrap();
        assert_eq!(restored, state);
        assert_eq!(Vec::<f32>::try_from(&other).unwrap(), [1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&fresh.exp_avg[0]).unwrap(), [9.0, 9.0]);
    }
}
