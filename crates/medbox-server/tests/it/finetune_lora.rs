//! Acceptance of fine-tuning with the REAL `medbox-trainer`: a synthetic
//! medical task (lab value → flag and phrase, `medbox_finetune::synthetic`)
//! uploaded through gRPC, a LoRA job on the tiny model watched to success,
//! the registered adapter loaded by name, and greedy exact match on
//! held-out examples through `Inference.Chat`, before and after.
//!
//! The base is the tiny model made by the same script with 1,500 training
//! steps instead of 200 (`tiny-pretrained`, made once and cached like the
//! tiny model). The 200-step model is close to a bigram model: its attention
//! carries almost nothing, and low-rank adapters on frozen weights do not
//! build attention circuits within this test's budget (measured: the eval
//! loss stops at 0.39, the floor of a predictor that sees only the current
//! token, with medbox-trainer and with a transformers reference alike),
//! whereas full fine-tuning of the same model learns the task. On the
//! 1,500-step model LoRA learns it in a few dozen steps.
//!
//! The trainer is the binary `cargo build --release -p medbox-finetune`
//! (and `cargo test --workspace`, and `scripts/setup.sh`) puts beside this
//! test's own executable's folder (`target/release/medbox-trainer`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use medbox_finetune::synthetic::{LabExample, lab_flag_examples, to_messages_jsonl};
use medbox_proto::v1::{self as pb, fine_tuning_client::FineTuningClient};

use crate::{Authed, Bearer, TestServer, start_with};

fn trainer_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/it-… → target/release/medbox-trainer
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("medbox-trainer");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release -p medbox-finetune`",
        path.display()
    );
    path
}

/// The tiny model with more pre-training (see the module comment).
fn pretrained_tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let cache = std::env::var_os("MEDBOX_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("medbox-test-cache"));
        let out = cache.join("models/tiny-pretrained");
        let status = Command::new("python3")
            .arg(root.join("scripts/make-tiny-model"))
            .arg(&out)
            .args(["--train-steps", "1500"])
            .status()
            .expect("python3 runs scripts/make-tiny-model (source scripts/env.sh)");
        assert!(status.success(), "scripts/make-tiny-model failed");
        out
    })
}

fn fine_tuning(test: &TestServer) -> FineTuningClient<Authed> {
    FineTuningClient::with_interceptor(test.channel.clone(), Bearer::new(Some(&test.admin_key)))
}

/// Share of `examples` whose greedy answer from `model` is exactly right.
async fn exact_match(test: &TestServer, model: &str, examples: &[LabExample]) -> f64 {
    let mut right = 0;
    for example in examples {
        let answer = test
            .inference()
            .chat(pb::ChatRequest {
                model: model.into(),
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: example.prompt.clone(),
                }],
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(12),
                    temperature: Some(0.0),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if answer.text.trim() == example.answer {
            right += 1;
        }
    }
    right as f64 / examples.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_job_teaches_the_tiny_model_a_lab_task_it_then_serves() {
    let trainer = trainer_binary();
    let section = format!(
        "[finetune]\ntrainer_path = \"{}\"\ncheckpoint_every = 20\ncancel_grace_seconds = 5\n",
        trainer.display()
    );
    let base = format!(
        "[[models]]\nname = \"tiny-pretrained\"\npath = \"{}\"\n",
        pretrained_tiny_model().display()
    );
    let test = start_with(&base, &section).await;
    let train = lab_flag_examples(2024, 240);
    let held_out: Vec<LabExample> = lab_flag_examples(7, 200)
        .into_iter()
        .filter(|example| train.iter().all(|seen| seen.prompt != example.prompt))
        .take(40)
        .collect();
    assert!(held_out.len() >= 20, "{} held-out examples", held_out.len());

    let body = to_messages_jsonl(&train).into_bytes();
    let mut messages = vec![pb::UploadDatasetRequest {
        part: Some(pb::upload_dataset_request::Part::Header(
            pb::DatasetHeader {
                name: "lab-flags".into(),
                format: "messages".into(),
                eval_percent: 10,
                split_seed: Some(1),
            },
        )),
    }];
    messages.extend(
        body.chunks(64 * 1024)
            .map(|piece| pb::UploadDatasetRequest {
                part: Some(pb::upload_dataset_request::Part::Chunk(piece.to_vec())),
            }),
    );
    let dataset = fine_tuning(&test)
        .upload_dataset(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner()
        .dataset
        .unwrap();
    assert_eq!(dataset.state, "accepted", "{dataset:?}");

    let before = exact_match(&test, "tiny-pretrained", &held_out).await;

    let job = fine_tuning(&test)
        .create_job(pb::CreateJobRequest {
            base_model: "tiny-pretrained".into(),
            dataset: "lab-flags".into(),
            method: "lora".into(),
            teacher_model: String::new(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(LORA_EPOCHS),
                learning_rate: Some(LORA_LEARNING_RATE),
                batch_size: Some(16),
                max_seq_len: Some(64),
                eval_every: Some(20),
                ..Default::default()
            }),
            output_name: "tiny-lab".into(),
            seed: Some(42),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut stream = fine_tuning(&test)
        .watch_job(pb::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let watch = async {
        while let Some(event) = stream.message().await.unwrap() {
            events.push(event);
        }
    };
    tokio::time::timeout(Duration::from_secs(600), watch)
        .await
        .expect("the job ends within 10 minutes");
    let Some(pb::job_event::Event::State(last)) = &events.last().unwrap().event else {
        panic!("the watch ends with the final state: {events:?}");
    };
    assert_eq!(last.state, "succeeded", "{last:?}");
    let eval_losses: Vec<f64> = events
        .iter()
        .filter_map(|event| match &event.event {
            Some(pb::job_event::Event::Eval(eval)) => Some(eval.eval_loss),
            _ => None,
        })
        .collect();
    assert!(eval_losses.len() >= 2, "{eval_losses:?}");
    assert!(
        eval_losses.last() < eval_losses.first(),
        "the eval loss falls: {eval_losses:?}"
    );

    // The registered adapter loads by name alone and serves at once.
    let loaded = test
        .admin()
        .load_model(pb::LoadModelRequest {
            name: "tiny-lab".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(loaded.name, "tiny-lab");
    // Its base is served, so the adapter runs on the base's engine.
    assert_eq!(loaded.base_model, "tiny-pretrained");
    test.wait_until_loaded().await;
    // Both at once: the engine batches the base's and the adapter's
    // requests together, each with its own weights.
    let (after, base_again) = tokio::join!(
        exact_match(&test, "tiny-lab", &held_out),
        exact_match(&test, "tiny-pretrained", &held_out)
    );
    eprintln!(
        "lab task exact match on {} held-out examples: base {before:.3}, adapter {after:.3} \
         (base again, beside the adapter: {base_again:.3}); eval loss {eval_losses:?}",
        held_out.len()
    );
    assert_eq!(base_again, before, "the base model answers as before");
    // The base cannot go while the adapter runs on it.
    let refused = test
        .admin()
        .unload_model(pb::UnloadModelRequest {
            name: "tiny-pretrained".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("`tiny-lab`"),
        "{}",
        refused.message()
    );
    assert!(
        before <= 0.1,
        "the base model does not know the task: {before}"
    );
    assert!(after >= 0.9, "the adapter answers ≥ 90% exactly: {after}");
}

/// Chosen so that the tiny model learns the task within the test's budget.
const LORA_EPOCHS: u32 = 4;
const LORA_LEARNING_RATE: f64 = 3e-3;
