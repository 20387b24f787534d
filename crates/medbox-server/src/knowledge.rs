//! `medbox.v1.Knowledge`: the knowledge base served. The chunking, the
//! indexes and the ranking live in `medbox_agents::knowledge`; this module
//! embeds through the router's embedding model ([`RouterEmbedder`]), keeps
//! documents in the store, loads them into the in-memory index at start,
//! ingests `[knowledge] dir`, and converts proto ⇄ domain types.
//!
//! **Invariant:** a document is in the index only after it is in the store;
//! the store is the truth and the index is rebuilt from it at every start.
//! Document text is never logged (titles and file names are).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use medbox_agents::context::{ContextTool, ToolFuture};
use medbox_agents::knowledge::{
    ChunkingConfig, DocumentFormat, EmbedFuture, EmbeddedChunk, Embedder, EmbedderError,
    Embeddings, FusionConfig, IndexedDocument, KNOWLEDGE_SEARCH_DESCRIPTION, KNOWLEDGE_SEARCH_TOOL,
    KnowledgeBase, KnowledgeConfig as BaseConfig, KnowledgeError, NewDocument, SearchHit,
    SearchMode, embedding_text, knowledge_search_schema,
};
use medbox_proto::v1 as pb;
use medbox_runtime::{EmbedError, EngineError};
use medbox_store::{
    KnowledgeDocumentRecord, KnowledgeInsert, NewKnowledgeChunk, NewKnowledgeDocument, Store,
    StoreError,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::now_ms,
    config::{KnowledgeConfig, ValidModelConfig},
    error::ApiError,
    router::ModelRouter,
    state::AppState,
};

/// Passages a search returns when the request says 0.
const DEFAULT_SEARCH_LIMIT: u32 = 5;
/// How often a long ingestion logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the message says when no embedding model is configured.
const NO_MODEL: &str = "the knowledge base has no embedding model: set knowledge.embedding_model \
     to a model of kind embedding ([[models]] kind = \"embedding\")";

/// The knowledge base's [`Embedder`]: the configured embedding model, found
/// through the router on every call (so a model loaded, reloaded or moved
/// live is used at once), on its own engine thread; awaiting its answer
/// never blocks a tokio worker.
pub struct RouterEmbedder {
    router: Arc<ModelRouter>,
    /// `[knowledge] embedding_model`, a name or alias.
    model: Option<String>,
}

impl Embedder for RouterEmbedder {
    fn embed(&self, texts: Vec<String>) -> EmbedFuture<'_> {
        Box::pin(async move {
            let Some(route) = &self.model else {
                return Err(EmbedderError::NotConfigured(NO_MODEL.to_owned()));
            };
            let (name, embedder) = match self.router.embedding(route, "Knowledge") {
                Ok(found) => found,
                Err(ApiError::ModelLoading(name)) => {
                    return Err(EmbedderError::Unavailable(format!(
                        "the embedding model `{name}` (knowledge.embedding_model) is still loading; retry shortly"
                    )));
                }
                Err(err) => {
                    return Err(EmbedderError::NotConfigured(format!(
                        "knowledge.embedding_model: {err}"
                    )));
                }
            };
            match embedder.embed(texts).await {
                Ok(vectors) => Ok(Embeddings {
                    model: name,
                    vectors,
                }),
                Err(EmbedError::Invalid(err)) => Err(EmbedderError::Failed(err.to_string())),
                Err(EmbedError::Engine(EngineError::QueueFull { .. })) => {
                    Err(EmbedderError::Unavailable(format!(
                        "the embedding model `{name}` has too many waiting requests; retry later"
                    )))
                }
                Err(EmbedError::Engine(EngineError::Stopped { .. })) => Err(
                    EmbedderError::Unavailable(format!("the embedding model `{name}` is stopping")),
                ),
                Err(EmbedError::Engine(EngineError::Model(detail))) => {
                    Err(EmbedderError::Failed(format!("model `{name}`: {detail}")))
                }
            }
        })
    }
}

