//! Test support: a scripted [`AgentModel`] and a tiny executor, so the step
//! loop (here and in the server's tests) runs without a model or a runtime.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::model::{AgentModel, ModelError, ModelReply, ModelTurn};

/// The prompt tokens [`ScriptedModel`] reports for every call.
pub const SCRIPTED_PROMPT_TOKENS: u32 = 10;

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// Answer with this text.
    Reply(String),
    /// Block the calling thread this long, then answer with this text.
    SlowReply(Duration, String),
    /// Fail with this error.
    Error(ModelError),
}

/// A model that answers from a script, in order, and records every turn it
/// was asked. When the script runs out it fails with [`ModelError::Failed`].
#[derive(Debug)]
pub struct ScriptedModel {
    model_name: String,
    script: Mutex<VecDeque<Scripted>>,
    turns: Mutex<Vec<ModelTurn>>,
}

impl ScriptedModel {
    /// A model named `scripted` that answers with these texts.
    pub fn replies<I: IntoIterator<Item = S>, S: Into<String>>(texts: I) -> ScriptedModel {
        ScriptedModel::new(texts.into_iter().map(|text| Scripted::Reply(text.into())))
    }

    pub fn new(script: impl IntoIterator<Item = Scripted>) -> ScriptedModel {
        ScriptedModel {
            model_name: "scripted".to_owned(),
            script: Mutex::new(script.into_iter().collect()),
            turns: Mutex::new(Vec::new()),
        }
    }

    /// Every turn asked so far, in order.
    pub fn turns(&self) -> Vec<ModelTurn> {
        self.turns
            .lock()
            .map(|turns| turns.clone())
            .unwrap_or_default()
    }

    fn answer(&self, turn: ModelTurn) -> Result<ModelReply, ModelError> {
        let route = turn.route.clone();
        if let Ok(mut turns) = self.turns.lock() {
            turns.push(turn);
        }
        let next = self
            .script
            .lock()
            .ok()
            .and_then(|mut script| script.pop_front());
        // Token counts a test can predict: ten per prompt, one per byte of
        // the answer.
        let reply = |text: String| ModelReply {
            completion_tokens: u32::try_from(text.len()).unwrap_or(u32::MAX),
            prompt_tokens: SCRIPTED_PROMPT_TOKENS,
            text,
            model: self.model_name.clone(),
        };
        match next {
            Some(Scripted::Reply(text)) => Ok(reply(text)),
            Some(Scripted::SlowReply(delay, text)) => {
                std::thread::sleep(delay);
                Ok(reply(text))
            }
            Some(Scripted::Error(error)) => Err(error),
            None => Err(ModelError::Failed {
                route,
                reason: "the script has no more answers".to_owned(),
            }),
        }
    }
}

impl AgentModel for ScriptedModel {
    async fn complete(&self, turn: ModelTurn) -> Result<ModelReply, ModelError> {
        self.answer(turn)
    }
}

/// Drives a future to completion on the current thread. Enough for futures
/// that never wait on I/O or timers, such as a run against [`ScriptedModel`].
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::yield_now();
    }
}

/// A deterministic [`crate::knowledge::Embedder`] for tests: each keyword
/// token ([`crate::knowledge::tokenize`]) adds one to a dimension chosen by
/// hashing it, and the vector is normalised. Texts that share words are
/// similar, as with a real model, without libtorch. `fail_with` makes every
/// call fail with that error; `calls` counts the calls made.
pub struct HashingEmbedder {
    pub model: String,
    pub dimensions: usize,
    pub fail_with: Option<crate::knowledge::EmbedderError>,
    pub calls: std::sync::atomic::AtomicUsize,
}

impl HashingEmbedder {
    pub fn new(dimensions: usize) -> HashingEmbedder {
        HashingEmbedder {
            model: "hashing".to_owned(),
            dimensions,
            fail_with: None,
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The vector of one text.
    pub fn vector(&self, text: &str) -> Vec<f32> {
        let mut vector = vec![0.0f32; self.dimensions];
        for token in crate::knowledge::tokenize(text) {
            // FNV-1a: stable across runs and platforms.
            let hash = token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
            vector[(hash % self.dimensions as u64) as usize] += 1.0;
        }
        crate::knowledge::normalize(&mut vector);
        vector
    }
}

impl crate::knowledge::Embedder for HashingEmbedder {
    fn embed(&self, texts: Vec<String>) -> crate::knowledge::EmbedFuture<'_> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = match &self.fail_with {
            Some(error) => Err(error.clone()),
            None => Ok(crate::knowledge::Embeddings {
                model: self.model.clone(),
                vectors: texts.iter().map(|text| self.vector(text)).collect(),
            }),
        };
        Box::pin(std::future::ready(result))
    }
}
/// A FHIR R4 Bundle for tests and examples: a 68-year-old woman (born
/// 1957-06-15) with hypertension and type 2 diabetes, on metformin and
/// amlodipine, allergic to penicillin, with two creatinine results (the
/// newer, 1.3 mg/dL, is the one eGFR uses) and an HbA1c.
pub const EXAMPLE_BUNDLE: &str = r#"{
  "resourceType": "Bundle",
  "type": "collection",
  "entry": [
    {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1957-06-15"}},
    {"resource": {"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "Essential hypertension"}], "text": "高血压"},
      "clinicalStatus": {"coding": [{"code": "active"}]}}},
    {"resource": {"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9", "display": "Type 2 diabetes mellitus"}]}}},
    {"resource": {"resourceType": "MedicationStatement", "status": "active",
      "medicationCodeableConcept": {"text": "metformin"}, "dosage": [{"text": "500 mg twice daily"}]}},
    {"resource": {"resourceType": "MedicationStatement", "status": "active",
      "medicationCodeableConcept": {"coding": [{"display": "amlodipine"}]}}},
    {"resource": {"resourceType": "MedicationStatement", "status": "completed",
      "medicationCodeableConcept": {"text": "amoxicillin"}}},
    {"resource": {"resourceType": "AllergyIntolerance", "code": {"text": "penicillin"}, "criticality": "high",
      "reaction": [{"manifestation": [{"text": "urticaria"}]}]}},
    {"resource": {"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
      "valueQuantity": {"value": 1.0, "unit": "mg/dL"}, "effectiveDateTime": "2025-01-10T08:00:00+08:00"}},
    {"resource": {"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
      "valueQuantity": {"value": 1.3, "unit": "mg/dL"}, "effectiveDateTime": "2025-10-02T08:00:00+08:00"}},
    {"resource": {"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
      "valueQuantity": {"value": 7.8, "unit": "%"}, "effectiveDateTime": "2025-10-02T08:00:00+08:00"}},
    {"resource": {"resourceType": "Encounter", "status": "finished"}}
  ]
}"#;
