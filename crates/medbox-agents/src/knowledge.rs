//! The knowledge base: guidelines and hospital protocols, chunked, embedded,
//! and searched by vector similarity fused with keyword (BM25) scores, so an
//! answer can cite the document and section it rests on.
//!
//! - [`parse_document`] reads a Markdown or plain-text document into
//!   [`Section`]s by heading; [`chunk_document`] cuts each section into
//!   [`ChunkDraft`]s of at most `chunk_tokens` estimated tokens, on sentence
//!   boundaries (Chinese `。！？；` included), with `overlap_tokens` of the
//!   previous chunk's tail repeated at the head of the next.
//! - [`tokenize`] is the keyword tokenizer: lower-cased English words with a
//!   light suffix stemmer and a short stop list, and Chinese (any CJK run) as
//!   overlapping character bigrams, since CJK text has no spaces.
//! - [`KnowledgeBase`] holds the in-memory indexes (a BM25 inverted index and
//!   a flat index of L2-normalised vectors, cosine by dot product) and answers
//!   [`KnowledgeBase::search`]. It embeds through the [`Embedder`] trait,
//!   which the server implements over the runtime's embedding engine; the
//!   store and the ingestion of folders are the server's business.
//!
//! Hybrid ranking is a convex combination of normalised scores ([`fuse_scores`]):
//! `α · minmax(cosine) + (1 − α) · bm25 / max bm25`, with `α` the vector
//! weight's share (0.5 by default). When the embedding model is not
//! multilingual, a query's vector weight is scaled by the share of its
//! characters that are not CJK ([`FusionConfig::vector_share`]): MiniLM's
//! vectors carry little meaning for Chinese, and BM25 over character
//! bigrams does. Score blending was chosen over reciprocal rank fusion by
//! measurement: on the server's 252-chunk test corpus RRF (k = 60) put the
//! right passage first for 13/18 English and 7/18 Chinese questions, the
//! blend for 14/18 and 16/18 (`docs/knowledge.md` has the table). Rank
//! fusion lets a passage ranked moderately by both lists beat one that a
//! single list is sure of; the blend keeps how sure each list is.
//!
//! **Architecture Invariant:** no tch, no store, no I/O here; the only
//! `await` is the [`Embedder`]. The index lock is a `std::sync::RwLock`,
//! never held across that `await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{ToolError, object_schema, parse_arguments};

/// The name an agent calls the search tool by.
pub const KNOWLEDGE_SEARCH_TOOL: &str = "knowledge_search";
/// What the model reads about the search tool.
pub const KNOWLEDGE_SEARCH_DESCRIPTION: &str = "Searches the hospital's knowledge base \
     (clinical guidelines and hospital protocols, Chinese and English) and returns the most \
     relevant passages with their document title and section. Use it before answering a \
     question that a guideline or protocol should settle, and cite the `citation` of each \
     passage you rely on.";
/// Passages the tool returns when `limit` is not given.
pub const DEFAULT_TOOL_LIMIT: usize = 5;
/// The most passages one tool call may ask for.
pub const MAX_TOOL_LIMIT: usize = 10;
/// The most passages one search may return.
pub const MAX_SEARCH_LIMIT: usize = 50;
/// The longest query accepted, in characters.
pub const MAX_QUERY_CHARS: usize = 2_000;
/// Texts per embedding call (the runtime accepts up to 256).
pub const EMBED_BATCH: usize = 32;

/// The JSON Schema of the search tool's arguments.
pub fn knowledge_search_schema() -> Value {
    object_schema(
        serde_json::json!({
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_QUERY_CHARS,
                "description": "what to look for, in Chinese or English: a question or key words"
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_TOOL_LIMIT,
                "description": "how many passages to return (default 5)"
            }
        }),
        &["query"],
    )
}

// ---------------------------------------------------------------------------
// Documents and sections
// ---------------------------------------------------------------------------

/// How a document's text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocumentFormat {
    /// `#` headings make sections; fenced code is kept as text.
    Markdown,
    /// One section; paragraphs and sentences guide the chunker.
    Text,
}

impl DocumentFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentFormat::Markdown => "markdown",
            DocumentFormat::Text => "text",
        }
    }

    /// `markdown`/`md` or `text`/`txt`; `None` for anything else.
    pub fn parse(name: &str) -> Option<DocumentFormat> {
        match name.to_ascii_lowercase().as_str() {
            "markdown" | "md" => Some(DocumentFormat::Markdown),
            "text" | "txt" => Some(DocumentFormat::Text),
            _ => None,
        }
    }
}

/// A document to add, as a client or a folder gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDocument {
    /// May be empty: the document's only `#` heading, else `source`, is used.
    pub title: String,
    /// Where it came from (a file name, a URL, a protocol number); may be empty.
    pub source: String,
    pub text: String,
    pub format: DocumentFormat,
}

/// A part of a document under one heading path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Headings from the outermost in, without the document's title heading.
    pub headings: Vec<String>,
    pub text: String,
}

impl Section {
    /// `Diagnosis > Blood pressure thresholds`; empty for text before any heading.
    pub fn path(&self) -> String {
        self.headings.join(" > ")
    }
}

/// A document read into its title and sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDocument {
    pub title: String,
    pub sections: Vec<Section>,
}

