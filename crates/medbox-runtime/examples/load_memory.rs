//! Peak resident memory and time of loading one model folder:
//!
//!     cargo run --release -p medbox-runtime --example load_memory -- MODEL_DIR [f32|bf16|f16]
//!
//! Prints the weights' size on disk, the peak resident memory (VmHWM) before
//! and after the load, and the load time, so that "memory at load stays near
//! the size of the weights" can be checked on any model.

use std::time::Instant;

use medbox_runtime::{Device, Engine, EngineConfig};

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path: std::path::PathBuf = args
        .next()
        .ok_or("usage: load_memory MODEL_DIR [f32|bf16|f16]")?
        .into();
    let dtype = args.next().map(|text| text.parse()).transpose()?;
    let weights_bytes: u64 = std::fs::read_dir(&path)?
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();
    // Start libtorch before measuring, so its own start-up is not counted.
    let _warm = tch::Tensor::from_slice(&[1.0f32]).sum(tch::Kind::Float);
    let before = status_kib("VmHWM:");
    let started = Instant::now();
    let engine = Engine::start(EngineConfig {
        name: "measured".into(),
        path: path.clone(),
        dtype,
        device: Device::Cpu,
        max_waiting: 1,
        batching: Default::default(),
    })?;
    let elapsed = started.elapsed();
    let after = status_kib("VmHWM:");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{}: weights {:.0} MiB on disk; peak resident {:.0} MiB before, {:.0} MiB after load \
         (+{:.0} MiB, {:.2}x the weights); resident now {:.0} MiB; load {:.2} s",
        path.display(),
        weights_bytes as f64 / 1_048_576.0,
        mib(before),
        mib(after),
        mib(after - before),
        (after - before) as f64 * 1024.0 / weights_bytes.max(1) as f64,
        mib(status_kib("VmRSS:")),
        elapsed.as_secs_f64()
    );
    engine.shutdown();
    Ok(())
}
