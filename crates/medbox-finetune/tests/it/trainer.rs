use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use medbox_finetune::hyperparameters::{Hyperparameters, Method};
use medbox_finetune::protocol::{DatasetRef, JobSpec, ModelRef, PROTOCOL_VERSION, TrainerEvent};
use medbox_finetune::synthetic::{lab_flag_examples, to_messages_jsonl};

/// The tiny model folder, made once by the project's script (idempotent).
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let cache = std::env::var_os("MEDBOX_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("medbox-test-cache"));
        let out = cache.join("models/tiny");
        let status = Command::new("python3")
            .arg(root.join("scripts/make-tiny-model"))
            .arg(&out)
            .status()
            .expect("python3 runs scripts/make-tiny-model (source scripts/env.sh)");
        assert!(status.success(), "scripts/make-tiny-model failed");
        out
    })
}

/// A job folder with `job.json` and a small synthetic dataset: 48 train
/// examples in batches of 8 for 2 epochs = 12 optimizer steps.
fn job_folder(parent: &Path, name: &str, method: Method) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let examples = lab_flag_examples(11, 56);
    let (train, eval) = examples.split_at(48);
    std::fs::write(dir.join("train.jsonl"), to_messages_jsonl(train)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), to_messages_jsonl(eval)).unwrap();
    let mut hyperparameters = Hyperparameters::defaults(method);
    hyperparameters.epochs = 2;
    hyperparameters.batch_size = 8;
    hyperparameters.max_seq_len = 64;
    hyperparameters.learning_rate = 3e-3;
    hyperparameters.warmup_ratio = 0.1;
    hyperparameters.eval_every = 4;
    let spec = JobSpec {
        protocol_version: PROTOCOL_VERSION,
        job_id: format!("job_{name}"),
        method,
        base_model: ModelRef {
            name: "tiny".into(),
            path: tiny_model().to_path_buf(),
        },
        teacher_model: None,
        dataset: DatasetRef {
            id: "ds_test".into(),
            name: "lab-flags".into(),
            sha256: "0".repeat(64),
            format: "messages".into(),
            train_file: dir.join("train.jsonl"),
            eval_file: dir.join("eval.jsonl"),
            train_examples: 48,
            eval_examples: 8,
        },
        hyperparameters,
        seed: 42,
        checkpoint_every: 4,
        device: "cpu".into(),
        checkpoints_dir: dir.join("checkpoints"),
        output_dir: dir.join("output"),
        output_name: "lab".into(),
    };
    std::fs::write(JobSpec::path_in(&dir), spec.to_json()).unwrap();
    dir
}

fn start(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("trainer.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_medbox-trainer"))
        .arg("--job-dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("medbox-trainer starts")
}

/// Reads events until the stream ends or `until` says stop; then the child
/// is left running, its further lines drained (its stdout stays open).
fn read_events(child: &mut Child, until: impl Fn(&TrainerEvent) -> bool) -> Vec<TrainerEvent> {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut events = Vec::new();
    for line in lines.by_ref() {
        let event =
            TrainerEvent::parse_line(&line.unwrap()).expect("only protocol lines on stdout");
        let done = until(&event);
        events.push(event);
        if done {
            std::thread::spawn(move || lines.for_each(drop));
            break;
        }
    }
    events
}

fn run_to_end(dir: &Path) -> (Vec<TrainerEvent>, std::process::ExitStatus) {
    let mut child = start(dir);
    let events = read_events(&mut child, |_| false);
    (events, child.wait().unwrap())
}