/// Why a document or a query cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnowledgeError {
    #[error("text has nothing to index (it is empty or only headings)")]
    EmptyDocument,
    #[error("title must not be empty (the text has no single `# heading` to take it from)")]
    MissingTitle,
    #[error("query must not be empty")]
    EmptyQuery,
    #[error("query is longer than {MAX_QUERY_CHARS} characters")]
    QueryTooLong,
    #[error("{0}")]
    Embedding(#[from] EmbedderError),
    #[error(
        "the embedding model answered {got} vectors of {got_dimensions} dimensions for {expected} texts of the index's {expected_dimensions}"
    )]
    EmbeddingShape {
        expected: usize,
        got: usize,
        expected_dimensions: usize,
        got_dimensions: usize,
    },
    #[error(
        "the index holds vectors of model `{index_model}`; model `{model}` cannot be mixed in (re-embed the knowledge base)"
    )]
    ModelMismatch { index_model: String, model: String },
}

/// Reads `text` into sections. Markdown: ATX headings (`#` to `######`)
/// outside fenced code start sections; a document with exactly one level-1
/// heading takes it as its title (when `title` is empty) and leaves it out of
/// section paths. Text: one section without headings. Sections with no text
/// are dropped.
pub fn parse_document(document: &NewDocument) -> Result<ParsedDocument, KnowledgeError> {
    let (sections, title_heading) = match document.format {
        DocumentFormat::Text => (
            vec![Section {
                headings: Vec::new(),
                text: document.text.trim().to_owned(),
            }],
            None,
        ),
        DocumentFormat::Markdown => parse_markdown(&document.text),
    };
    let sections: Vec<Section> = sections
        .into_iter()
        .filter(|section| !section.text.trim().is_empty())
        .collect();
    if sections.is_empty() {
        return Err(KnowledgeError::EmptyDocument);
    }
    let title = [
        Some(document.title.trim().to_owned()),
        title_heading,
        Some(document.source.trim().to_owned()),
    ]
    .into_iter()
    .flatten()
    .find(|title| !title.is_empty())
    .ok_or(KnowledgeError::MissingTitle)?;
    Ok(ParsedDocument { title, sections })
}

fn heading_of(line: &str) -> Option<(usize, String)> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.chars().take_while(|&c| c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &trimmed[level..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let text = rest.trim().trim_end_matches('#').trim();
    Some((level, text.to_owned()))
}

/// The headings above a block, outermost first, with their levels.
type HeadingPath = Vec<(usize, String)>;

/// Sections by heading, and the title heading when there is exactly one `#`.
fn parse_markdown(text: &str) -> (Vec<Section>, Option<String>) {
    let mut in_fence = false;
    // (heading path, lines) in document order.
    let mut blocks: Vec<(HeadingPath, Vec<&str>)> = vec![(Vec::new(), Vec::new())];
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut top_headings = Vec::new();
    for line in text.lines() {
        let fence = line.trim_start().starts_with("```") || line.trim_start().starts_with("~~~");
        if fence {
            in_fence = !in_fence;
        }
        if !in_fence
            && !fence
            && let Some((level, heading)) = heading_of(line)
        {
            if level == 1 {
                top_headings.push(heading.clone());
            }
            stack.retain(|(outer, _)| *outer < level);
            stack.push((level, heading));
            blocks.push((stack.clone(), Vec::new()));
            continue;
        }
        if let Some((_, lines)) = blocks.last_mut() {
            lines.push(line);
        }
    }
    let title = match top_headings.as_slice() {
        [only] if !only.is_empty() => Some(only.clone()),
        _ => None,
    };
    let sections = blocks
        .into_iter()
        .map(|(path, lines)| Section {
            headings: path
                .into_iter()
                .filter(|(level, _)| !(title.is_some() && *level == 1))
                .map(|(_, heading)| heading)
                .filter(|heading| !heading.is_empty())
                .collect(),
            text: lines.join("\n").trim().to_owned(),
        })
        .collect();
    (sections, title)
}

// ---------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------

/// How documents are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkingConfig {
    /// Most estimated tokens in one chunk's text ([`estimate_tokens`]).
    pub chunk_tokens: usize,
    /// Estimated tokens of a chunk's tail repeated at the head of the next
    /// chunk of the same section, in whole sentences.
    pub overlap_tokens: usize,
}

impl Default for ChunkingConfig {
    /// 160 tokens leaves room under a 256-token encoder (MiniLM) for the
    /// title and section that are embedded with the chunk.
    fn default() -> Self {
        ChunkingConfig {
            chunk_tokens: 160,
            overlap_tokens: 32,
        }
    }
}

/// One chunk of a document, before it is embedded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDraft {
    /// 0, 1, 2, … in document order.
    pub ordinal: usize,
    /// The section path ([`Section::path`]).
    pub section: String,
    pub text: String,
}

/// Whether `c` is written without spaces between words (Chinese, Japanese, Korean).
pub fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'   // kana
        | '\u{3400}'..='\u{4DBF}' // CJK extension A
        | '\u{4E00}'..='\u{9FFF}' // CJK unified ideographs
        | '\u{AC00}'..='\u{D7AF}' // hangul
        | '\u{F900}'..='\u{FAFF}' // compatibility ideographs
        | '\u{20000}'..='\u{2FA1F}')
}

/// A cheap estimate of an encoder's token count: one per CJK character or
/// punctuation mark, one per four letters or digits of a word (WordPiece
/// splits long words).
pub fn estimate_tokens(text: &str) -> usize {
    let mut tokens = 0;
    let mut word = 0usize;
    for c in text.chars() {
        if c.is_alphanumeric() && !is_cjk(c) {
            word += 1;
            continue;
        }
        tokens += word.div_ceil(4);
        word = 0;
        if is_cjk(c) || !(c.is_whitespace()) {
            tokens += 1;
        }
    }
    tokens + word.div_ceil(4)
}