/// The knowledge base as medboxd serves it.
#[derive(Clone)]
pub struct KnowledgeContext {
    /// The in-memory index; the agents' `knowledge_search` tool searches it too.
    pub base: Arc<KnowledgeBase>,
    store: Store,
    /// The configured model's name (an alias resolved through `[[models]]`).
    model_name: Option<String>,
    max_document_bytes: usize,
    /// True until start-up re-embedding and folder ingestion are done.
    ingesting: Arc<AtomicBool>,
    dir: Option<PathBuf>,
}

/// What `add` did.
pub enum Added {
    New(KnowledgeDocumentRecord),
    AlreadyPresent(KnowledgeDocumentRecord),
}

impl KnowledgeContext {
    /// The agents' `knowledge_search` tool over this knowledge base, when an
    /// embedding model is configured (without one, no agent is offered it).
    pub fn search_tool(&self) -> Option<Arc<dyn ContextTool>> {
        self.model_name.as_ref()?;
        Some(Arc::new(KnowledgeSearchTool {
            base: self.base.clone(),
        }))
    }

    /// Builds the knowledge base and loads every stored document embedded by
    /// the configured model into the index. Documents embedded by another
    /// model wait for [`KnowledgeContext::ingest_at_start`].
    pub async fn open(
        config: &KnowledgeConfig,
        models: &[ValidModelConfig],
        router: Arc<ModelRouter>,
        store: Store,
    ) -> Result<KnowledgeContext, StoreError> {
        let base_config = BaseConfig {
            chunking: ChunkingConfig {
                chunk_tokens: config.chunk_tokens,
                overlap_tokens: config.chunk_overlap_tokens,
            },
            fusion: FusionConfig {
                vector_weight: config.vector_weight as f32,
                keyword_weight: config.keyword_weight as f32,
                multilingual_embeddings: config.multilingual_embeddings,
            },
            ..BaseConfig::default()
        };
        let model_name = config.embedding_model.as_ref().map(|route| {
            models
                .iter()
                .find(|model| model.name == *route || model.aliases.contains(route))
                .map_or_else(|| route.clone(), |model| model.name.clone())
        });
        let embedder = RouterEmbedder {
            router,
            model: config.embedding_model.clone(),
        };
        let context = KnowledgeContext {
            base: Arc::new(KnowledgeBase::new(Arc::new(embedder), base_config)),
            store,
            model_name,
            max_document_bytes: config.max_document_bytes,
            ingesting: Arc::new(AtomicBool::new(true)),
            dir: config.dir.clone(),
        };
        context.load_stored().await?;
        Ok(context)
    }

    /// Indexes stored documents of the configured model; returns how many others wait.
    #[tracing::instrument(skip_all)]
    async fn load_stored(&self) -> Result<usize, StoreError> {
        let started = Instant::now();
        let documents = self.store.list_knowledge_documents().await?;
        let mut stale = 0;
        let mut chunks = 0;
        for document in documents {
            if Some(&document.embedding_model) != self.model_name.as_ref() {
                stale += 1;
                continue;
            }
            let stored = self.store.knowledge_chunks(&document.id).await?;
            chunks += stored.len();
            self.index(&document, stored_chunks(stored));
        }
        tracing::info!(
            documents = self.base.document_count(),
            chunks,
            waiting_for_re_embedding = stale,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "knowledge base loaded from the store"
        );
        Ok(stale)
    }

    fn index(&self, document: &KnowledgeDocumentRecord, chunks: Vec<EmbeddedChunk>) {
        let indexed = IndexedDocument {
            id: document.id.clone(),
            title: document.title.clone(),
            source: document.source.clone(),
            model: document.embedding_model.clone(),
            chunks,
        };
        if let Err(err) = self.base.insert(indexed) {
            tracing::error!(document = %document.id, error = %err, "a stored document cannot be indexed");
        }
    }

    pub fn ingesting(&self) -> bool {
        self.ingesting.load(Ordering::Relaxed)
    }

