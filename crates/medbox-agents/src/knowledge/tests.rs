use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::test_support::{HashingEmbedder, block_on};

fn markdown(title: &str, text: &str) -> NewDocument {
    NewDocument {
        title: title.to_owned(),
        source: "test.md".to_owned(),
        text: text.to_owned(),
        format: DocumentFormat::Markdown,
    }
}

fn check_sections(text: &str, expect_title: &str, expect: &[(&str, &str)]) {
    let parsed = parse_document(&markdown("", text)).unwrap();
    assert_eq!(parsed.title, expect_title, "title of {text:?}");
    let actual: Vec<(String, String)> = parsed
        .sections
        .iter()
        .map(|section| (section.path(), section.text.clone()))
        .collect();
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(path, text)| (path.to_string(), text.to_string()))
        .collect();
    assert_eq!(actual, expect, "sections of {text:?}");
}

#[test]
fn markdown_sections_follow_headings() {
    check_sections(
        "# Hypertension\nIntro line.\n## Diagnosis\nMeasure twice.\n### Home readings\nUse a cuff.\n## Treatment\nStart low.\n",
        "Hypertension",
        &[
            ("", "Intro line."),
            ("Diagnosis", "Measure twice."),
            ("Diagnosis > Home readings", "Use a cuff."),
            ("Treatment", "Start low."),
        ],
    );
    // Two level-1 headings: no title heading, both stay in the paths.
    check_sections(
        "# Part A\ntext a\n# Part B\n## Sub\ntext b",
        "test.md",
        &[("Part A", "text a"), ("Part B > Sub", "text b")],
    );
    // `#` inside fenced code, `#tag` without a space, and empty sections.
    check_sections(
        "# 糖尿病指南\n## 诊断\n```\n# not a heading\n```\n#hashtag stays text\n## 空\n## 治疗 ##\n二甲双胍。",
        "糖尿病指南",
        &[
            ("诊断", "```\n# not a heading\n```\n#hashtag stays text"),
            ("治疗", "二甲双胍。"),
        ],
    );
}

#[test]
fn titles_come_from_the_request_the_heading_or_the_source() {
    let given = parse_document(&markdown("Given", "# Heading\ntext")).unwrap();
    assert_eq!(given.title, "Given");
    let mut untitled = markdown("", "no heading at all");
    untitled.source = String::new();
    assert_eq!(parse_document(&untitled), Err(KnowledgeError::MissingTitle));
    assert_eq!(
        parse_document(&markdown("T", "# Only\n## Headings\n")),
        Err(KnowledgeError::EmptyDocument)
    );
    let text = NewDocument {
        format: DocumentFormat::Text,
        ..markdown("Plain", "## not parsed\nbody")
    };
    let parsed = parse_document(&text).unwrap();
    assert_eq!(parsed.sections.len(), 1);
    assert_eq!(parsed.sections[0].path(), "");
    assert_eq!(parsed.sections[0].text, "## not parsed\nbody");
    assert_eq!(DocumentFormat::parse("MD"), Some(DocumentFormat::Markdown));
    assert_eq!(DocumentFormat::parse("txt"), Some(DocumentFormat::Text));
    assert_eq!(DocumentFormat::parse("pdf"), None);
}

#[test]
fn token_estimates() {
    for (text, expect) in [
        ("", 0),
        ("the", 1),
        ("hypertension", 3),
        ("Blood pressure 140/90.", 2 + 2 + 1 + 1 + 1 + 1),
        ("高血压", 3),
        ("高血压 BP", 4),
    ] {
        assert_eq!(estimate_tokens(text), expect, "{text:?}");
    }
}

fn chunks_of(text: &str, chunk_tokens: usize, overlap_tokens: usize) -> Vec<ChunkDraft> {
    let parsed = parse_document(&markdown("T", text)).unwrap();
    chunk_document(
        &parsed,
        &ChunkingConfig {
            chunk_tokens,
            overlap_tokens,
        },
    )
}