/// Sentences of `text`, each with its trailing punctuation and space; a
/// newline always ends one.
fn sentences(text: &str) -> Vec<&str> {
    let mut sentences = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((index, c)) = chars.next() {
        let next = chars.peek().map(|&(_, next)| next);
        let ends = match c {
            '\n' | '。' | '！' | '？' | '；' => true,
            '.' | '!' | '?' | ';' => next.is_none_or(char::is_whitespace),
            _ => false,
        };
        if ends {
            let mut end = index + c.len_utf8();
            while let Some(&(at, space)) = chars.peek() {
                if space.is_whitespace() {
                    end = at + space.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            sentences.push(&text[start..end]);
            start = end;
        }
    }
    if start < text.len() {
        sentences.push(&text[start..]);
    }
    sentences
        .into_iter()
        .filter(|sentence| !sentence.trim().is_empty())
        .collect()
}

/// Cuts a sentence longer than `budget` tokens at character boundaries.
fn split_long(sentence: &str, budget: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    for word in sentence.split_inclusive(|c: char| c.is_whitespace() || is_cjk(c)) {
        if !piece.is_empty() && estimate_tokens(&piece) + estimate_tokens(word) > budget {
            pieces.push(std::mem::take(&mut piece));
        }
        piece.push_str(word);
    }
    if !piece.trim().is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// Cuts every section into chunks of at most `chunk_tokens` (a single word
/// longer than that is kept whole), on sentence boundaries, with overlap.
pub fn chunk_document(document: &ParsedDocument, config: &ChunkingConfig) -> Vec<ChunkDraft> {
    let budget = config.chunk_tokens.max(1);
    let overlap = config.overlap_tokens.min(budget / 2);
    let mut chunks = Vec::new();
    for section in &document.sections {
        let path = section.path();
        let units: Vec<String> = sentences(&section.text)
            .into_iter()
            .flat_map(|sentence| {
                if estimate_tokens(sentence) > budget {
                    split_long(sentence, budget)
                } else {
                    vec![sentence.to_owned()]
                }
            })
            .collect();
        let mut current: Vec<&str> = Vec::new();
        let mut current_tokens = 0;
        // Whether `current` holds anything beyond the overlap it started with.
        let mut fresh = false;
        for unit in &units {
            let tokens = estimate_tokens(unit);
            if fresh && current_tokens + tokens > budget {
                chunks.push(draft(chunks.len(), &path, &current));
                // Carry whole sentences from the tail, up to `overlap` tokens.
                let mut carried: Vec<&str> = Vec::new();
                let mut carried_tokens = 0;
                for previous in current.iter().rev() {
                    let previous_tokens = estimate_tokens(previous);
                    if carried_tokens + previous_tokens > overlap
                        || carried_tokens + previous_tokens + tokens > budget
                    {
                        break;
                    }
                    carried.insert(0, previous);
                    carried_tokens += previous_tokens;
                }
                current = carried;
                current_tokens = carried_tokens;
            }
            current.push(unit);
            current_tokens += tokens;
            fresh = true;
        }
        if fresh {
            chunks.push(draft(chunks.len(), &path, &current));
        }
    }
    chunks
}

fn draft(ordinal: usize, section: &str, sentences: &[&str]) -> ChunkDraft {
    ChunkDraft {
        ordinal,
        section: section.to_owned(),
        text: sentences.concat().trim().to_owned(),
    }
}

/// The text embedded for a chunk: its title and section give the vector the
/// context a bare paragraph lacks ("Treatment" alone says little).
pub fn embedding_text(title: &str, section: &str, text: &str) -> String {
    if section.is_empty() {
        format!("{title}\n{text}")
    } else {
        format!("{title} > {section}\n{text}")
    }
}

/// SHA-256 of a document's text, hex: the same text is stored once.
pub fn document_sha256(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Keyword tokenizer
// ---------------------------------------------------------------------------

/// English words too common to say anything about a passage.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has",
    "have", "how", "i", "if", "in", "is", "it", "its", "my", "of", "on", "or", "should", "than",
    "that", "the", "their", "then", "there", "these", "this", "to", "was", "we", "were", "what",
    "when", "which", "who", "will", "with", "you",
];

/// A light English stemmer: plural and verb endings, so that `patients` and
/// `patient`, `treated` and `treat` meet. Words of four letters or fewer are
/// left alone.
fn stem(word: &str) -> String {
    let strip = |suffix: &str, replacement: &str| -> Option<String> {
        let stem = word.strip_suffix(suffix)?;
        (stem.chars().count() >= 3).then(|| format!("{stem}{replacement}"))
    };
    if word.chars().count() <= 4 {
        return word.to_owned();
    }
    if let Some(stemmed) = strip("ies", "y") {
        return stemmed;
    }
    for suffix in ["ing", "ed", "es"] {
        if let Some(stemmed) = strip(suffix, "") {
            return stemmed;
        }
    }
    if !word.ends_with("ss")
        && !word.ends_with("us")
        && !word.ends_with("is")
        && let Some(stemmed) = strip("s", "")
    {
        return stemmed;
    }
    word.to_owned()
}

/// Keyword tokens: lower-cased, stemmed English (and other alphabetic) words
/// without stop words; every CJK run as its overlapping character bigrams
/// followed by its single characters (bigrams carry most of the meaning;
/// unigrams let `抗凝药` meet `抗凝` and a paraphrase that shares characters
/// but not pairs).
pub fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut cjk: Vec<char> = Vec::new();
    let flush_word = |word: &mut String, tokens: &mut Vec<String>| {
        if !word.is_empty() {
            if !STOP_WORDS.contains(&word.as_str()) {
                tokens.push(stem(word));
            }
            word.clear();
        }
    };
    let flush_cjk = |cjk: &mut Vec<char>, tokens: &mut Vec<String>| {
        match cjk.len() {
            0 => {}
            1 => tokens.push(cjk[0].to_string()),
            _ => {
                tokens.extend(cjk.windows(2).map(|pair| pair.iter().collect::<String>()));
                tokens.extend(cjk.iter().map(char::to_string));
            }
        }
        cjk.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            flush_word(&mut word, &mut tokens);
            cjk.push(c);
        } else if c.is_alphanumeric() {
            flush_cjk(&mut cjk, &mut tokens);
            word.extend(c.to_lowercase());
        } else {
            flush_word(&mut word, &mut tokens);
            flush_cjk(&mut cjk, &mut tokens);
        }
    }
    flush_word(&mut word, &mut tokens);
    flush_cjk(&mut cjk, &mut tokens);
    tokens
}

// ---------------------------------------------------------------------------
// Indexes
// ---------------------------------------------------------------------------

/// BM25 parameters (Robertson and Zaragoza's usual values by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Config {
    /// Term-frequency saturation.
    pub k1: f32,
    /// Length normalisation, 0 (none) to 1 (full).
    pub b: f32,
}

