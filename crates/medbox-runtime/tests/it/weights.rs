//! Lower precision and memory-lean loading.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use medbox_runtime::{DType, Device, Engine, EngineConfig};

use super::{PROMPT, generate, greedy, models_dir, tiny_model};

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

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Peak resident memory while loading `$MEDBOX_CACHE/models/bench-small` (or
/// `MEDBOX_BENCH_MODEL`, in `MEDBOX_BENCH_DTYPE` if set). Run alone:
/// `cargo test --release -p medbox-runtime --test it load_memory -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: needs a large model, run alone"]
fn load_memory() {
    let path = std::env::var_os("MEDBOX_BENCH_MODEL")
        .map(Into::into)
        .unwrap_or_else(|| models_dir().join("bench-small"));
    let weights_bytes: u64 = std::fs::read_dir(&path)
        .expect("the bench model exists")
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .map(|entry| entry.metadata().unwrap().len())
        .sum();
    // Start libtorch before measuring.
    let _ = tch::Tensor::from_slice(&[1.0f32]).sum(tch::Kind::Float);
    let before = status_kib("VmHWM:");
    let started = Instant::now();
    let engine = Engine::start(EngineConfig {
        name: "bench".into(),
        path: path.clone(),
        dtype: std::env::var("MEDBOX_BENCH_DTYPE").ok().map(|dtype| {
            dtype
                .parse()
                .expect("MEDBOX_BENCH_DTYPE is f32, bf16 or f16")
        }),
        device: Device::Cpu,
        max_waiting: 1,
    })
    .expect("bench model loads");
    let elapsed = started.elapsed();
    let after = status_kib("VmHWM:");
    let resident = status_kib("VmRSS:");
    eprintln!(
        "{}: weights {:.0} MiB; VmHWM {:.0} MiB before, {:.0} MiB after load (+{:.0} MiB); \
         VmRSS {:.0} MiB; load {:.2} s",
        path.display(),
        weights_bytes as f64 / 1048576.0,
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0,
        resident as f64 / 1024.0,
        elapsed.as_secs_f64()
    );
    engine.shutdown();
}