#[test]
fn a_short_section_is_one_chunk() {
    let chunks = chunks_of("## A\nOne. Two.\n## B\nThree.", 100, 10);
    let actual: Vec<(usize, &str, &str)> = chunks
        .iter()
        .map(|chunk| (chunk.ordinal, chunk.section.as_str(), chunk.text.as_str()))
        .collect();
    assert_eq!(actual, [(0, "A", "One. Two."), (1, "B", "Three.")]);
}

#[test]
fn long_english_sections_split_on_sentences_with_overlap() {
    let sentences: Vec<String> = (1..=12)
        .map(|n| format!("Sentence number {n} says something about dosing."))
        .collect();
    let text = format!("## Dosing\n{}", sentences.join(" "));
    // Each sentence is 14 tokens: two fit in 40, and one is carried over.
    assert_eq!(estimate_tokens(&sentences[0]), 14);
    let chunks = chunks_of(&text, 40, 16);
    assert!(chunks.len() > 2, "{chunks:#?}");
    for (index, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.ordinal, index);
        assert_eq!(chunk.section, "Dosing");
        assert!(estimate_tokens(&chunk.text) <= 40, "{chunk:?}");
        assert!(chunk.text.starts_with("Sentence") && chunk.text.ends_with('.'));
    }
    // Each chunk after the first starts with the last sentence of the one before.
    for pair in chunks.windows(2) {
        let last_sentence = pair[0].text.rsplit(". ").next().unwrap();
        assert!(
            pair[1]
                .text
                .starts_with(last_sentence.trim_end_matches('.')),
            "{:?} then {:?}",
            pair[0].text,
            pair[1].text
        );
    }
    // Every sentence is somewhere.
    for sentence in &sentences {
        assert!(
            chunks
                .iter()
                .any(|chunk| chunk.text.contains(sentence.as_str()))
        );
    }
    // No overlap asked: every sentence exactly once.
    let plain = chunks_of(&text, 40, 0);
    let joined: Vec<&str> = plain.iter().map(|chunk| chunk.text.as_str()).collect();
    assert_eq!(joined.join(" "), sentences.join(" "));
}

#[test]
fn chinese_without_spaces_splits_on_chinese_punctuation() {
    let sentence = "高血压患者应每三个月复查一次血压并记录家庭血压。";
    let text = format!("## 随访\n{}", sentence.repeat(10));
    let chunks = chunks_of(&text, 60, 0);
    assert!(chunks.len() >= 4, "{chunks:#?}");
    for chunk in &chunks {
        assert!(estimate_tokens(&chunk.text) <= 60);
        assert!(chunk.text.ends_with('。'), "{chunk:?}");
    }
    // One sentence longer than the budget is cut between characters.
    let run_on = "患者".repeat(100);
    let chunks = chunks_of(&format!("## 长句\n{run_on}"), 50, 0);
    assert_eq!(chunks.len(), 4);
    assert_eq!(
        chunks.iter().map(|c| c.text.as_str()).collect::<String>(),
        run_on
    );
    assert!(
        chunks
            .iter()
            .all(|chunk| estimate_tokens(&chunk.text) <= 50)
    );
}

#[test]
fn tokens_are_stemmed_words_and_chinese_bigrams() {
    let check = |text: &str, expect: &[&str]| assert_eq!(tokenize(text), expect, "{text:?}");
    check(
        "The patients were treated with Metformin",
        &["patient", "treat", "metformin"],
    );
    check("studies glasses diabetes", &["study", "glass", "diabet"]);
    check("高血压", &["高血", "血压", "高", "血", "压"]);
    check("血", &["血"]);
    check(
        "HbA1c 7.0%，糖尿病控制",
        &[
            "hba1c", "7", "0", "糖尿", "尿病", "病控", "控制", "糖", "尿", "病", "控", "制",
        ],
    );
}

fn index_of(texts: &[&str]) -> Bm25Index {
    let mut index = Bm25Index::new(Bm25Config::default());
    for (slot, text) in texts.iter().enumerate() {
        index.insert(slot, text);
    }
    index
}

fn slots(ranked: &[(usize, f32)]) -> Vec<usize> {
    ranked.iter().map(|(slot, _)| *slot).collect()
}