impl Default for Bm25Config {
    fn default() -> Self {
        Bm25Config { k1: 1.2, b: 0.75 }
    }
}

/// An inverted index over chunk slots, scored with Okapi BM25.
#[derive(Debug, Default, Clone)]
pub struct Bm25Index {
    config: Bm25Config,
    /// term → (slot, term frequency)
    postings: HashMap<String, Vec<(usize, u32)>>,
    /// slot → (length in tokens, its distinct terms), for removal and normalisation.
    documents: HashMap<usize, (u32, Vec<String>)>,
    total_length: u64,
}

impl Bm25Index {
    pub fn new(config: Bm25Config) -> Bm25Index {
        Bm25Index {
            config,
            ..Bm25Index::default()
        }
    }

    /// Indexes `text` under `slot` (replacing what the slot held).
    pub fn insert(&mut self, slot: usize, text: &str) {
        self.remove(slot);
        let tokens = tokenize(text);
        let mut frequencies: BTreeMap<String, u32> = BTreeMap::new();
        for token in &tokens {
            *frequencies.entry(token.clone()).or_default() += 1;
        }
        let length = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        for (term, frequency) in &frequencies {
            self.postings
                .entry(term.clone())
                .or_default()
                .push((slot, *frequency));
        }
        self.total_length += u64::from(length);
        self.documents
            .insert(slot, (length, frequencies.into_keys().collect()));
    }

    pub fn remove(&mut self, slot: usize) {
        let Some((length, terms)) = self.documents.remove(&slot) else {
            return;
        };
        self.total_length -= u64::from(length);
        for term in terms {
            if let Some(postings) = self.postings.get_mut(&term) {
                postings.retain(|(other, _)| *other != slot);
                if postings.is_empty() {
                    self.postings.remove(&term);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.documents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// Every slot sharing a term with `query`, best first (ties by slot).
    pub fn search(&self, query: &str) -> Vec<(usize, f32)> {
        if self.documents.is_empty() {
            return Vec::new();
        }
        let count = self.documents.len() as f32;
        let average_length = (self.total_length as f32 / count).max(1.0);
        let Bm25Config { k1, b } = self.config;
        let terms: HashSet<String> = tokenize(query).into_iter().collect();
        let mut scores: HashMap<usize, f32> = HashMap::new();
        for term in &terms {
            let Some(postings) = self.postings.get(term) else {
                continue;
            };
            let frequency = postings.len() as f32;
            let idf = (1.0 + (count - frequency + 0.5) / (frequency + 0.5)).ln();
            for &(slot, term_frequency) in postings {
                let length = self.documents.get(&slot).map_or(0, |(length, _)| *length) as f32;
                let tf = term_frequency as f32;
                let saturated =
                    tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * length / average_length));
                *scores.entry(slot).or_default() += idf * saturated;
            }
        }
        sorted(scores.into_iter().collect())
    }
}

/// Best first; ties go to the lower slot so results are reproducible.
fn sorted(mut scored: Vec<(usize, f32)>) -> Vec<(usize, f32)> {
    scored.sort_by(|left, right| right.1.total_cmp(&left.1).then(left.0.cmp(&right.0)));
    scored
}

/// Scales `vector` to unit length; a zero vector stays zero.
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    if norm > 0.0 {
        for value in vector.iter_mut() {
            *value /= norm;
        }
    }
}

/// A flat (exact, brute-force) index of unit vectors: cosine similarity is a
/// dot product. Exact search over a few hundred thousand chunks takes
/// milliseconds; no approximate structure is needed at a hospital's scale.
#[derive(Debug, Default, Clone)]
pub struct VectorIndex {
    dimensions: usize,
    vectors: HashMap<usize, Vec<f32>>,
}

impl VectorIndex {
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Stores `vector`, normalised, under `slot`. The first vector fixes the
    /// dimensions; `false` (nothing stored) for a vector of other dimensions.
    pub fn insert(&mut self, slot: usize, mut vector: Vec<f32>) -> bool {
        if self.vectors.is_empty() {
            self.dimensions = vector.len();
        }
        if vector.len() != self.dimensions || vector.is_empty() {
            return false;
        }
        normalize(&mut vector);
        self.vectors.insert(slot, vector);
        true
    }

