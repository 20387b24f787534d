//! Several LoRA adapters served on one base engine: an attached adapter
//! computes what the same adapter merged into the weights computes; one
//! batch mixes the base model and two adapters, each request getting the
//! tokens it gets alone; cached prefixes are never shared across adapters;
//! an adapter of another model is refused, and a detached one stops while
//! the base goes on.

use std::path::{Path, PathBuf};
use std::thread;

use medbox_runtime::train::{Trainable, TrainableModel, TrainingOptions};
use medbox_runtime::{
    BatchingConfig, DType, Device, Engine, EngineConfig, EngineError, GenerateRequest,
    GenerationEvent, GenerationStream, SamplingParams, debug,
};

use crate::{Outcome, collect, greedy, max_difference, submit, tiny_model};

/// A LoRA adapter of the tiny model with every weight random (a fresh `B`
/// is zero and would change nothing), written in PEFT's format.
pub(crate) fn random_adapter(dir: &Path, seed: i64, targets: &[&str]) -> PathBuf {
    let base = std::fs::canonicalize(tiny_model()).unwrap();
    tch::manual_seed(seed);
    let settings = medbox_runtime::lora::LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|target| target.to_string()).collect(),
    };
    let model = TrainableModel::load(
        &base,
        &TrainingOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::Lora(settings),
        },
    )
    .expect("the tiny model loads for training");
    {
        let _no_grad = tch::no_grad_guard();
        for (name, tensor) in model.parameters() {
            if name.ends_with("lora_B") {
                let random =
                    tch::Tensor::randn(tensor.size(), (tch::Kind::Float, tch::Device::Cpu)) * 0.05;
                tensor.shallow_clone().copy_(&random);
            }
        }
    }
    let folder = dir.join(format!("adapter-{seed}"));
    std::fs::create_dir_all(&folder).unwrap();
    model.save_adapter(&folder).unwrap();
    folder
}

fn start_base() -> Engine {
    Engine::start(EngineConfig {
        name: "tiny".into(),
        path: tiny_model().to_path_buf(),
        dtype: Some(DType::F32),
        device: Device::Cpu,
        max_waiting: 64,
        batching: BatchingConfig::default(),
    })
    .expect("tiny model loads")
}

#[test]
fn an_attached_adapter_computes_what_the_merged_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = random_adapter(dir.path(), 11, &["all-linear"]);
    let base = tiny_model();
    let ids: Vec<u32> = (3..40).collect();
    let plain = debug::prompt_logits(base, DType::F32, Device::Cpu, &ids, ids.len()).unwrap();
    let merged = debug::prompt_logits(&adapter, DType::F32, Device::Cpu, &ids, ids.len()).unwrap();
    assert!(
        max_difference(&plain, &merged) > 0.05,
        "the adapter changes the logits"
    );
    // One prefill, and token by token through the decode path.
    for chunk in [ids.len(), 1] {
        let attached =
            debug::attached_adapter_logits(base, &adapter, DType::F32, Device::Cpu, &ids, chunk)
                .unwrap();
        let gap = max_difference(&attached, &merged);
        eprintln!("chunk {chunk}: attached against merged, max |Δlogit| {gap:.2e}");
        assert!(gap <= 1e-4, "chunk {chunk}: {gap}");
    }
}