fn losses(events: &[TrainerEvent]) -> BTreeMap<u64, f64> {
    events
        .iter()
        .filter_map(|event| match event {
            TrainerEvent::Progress { step, loss, .. } => Some((*step, *loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn lora_job_writes_a_peft_adapter_and_resumes_after_sigkill_with_the_same_losses() {
    let parent = tempfile::tempdir().unwrap();
    // Uninterrupted.
    let whole = job_folder(parent.path(), "whole", Method::Lora);
    let (events, status) = run_to_end(&whole);
    assert!(status.success(), "{status}: {}", log_of(&whole));
    assert_eq!(
        events[0],
        TrainerEvent::Started {
            total_steps: 12,
            resumed_from_step: 0
        }
    );
    let reference = losses(&events);
    assert_eq!(
        reference.keys().copied().collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    let evals: Vec<f64> = events
        .iter()
        .filter_map(|event| match event {
            TrainerEvent::Eval { eval_loss, .. } => Some(*eval_loss),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 3, "{events:?}");
    assert!(evals[2] < evals[0], "the eval loss falls: {evals:?}");
    let checkpoints: Vec<u64> = events
        .iter()
        .filter_map(|event| match event {
            TrainerEvent::Checkpoint { step, path } => {
                assert_eq!(path, &format!("checkpoints/step-{step}"));
                Some(*step)
            }
            _ => None,
        })
        .collect();
    assert_eq!(checkpoints, [4, 8, 12]);
    let Some(TrainerEvent::Succeeded {
        output_dir,
        metrics,
    }) = events.last()
    else {
        panic!("last event is succeeded: {events:?}");
    };
    assert_eq!(Path::new(output_dir), whole.join("output"));
    assert_eq!(metrics["steps"], 12.0);
    assert_eq!(metrics["eval_loss"], evals[2]);
    // PEFT's folder: its config and tensor names.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("output/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 16);
    assert_eq!(config["lora_alpha"], 32.0);
    assert_eq!(
        config["base_model_name_or_path"],
        std::fs::canonicalize(tiny_model())
            .unwrap()
            .display()
            .to_string()
    );
    let tensors =
        tch::Tensor::read_safetensors(whole.join("output/adapter_model.safetensors")).unwrap();
    assert_eq!(tensors.len(), 4 * 7 * 2);
    let names: Vec<&str> = tensors.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{names:?}"
    );
    let (_, a) = tensors
        .iter()
        .find(|(name, _)| name.ends_with("layers.3.mlp.down_proj.lora_B.weight"))
        .unwrap();
    assert_eq!(a.size(), [128, 16]);
    // Only the newest two checkpoints are kept.
    let kept: Vec<String> = std::fs::read_dir(whole.join("checkpoints"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");

    // SIGKILL right after the step-8 checkpoint, then start again.
    let killed = job_folder(parent.path(), "killed", Method::Lora);
    let mut child = start(&killed);
    let before = read_events(&mut child, |event| {
        matches!(event, TrainerEvent::Checkpoint { step: 8, .. })
    });
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    let (after, status) = run_to_end(&killed);
    assert!(status.success(), "{status}: {}", log_of(&killed));
    assert_eq!(
        after[0],
        TrainerEvent::Started {
            total_steps: 12,
            resumed_from_step: 8
        }
    );
    let mut resumed = losses(&before);
    let second = losses(&after);
    assert_eq!(second.keys().copied().collect::<Vec<_>>(), [9, 10, 11, 12]);
    resumed.extend(second);
    assert_eq!(
        resumed, reference,
        "a resumed job repeats the uninterrupted loss curve"
    );
    assert!(killed.join("output/adapter_model.safetensors").is_file());
}

#[test]
fn full_job_writes_a_model_folder_and_sigterm_stops_it_without_output() {
    let parent = tempfile::tempdir().unwrap();
    let dir = job_folder(parent.path(), "full", Method::Full);
    let (events, status) = run_to_end(&dir);
    assert!(status.success(), "{status}: {}", log_of(&dir));
    let reference = losses(&events);
    assert!(reference[&12] < reference[&1], "{reference:?}");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join("output").join(file).is_file(), "{file}");
    }

    let cancelled = job_folder(parent.path(), "cancelled", Method::Full);
    let mut child = start(&cancelled);
    let _first = read_events(&mut child, |event| {
        matches!(event, TrainerEvent::Progress { .. })
    });
    let asked = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status.code(), Some(143));
    assert!(!cancelled.join("output").exists());
}

#[test]
fn a_spec_of_another_protocol_version_is_refused_with_a_reason() {
    let parent = tempfile::tempdir().unwrap();
    let dir = job_folder(parent.path(), "future", Method::Lora);
    let spec = std::fs::read_to_string(dir.join("job.json")).unwrap();
    let newer = spec.replace("\"protocol_version\": 1", "\"protocol_version\": 2");
    assert_ne!(spec, newer);
    std::fs::write(dir.join("job.json"), newer).unwrap();
    let (events, status) = run_to_end(&dir);
    assert!(!status.success());
    assert_eq!(
        events,
        [TrainerEvent::Failed {
            reason: "job.json is protocol version 2; this program speaks version 1".into()
        }]
    );
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("trainer.log")).unwrap_or_default()
}

/// A copy of the tiny model whose tokenizer numbers two tokens the other
/// way round: the same network behind a different vocabulary, so
/// distillation from it has to work on its answers rather than its logits.
fn tiny_with_another_tokenizer(parent: &Path) -> PathBuf {
    let dir = parent.join("tiny-other-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let path = dir.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let mut by_id: Vec<(u64, String)> = vocab
        .iter()
        .map(|(token, id)| (id.as_u64().unwrap(), token.clone()))
        .collect();
    by_id.sort();
    let (first_id, first) = by_id[by_id.len() - 1].clone();
    let (second_id, second) = by_id[by_id.len() - 2].clone();
    vocab.insert(first, second_id.into());
    vocab.insert(second, first_id.into());
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    dir
}

/// `job_folder` for method distill with `teacher`, one epoch (6 steps).
fn distill_folder(parent: &Path, name: &str, teacher: &Path) -> PathBuf {
    let dir = job_folder(parent, name, Method::Distill);
    let mut spec =
        JobSpec::from_json(&std::fs::read_to_string(JobSpec::path_in(&dir)).unwrap()).unwrap();
    spec.teacher_model = Some(ModelRef {
        name: "teacher".into(),
        path: teacher.to_path_buf(),
    });
    spec.hyperparameters.epochs = 1;
    std::fs::write(JobSpec::path_in(&dir), spec.to_json()).unwrap();
    dir
}

#[test]
fn distillation_learns_from_the_teachers_logits_or_from_its_answers() {
    let parent = tempfile::tempdir().unwrap();

    // Same vocabulary: token level. The teacher is the tiny model itself,
    // so the KL term starts at zero and the first loss is (1-r)·CE of a
    // full job's first step (r = 0.5 by default).
    let token_level = distill_folder(parent.path(), "token-level", tiny_model());
    let (events, status) = run_to_end(&token_level);
    assert!(status.success(), "{status}: {}", log_of(&token_level));
    assert!(log_of(&token_level).contains("distilling token by token"));
    let distilled = losses(&events);
    assert_eq!(distilled.len(), 6);
    let full = job_folder(parent.path(), "full-reference", Method::Full);
    let mut child = start(&full);
    let first = read_events(&mut child, |event| {
        matches!(event, TrainerEvent::Progress { .. })
    });
    child.kill().unwrap();
    let _ = child.wait();
    let full_first = losses(&first)[&1];
    assert!(
        (distilled[&1] - 0.5 * full_first).abs() <= 1e-4 * full_first,
        "first distilled loss {} vs half the cross-entropy {}",
        distilled[&1],
        full_first
    );
    assert!(token_level.join("output/model.safetensors").is_file());

    // Another vocabulary: sequence level, on the teacher's greedy answers,
    // saved in the job folder and reused when the job starts again.
    let teacher = tiny_with_another_tokenizer(parent.path());
    let sequence_level = distill_folder(parent.path(), "sequence-level", &teacher);
    let (events, status) = run_to_end(&sequence_level);
    assert!(status.success(), "{status}: {}", log_of(&sequence_level));
    assert!(log_of(&sequence_level).contains("distilling at the sequence level"));
    assert_eq!(losses(&events).len(), 6);
    let answers = std::fs::read_to_string(sequence_level.join("teacher-answers.jsonl")).unwrap();
    let reference = std::fs::read_to_string(sequence_level.join("train.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 48);
    let changed = answers
        .lines()
        .zip(reference.lines())
        .filter(|(answered, original)| answered != original)
        .count();
    assert!(
        changed >= 40,
        "{changed} of 48 examples carry the teacher's answer"
    );
    for line in answers.lines() {
        let example: serde_json::Value = serde_json::from_str(line).unwrap();
        let roles: Vec<&str> = example["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|message| message["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles.last(), Some(&"assistant"), "{roles:?}");
    }
    std::fs::remove_dir_all(sequence_level.join("checkpoints")).unwrap();
    let (again, status) = run_to_end(&sequence_level);
    assert!(status.success(), "{status}: {}", log_of(&sequence_level));
    assert!(log_of(&sequence_level).contains("teacher answers read from the job folder"));
    assert_eq!(
        losses(&again),
        losses(&events),
        "the same answers train the same way"
    );
}