    pub fn remove(&mut self, slot: usize) {
        self.vectors.remove(&slot);
    }

    /// The `limit` slots most similar to `query` (cosine), best first.
    pub fn search(&self, query: &[f32], limit: usize) -> Vec<(usize, f32)> {
        if query.len() != self.dimensions {
            return Vec::new();
        }
        let mut query = query.to_vec();
        normalize(&mut query);
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .iter()
            .map(|(slot, vector)| {
                let dot = vector.iter().zip(&query).map(|(a, b)| a * b).sum::<f32>();
                (*slot, dot)
            })
            .collect();
        scored = sorted(scored);
        scored.truncate(limit);
        scored
    }
}

/// How the two rankings are fused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusionConfig {
    /// Weight of the vector ranking's normalised score.
    pub vector_weight: f32,
    /// Weight of the keyword (BM25) ranking's normalised score.
    pub keyword_weight: f32,
    /// Whether the embedding model understands CJK text. When it does not
    /// (MiniLM, the default model, was trained on English), the vector
    /// weight of a query is scaled by the share of its letters and digits
    /// that are not CJK, so a Chinese question is ranked by its keywords.
    pub multilingual_embeddings: bool,
}

impl Default for FusionConfig {
    fn default() -> Self {
        FusionConfig {
            vector_weight: 1.0,
            keyword_weight: 1.0,
            multilingual_embeddings: false,
        }
    }
}

impl FusionConfig {
    /// The vector ranking's share `α` of the fused score for `query`, 0 to 1.
    pub fn vector_share(&self, query: &str) -> f32 {
        let mut vector_weight = self.vector_weight.max(0.0);
        if !self.multilingual_embeddings {
            vector_weight *= 1.0 - cjk_share(query);
        }
        let total = vector_weight + self.keyword_weight.max(0.0);
        if total > 0.0 {
            vector_weight / total
        } else {
            0.0
        }
    }
}

/// The share of `text`'s letters and digits that are CJK, 0 to 1.
pub fn cjk_share(text: &str) -> f32 {
    let (cjk, all) = text
        .chars()
        .filter(|c| c.is_alphanumeric())
        .fold((0usize, 0usize), |(cjk, all), c| {
            (cjk + usize::from(is_cjk(c)), all + 1)
        });
    if all == 0 {
        0.0
    } else {
        cjk as f32 / all as f32
    }
}

/// One ranking entry: a slot, its rank (1-based) and raw score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    pub slot: usize,
    pub rank: usize,
    pub score: f32,
}

/// A fused entry: the slot, the fused score and where each list had it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fused {
    pub slot: usize,
    pub score: f32,
    pub vector: Option<Ranked>,
    pub keyword: Option<Ranked>,
}

/// A convex combination of normalised scores (Bruch, Gai and Ingber, 2023):
/// `α · (cos − min cos) / (max cos − min cos) + (1 − α) · bm25 / max bm25`,
/// where `vector` holds the cosine of every indexed chunk and `keyword` the
/// BM25 score of every chunk sharing a term with the query (others count 0).
/// Best first; ties go to the better single rank, then the lower slot.
pub fn fuse_scores(
    vector: &[(usize, f32)],
    keyword: &[(usize, f32)],
    vector_share: f32,
) -> Vec<Fused> {
    let alpha = vector_share.clamp(0.0, 1.0);
    let (low, high) = vector.iter().fold(
        (f32::INFINITY, f32::NEG_INFINITY),
        |(low, high), &(_, score)| (low.min(score), high.max(score)),
    );
    let spread = high - low;
    let keyword_max = keyword
        .iter()
        .map(|&(_, score)| score)
        .fold(0.0f32, f32::max);
    let mut fused: BTreeMap<usize, Fused> = BTreeMap::new();
    for (list, is_vector) in [(vector, true), (keyword, false)] {
        for (index, &(slot, score)) in list.iter().enumerate() {
            let normalized = if is_vector {
                if spread > 0.0 {
                    (score - low) / spread
                } else {
                    1.0
                }
            } else if keyword_max > 0.0 {
                score / keyword_max
            } else {
                0.0
            };
            let weight = if is_vector { alpha } else { 1.0 - alpha };
            let entry = fused.entry(slot).or_insert(Fused {
                slot,
                score: 0.0,
                vector: None,
                keyword: None,
            });
            entry.score += weight * normalized;
            let ranked = Some(Ranked {
                slot,
                rank: index + 1,
                score,
            });
            if is_vector {
                entry.vector = ranked;
            } else {
                entry.keyword = ranked;
            }
        }
    }
    let best_rank = |entry: &Fused| {
        [entry.vector, entry.keyword]
            .into_iter()
            .flatten()
            .map(|ranked| ranked.rank)
            .min()
            .unwrap_or(usize::MAX)
    };
    let mut fused: Vec<Fused> = fused.into_values().collect();
    fused.sort_by(|left, right| {
        right
            .score
            .total_cmp(&left.score)
            .then(best_rank(left).cmp(&best_rank(right)))
            .then(left.slot.cmp(&right.slot))
    });
    fused
}

// ---------------------------------------------------------------------------
// The embedder boundary
// ---------------------------------------------------------------------------

