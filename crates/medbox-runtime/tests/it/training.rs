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