#[test]
fn one_batch_serves_the_base_model_and_two_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_base();
    let first = engine
        .attach_adapter("tiny-lab", &random_adapter(dir.path(), 21, &["all-linear"]))
        .expect("the adapter attaches");
    let second = engine
        .attach_adapter(
            "tiny-notes",
            &random_adapter(dir.path(), 22, &["q_proj", "v_proj", "down_proj"]),
        )
        .expect("the adapter attaches");
    assert_eq!(first.info().name, "tiny-lab");
    assert_eq!(first.base_name(), "tiny");
    assert_eq!(engine.info().name, "tiny");

    let handles = [&engine, &first, &second];
    let prompts = [
        "Lab report: potassium 5.9 mmol/L, creatinine",
        "Follow-up: repeat the full blood count",
        "Plan:",
        "出院小结：患者因胸痛入院，",
    ];
    let work: Vec<(usize, &str, SamplingParams)> = (0..12)
        .map(|index| {
            let sampling = if index % 2 == 0 {
                greedy(10 + index as u32)
            } else {
                SamplingParams {
                    max_tokens: Some(12),
                    temperature: Some(0.8),
                    seed: Some(index as u64),
                    ignore_eos: true,
                    ..SamplingParams::default()
                }
            };
            (index % 3, prompts[index % prompts.len()], sampling)
        })
        .collect();
    let alone: Vec<Outcome> = work
        .iter()
        .map(|(model, prompt, sampling)| collect(submit(handles[*model], prompt, sampling.clone())))
        .collect();
    let steps_before = engine.load().steps;
    let streams: Vec<GenerationStream> = work
        .iter()
        .map(|(model, prompt, sampling)| submit(handles[*model], prompt, sampling.clone()))
        .collect();
    let together: Vec<Outcome> = streams
        .into_iter()
        .map(|stream| thread::spawn(move || collect(stream)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|handle| handle.join().expect("collector thread"))
        .collect();
    let steps = engine.load().steps - steps_before;
    let longest = work
        .iter()
        .map(|(_, _, sampling)| sampling.max_tokens.unwrap_or(0) as u64)
        .max()
        .unwrap();
    // All twelve ran in shared batches: far fewer steps than one by one.
    assert!(steps < 2 * longest, "{steps} steps for 12 requests");
    for (index, (alone, together)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(alone.token_ids, together.token_ids, "request {index}");
    }
    // The same greedy prompt gives other tokens under each adapter.
    let answers: Vec<Vec<u32>> = handles
        .iter()
        .map(|handle| collect(submit(handle, prompts[0], greedy(12))).token_ids)
        .collect();
    assert_ne!(
        answers[0], answers[1],
        "the first adapter changes the answer"
    );
    assert_ne!(
        answers[0], answers[2],
        "the second adapter changes the answer"
    );
    assert_ne!(answers[1], answers[2]);
}

#[test]
fn cached_prefixes_are_reused_within_an_adapter_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_base();
    let adapted = engine
        .attach_adapter("tiny-lab", &random_adapter(dir.path(), 31, &["all-linear"]))
        .unwrap();
    let prompt = "System: you are a careful clinical assistant. Answer briefly. ".repeat(3);
    let expected = collect(submit(&adapted, &prompt, greedy(8)));
    let reused = |engine: &Engine| engine.load().reused_tokens;
    let before = reused(&engine);
    let base = collect(submit(&engine, &prompt, greedy(8)));
    assert_eq!(
        reused(&engine),
        before,
        "the base model reuses none of the adapter's blocks"
    );
    assert_ne!(base.token_ids, expected.token_ids);
    let again = collect(submit(&adapted, &prompt, greedy(8)));
    assert!(
        reused(&engine) > before,
        "the adapter reuses its own blocks"
    );
    assert_eq!(again.token_ids, expected.token_ids);
}

#[test]
fn a_foreign_adapter_is_refused_and_a_detached_one_stops_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_base();
    // An adapter whose base is another model folder (its config is all
    // the check reads).
    let other = dir.path().join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(tiny_model().join("config.json"), other.join("config.json")).unwrap();
    let adapter = random_adapter(dir.path(), 41, &["all-linear"]);
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter.join(file), foreign.join(file)).unwrap();
    }
    let config_path = foreign.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["base_model_name_or_path"] = other.display().to_string().into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let error = engine.attach_adapter("foreign", &foreign).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("adapter_config.json") && message.contains("serves"),
        "{message}"
    );

    let adapted = engine.attach_adapter("tiny-lab", &adapter).unwrap();
    let kept = adapted.clone();
    let running = submit(&adapted, "Plan:", greedy(24));
    adapted.shutdown();
    // What was submitted before the detach finishes ...
    assert_eq!(collect(running).token_ids.len(), 24);
    // ... and nothing more is served under the adapter's name.
    let request = kept
        .validate(GenerateRequest {
            prompt: "Plan:".into(),
            sampling: greedy(4),
            constraint: None,
        })
        .unwrap();
    let mut stream = kept.submit(request).unwrap();
    match stream.blocking_next() {
        Some(GenerationEvent::Failed(EngineError::Stopped { model })) => {
            assert_eq!(model, "tiny-lab")
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert_eq!(
        collect(submit(&engine, "Plan:", greedy(4))).token_ids.len(),
        4
    );
}