/// Vectors for a list of texts, and the model that made them.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The model's name (not an alias): vectors of different models never mix.
    pub model: String,
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
}

/// Why texts could not be embedded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedderError {
    /// No embedding model is configured, or the configured one is not a
    /// loaded embedding model: an administrator must act.
    #[error("{0}")]
    NotConfigured(String),
    /// The model is loading, busy or stopping: worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The model failed on these texts.
    #[error("embedding failed: {0}")]
    Failed(String),
}

/// The future an [`Embedder`] returns.
pub type EmbedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Embeddings, EmbedderError>> + Send + 'a>>;

/// Texts to vectors. The server implements it over the runtime's embedding
/// engine (the path `Inference.Embed` takes); tests use a hashing double.
/// Implementations must not block the calling thread.
pub trait Embedder: Send + Sync {
    /// Embeds at most [`EMBED_BATCH`] non-blank texts, in order.
    fn embed(&self, texts: Vec<String>) -> EmbedFuture<'_>;
}

// ---------------------------------------------------------------------------
// The knowledge base
// ---------------------------------------------------------------------------

/// A chunk with its vector, ready for the index (and the store).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedChunk {
    pub ordinal: usize,
    pub section: String,
    pub text: String,
    pub vector: Vec<f32>,
}

/// A document chunked and embedded, not yet stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedDocument {
    pub title: String,
    pub source: String,
    pub format: DocumentFormat,
    /// [`document_sha256`] of the text.
    pub sha256: String,
    pub bytes: usize,
    /// The embedding model's name and its vectors' length.
    pub model: String,
    pub dimensions: usize,
    pub chunks: Vec<EmbeddedChunk>,
}

/// A stored document as the index holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedDocument {
    pub id: String,
    pub title: String,
    pub source: String,
    pub model: String,
    pub chunks: Vec<EmbeddedChunk>,
}

/// Which rankings a search uses (the vector and keyword ones are for
/// measuring and debugging; agents and clients use hybrid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchMode {
    Hybrid,
    Vector,
    Keyword,
}

impl SearchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchMode::Hybrid => "hybrid",
            SearchMode::Vector => "vector",
            SearchMode::Keyword => "keyword",
        }
    }

    pub fn parse(name: &str) -> Option<SearchMode> {
        match name {
            "" | "hybrid" => Some(SearchMode::Hybrid),
            "vector" => Some(SearchMode::Vector),
            "keyword" | "bm25" => Some(SearchMode::Keyword),
            _ => None,
        }
    }
}

/// One passage found.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub document_id: String,
    pub title: String,
    pub source: String,
    pub section: String,
    pub ordinal: usize,
    pub text: String,
    /// The fused score (hybrid), the cosine (vector) or the BM25 score (keyword).
    pub score: f32,
    /// Cosine similarity and rank, when the vector ranking had the passage.
    pub vector: Option<(f32, usize)>,
    /// BM25 score and rank, when the keyword ranking had the passage.
    pub keyword: Option<(f32, usize)>,
}

impl SearchHit {
    /// `Title § Section`, how an answer cites the passage.
    pub fn citation(&self) -> String {
        if self.section.is_empty() {
            self.title.clone()
        } else {
            format!("{} § {}", self.title, self.section)
        }
    }
}

/// What the knowledge base is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KnowledgeConfig {
    pub chunking: ChunkingConfig,
    pub bm25: Bm25Config,
    pub fusion: FusionConfig,
}

#[derive(Debug, Clone)]
struct Slot {
    document: Arc<DocumentInfo>,
    ordinal: usize,
    section: String,
    text: String,
}

#[derive(Debug)]
struct DocumentInfo {
    id: String,
    title: String,
    source: String,
}

#[derive(Debug, Default)]
struct Index {
    slots: Vec<Option<Slot>>,
    by_document: HashMap<String, Vec<usize>>,
    keyword: Bm25Index,
    vector: VectorIndex,
    /// The embedding model of every vector in the index (none while empty).
    model: Option<String>,
}

/// The searchable knowledge base: in-memory indexes over every stored chunk.
/// Cheap to share behind an `Arc`; searches run concurrently with each other.
pub struct KnowledgeBase {
    embedder: Arc<dyn Embedder>,
    config: KnowledgeConfig,
    index: RwLock<Index>,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KnowledgeBase")
            .field("chunks", &self.chunk_count())
            .finish()
    }
}