    /// After the models have loaded: re-embeds stored documents of another
    /// model, then ingests `[knowledge] dir`. Logs progress; failures of one
    /// document are logged and the others go on.
    #[tracing::instrument(skip_all)]
    pub async fn ingest_at_start(&self) {
        if self.model_name.is_some() {
            if let Err(err) = self.re_embed_stale().await {
                tracing::error!(error = %err, "re-embedding the knowledge base failed");
            }
            if let Some(dir) = &self.dir {
                self.ingest_folder(dir).await;
            }
        }
        self.ingesting.store(false, Ordering::Relaxed);
    }

    async fn re_embed_stale(&self) -> Result<(), StoreError> {
        let documents: Vec<KnowledgeDocumentRecord> = self
            .store
            .list_knowledge_documents()
            .await?
            .into_iter()
            .filter(|document| Some(&document.embedding_model) != self.model_name.as_ref())
            .collect();
        if documents.is_empty() {
            return Ok(());
        }
        tracing::info!(
            documents = documents.len(),
            "re-embedding knowledge documents stored with another embedding model"
        );
        for document in documents {
            let stored = self.store.knowledge_chunks(&document.id).await?;
            let texts = stored
                .iter()
                .map(|chunk| embedding_text(&document.title, &chunk.section, &chunk.text))
                .collect();
            let embedded = match self.base.embed_all(texts).await {
                Ok(embedded) => embedded,
                Err(err) => {
                    tracing::warn!(document = %document.id, error = %err, "cannot re-embed a knowledge document; it stays out of the index");
                    continue;
                }
            };
            let dimensions = embedded.vectors.first().map_or(0, Vec::len);
            let replaced = self
                .store
                .replace_knowledge_vectors(
                    &document.id,
                    &embedded.model,
                    u32::try_from(dimensions).unwrap_or(u32::MAX),
                    &embedded.vectors,
                    now_ms(),
                )
                .await?;
            if !replaced {
                continue;
            }
            let chunks = stored
                .into_iter()
                .zip(embedded.vectors)
                .map(|(chunk, vector)| EmbeddedChunk {
                    ordinal: chunk.ordinal as usize,
                    section: chunk.section,
                    text: chunk.text,
                    vector,
                })
                .collect();
            let record = KnowledgeDocumentRecord {
                embedding_model: embedded.model,
                ..document
            };
            self.index(&record, chunks);
        }
        Ok(())
    }

