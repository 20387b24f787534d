//! Serving several LoRA adapters at once, measured against two references
//! in the same run: the same number of streams on the base model alone (what
//! the adapters' extra products cost), and one merged engine per adapter
//! (what serving them without shared batches costs: N copies of the weights
//! and N batches competing for the cores).
//!
//! The adapters are made here with random weights (r 16, alpha 32, every
//! linear layer: the trainer's defaults) for the model in MODEL_DIR.
//!
//! ```text
//! cargo run --release -p medbox-runtime --example adapter_throughput -- MODEL_DIR [DTYPE] [ADAPTERS] [STREAMS] [RUNS]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use medbox_runtime::lora::LoraSettings;
use medbox_runtime::train::{Trainable, TrainableModel, TrainingOptions};
use medbox_runtime::{
    BatchingConfig, DType, Device, Engine, EngineConfig, GenerateRequest, GenerationEvent,
    SamplingParams,
};

const NEW_TOKENS: u32 = 64;

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let mut arguments = std::env::args().skip(1);
    let usage = "usage: MODEL_DIR [DTYPE] [ADAPTERS] [STREAMS] [RUNS]";
    let model = std::fs::canonicalize(PathBuf::from(arguments.next().ok_or(usage)?))?;
    let dtype: DType = arguments.next().as_deref().unwrap_or("f32").parse()?;
    let mut number = |default: usize| -> Result<usize, BoxError> {
        Ok(arguments
            .next()
            .map(|n| n.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (adapter_count, streams, runs) = (number(4)?, number(32)?, number(2)?);

    let dir = tempfile::tempdir()?;
    let adapters: Vec<PathBuf> = (0..adapter_count)
        .map(|index| random_adapter(&model, dir.path(), index as i64))
        .collect::<Result<_, _>>()?;
    let start = |name: &str, path: &Path| {
        Engine::start(EngineConfig {
            name: name.into(),
            path: path.to_path_buf(),
            dtype: Some(dtype),
            device: Device::Cpu,
            max_waiting: 256,
            batching: BatchingConfig {
                kv_cache_bytes: Some(256 << 20),
                ..BatchingConfig::default()
            },
        })
    };
    let base = start("base", &model)?;
    let attached: Vec<Engine> = adapters
        .iter()
        .enumerate()
        .map(|(index, path)| base.attach_adapter(&format!("attached-{index}"), path))
        .collect::<Result<_, _>>()?;
    let merged: Vec<Engine> = adapters
        .iter()
        .enumerate()
        .map(|(index, path)| start(&format!("merged-{index}"), path))
        .collect::<Result<_, _>>()?;

    println!(
        "model {} dtype {dtype}: {streams} streams of {NEW_TOKENS} new tokens, {adapter_count} adapters (r 16, all linear layers)",
        model.display()
    );
    let prompt = "Discharge summary: the patient was admitted with chest pain and ".repeat(2);
    let layouts: [(&str, &[Engine]); 3] = [
        ("base model only", std::slice::from_ref(&base)),
        ("adapters mixed in one batch", &attached),
        ("one merged engine per adapter", &merged),
    ];
    // Warm-up, then the runs, each layout in turn so that a machine that
    // slows down slows all three alike.
    for (_, engines) in &layouts {
        run(engines, &prompt, engines.len(), 0)?;
    }
    let mut totals = [0.0f64; 3];
    for round in 1..=runs {
        for (index, (name, engines)) in layouts.iter().enumerate() {
            let rate = run(engines, &prompt, streams, round)?;
            println!("run {round}: {name:<32} {rate:>7.1} tok/s");
            totals[index] += rate;
        }
    }
    let [base_rate, mixed_rate, merged_rate] = totals.map(|total| total / runs as f64);
    println!("| layout | tok/s (mean of {runs}) | ratio |");
    println!("|---|---|---|");
    println!("| {} | {base_rate:.1} | 1.00 |", layouts[0].0);
    println!(
        "| {} | {mixed_rate:.1} | {:.2} of the base |",
        layouts[1].0,
        mixed_rate / base_rate
    );
    println!(
        "| {} | {merged_rate:.1} | mixed batch is {:.2}× this |",
        layouts[2].0,
        mixed_rate / merged_rate
    );
    for engine in attached.into_iter().chain(merged).chain([base]) {
        engine.shutdown();
    }
    Ok(())
}

/// An adapter with the trainer's default shape and random weights (a fresh
/// `B` is zero), in PEFT's format.
fn random_adapter(model: &Path, dir: &Path, seed: i64) -> Result<PathBuf, BoxError> {
    tch::manual_seed(seed);
    let trainable = TrainableModel::load(
        model,
        &TrainingOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::Lora(LoraSettings {
                r: 16,
                alpha: 32.0,
                dropout: 0.0,
                target_modules: vec!["all-linear".into()],
            }),
        },
    )?;
    {
        let _no_grad = tch::no_grad_guard();
        for (name, tensor) in trainable.parameters() {
            if name.ends_with("lora_B") {
                let random =
                    tch::Tensor::randn(tensor.size(), (tch::Kind::Float, tch::Device::Cpu)) * 0.01;
                tensor.shallow_clone().copy_(&random);
            }
        }
    }
    let folder = dir.join(format!("adapter-{seed}"));
    std::fs::create_dir_all(&folder)?;
    trainable.save_adapter(&folder)?;
    Ok(folder)
}

/// `count` greedy streams spread round-robin over `engines`, all sent at
/// once; returns the generated tokens per second over the whole run.
fn run(engines: &[Engine], prompt: &str, count: usize, round: usize) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(count);
    for index in 0..count {
        let engine = &engines[index % engines.len()];
        let request = engine.validate(GenerateRequest {
            // Every prompt differs from its first token, so no stream is
            // helped by another's cached prefix.
            prompt: format!("Case {index}, round {round}. {prompt}"),
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
            let mut tokens = 0usize;
            while let Some(event) = stream.blocking_next() {
                match event {
                    GenerationEvent::Delta { token_ids, .. } => tokens += token_ids.len(),
                    GenerationEvent::Finished { .. } => break,
                    GenerationEvent::Failed(error) => panic!("{error}"),
                }
            }
            tokens
        }));
    }
    let tokens: usize = handles
        .into_iter()
        .map(|handle| handle.join().expect("collector"))
        .sum();
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}
