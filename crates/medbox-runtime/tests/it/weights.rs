//! Lower precision and memory-lean loading.

use std::path::Path;
use std::process::Command;

use medbox_runtime::{DType, Device, Engine, EngineConfig, debug};

use super::{PROMPT, generate, greedy, tiny_model};

fn reference_greedy(model: &Path, prompt: &str, count: u32, dtype: &str) -> Vec<u32> {
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .args([
            "greedy".as_ref(),
            model.as_os_str(),
            prompt.as_ref(),
            count.to_string().as_ref(),
            dtype.as_ref(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "reference.py greedy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    serde_json::from_value(json["greedy_ids"].clone()).unwrap()
}

#[test]
fn bf16_greedy_matches_transformers_bf16() {
    const COUNT: u32 = 8;
    let engine = Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::BF16),
        device: Device::Cpu,
        max_waiting: 1,
        batching: Default::default(),
    })
    .expect("tiny model loads in bf16");
    assert_eq!(engine.info().dtype, DType::BF16);
    let outcome = generate(&engine, PROMPT, greedy(COUNT));
    let expected = reference_greedy(tiny_model(), PROMPT, COUNT, "bfloat16");
    assert_eq!(outcome.token_ids, expected, "bf16 greedy tokens");
    engine.shutdown();
}

/// Weight-only int8 (per-output-channel scales) keeps the model's answers:
/// over 256 positions, every logit row's cosine to f32 is at least 0.999
/// and the top token agrees at 90% of positions or more.
#[test]
fn int8_weights_keep_the_f32_logits() {
    let text = "The patient was admitted with chest pain. Troponin was raised; \
                the ECG showed ST depression. Plan: repeat the full blood count, \
                check potassium and creatinine, start aspirin, review in clinic. "
        .repeat(8);
    let engine = Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::F32),
        device: Device::Cpu,
        max_waiting: 1,
        batching: Default::default(),
    })
    .unwrap();
    let ids: Vec<u32> = engine
        .tokenize(&text)
        .unwrap()
        .into_iter()
        .map(|token| token.id)
        .take(256)
        .collect();
    assert_eq!(ids.len(), 256);
    engine.shutdown();
    let full = debug::prompt_logits(tiny_model(), DType::F32, Device::Cpu, &ids, 256).unwrap();
    // One prefill (libtorch's kernels) and token by token (the decode
    // step's own products, `matvec` on the CPU).
    for chunk in [256, 1] {
        let int8 =
            debug::prompt_logits(tiny_model(), DType::Int8, Device::Cpu, &ids, chunk).unwrap();
        let (min_cosine, agree) = agreement(&full, &int8);
        eprintln!(
            "int8 vs f32, chunk {chunk}: min cosine {min_cosine:.5}, top-1 agreement {agree}/256"
        );
        assert!(
            min_cosine >= 0.999,
            "chunk {chunk}: min cosine {min_cosine}"
        );
        assert!(
            agree * 10 >= 256 * 9,
            "chunk {chunk}: top-1 agreement {agree}/256"
        );
    }

    let engine = Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::Int8),
        device: Device::Cpu,
        max_waiting: 1,
        batching: Default::default(),
    })
    .unwrap();
    assert_eq!(engine.info().dtype, DType::Int8);
    assert_eq!(generate(&engine, PROMPT, greedy(8)).token_ids.len(), 8);
}

/// The lowest cosine between matching logit rows, and at how many rows the
/// top token is the same.
fn agreement(exact: &[Vec<f32>], approximate: &[Vec<f32>]) -> (f64, usize) {
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|left, right| left.1.total_cmp(right.1))
            .map(|(index, _)| index)
    };
    let norm = |row: &[f32]| {
        row.iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let mut min_cosine = f64::MAX;
    let mut agree = 0;
    for (exact, approximate) in exact.iter().zip(approximate) {
        let dot: f64 = exact
            .iter()
            .zip(approximate)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        min_cosine = min_cosine.min(dot / (norm(exact) * norm(approximate)));
        agree += usize::from(argmax(exact) == argmax(approximate));
    }
    (min_cosine, agree)
}