    /// Ingests every `.md`, `.markdown` and `.txt` file under `dir`.
    async fn ingest_folder(&self, dir: &Path) {
        let started = Instant::now();
        let root = dir.to_path_buf();
        let files = match tokio::task::spawn_blocking(move || document_files(&root)).await {
            Ok(Ok(files)) => files,
            Ok(Err(err)) => {
                tracing::error!(dir = %dir.display(), error = %err, "cannot read knowledge.dir");
                return;
            }
            Err(err) => {
                tracing::error!(error = %err, "listing knowledge.dir crashed");
                return;
            }
        };
        tracing::info!(dir = %dir.display(), files = files.len(), "ingesting the knowledge folder");
        let (mut added, mut skipped, mut failed, mut chunks) = (0usize, 0usize, 0usize, 0u64);
        let mut last_report = Instant::now();
        for (done, (path, format)) in files.iter().enumerate() {
            let source = path.strip_prefix(dir).unwrap_or(path).display().to_string();
            let outcome = match tokio::fs::read(path).await {
                Ok(bytes) if bytes.len() > self.max_document_bytes => Err(ApiError::InvalidField {
                    field: "text",
                    reason: format!(
                        "the file is larger than {} bytes (knowledge.max_document_bytes)",
                        self.max_document_bytes
                    ),
                }),
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => {
                        self.add(NewDocument {
                            title: String::new(),
                            source: source.clone(),
                            text,
                            format: *format,
                        })
                        .await
                    }
                    Err(_) => Err(ApiError::InvalidField {
                        field: "text",
                        reason: "the file is not UTF-8".into(),
                    }),
                },
                Err(err) => Err(ApiError::Internal(format!("reading {source}: {err}"))),
            };
            match outcome {
                Ok(Added::New(record)) => {
                    added += 1;
                    chunks += record.chunk_count;
                    tracing::debug!(%source, document = %record.id, chunks = record.chunk_count, "knowledge file added");
                }
                Ok(Added::AlreadyPresent(_)) => skipped += 1,
                Err(err) => {
                    failed += 1;
                    tracing::warn!(%source, error = %err, "knowledge file not ingested");
                }
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                tracing::info!(
                    files_done = done + 1,
                    files = files.len(),
                    added,
                    chunks,
                    elapsed_s = started.elapsed().as_secs(),
                    "knowledge ingestion progress"
                );
            }
        }
        tracing::info!(
            files = files.len(),
            added,
            unchanged = skipped,
            failed,
            chunks,
            indexed_chunks = self.base.chunk_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "knowledge folder ingested"
        );
    }

    /// Chunks, embeds, stores and indexes a document; a text already stored
    /// is answered from the store without embedding.
    pub async fn add(&self, document: NewDocument) -> Result<Added, ApiError> {
        if document.text.len() > self.max_document_bytes {
            return Err(ApiError::InvalidField {
                field: "text",
                reason: format!(
                    "is larger than {} bytes (knowledge.max_document_bytes)",
                    self.max_document_bytes
                ),
            });
        }
        let sha256 = medbox_agents::knowledge::document_sha256(&document.text);
        if let Some(existing) = self
            .store
            .find_knowledge_document_by_sha256(&sha256)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Added::AlreadyPresent(existing));
        }
        let prepared = self
            .base
            .prepare(&document)
            .await
            .map_err(knowledge_error)?;
        let new = NewKnowledgeDocument {
            title: prepared.title.clone(),
            source: prepared.source.clone(),
            format: prepared.format.as_str().to_owned(),
            sha256: prepared.sha256.clone(),
            bytes: prepared.bytes as u64,
            embedding_model: prepared.model.clone(),
            embedding_dimensions: u32::try_from(prepared.dimensions).unwrap_or(u32::MAX),
            chunks: prepared
                .chunks
                .iter()
                .map(|chunk| NewKnowledgeChunk {
                    ordinal: u32::try_from(chunk.ordinal).unwrap_or(u32::MAX),
                    section: chunk.section.clone(),
                    text: chunk.text.clone(),
                    vector: chunk.vector.clone(),
                })
                .collect(),
        };
        match self
            .store
            .insert_knowledge_document(&new, now_ms())
            .await
            .map_err(ApiError::from)?
        {
            KnowledgeInsert::Inserted(record) => {
                self.base
                    .insert(IndexedDocument {
                        id: record.id.clone(),
                        title: prepared.title,
                        source: prepared.source,
                        model: prepared.model,
                        chunks: prepared.chunks,
                    })
                    .map_err(knowledge_error)?;
                Ok(Added::New(record))
            }
            KnowledgeInsert::AlreadyPresent(record) => Ok(Added::AlreadyPresent(record)),
        }
    }
}

/// `(path, format)` of every document file under `root`, sorted by path.
fn document_files(root: &Path) -> std::io::Result<Vec<(PathBuf, DocumentFormat)>> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                folders.push(path);
                continue;
            }
            let format = match path.extension().and_then(|ext| ext.to_str()) {
                Some("md" | "markdown") => DocumentFormat::Markdown,
                Some("txt") => DocumentFormat::Text,
                _ => continue,
            };
            files.push((path, format));
        }
    }
    files.sort_by(|left, right| left.0.cmp(&right.0));
    Ok(files)
}

fn stored_chunks(stored: Vec<medbox_store::KnowledgeChunkRecord>) -> Vec<EmbeddedChunk> {
    stored
        .into_iter()
        .map(|chunk| EmbeddedChunk {
            ordinal: chunk.ordinal as usize,
            section: chunk.section,
            text: chunk.text,
            vector: chunk.vector,
        })
        .collect()
}