#[test]
fn bm25_prefers_rare_terms_and_short_passages() {
    let index = index_of(&[
        "aspirin for chest pain",
        "chest pain and chest tightness in older patients with many other complaints",
        "warfarin dosing",
        "chest pain",
    ]);
    // `aspirin` is rare: the one passage with it wins over passages with `chest pain` only.
    assert_eq!(slots(&index.search("aspirin chest pain"))[0], 0);
    // Same terms: the shorter passage ranks first.
    assert_eq!(slots(&index.search("chest pain")), [3, 0, 1]);
    assert!(index.search("unknown words").is_empty());
    // Chinese by bigrams.
    let chinese = index_of(&["高血压的诊断标准", "糖尿病的药物治疗", "高血压的药物治疗"]);
    assert_eq!(slots(&chinese.search("高血压用什么药物"))[0], 2);
}

#[test]
fn bm25_removal_forgets_a_passage() {
    let mut index = index_of(&["insulin pump", "insulin pen", "oral tablets"]);
    assert_eq!(index.len(), 3);
    index.remove(0);
    assert_eq!(slots(&index.search("insulin pump")), [1]);
    index.remove(1);
    index.remove(2);
    assert!(index.is_empty());
    assert!(index.search("insulin").is_empty());
}

#[test]
fn vector_index_ranks_by_cosine() {
    let mut index = VectorIndex::default();
    assert!(index.insert(0, vec![1.0, 0.0]));
    assert!(index.insert(1, vec![3.0, 3.0]));
    assert!(index.insert(2, vec![0.0, -2.0]));
    assert!(!index.insert(3, vec![1.0, 0.0, 0.0]), "other dimensions");
    let ranked = index.search(&[2.0, 1.0], 2);
    assert_eq!(slots(&ranked), [1, 0]);
    assert!((ranked[0].1 - 0.948_683_3).abs() < 1e-6);
    assert!(index.search(&[1.0], 3).is_empty());
}

