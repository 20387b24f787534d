//! Structured output through the engine: every constraint kind, in batches,
//! with random weights, and invalid constraints refused (fail closed).

use std::thread;

use medbox_runtime::{
    BatchingConfig, Constraint, DType, Device, Engine, EngineConfig, FinishReason, GenerateRequest,
    SamplingParams, ValidationError,
};

use super::{Outcome, collect, make_model, tiny_model};

/// A report a lab-interpretation agent could ask for: bounded, so that even
/// random weights finish it well within `MAX_TOKENS`.
const LAB_FLAG_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "analyte": {"enum": ["potassium", "sodium", "creatinine", "haemoglobin"]},
    "flag": {"enum": ["low", "normal", "high", "critical"]},
    "value": {"type": "integer", "minimum": 0, "maximum": 999},
    "repeat": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 16}
  },
  "required": ["analyte", "flag", "value", "repeat", "note"],
  "additionalProperties": false
}"#;
const MAX_TOKENS: u32 = 200;

fn start(path: &std::path::Path) -> Engine {
    Engine::start(EngineConfig {
        name: "constrained".into(),
        path: path.to_path_buf(),
        dtype: Some(DType::F32),
        device: Device::Cpu,
        max_waiting: 256,
        batching: BatchingConfig::default(),
    })
    .expect("model loads")
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(MAX_TOKENS),
        temperature: Some(1.0),
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn run_all(engine: &Engine, prompts: &[String], constraint: &Constraint) -> Vec<Outcome> {
    let streams: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            let request = engine
                .validate(GenerateRequest {
                    prompt: prompt.clone(),
                    sampling: sampled(index as u64),
                    constraint: Some(constraint.clone()),
                })
                .expect("valid constrained request");
            engine.submit(request).expect("submitted")
        })
        .collect();
    let collectors: Vec<_> = streams
        .into_iter()
        .map(|stream| thread::spawn(move || collect(stream)))
        .collect();
    collectors
        .into_iter()
        .map(|collector| collector.join().expect("collector"))
        .collect()
}

fn prompts(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("Lab result {index}: potassium 6.1 mmol/L. JSON:"))
        .collect()
}

#[test]
fn two_hundred_json_answers_from_random_weights_all_validate() {
    let random = make_model(
        "tiny-qwen2-random",
        &["--arch", "qwen2", "--train-steps", "0", "--init-std", "0.1"],
    );
    let engine = start(&random);
    let schema: serde_json::Value = serde_json::from_str(LAB_FLAG_SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let outcomes = run_all(
        &engine,
        &prompts(200),
        &Constraint::JsonSchema(LAB_FLAG_SCHEMA.into()),
    );
    for (index, outcome) in outcomes.iter().enumerate() {
        assert_eq!(
            outcome.reason,
            FinishReason::Stop,
            "answer {index}: {outcome:?}"
        );
        let value: serde_json::Value =
            serde_json::from_str(&outcome.text).unwrap_or_else(|error| {
                panic!("answer {index} is not JSON ({error}): {}", outcome.text)
            });
        assert!(
            validator.is_valid(&value),
            "answer {index} breaks the schema: {value}"
        );
    }
}

#[test]
fn regex_and_grammar_constraints_hold_in_a_batch() {
    let engine = start(tiny_model());
    let pattern = r"[A-Z]\d{2}\.\d";
    let regex = regex::Regex::new(&format!("^{pattern}$")).unwrap();
    for outcome in run_all(&engine, &prompts(16), &Constraint::Regex(pattern.into())) {
        assert_eq!(outcome.reason, FinishReason::Stop, "{outcome:?}");
        assert!(regex.is_match(&outcome.text), "`{}`", outcome.text);
    }
    let grammar = r#"
start: "flag: " FLAG "; repeat in " DAYS " days"
FLAG: "low" | "normal" | "high"
DAYS: /[1-9][0-9]?/
"#;
    let shape =
        regex::Regex::new(r"^flag: (low|normal|high); repeat in [1-9][0-9]? days$").unwrap();
    for outcome in run_all(&engine, &prompts(16), &Constraint::Grammar(grammar.into())) {
        assert_eq!(outcome.reason, FinishReason::Stop, "{outcome:?}");
        assert!(shape.is_match(&outcome.text), "`{}`", outcome.text);
    }
}

#[test]
fn constrained_and_free_sequences_share_a_batch() {
    let engine = start(tiny_model());
    let free = engine
        .validate(GenerateRequest {
            prompt: "Plan:".into(),
            sampling: SamplingParams {
                max_tokens: Some(20),
                temperature: Some(0.0),
                ignore_eos: true,
                ..SamplingParams::default()
            },
            constraint: None,
        })
        .unwrap();
    let alone = collect(engine.submit(free.clone()).unwrap());
    let free_stream = engine.submit(free).unwrap();
    let constrained = run_all(
        &engine,
        &prompts(4),
        &Constraint::JsonSchema(LAB_FLAG_SCHEMA.into()),
    );
    let together = collect(free_stream);
    assert_eq!(
        together.token_ids, alone.token_ids,
        "the free one is unchanged"
    );
    for outcome in constrained {
        serde_json::from_str::<serde_json::Value>(&outcome.text).expect("JSON");
    }
}

#[test]
fn invalid_constraints_are_refused_naming_the_field() {
    let engine = start(tiny_model());
    let refuse = |constraint: Constraint| {
        engine
            .validate(GenerateRequest {
                prompt: "Plan:".into(),
                sampling: SamplingParams::default(),
                constraint: Some(constraint),
            })
            .unwrap_err()
    };
    let cases = [
        (Constraint::JsonSchema("{\"type\": ".into()), "json_schema"),
        (
            Constraint::JsonSchema("{\"type\": \"no-such-type\"}".into()),
            "json_schema",
        ),
        (Constraint::Regex("[unclosed".into()), "regex"),
        (Constraint::Grammar("start: missing_rule".into()), "grammar"),
    ];
    for (constraint, field) in cases {
        let error = refuse(constraint);
        assert!(
            matches!(&error, ValidationError::Constraint { field: named, .. } if *named == field),
            "{error:?}"
        );
        assert!(error.to_string().contains(field), "{error}");
    }
}