/// The knowledge base's errors as the API answers them.
pub fn knowledge_error(err: KnowledgeError) -> ApiError {
    match err {
        KnowledgeError::EmptyDocument => ApiError::InvalidField {
            field: "text",
            reason: "has nothing to index (it is empty or only headings)".into(),
        },
        KnowledgeError::MissingTitle => ApiError::InvalidField {
            field: "title",
            reason: "must not be empty (the text has no single `# heading` to take it from, and source is empty)".into(),
        },
        KnowledgeError::EmptyQuery => ApiError::MissingField("query"),
        KnowledgeError::QueryTooLong => ApiError::InvalidField {
            field: "query",
            reason: format!(
                "must be at most {} characters",
                medbox_agents::knowledge::MAX_QUERY_CHARS
            ),
        },
        KnowledgeError::Embedding(EmbedderError::NotConfigured(message)) => {
            ApiError::KnowledgeNotConfigured(message)
        }
        KnowledgeError::Embedding(EmbedderError::Unavailable(message)) => {
            ApiError::KnowledgeUnavailable(message)
        }
        KnowledgeError::Embedding(EmbedderError::Failed(detail)) => {
            ApiError::Internal(format!("knowledge embedding: {detail}"))
        }
        shape @ KnowledgeError::EmbeddingShape { .. } => {
            ApiError::Internal(format!("knowledge embedding: {shape}"))
        }
        mismatch @ KnowledgeError::ModelMismatch { .. } => {
            ApiError::KnowledgeNotConfigured(mismatch.to_string())
        }
    }
}

fn document_to_proto(record: KnowledgeDocumentRecord) -> pb::KnowledgeDocument {
    pb::KnowledgeDocument {
        id: record.id,
        title: record.title,
        source: record.source,
        format: record.format,
        sha256: record.sha256,
        bytes: record.bytes,
        chunk_count: record.chunk_count,
        embedding_model: record.embedding_model,
        embedding_dimensions: record.embedding_dimensions,
        created_at: record.created_at_ms,
    }
}

fn passage_to_proto(hit: SearchHit) -> pb::KnowledgePassage {
    let citation = hit.citation();
    let (vector_score, vector_rank) = hit.vector.unwrap_or((0.0, 0));
    let (keyword_score, keyword_rank) = hit.keyword.unwrap_or((0.0, 0));
    pb::KnowledgePassage {
        document_id: hit.document_id,
        title: hit.title,
        source: hit.source,
        section: hit.section,
        text: hit.text,
        score: hit.score,
        citation,
        ordinal: u32::try_from(hit.ordinal).unwrap_or(u32::MAX),
        vector_score,
        vector_rank: u32::try_from(vector_rank).unwrap_or(u32::MAX),
        keyword_score,
        keyword_rank: u32::try_from(keyword_rank).unwrap_or(u32::MAX),
    }
}

pub struct KnowledgeService {
    state: AppState,
    knowledge: KnowledgeContext,
}

impl KnowledgeService {
    pub fn new(state: AppState, knowledge: KnowledgeContext) -> KnowledgeService {
        KnowledgeService { state, knowledge }
    }
}

