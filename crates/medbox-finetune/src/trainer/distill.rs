//! Distillation: what the student learns from the teacher.
//!
//! - **Token level**, when both models read and write the same tokens: the
//!   loss over the answer tokens is `(1-r)·CE + r·T²·KL(teacher‖student)`,
//!   the teacher's distribution computed in the same pass without gradients.
//! - **Sequence level**, when the tokenizers differ: the teacher answers
//!   every training conversation first (greedy, through the runtime's
//!   engine), and the student learns those answers with plain
//!   cross-entropy. The answers are saved in the job folder
//!   ([`TEACHER_ANSWERS_FILE`], written whole then renamed), so that a resumed
//!   job trains on exactly the same data.
//!
//! Evaluation is the student's cross-entropy on the held-out references in
//! both cases, so eval losses compare across methods.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use medbox_runtime::train::{DistillMix, EncodedExample, TrainableModel};
use medbox_runtime::{
    ChatMessage, ChatRequest, Device, Engine, EngineConfig, GenerationEvent, ReasoningSplitter,
    SamplingParams,
};
use tch::{TchError, Tensor};

use super::{Sample, TrainerError};
use crate::protocol::ModelRef;

/// The teacher's answers of a sequence-level job, in the job folder.
pub const TEACHER_ANSWERS_FILE: &str = "teacher-answers.jsonl";
/// Conversations the teacher answers at once (its engine batches them).
const ANSWER_BATCH: usize = 32;
/// Longest teacher answer, in the teacher's tokens.
const MAX_ANSWER_TOKENS: u32 = 1024;

/// What a training step minimises.
pub enum Objective {
    /// Next-token cross-entropy on the answers (lora, full, and
    /// sequence-level distillation).
    CrossEntropy,
    /// Token-level distillation from a teacher of the same vocabulary.
    Distill {
        teacher: Box<TrainableModel>,
        mix: DistillMix,
    },
}

impl Objective {
    /// The summed loss of one micro-batch and its number of target positions.
    pub fn loss_sum(
        &self,
        model: &TrainableModel,
        examples: &[&EncodedExample],
        train: bool,
    ) -> Result<(Tensor, i64), TchError> {
        match self {
            Objective::CrossEntropy => model.loss_sum(examples, train),
            Objective::Distill { teacher, mix } => {
                model.distill_loss_sum(teacher, examples, *mix, train)
            }
        }
    }
}