#[test]
fn score_fusion_blends_normalised_scores() {
    // Cosines over every chunk; BM25 only where a term matched.
    let vector = [(1, 0.9), (2, 0.7), (3, 0.5), (4, 0.4)];
    let keyword = [(4, 12.0), (2, 6.0)];
    let fused = fuse_scores(&vector, &keyword, 0.5);
    let scores: Vec<(usize, f32)> = fused
        .iter()
        .map(|entry| (entry.slot, entry.score))
        .collect();
    // 1: 0.5·1 = 0.5; 2: 0.5·0.6 + 0.5·0.5 = 0.55; 3: 0.5·0.2 = 0.1; 4: 0 + 0.5·1 = 0.5.
    let expect = [(2, 0.55), (1, 0.5), (4, 0.5), (3, 0.1)];
    assert_eq!(scores.len(), expect.len());
    for ((slot, score), (expect_slot, expect_score)) in scores.iter().zip(expect) {
        assert_eq!(*slot, expect_slot, "{scores:?}");
        assert!((score - expect_score).abs() < 1e-6, "{scores:?}");
    }
    assert_eq!(fused[0].vector.map(|ranked| ranked.rank), Some(2));
    assert_eq!(fused[0].keyword.map(|ranked| ranked.rank), Some(2));
    // All vector or all keyword reproduces that ranking.
    let order = |share: f32| -> Vec<usize> {
        fuse_scores(&vector, &keyword, share)
            .iter()
            .map(|entry| entry.slot)
            .collect()
    };
    assert_eq!(order(1.0), [1, 2, 3, 4]);
    assert_eq!(order(0.0)[..2], [4, 2]);
    // No keyword match: the vector ranking alone.
    assert_eq!(
        fuse_scores(&vector, &[], 0.5)
            .iter()
            .map(|entry| entry.slot)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
}

#[test]
fn chinese_queries_lean_on_keywords_unless_the_model_is_multilingual() {
    let config = FusionConfig::default();
    let check = |query: &str, share: f32| {
        let actual = config.vector_share(query);
        assert!((actual - share).abs() < 1e-6, "{query}: {actual}");
    };
    check("When to refer asthma?", 0.5);
    check("哮喘何时转诊", 0.0);
    // Six CJK of eight letters and digits: a quarter of the vector weight.
    check("骨密度T值多少2", 0.25 / 1.25);
    check("", 0.5);
    let multilingual = FusionConfig {
        multilingual_embeddings: true,
        ..config
    };
    assert_eq!(multilingual.vector_share("哮喘何时转诊"), 0.5);
    let keyword_only = FusionConfig {
        vector_weight: 0.0,
        ..config
    };
    assert_eq!(keyword_only.vector_share("asthma"), 0.0);
    assert_eq!(cjk_share("abc 高血压"), 0.5);
}

const GUIDE: &str = "# Asthma in adults\n\
    ## Diagnosis\nSpirometry shows reversible obstruction: FEV1 improves by 12% after a bronchodilator.\n\
    ## Treatment\nStart an inhaled corticosteroid with formoterol as needed.\n\
    ## Referral\nRefer after two severe exacerbations in a year.\n";

const GUIDE_ZH: &str = "# 成人哮喘\n## 诊断\n肺功能检查显示可逆性气流受限。\n## 治疗\n首选吸入糖皮质激素联合福莫特罗。\n";

fn knowledge_base(embedder: HashingEmbedder) -> KnowledgeBase {
    KnowledgeBase::new(Arc::new(embedder), KnowledgeConfig::default())
}

fn add(base: &KnowledgeBase, id: &str, text: &str) -> PreparedDocument {
    let prepared = block_on(base.prepare(&markdown("", text))).unwrap();
    base.insert(IndexedDocument {
        id: id.to_owned(),
        title: prepared.title.clone(),
        source: prepared.source.clone(),
        model: prepared.model.clone(),
        chunks: prepared.chunks.clone(),
    })
    .unwrap();
    prepared
}

#[test]
fn hybrid_search_finds_the_section_and_cites_it() {
    let base = knowledge_base(HashingEmbedder::new(64));
    let prepared = add(&base, "kd_1", GUIDE);
    assert_eq!(prepared.title, "Asthma in adults");
    assert_eq!(prepared.chunks.len(), 3);
    assert_eq!(prepared.dimensions, 64);
    assert_eq!(prepared.sha256, document_sha256(GUIDE));
    add(&base, "kd_2", GUIDE_ZH);
    assert_eq!((base.document_count(), base.chunk_count()), (2, 5));
    for (query, expect) in [
        (
            "when to refer asthma exacerbations",
            "Asthma in adults § Referral",
        ),
        (
            "inhaled corticosteroid treatment",
            "Asthma in adults § Treatment",
        ),
        ("哮喘首选什么吸入治疗", "成人哮喘 § 治疗"),
    ] {
        for mode in [SearchMode::Hybrid, SearchMode::Keyword, SearchMode::Vector] {
            let hits = block_on(base.search_with(query, 3, mode)).unwrap();
            assert_eq!(hits[0].citation(), expect, "{query} ({})", mode.as_str());
        }
    }
    let hits = block_on(base.search("spirometry", 10)).unwrap();
    assert_eq!(hits[0].section, "Diagnosis");
    assert!(hits[0].keyword.is_some() && hits[0].vector.is_some());
    assert!(base.remove("kd_1"));
    assert!(!base.remove("kd_1"));
    let hits = block_on(base.search("spirometry asthma", 10)).unwrap();
    assert!(hits.iter().all(|hit| hit.document_id == "kd_2"));
    assert_eq!(
        block_on(base.search("  ", 3)),
        Err(KnowledgeError::EmptyQuery)
    );
}

#[test]
fn vectors_of_another_model_are_refused() {
    let base = knowledge_base(HashingEmbedder::new(32));
    add(&base, "kd_1", GUIDE);
    let error = base
        .insert(IndexedDocument {
            id: "kd_2".into(),
            title: "x".into(),
            source: String::new(),
            model: "other".into(),
            chunks: vec![],
        })
        .unwrap_err();
    assert!(
        matches!(error, KnowledgeError::ModelMismatch { .. }),
        "{error}"
    );
    let error = base
        .insert(IndexedDocument {
            id: "kd_3".into(),
            title: "x".into(),
            source: String::new(),
            model: "hashing".into(),
            chunks: vec![EmbeddedChunk {
                ordinal: 0,
                section: String::new(),
                text: "short".into(),
                vector: vec![1.0; 8],
            }],
        })
        .unwrap_err();
    assert!(
        matches!(error, KnowledgeError::EmbeddingShape { .. }),
        "{error}"
    );
}

#[test]
fn the_search_tool_returns_passages_with_citations() {
    let base = knowledge_base(HashingEmbedder::new(64));
    add(&base, "kd_1", GUIDE);
    let result =
        block_on(base.call_search_tool(&json!({"query": "asthma referral", "limit": 1}))).unwrap();
    assert_eq!(result["query"], "asthma referral");
    let passages = result["passages"].as_array().unwrap();
    assert_eq!(passages.len(), 1);
    assert_eq!(passages[0]["rank"], 1);
    assert_eq!(passages[0]["citation"], "Asthma in adults § Referral");
    assert_eq!(passages[0]["document_id"], "kd_1");
    assert_eq!(passages[0]["section"], "Referral");
    assert_eq!(passages[0]["source"], "test.md");
    assert!(passages[0]["text"].as_str().unwrap().contains("two severe"));
    let default_limit = block_on(base.call_search_tool(&json!({"query": "asthma"}))).unwrap();
    assert_eq!(default_limit["passages"].as_array().unwrap().len(), 3);

    let refused = |arguments: Value| block_on(base.call_search_tool(&arguments)).unwrap_err();
    for (arguments, field) in [
        (json!({}), "query"),
        (json!({"query": ""}), "query"),
        (json!({"query": 5}), "query"),
        (json!({"query": "x", "top": 3}), "top"),
        (json!({"query": "x", "limit": -1}), "limit"),
    ] {
        match refused(arguments.clone()) {
            ToolError::BadArguments { field: named, .. } => {
                assert_eq!(named, field, "{arguments}")
            }
            other => panic!("{arguments}: {other}"),
        }
    }
    match refused(json!({"query": "x", "limit": 11})) {
        ToolError::OutOfRange { field, .. } => assert_eq!(field, "limit"),
        other => panic!("{other}"),
    }
    let schema = knowledge_search_schema();
    assert_eq!(schema["required"], json!(["query"]));
    assert_eq!(
        schema["properties"]["limit"]["maximum"],
        json!(MAX_TOOL_LIMIT)
    );
}

#[test]
fn an_unavailable_embedder_is_reported_to_the_model() {
    let mut embedder = HashingEmbedder::new(16);
    embedder.fail_with = Some(EmbedderError::Unavailable(
        "no embedding model is loaded".into(),
    ));
    let base = knowledge_base(embedder);
    assert!(matches!(
        block_on(base.prepare(&markdown("", GUIDE))),
        Err(KnowledgeError::Embedding(EmbedderError::Unavailable(_)))
    ));
    // An empty knowledge base answers without embedding.
    assert_eq!(block_on(base.search("asthma", 3)), Ok(Vec::new()));
    let other = knowledge_base(HashingEmbedder::new(16));
    let prepared = block_on(other.prepare(&markdown("", GUIDE))).unwrap();
    base.insert(IndexedDocument {
        id: "kd_1".into(),
        title: prepared.title,
        source: prepared.source,
        model: prepared.model,
        chunks: prepared.chunks,
    })
    .unwrap();
    let error = block_on(base.call_search_tool(&json!({"query": "asthma"}))).unwrap_err();
    assert_eq!(
        error.to_string(),
        "tool `knowledge_search` is unavailable right now: no embedding model is loaded; answer without it"
    );
    // Keyword search still works without the model.
    let hits = block_on(base.search_with("asthma spirometry", 1, SearchMode::Keyword)).unwrap();
    assert_eq!(hits[0].section, "Diagnosis");
}
