//! Lower precision and memory-lean loading.

use std::path::Path;
use std::process::Command;

use medbox_runtime::{DType, Device, Engine, EngineConfig};

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
    })
    .expect("tiny model loads in bf16");
    assert_eq!(engine.info().dtype, DType::BF16);
    let outcome = generate(&engine, PROMPT, greedy(COUNT));
    let expected = reference_greedy(tiny_model(), PROMPT, COUNT, "bfloat16");
    assert_eq!(outcome.token_ids, expected, "bf16 greedy tokens");
    engine.shutdown();
}
