//! The distillation loss on the tiny models: a teacher identical to the
//! student adds nothing (the loss is `(1-r)·CE`), another teacher adds a
//! positive KL term that trains the student, and vocabularies are compared
//! by what the tokenizers map, not by file.

use medbox_runtime::train::{
    DistillMix, EncodedExample, IGNORED_LABEL, Trainable, TrainableModel, TrainingOptions,
};
use medbox_runtime::{DType, Device};

use crate::{make_model, tiny_model};

fn load(path: &std::path::Path, trainable: Trainable) -> TrainableModel {
    TrainableModel::load(
        path,
        &TrainingOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable,
        },
    )
    .expect("the tiny model loads for training")
}

/// Two examples of different lengths, loss on the later tokens only.
fn examples(model: &TrainableModel) -> Vec<EncodedExample> {
    [
        "The patient reports chest pain after exercise.",
        "Potassium is 5.9 mmol/L: high.",
    ]
    .iter()
    .map(|text| {
        let mut example = model.encode_text(text, 64).unwrap();
        for label in example.labels.iter_mut().take(3) {
            *label = IGNORED_LABEL;
        }
        example
    })
    .collect()
}

fn value(tensor: &tch::Tensor) -> f64 {
    tensor.double_value(&[])
}

#[test]
fn a_teacher_identical_to_the_student_leaves_only_the_weighted_cross_entropy() {
    let student = load(tiny_model(), Trainable::Full);
    let teacher = load(tiny_model(), Trainable::Frozen);
    assert!(
        teacher.parameters().is_empty(),
        "a frozen teacher trains nothing"
    );
    assert!(student.shares_vocabulary_with(&teacher));
    let examples = examples(&student);
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    let (cross_entropy, targets) = student.loss_sum(&refs, false).unwrap();
    let mix = DistillMix {
        ratio: 0.3,
        temperature: 2.0,
    };
    let (distilled, distill_targets) = student
        .distill_loss_sum(&teacher, &refs, mix, false)
        .unwrap();
    assert_eq!(targets, distill_targets);
    let expected = 0.7 * value(&cross_entropy);
    assert!(
        (value(&distilled) - expected).abs() <= 1e-4 * expected,
        "{} vs (1-r)·CE = {expected}",
        value(&distilled)
    );
}

#[test]
fn another_teacher_adds_a_positive_kl_term_with_gradients() {
    let student = load(tiny_model(), Trainable::Full);
    let teacher_path = make_model(
        "tiny-qwen2-random",
        &["--arch", "qwen2", "--train-steps", "0", "--init-std", "0.1"],
    );
    let teacher = load(&teacher_path, Trainable::Frozen);
    assert!(
        student.shares_vocabulary_with(&teacher),
        "the tiny models share their tokenizer"
    );
    let examples = examples(&student);
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    let only_kl = DistillMix {
        ratio: 1.0,
        temperature: 1.0,
    };
    let (kl, _) = student
        .distill_loss_sum(&teacher, &refs, only_kl, true)
        .unwrap();
    assert!(value(&kl) > 0.1, "KL(teacher‖student) = {}", value(&kl));
    kl.backward();
    let with_gradient = student
        .parameters()
        .iter()
        .filter(|(_, weight)| weight.grad().defined())
        .count();
    assert_eq!(
        with_gradient,
        student.parameters().len(),
        "every student weight learns"
    );
}

#[derive(serde::Deserialize)]
struct PeftReference {
    prompt_ids: Vec<u32>,
    made: Vec<Vec<f32>>,
    read: Vec<Vec<f32>>,
}

/// Adapters cross the PEFT boundary both ways with the same logits: one
/// made by peft (every weight random) is served by medbox as peft computes
/// it, and one medbox trains and writes is read by peft as medbox serves it.
#[test]
fn lora_adapters_give_peft_logits_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(tiny_model()).unwrap();
    // medbox's adapter: fresh A, and B drawn at random too (a fresh B is
    // zero, which would compare nothing).
    let written = crate::adapters::random_adapter(dir.path(), 7, &["all-linear"]);

    let made = dir.path().join("peft-made");
    let output = std::process::Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .arg("peft")
        .args([&base, &made, &written])
        .arg("Potassium 5.9 mmol/L: the flag is high. 血钾偏高。")
        .output()
        .expect("python3 runs (source scripts/env.sh)");
    assert!(
        output.status.success(),
        "reference.py peft failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reference: PeftReference = serde_json::from_slice(&output.stdout).unwrap();
    let ids = &reference.prompt_ids;
    let served = |adapter: &std::path::Path| {
        medbox_runtime::debug::prompt_logits(adapter, DType::F32, Device::Cpu, ids, ids.len())
            .unwrap()
    };
    let plain = served(&base);
    let from_peft = served(&made);
    let from_medbox = served(&written);
    // The adapters change the logits by far more than the tolerance ...
    assert!(crate::max_difference(&plain, &reference.made) > 0.1);
    assert!(crate::max_difference(&plain, &reference.read) > 0.01);
    // ... and both sides agree on them.
    let made_gap = crate::max_difference(&from_peft, &reference.made);
    let read_gap = crate::max_difference(&from_medbox, &reference.read);
    eprintln!("peft-made adapter: max |Δlogit| {made_gap:.2e}; medbox-made: {read_gap:.2e}");
    assert!(
        made_gap <= 1e-4,
        "peft's adapter served by medbox: {made_gap}"
    );
    assert!(
        read_gap <= 1e-4,
        "medbox's adapter read by peft: {read_gap}"
    );
}
