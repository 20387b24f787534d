//! The engine alone, without gRPC: decode speed of one stream and total
//! speed of N concurrent streams, for tuning the batching loop; then one
//! stream with the benchmark's JSON-schema constraint against one without.
//! `scripts/bench.sh` is the benchmark of record (through gRPC, against
//! transformers); this one isolates the engine.
//!
//! ```text
//! cargo run --release -p medbox-runtime --example engine_throughput -- MODEL_DIR [DTYPE] [STREAMS...]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use medbox_runtime::{
    BatchingConfig, Constraint, DType, Device, Engine, EngineConfig, GenerateRequest,
    GenerationEvent, SamplingParams,
};

const NEW_TOKENS: u32 = 128;
/// The schema of `scripts/bench/json_constraint.py`: a triage note whose
/// list of findings is long enough that 128 tokens end inside it.
const SCHEMA: &str = r#"{"type": "object", "properties": {"patient_id": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "triage": {"enum": ["red", "orange", "yellow", "green", "blue"]}, "ward": {"type": "string", "maxLength": 24}, "findings": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64}}, "required": ["patient_id", "age", "triage", "ward", "findings"], "additionalProperties": false}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut arguments = std::env::args().skip(1);
    let path = PathBuf::from(
        arguments
            .next()
            .ok_or("usage: MODEL_DIR [DTYPE] [STREAMS...]")?,
    );
    let dtype: DType = arguments.next().as_deref().unwrap_or("f32").parse()?;
    let mut streams: Vec<usize> = arguments.map(|n| n.parse()).collect::<Result<_, _>>()?;
    if streams.is_empty() {
        streams = vec![1, 4, 16, 32];
    }
    let engine = Engine::start(EngineConfig {
        name: "bench".into(),
        path,
        dtype: Some(dtype),
        device: Device::Cpu,
        max_waiting: 64,
        batching: BatchingConfig::default(),
    })?;
    let prompt = "Discharge summary: the patient was admitted with chest pain and ".repeat(4);
    run(&engine, &prompt, 1, None)?; // warm-up
    println!("model {} dtype {dtype}", engine.info().name);
    for count in streams {
        let (first_token, decode, total) = run(&engine, &prompt, count, None)?;
        println!(
            "{count:>3} streams: first token {:>7.1} ms, decode {:>7.1} tok/s per stream, {:>7.1} tok/s total",
            first_token * 1e3,
            decode,
            total
        );
    }
    let json = Constraint::JsonSchema(SCHEMA.into());
    for _ in 0..3 {
        let (_, free, _) = run(&engine, &prompt, 1, None)?;
        let (_, constrained, _) = run(&engine, &prompt, 1, Some(json.clone()))?;
        println!(
            "  1 stream, JSON schema: decode {constrained:>7.1} tok/s against {free:>7.1} \
             unconstrained ({:.2}×)",
            constrained / free
        );
    }
    Ok(())
}

/// Returns the mean time to first token, the mean per-stream decode rate
/// (first token to last) and the total rate over the whole run.
fn run(
    engine: &Engine,
    prompt: &str,
    count: usize,
    constraint: Option<Constraint>,
) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut handles = Vec::new();
    for index in 0..count {
        let request = engine.validate(GenerateRequest {
            prompt: format!("{prompt}{index}"),
            sampling: SamplingParams {
                max_tokens: Some(NEW_TOKENS),
                temperature: Some(0.0),
                ignore_eos: true,
                ..SamplingParams::default()
            },
            constraint: constraint.clone(),
        })?;
        let mut stream = engine.submit(request)?;
        handles.push(std::thread::spawn(move || {
            let mut first = None;
            let mut tokens = 0usize;
            while let Some(event) = stream.blocking_next() {
                match event {
                    GenerationEvent::Delta { token_ids, .. } => {
                        tokens += token_ids.len();
                        first.get_or_insert_with(|| started.elapsed());
                    }
                    GenerationEvent::Finished { .. } => break,
                    GenerationEvent::Failed(error) => panic!("{error}"),
                }
            }
            (first.unwrap_or_default(), started.elapsed(), tokens)
        }));
    }
    let results: Vec<_> = handles
        .into_iter()
        .map(|handle| handle.join().expect("collector"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let first: f64 = results
        .iter()
        .map(|(first, _, _)| first.as_secs_f64())
        .sum::<f64>()
        / count as f64;
    let decode: f64 = results
        .iter()
        .map(|(first, last, tokens)| (*tokens as f64 - 1.0) / (*last - *first).as_secs_f64())
        .sum::<f64>()
        / count as f64;
    let total: usize = results.iter().map(|(_, _, tokens)| tokens).sum();
    Ok((first, decode, total as f64 / elapsed))
}