impl KnowledgeBase {
    pub fn new(embedder: Arc<dyn Embedder>, config: KnowledgeConfig) -> KnowledgeBase {
        KnowledgeBase {
            embedder,
            config,
            index: RwLock::new(Index {
                keyword: Bm25Index::new(config.bm25),
                ..Index::default()
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Chunks in the index.
    pub fn chunk_count(&self) -> usize {
        self.read().by_document.values().map(Vec::len).sum()
    }

    /// Documents in the index.
    pub fn document_count(&self) -> usize {
        self.read().by_document.len()
    }

    /// Embeds texts in batches of [`EMBED_BATCH`]; every batch must come from
    /// the same model with vectors of one length.
    pub async fn embed_all(&self, texts: Vec<String>) -> Result<Embeddings, KnowledgeError> {
        let mut model: Option<String> = None;
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            let embedded = self.embedder.embed(batch.to_vec()).await?;
            check_shape(batch.len(), &embedded, vectors.first().map(Vec::len))?;
            match &model {
                Some(first) if *first != embedded.model => {
                    return Err(KnowledgeError::ModelMismatch {
                        index_model: first.clone(),
                        model: embedded.model,
                    });
                }
                Some(_) => {}
                None => model = Some(embedded.model.clone()),
            }
            vectors.extend(embedded.vectors);
        }
        Ok(Embeddings {
            model: model.unwrap_or_default(),
            vectors,
        })
    }

    /// Parses, chunks and embeds a document (nothing is indexed yet: the
    /// server stores it first, then calls [`KnowledgeBase::insert`]).
    pub async fn prepare(
        &self,
        document: &NewDocument,
    ) -> Result<PreparedDocument, KnowledgeError> {
        let parsed = parse_document(document)?;
        let drafts = chunk_document(&parsed, &self.config.chunking);
        if drafts.is_empty() {
            return Err(KnowledgeError::EmptyDocument);
        }
        let texts = drafts
            .iter()
            .map(|chunk| embedding_text(&parsed.title, &chunk.section, &chunk.text))
            .collect();
        let embedded = self.embed_all(texts).await?;
        let dimensions = embedded.vectors.first().map_or(0, Vec::len);
        let chunks = drafts
            .into_iter()
            .zip(embedded.vectors)
            .map(|(draft, vector)| EmbeddedChunk {
                ordinal: draft.ordinal,
                section: draft.section,
                text: draft.text,
                vector,
            })
            .collect();
        Ok(PreparedDocument {
            title: parsed.title,
            source: document.source.trim().to_owned(),
            format: document.format,
            sha256: document_sha256(&document.text),
            bytes: document.text.len(),
            model: embedded.model,
            dimensions,
            chunks,
        })
    }

    /// Adds a stored document to the index (replacing one with the same id).
    /// Refused when its vectors come from another model than the index's, or
    /// have other dimensions.
    pub fn insert(&self, document: IndexedDocument) -> Result<(), KnowledgeError> {
        let mut index = self.write();
        if let Some(index_model) = &index.model
            && !index.by_document.is_empty()
            && *index_model != document.model
        {
            return Err(KnowledgeError::ModelMismatch {
                index_model: index_model.clone(),
                model: document.model,
            });
        }
        if index.by_document.is_empty() {
            index.vector = VectorIndex::default();
        }
        let expected = if index.vector.is_empty() {
            document
                .chunks
                .first()
                .map_or(0, |chunk| chunk.vector.len())
        } else {
            index.vector.dimensions()
        };
        if let Some(bad) = document
            .chunks
            .iter()
            .find(|chunk| chunk.vector.len() != expected || expected == 0)
        {
            return Err(KnowledgeError::EmbeddingShape {
                expected: document.chunks.len(),
                got: document.chunks.len(),
                expected_dimensions: expected,
                got_dimensions: bad.vector.len(),
            });
        }
        remove_document(&mut index, &document.id);
        index.model = Some(document.model.clone());
        let info = Arc::new(DocumentInfo {
            id: document.id.clone(),
            title: document.title,
            source: document.source,
        });
        let mut slots = Vec::with_capacity(document.chunks.len());
        for chunk in document.chunks {
            let slot = index.slots.len();
            let keyword_text = format!("{}\n{}\n{}", info.title, chunk.section, chunk.text);
            index.keyword.insert(slot, &keyword_text);
            index.vector.insert(slot, chunk.vector);
            index.slots.push(Some(Slot {
                document: info.clone(),
                ordinal: chunk.ordinal,
                section: chunk.section,
                text: chunk.text,
            }));
            slots.push(slot);
        }
        index.by_document.insert(document.id, slots);
        Ok(())
    }

    /// Takes a document out of the index; `false` if it was not there.
    pub fn remove(&self, document_id: &str) -> bool {
        remove_document(&mut self.write(), document_id)
    }

    /// Hybrid search: the `limit` best passages for `query`.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<SearchHit>, KnowledgeError> {
        self.search_with(query, limit, SearchMode::Hybrid).await
    }

    /// Search with the rankings `mode` names. `limit` is clamped to 1..=[`MAX_SEARCH_LIMIT`].
    pub async fn search_with(
        &self,
        query: &str,
        limit: usize,
        mode: SearchMode,
    ) -> Result<Vec<SearchHit>, KnowledgeError> {
        let query = query.trim();
        if query.is_empty() {
            return Err(KnowledgeError::EmptyQuery);
        }
        if query.chars().count() > MAX_QUERY_CHARS {
            return Err(KnowledgeError::QueryTooLong);
        }
        let limit = limit.clamp(1, MAX_SEARCH_LIMIT);
        if self.read().by_document.is_empty() {
            return Ok(Vec::new());
        }
        let query_vector = match mode {
            SearchMode::Keyword => None,
            SearchMode::Hybrid | SearchMode::Vector => {
                let embedded = self.embedder.embed(vec![query.to_owned()]).await?;
                check_shape(1, &embedded, None)?;
                Some(embedded)
            }
        };
        // From here on no `.await`: the read lock is taken and dropped in this block.
        let index = self.read();
        // Every chunk's cosine: the blend normalises by the whole range.
        let candidates = index.vector.len();
        let vector = match &query_vector {
            Some(embedded) => {
                if let Some(index_model) = &index.model
                    && *index_model != embedded.model
                {
                    return Err(KnowledgeError::ModelMismatch {
                        index_model: index_model.clone(),
                        model: embedded.model.clone(),
                    });
                }
                let query_vector = &embedded.vectors[0];
                if query_vector.len() != index.vector.dimensions() {
                    return Err(KnowledgeError::EmbeddingShape {
                        expected: 1,
                        got: 1,
                        expected_dimensions: index.vector.dimensions(),
                        got_dimensions: query_vector.len(),
                    });
                }
                index.vector.search(query_vector, candidates)
            }
            None => Vec::new(),
        };
        let keyword = match mode {
            SearchMode::Vector => Vec::new(),
            SearchMode::Hybrid | SearchMode::Keyword => index.keyword.search(query),
        };
        let fused = match mode {
            SearchMode::Hybrid => {
                fuse_scores(&vector, &keyword, self.config.fusion.vector_share(query))
            }
            SearchMode::Vector | SearchMode::Keyword => {
                let single = if mode == SearchMode::Vector {
                    &vector
                } else {
                    &keyword
                };
                let only_vector = mode == SearchMode::Vector;
                single
                    .iter()
                    .enumerate()
                    .map(|(index, &(slot, score))| {
                        let ranked = Some(Ranked {
                            slot,
                            rank: index + 1,
                            score,
                        });
                        Fused {
                            slot,
                            score,
                            vector: if only_vector { ranked } else { None },
                            keyword: if only_vector { None } else { ranked },
                        }
                    })
                    .collect()
            }
        };
        let hits = fused
            .into_iter()
            .filter_map(|fused| {
                let slot = index.slots.get(fused.slot)?.as_ref()?;
                Some(SearchHit {
                    document_id: slot.document.id.clone(),
                    title: slot.document.title.clone(),
                    source: slot.document.source.clone(),
                    section: slot.section.clone(),
                    ordinal: slot.ordinal,
                    text: slot.text.clone(),
                    score: fused.score,
                    vector: fused.vector.map(|ranked| (ranked.score, ranked.rank)),
                    keyword: fused.keyword.map(|ranked| (ranked.score, ranked.rank)),
                })
            })
            .take(limit)
            .collect();
        Ok(hits)
    }

    /// The `knowledge_search` tool: `{"query": …, "limit"?: 1..=10}` →
    /// `{"query", "passages": [{"rank", "citation", "document_id", "title",
    /// "source", "section", "text", "score"}]}`. Errors are written for the
    /// model: a bad argument names the field; an unavailable embedding model
    /// says to answer without the knowledge base.
    pub async fn call_search_tool(&self, arguments: &Value) -> Result<Value, ToolError> {
        let arguments: SearchArguments = parse_arguments(arguments)?;
        let limit = arguments.limit.unwrap_or(DEFAULT_TOOL_LIMIT as u64);
        if !(1..=MAX_TOOL_LIMIT as u64).contains(&limit) {
            return Err(ToolError::OutOfRange {
                field: "limit".into(),
                value: limit as f64,
                expected: format!("expected 1 to {MAX_TOOL_LIMIT} passages"),
            });
        }
        let hits = self
            .search(&arguments.query, limit as usize)
            .await
            .map_err(|error| match error {
                KnowledgeError::EmptyQuery | KnowledgeError::QueryTooLong => {
                    ToolError::bad("query", error.to_string())
                }
                other => ToolError::Unavailable {
                    tool: KNOWLEDGE_SEARCH_TOOL,
                    reason: other.to_string(),
                },
            })?;
        let result = SearchResult {
            query: arguments.query.trim().to_owned(),
            passages: hits
                .into_iter()
                .enumerate()
                .map(|(index, hit)| Passage {
                    rank: index + 1,
                    citation: hit.citation(),
                    document_id: hit.document_id,
                    title: hit.title,
                    source: hit.source,
                    section: hit.section,
                    text: hit.text,
                    score: hit.score,
                })
                .collect(),
        };
        serde_json::to_value(result).map_err(|error| ToolError::ResultEncoding {
            tool: KNOWLEDGE_SEARCH_TOOL,
            reason: error.to_string(),
        })
    }
}

fn check_shape(
    texts: usize,
    embedded: &Embeddings,
    dimensions: Option<usize>,
) -> Result<(), KnowledgeError> {
    let expected_dimensions = dimensions
        .or_else(|| embedded.vectors.first().map(Vec::len))
        .unwrap_or(0);
    let bad = embedded.vectors.len() != texts
        || expected_dimensions == 0
        || embedded
            .vectors
            .iter()
            .any(|vector| vector.len() != expected_dimensions);
    if bad {
        return Err(KnowledgeError::EmbeddingShape {
            expected: texts,
            got: embedded.vectors.len(),
            expected_dimensions,
            got_dimensions: embedded
                .vectors
                .iter()
                .map(Vec::len)
                .find(|length| *length != expected_dimensions)
                .unwrap_or(expected_dimensions),
        });
    }
    Ok(())
}

fn remove_document(index: &mut Index, document_id: &str) -> bool {
    let Some(slots) = index.by_document.remove(document_id) else {
        return false;
    };
    for slot in slots {
        index.keyword.remove(slot);
        index.vector.remove(slot);
        if let Some(entry) = index.slots.get_mut(slot) {
            *entry = None;
        }
    }
    if index.by_document.is_empty() {
        index.model = None;
    }
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArguments {
    query: String,
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Serialize)]
struct SearchResult {
    query: String,
    passages: Vec<Passage>,
}

#[derive(Serialize)]
struct Passage {
    rank: usize,
    /// `Title § Section`.
    citation: String,
    document_id: String,
    title: String,
    source: String,
    section: String,
    text: String,
    score: f32,
}

#[cfg(test)]
mod tests;