/// The training conversations with every assistant turn answered by the
/// teacher: read from the job folder when an earlier start wrote them,
/// else generated and saved. Plain-text examples have no prompt and stay.
pub(super) fn teacher_answers(
    teacher: &ModelRef,
    device: Device,
    samples: Vec<Sample>,
    max_tokens: u32,
    job_dir: &Path,
    stop: &AtomicBool,
) -> Result<Vec<Sample>, TrainerError> {
    let saved = job_dir.join(TEACHER_ANSWERS_FILE);
    if saved.is_file() {
        let answered = super::read_samples(&saved, "teacher-answered")?;
        if answered.len() == samples.len() {
            tracing::info!(
                examples = answered.len(),
                "teacher answers read from the job folder"
            );
            return Ok(answered);
        }
        tracing::warn!("the saved teacher answers do not match the dataset: answering again");
    }
    let started = Instant::now();
    let engine = Engine::start(EngineConfig {
        name: teacher.name.clone(),
        path: teacher.path.clone(),
        dtype: None,
        device,
        max_waiting: ANSWER_BATCH,
        batching: Default::default(),
    })
    .map_err(|error| {
        TrainerError::failed(
            format!(
                "the teacher `{}` could not be loaded to answer the training examples",
                teacher.name
            ),
            error,
        )
    })?;
    // Every (example, assistant turn) the teacher answers.
    let mut turns: Vec<(usize, usize)> = Vec::new();
    for (index, sample) in samples.iter().enumerate() {
        if let Sample::Chat(messages) = sample {
            for (position, message) in messages.iter().enumerate() {
                if message.role == "assistant" && position > 0 {
                    turns.push((index, position));
                }
            }
        }
    }
    let mut samples = samples;
    let mut kept_reference = 0usize;
    for (batch_number, batch) in turns.chunks(ANSWER_BATCH).enumerate() {
        if stop.load(Ordering::SeqCst) {
            return Err(TrainerError::Cancelled);
        }
        let mut streams = Vec::with_capacity(batch.len());
        for &(index, position) in batch {
            let Sample::Chat(messages) = &samples[index] else {
                continue;
            };
            let request = ChatRequest {
                messages: messages[..position].to_vec(),
                sampling: SamplingParams {
                    max_tokens: Some(max_tokens.min(MAX_ANSWER_TOKENS)),
                    temperature: Some(0.0),
                    ..SamplingParams::default()
                },
                constraint: None,
            };
            // A prompt the teacher cannot take keeps the reference answer.
            let submitted = engine.validate_chat(request).ok().and_then(|valid| {
                let splitter = engine
                    .thinks()
                    .then(|| ReasoningSplitter::new(valid.starts_in_reasoning()));
                engine
                    .submit(valid)
                    .ok()
                    .map(|stream| (index, position, stream, splitter))
            });
            match submitted {
                Some(submitted) => streams.push(submitted),
                None => kept_reference += 1,
            }
        }
        for (index, position, mut stream, mut splitter) in streams {
            match collect_answer(&mut stream, splitter.as_mut()) {
                Some(answer) if !answer.trim().is_empty() => {
                    if let Sample::Chat(messages) = &mut samples[index] {
                        messages[position].content = answer;
                    }
                }
                _ => kept_reference += 1,
            }
        }
        tracing::info!(
            answered = ((batch_number + 1) * ANSWER_BATCH).min(turns.len()),
            of = turns.len(),
            "teacher answering the training examples"
        );
    }
    tracing::info!(
        turns = turns.len(),
        kept_reference,
        seconds = started.elapsed().as_secs_f64(),
        "teacher answers ready"
    );
    save_samples(&saved, &samples)?;
    Ok(samples)
}

/// The answer text of one generation (reasoning left out); `None` if it failed.
fn collect_answer(
    stream: &mut medbox_runtime::GenerationStream,
    mut splitter: Option<&mut ReasoningSplitter>,
) -> Option<String> {
    let mut text = String::new();
    while let Some(event) = stream.blocking_next() {
        match event {
            GenerationEvent::Delta { text: delta, .. } => match splitter.as_mut() {
                Some(splitter) => text.push_str(&splitter.push(&delta).answer),
                None => text.push_str(&delta),
            },
            GenerationEvent::Finished { .. } => {
                if let Some(splitter) = splitter {
                    text.push_str(&splitter.finish().answer);
                }
                return Some(text);
            }
            GenerationEvent::Failed(error) => {
                tracing::warn!(%error, "the teacher failed on an example; its reference answer stays");
                return None;
            }
        }
    }
    None
}

/// Writes the samples as canonical JSONL under a temporary name, synced,
/// then renamed into place.
fn save_samples(path: &Path, samples: &[Sample]) -> Result<(), TrainerError> {
    let failure = |error: std::io::Error| {
        TrainerError::failed(
            "the teacher's answers could not be saved in the job folder (is the disk full?)",
            error,
        )
    };
    let mut text = String::new();
    for sample in samples {
        let line = match sample {
            Sample::Chat(messages) => serde_json::json!({ "messages": messages_json(messages) }),
            Sample::Text(body) => serde_json::json!({ "text": body }),
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let temporary = path.with_extension("jsonl.tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary).map_err(failure)?;
        file.write_all(text.as_bytes()).map_err(failure)?;
        file.sync_all().map_err(failure)?;
    }
    std::fs::rename(&temporary, path).map_err(failure)
}

fn messages_json(messages: &[ChatMessage]) -> Vec<serde_json::Value> {
    messages
        .iter()
        .map(|message| serde_json::json!({"role": message.role, "content": message.content}))
        .collect()
}
