//! The engine alone, without gRPC: decode speed of one stream and total
//! speed of N concurrent streams, for tuning the batching loop.
//! `scripts/bench.sh` is the benchmark of record (through gRPC, against
//! transformers); this one isolates the engine.
//!
//! ```text
//! cargo run --release -p medbox-runtime --example engine_throughput -- MODEL_DIR [DTYPE] [STREAMS...]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use medbox_runtime::{
    BatchingConfig, DType, Device, Engine, EngineConfig, GenerateRequest, GenerationEvent,
    SamplingParams,
};

const NEW_TOKENS: u32 = 128;

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
    run(&engine, &prompt, 1)?; // warm-up
    println!("model {} dtype {dtype}", engine.info().name);
    for count in streams {
        let (first_token, decode, total) = run(&engine, &prompt, count)?;
        println!(
            "{count:>3} streams: first token {:>7.1} ms, decode {:>7.1} tok/s per stream, {:>7.1} tok/s total",
            first_token * 1e3,
            decode,
            total
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
            constraint: None,
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
