//! Integration tests: build the tiny model with `scripts/make-tiny-model`
//! (reused from `$MEDBOX_CACHE/models/tiny` when that is set), run it through
//! `Engine`, and compare it with transformers (`reference.py`, run with the
//! `python3` on PATH: source scripts/env.sh first).

mod adapters;
mod batching;
mod constraints;
mod embedding;
mod parity;
mod training;
mod weights;

mod chat;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use medbox_runtime::{
    DType, Device, Engine, EngineConfig, FinishReason, GenerateRequest, GenerationEvent,
    GenerationStream, SamplingParams, Usage, debug,
};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    match std::env::var_os("MEDBOX_CACHE") {
        Some(cache) => PathBuf::from(cache).join("models"),
        None => std::env::temp_dir().join("medbox-runtime-it-models"),
    }
}

/// Runs make-tiny-model once per process (it is idempotent across processes).
fn make_model(name: &str, arguments: &[&str]) -> PathBuf {
    let dir = models_dir().join(name);
    let status = Command::new("python3")
        .arg(workspace_root().join("scripts/make-tiny-model"))
        .arg(&dir)
        .args(arguments)
        .status()
        .expect("python3 runs (source scripts/env.sh)");
    assert!(status.success(), "make-tiny-model {name} failed: {status}");
    dir
}

fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| make_model("tiny", &[]))
}

fn start(max_waiting: usize) -> Engine {
    Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::F32),
        device: Device::Cpu,
        max_waiting,
        batching: Default::default(),
    })
    .expect("tiny model loads")
}

/// Everything a finished generation produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    text: String,
    token_ids: Vec<u32>,
    deltas: Vec<String>,
    reason: FinishReason,
    usage: Usage,
}

fn collect(mut stream: GenerationStream) -> Outcome {
    let mut deltas = Vec::new();
    let mut token_ids = Vec::new();
    loop {
        match stream.blocking_next().expect("stream ends with Finished") {
            GenerationEvent::Delta {
                text,
                token_ids: ids,
            } => {
                deltas.push(text);
                token_ids.extend(ids);
            }
            GenerationEvent::Finished { reason, usage } => {
                assert!(stream.blocking_next().is_none(), "nothing after Finished");
                return Outcome {
                    text: deltas.concat(),
                    token_ids,
                    deltas,
                    reason,
                    usage,
                };
            }
            GenerationEvent::Failed(error) => panic!("generation failed: {error}"),
        }
    }
}

/// Validates and submits an unconstrained request.
fn submit(engine: &Engine, prompt: &str, sampling: SamplingParams) -> GenerationStream {
    let request = engine
        .validate(GenerateRequest {
            prompt: prompt.into(),
            sampling,
            constraint: None,
        })
        .expect("valid request");
    engine.submit(request).expect("submitted")
}