#[tonic::async_trait]
impl pb::knowledge_server::Knowledge for KnowledgeService {
    #[tracing::instrument(skip_all)]
    async fn add_document(
        &self,
        request: Request<pb::AddDocumentRequest>,
    ) -> Result<Response<pb::AddDocumentResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Knowledge/AddDocument", &request);
        let request = request.into_inner();
        let result = async {
            let format = match request.format.as_str() {
                "" => DocumentFormat::Markdown,
                other => DocumentFormat::parse(other).ok_or_else(|| ApiError::InvalidField {
                    field: "format",
                    reason: format!("`{other}` is not one of markdown, text"),
                })?,
            };
            if request.text.trim().is_empty() {
                return Err(ApiError::MissingField("text"));
            }
            let added = self
                .knowledge
                .add(NewDocument {
                    title: request.title,
                    source: request.source,
                    text: request.text,
                    format,
                })
                .await?;
            Ok(match added {
                Added::New(record) => {
                    tracing::info!(document = %record.id, chunks = record.chunk_count, "knowledge document added");
                    pb::AddDocumentResponse {
                        document: Some(document_to_proto(record)),
                        already_present: false,
                    }
                }
                Added::AlreadyPresent(record) => pb::AddDocumentResponse {
                    document: Some(document_to_proto(record)),
                    already_present: true,
                },
            })
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Knowledge/ListDocuments", &request);
        let result = self
            .knowledge
            .store
            .list_knowledge_documents()
            .await
            .map_err(ApiError::from)
            .map(|documents| pb::ListDocumentsResponse {
                documents: documents.into_iter().map(document_to_proto).collect(),
                indexed_chunks: self.knowledge.base.chunk_count() as u64,
                ingesting: self.knowledge.ingesting(),
            });
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        let record = self
            .state
            .log
            .begin_for("medbox.v1.Knowledge/DeleteDocument", &request);
        let id = request.into_inner().id;
        let result = async {
            if id.is_empty() {
                return Err(ApiError::MissingField("id"));
            }
            let deleted = self
                .knowledge
                .store
                .delete_knowledge_document(&id)
                .await
                .map_err(ApiError::from)?;
            // Out of the index whatever the store said: the store is the truth.
            self.knowledge.base.remove(&id);
            if !deleted {
                return Err(ApiError::DocumentNotFound(id));
            }
            tracing::info!(document = %id, "knowledge document deleted");
            Ok(pb::DeleteDocumentResponse {})
        }
        .await;
        record.answer(result)
    }

    #[tracing::instrument(skip_all)]
    async fn search(
        &self,
        request: Request<pb::KnowledgeSearchRequest>,
    ) -> Result<Response<pb::KnowledgeSearchResponse>, Status> {
        let mut record = self
            .state
            .log
            .begin_for("medbox.v1.Knowledge/Search", &request);
        let request = request.into_inner();
        record.model = self.knowledge.model_name.clone();
        let result = async {
            let mode = SearchMode::parse(&request.mode).ok_or_else(|| ApiError::InvalidField {
                field: "mode",
                reason: format!("`{}` is not one of hybrid, vector, keyword", request.mode),
            })?;
            let limit = match request.limit {
                0 => DEFAULT_SEARCH_LIMIT,
                limit if limit as usize <= medbox_agents::knowledge::MAX_SEARCH_LIMIT => limit,
                limit => {
                    return Err(ApiError::InvalidField {
                        field: "limit",
                        reason: format!(
                            "{limit} is more than {} passages",
                            medbox_agents::knowledge::MAX_SEARCH_LIMIT
                        ),
                    });
                }
            };
            if request.query.trim().is_empty() {
                return Err(ApiError::MissingField("query"));
            }
            // A search of an empty index answers at once; say why when the
            // box has no embedding model at all.
            if mode != SearchMode::Keyword && self.knowledge.model_name.is_none() {
                return Err(ApiError::KnowledgeNotConfigured(NO_MODEL.to_owned()));
            }
            let hits = self
                .knowledge
                .base
                .search_with(&request.query, limit as usize, mode)
                .await
                .map_err(knowledge_error)?;
            Ok(pb::KnowledgeSearchResponse {
                passages: hits.into_iter().map(passage_to_proto).collect(),
                embedding_model: match mode {
                    SearchMode::Keyword => String::new(),
                    SearchMode::Hybrid | SearchMode::Vector => {
                        self.knowledge.model_name.clone().unwrap_or_default()
                    }
                },
            })
        }
        .await;
        record.answer(result)
    }
}

/// `knowledge_search` for the agents' step loop: the knowledge base's own
/// search, with citations (document, section) in every passage.
struct KnowledgeSearchTool {
    base: Arc<KnowledgeBase>,
}

impl ContextTool for KnowledgeSearchTool {
    fn name(&self) -> &str {
        KNOWLEDGE_SEARCH_TOOL
    }

    fn description(&self) -> &str {
        KNOWLEDGE_SEARCH_DESCRIPTION
    }

    fn parameters_schema(&self) -> serde_json::Value {
        knowledge_search_schema()
    }

    fn call<'a>(&'a self, arguments: &'a serde_json::Value) -> ToolFuture<'a> {
        Box::pin(self.base.call_search_tool(arguments))
    }
}