fn generate(engine: &Engine, prompt: &str, sampling: SamplingParams) -> Outcome {
    collect(submit(engine, prompt, sampling))
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

const PROMPT: &str = "Follow-up: repeat the full blood count";

/// Prompt ids and f32 prompt logits from transformers (`reference.py logits`);
/// `parity.rs` has the full comparison, greedy included.
#[derive(Debug)]
struct Reference {
    prompt_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn reference(model: &Path, prompt: &str, count: u32) -> Reference {
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .args([
            "logits".as_ref(),
            model.as_os_str(),
            prompt.as_ref(),
            count.to_string().as_ref(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "reference.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("reference JSON");
    Reference {
        prompt_ids: serde_json::from_value(json["prompt_ids"].clone()).unwrap(),
        logits: serde_json::from_value(json["logits"].clone()).unwrap(),
    }
}

fn max_difference(left: &[Vec<f32>], right: &[Vec<f32>]) -> f32 {
    assert_eq!(left.len(), right.len(), "positions");
    left.iter()
        .zip(right)
        .flat_map(|(left, right)| {
            assert_eq!(left.len(), right.len(), "vocabulary");
            left.iter().zip(right).map(|(a, b)| (a - b).abs())
        })
        // A NaN anywhere must fail the comparison, not vanish in `max`.
        .fold(0.0, |worst: f32, difference| {
            if difference.is_nan() || worst.is_nan() {
                f32::NAN
            } else {
                worst.max(difference)
            }
        })
}

#[test]
fn sharded_checkpoint_loads_the_same() {
    let sharded = tempfile::tempdir().unwrap();
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .args([
            "reshard".as_ref(),
            tiny_model().as_os_str(),
            sharded.path().as_os_str(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        sharded
            .path()
            .join("model.safetensors.index.json")
            .is_file()
    );
    let ids = [0, 17, 42, 99, 7];
    let single = debug::prompt_logits(tiny_model(), DType::F32, Device::Cpu, &ids, 5).unwrap();
    let shards = debug::prompt_logits(sharded.path(), DType::F32, Device::Cpu, &ids, 5).unwrap();
    assert_eq!(max_difference(&single, &shards), 0.0);
}

#[test]
fn generation_ends_with_length_at_max_tokens() {
    let engine = start(4);
    for max_tokens in [1, 5, 17] {
        let outcome = generate(&engine, PROMPT, greedy(max_tokens));
        assert_eq!(outcome.reason, FinishReason::Length);
        assert_eq!(outcome.token_ids.len(), max_tokens as usize);
        let prompt_tokens = engine.tokenize(PROMPT).unwrap().len() as u32;
        assert_eq!(
            outcome.usage,
            Usage {
                prompt_tokens,
                completion_tokens: max_tokens
            }
        );
    }
}

#[test]
fn greedy_is_deterministic() {
    let engine = start(4);
    let first = generate(&engine, PROMPT, greedy(32));
    let second = generate(&engine, PROMPT, greedy(32));
    assert_eq!(first, second);
    assert!(!first.text.is_empty());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = start(4);
    let seeded = |seed| SamplingParams {
        max_tokens: Some(32),
        temperature: Some(1.0),
        top_p: Some(0.95),
        seed: Some(seed),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let first = generate(&engine, "发热", seeded(7));
    assert_eq!(first, generate(&engine, "发热", seeded(7)));
    let others: Vec<Outcome> = (8..12)
        .map(|seed| generate(&engine, "发热", seeded(seed)))
        .collect();
    assert!(
        others
            .iter()
            .any(|other| other.token_ids != first.token_ids),
        "seeds matter"
    );
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let engine = start(4);
    let full = generate(&engine, PROMPT, greedy(32)).text;
    // Stop at a piece in the middle of the greedy answer.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let outcome = generate(
        &engine,
        PROMPT,
        SamplingParams {
            stop: vec![stop.clone()],
            ..greedy(32)
        },
    );
    assert_eq!(
        outcome.reason,
        FinishReason::Stop,
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(outcome.text, expected);
    assert!(outcome.deltas.iter().all(|delta| !delta.contains(&stop)));
}

#[test]
fn chinese_streams_whole_characters() {
    let engine = start(4);
    let outcome = generate(&engine, "随访：", greedy(40));
    assert!(
        outcome
            .text
            .chars()
            .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "{}",
        outcome.text
    );
    for delta in &outcome.deltas {
        assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_stream_and_eos() {
    let engine = tokio::task::spawn_blocking(|| start(4)).await.unwrap();
    // Unset sampling fields take generation_config.json; end tokens stop it.
    let request = engine
        .validate(GenerateRequest {
            prompt: "Question: What is a normal blood pressure? Answer:".into(),
            sampling: SamplingParams {
                max_tokens: Some(200),
                seed: Some(1),
                ..SamplingParams::default()
            },
            constraint: None,
        })
        .unwrap();
    let mut stream = engine.submit(request).unwrap();
    let mut ids = Vec::new();
    let finished = loop {
        match stream.next().await.unwrap() {
            GenerationEvent::Delta { token_ids, .. } => ids.extend(token_ids),
            GenerationEvent::Finished { reason, usage } => break (reason, usage),
            GenerationEvent::Failed(error) => panic!("{error}"),
        }
    };
    assert_eq!(finished.1.completion_tokens as usize, ids.len());
    if finished.0 == FinishReason::Stop {
        assert!(engine.info().eos_token_ids.contains(ids.last().unwrap()));
    } else {
        assert_eq!(ids.len(), 200);
    }
}

fn long_request(engine: &Engine) -> GenerationStream {
    let prompt_tokens = engine.tokenize(PROMPT).unwrap().len() as u32;
    let max_tokens = engine.info().max_context as u32 - prompt_tokens;
    let request = engine
        .validate(GenerateRequest {
            prompt: PROMPT.into(),
            sampling: greedy(max_tokens),
            constraint: None,
        })
        .unwrap();
    engine.submit(request).unwrap()
}

/// Waits until the engine has started on `stream` (its first event).
fn first_event(stream: &mut GenerationStream) {
    assert!(matches!(
        stream.blocking_next(),
        Some(GenerationEvent::Delta { .. })
    ));
}

#[test]
fn dropping_the_stream_cancels() {
    let engine = start(4);
    let started = Instant::now();
    let full = collect(long_request(&engine));
    let full_run = started.elapsed();
    assert_eq!(full.reason, FinishReason::Length);

    let mut cancelled = long_request(&engine);
    first_event(&mut cancelled);
    let started = Instant::now();
    drop(cancelled);
    // The next request runs as soon as the dropped one is gone.
    let after = generate(&engine, PROMPT, greedy(1));
    let waited = started.elapsed();
    assert_eq!(after.reason, FinishReason::Length);
    eprintln!("cancelled after {waited:?}; a full run takes {full_run:?}");
    assert!(
        waited < full_run / 2 + Duration::from_millis(20),
        "waited {waited:?}; a full run takes {full_run:?}"
    );
}

#[test]
fn shutdown_stops_every_handle() {
    let engine = start(2);
    let other = engine.clone();
    engine.shutdown();
    let request = other
        .validate(GenerateRequest {
            prompt: PROMPT.into(),
            sampling: greedy(1),
            constraint: None,
        })
        .unwrap();
    let error = other.submit(request).unwrap_err();
    assert_eq!(error.kind(), "stopped");
}

#[test]
fn validation_names_the_model_and_field() {
    let engine = start(1);
    let long_prompt = "blood ".repeat(600);
    let error = engine
        .validate(GenerateRequest {
            prompt: long_prompt,
            sampling: SamplingParams::default(),
            constraint: None,
        })
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("model `tiny` accepts at most 511"),
        "{error}"
    );
    let error = engine
        .validate(GenerateRequest {
            prompt: PROMPT.into(),
            sampling: SamplingParams {
                max_tokens: Some(10_000),
                ..SamplingParams::default()
            },
            constraint: None,
        })
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("sampling.max_tokens must be between 1 and "),
        "{error}"
    );
}

/// Copies the tiny model, lets `damage` break it, and returns the load error.
fn load_error(damage: impl FnOnce(&Path)) -> medbox_runtime::LoadError {
    load_error_of(tiny_model(), damage)
}

fn load_error_of(model: &Path, damage: impl FnOnce(&Path)) -> medbox_runtime::LoadError {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    damage(copy.path());
    Engine::start(EngineConfig {
        name: "broken".into(),
        path: copy.path().to_path_buf(),
        dtype: None,
        device: Device::Cpu,
        max_waiting: 1,
        batching: Default::default(),
    })
    .unwrap_err()
}

#[test]
fn load_errors_name_the_file_and_tensor() {
    let edit_config = |dir: &Path, from: &str, to: &str| {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{from} in config.json");
        std::fs::write(&path, text.replace(from, to)).unwrap();
    };
    let truncated = load_error(|dir| {
        let path = dir.join("model.safetensors");
        let length = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(length - 1000).unwrap();
    });
    assert_eq!(truncated.kind(), "tensor");
    assert!(
        truncated.to_string().contains("model.safetensors"),
        "{truncated}"
    );
    assert!(truncated.to_string().contains("truncated"), "{truncated}");

    let missing = load_error(|dir| std::fs::remove_file(dir.join("model.safetensors")).unwrap());
    assert_eq!(missing.kind(), "io");
    assert!(
        missing.to_string().contains("model.safetensors"),
        "{missing}"
    );

    let architecture = load_error(|dir| edit_config(dir, "LlamaForCausalLM", "GPTNeoXForCausalLM"));
    assert_eq!(architecture.kind(), "unsupported_architecture");

    let shape = load_error(|dir| {
        edit_config(
            dir,
            "\"intermediate_size\": 352",
            "\"intermediate_size\": 350",
        )
    });
    assert_eq!(shape.kind(), "wrong_shape");
    assert!(
        shape
            .to_string()
            .contains("model.layers.0.mlp.gate_proj.weight"),
        "{shape}"
    );

    let vocabulary =
        load_error(|dir| edit_config(dir, "\"vocab_size\": 1988", "\"vocab_size\": 1000"));
    assert_eq!(vocabulary.kind(), "vocab_mismatch");

    let tied =
        load_error(|dir| edit_config(dir, "\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5"));
    assert_eq!(tied.kind(), "missing_tensor");
    assert!(tied.to_string().contains("model.layers.4."), "{tied}");
}

#[test]
fn half_precision_dtypes_generate() {
    for dtype in [DType::BF16, DType::F16] {
        let engine = Engine::start(EngineConfig {
            name: "tiny".into(),
            path: tiny_model().to_path_buf(),
            dtype: Some(dtype),
            device: Device::Cpu,
            max_waiting: 1,
            batching: Default::default(),
        })
        .unwrap();
        assert_eq!(engine.info().dtype, dtype);
        let outcome = generate(&engine, PROMPT, greedy(8));
        assert_eq!(outcome.token_ids.len(), 8, "{dtype}");
        engine.shutdown();
    }
}

#[test]
fn cuda_parity_or_skip() {
    if !tch::Cuda::is_available() {
        eprintln!("cuda_parity_or_skip: SKIPPED, no CUDA device visible");
        return;
    }
    let expected = reference(tiny_model(), PROMPT, 1);
    let logits = debug::prompt_logits(
        tiny_model(),
        DType::F32,
        Device::Cuda(0),
        &expected.prompt_ids,
        64,
    )
    .unwrap();
    let difference = max_difference(&logits, &expected.logits);
    assert!(difference < 1e-3, "cuda logits differ by {difference}");
}
