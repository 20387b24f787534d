//! Constrained decoding: answers that must match a JSON schema, a regular
//! expression or a grammar (Lark, in the llguidance dialect), enforced token
//! by token with the `llguidance` crate.
//!
//! # Pieces
//! - [`Constraint`]: what a request asks for, as text.
//! - `ConstraintCompiler`: built once per model at load from its tokenizer,
//!   its vocabulary size (the rows of the output layer, which may outnumber
//!   the tokenizer's ids) and its end-of-sequence ids. It knows the bytes of
//!   every token: byte-level BPE pieces (`Ġ` and friends) and byte-fallback
//!   pieces (`<0x0A>`, `▁`) map to the bytes they stand for; special tokens
//!   are marked special, so no grammar over text can produce them; end ids
//!   are always special. It lives in an `Arc` in the `Validator`.
//! - `CompiledConstraint`: what `Validator::validate` makes of a request's
//!   constraint, so that a bad schema, regex or grammar is a
//!   `ValidationError::Constraint` naming the field before any work is
//!   queued. JSON schemas default to compact JSON (no free whitespace
//!   between tokens, so a small model cannot loop on blank lines); a
//!   schema's own `x-guidance` object overrides that.
//! - `ConstraintState`: one per running sequence, on the engine thread.
//!
//! # How the engine uses it
//! For each constrained sequence, every step: if `is_finished()`, finish
//! with reason `Stop` (also under `ignore_eos`); otherwise `mask_logits` on
//! the sequence's logits (one row of the model's vocabulary), sample from
//! them, then `commit` the sampled token. Any `Err` fails the request: its
//! text says what went wrong.
//!
//! Reasoning models: a prompt that ends inside an open `<think>`
//! (`starts_in_reasoning`) runs free until `</think>` is sampled; otherwise
//! the first step may choose `<think>` besides the constraint's own tokens
//! and, if it does, runs free until `</think>`. Free running masks only ids
//! that are no token of the tokenizer and the end ids, so that a sequence
//! cannot end before it has given its constrained answer; it never forces
//! `</think>`. This is the same `<think>` rule `ReasoningSplitter` applies,
//! so the answer it separates is the constrained text.
//!
//! # Invariant: fail closed
//! A constrained request either yields text the constraint accepts (or a
//! prefix of it, when `max_tokens` cuts it short) or an error; never an
//! unconstrained answer. Ids beyond the tokenizer are never allowed; an empty
//! mask, a token the constraint rejects or an internal matcher error is an
//! `Err`, never "let everything through". Tokens whose bytes cannot be
//! known are left out of the vocabulary the constraint sees, so they can
//! never be chosen under it.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::{INVALID_TOKEN, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::ValidationError;

/// Constraint texts are bounded: compiling one is work done for a caller.
pub(crate) const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// Error reasons quoted back to a caller are cut to this many bytes.
const MAX_REASON_BYTES: usize = 512;

/// Longer tokens are left out of the constraint's vocabulary (the token
/// trie cannot hold them; no real tokenizer has them).
const MAX_TOKEN_BYTES: usize = 512;

/// What the answer must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// A JSON schema, as JSON text; the answer is one JSON value it accepts.
    JsonSchema(String),
    /// A regular expression (Rust `regex` syntax) the whole answer matches.
    Regex(String),
    /// A context-free grammar in llguidance's Lark dialect; the answer is a
    /// sentence of its `start` rule.
    Grammar(String),
}

impl Constraint {
    /// The request field the constraint came from, as error messages name it.
    pub fn field(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::Regex(_) => "regex",
            Constraint::Grammar(_) => "grammar",
        }
    }

    /// The constraint's text.
    pub fn source(&self) -> &str {
        match self {
            Constraint::JsonSchema(source)
            | Constraint::Regex(source)
            | Constraint::Grammar(source) => source,
        }
    }
}

/// The `<think>` and `</think>` token ids of a reasoning model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ThinkTokens {
    open: u32,
    close: u32,
}

/// The model's vocabulary as every constraint of it sees it.
struct Vocabulary {
    /// Rows of the model's output: the length of a logits row.
    size: usize,
    /// The model's end-of-sequence ids (all below `size`).
    eos: Vec<u32>,
    /// Just the end ids.
    eos_mask: SimpleVob,
    /// What free reasoning may choose: every token with known bytes,
    /// the end ids excepted.
    free_mask: SimpleVob,
    think: Option<ThinkTokens>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Vocabulary")
            .field("size", &self.size)
            .field("eos", &self.eos)
            .field("known_tokens", &(self.free_mask.num_set() + self.eos.len()))
            .field("think", &self.think)
            .finish()
    }
}

/// Compiles constraints for one model. Built once, at load.
pub(crate) struct ConstraintCompiler {
    factory: ParserFactory,
    vocabulary: Arc<Vocabulary>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConstraintCompiler")
            .field("vocabulary", &self.vocabulary)
            .finish_non_exhaustive()
    }
}

impl ConstraintCompiler {
    /// `vocab_size`: the model's output rows (at least the tokenizer's ids);
    /// `eos_token_ids`: every id that ends a sequence (ids beyond
    /// `vocab_size` are ignored). Fails when the tokenizer's pieces cannot
    /// be mapped to bytes (neither byte-level nor byte-fallback).
    pub(crate) fn new(
        tokenizer: Arc<tokenizers::Tokenizer>,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<ConstraintCompiler, String> {
        let vocab_u32 = u32::try_from(vocab_size)
            .ok()
            .filter(|&size| size < INVALID_TOKEN)
            .ok_or_else(|| format!("vocabulary of {vocab_size} tokens is too large"))?;
        let mut eos: Vec<u32> = Vec::new();
        for &id in eos_token_ids {
            if id < vocab_u32 && !eos.contains(&id) {
                eos.push(id);
            }
        }
        let mut words = token_bytes(&tokenizer, vocab_size)?;
        // End ids are only ever chosen as ends, never as text.
        for &id in &eos {
            let word = &mut words[id as usize];
            if word.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
                let text = tokenizer
                    .id_to_token(id)
                    .unwrap_or_else(|| format!("<[{id}]>"));
                *word = special_bytes(&text);
            }
        }
        let think = match (
            tokenizer.token_to_id("<think>"),
            tokenizer.token_to_id("</think>"),
        ) {
            (Some(open), Some(close)) if open < vocab_u32 && close < vocab_u32 => {
                Some(ThinkTokens { open, close })
            }
            _ => None,
        };
        let first_eos = eos.first().copied().unwrap_or(INVALID_TOKEN);
        let info = TokRxInfo::new(vocab_u32, first_eos);
        let trie = catch_unwind(AssertUnwindSafe(|| {
            let trie = TokTrie::from(&info, &words);
            if eos.is_empty() {
                trie
            } else {
                trie.with_eos_tokens(&eos)
            }
        }))
        .map_err(|_| "the token trie could not be built".to_string())?;
        let mut eos_mask = trie.alloc_token_set();
        let mut free_mask = trie.alloc_token_set();
        for (id, word) in words.iter().enumerate() {
            if !word.is_empty() {
                free_mask.set(id, true);
            }
        }
        for &id in &eos {
            eos_mask.allow_token(id);
            free_mask.disallow_token(id);
        }
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = catch_unwind(AssertUnwindSafe(|| ParserFactory::new_simple(&env)))
            .map_err(|_| "the constraint parser could not be set up".to_string())?
            .map_err(|error| format!("the constraint parser could not be set up: {error}"))?;
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(ConstraintCompiler {
            factory,
            vocabulary: Arc::new(Vocabulary {
                size: vocab_size,
                eos,
                eos_mask,
                free_mask,
                think,
            }),
        })
    }

    /// Compiles a request's constraint, computing its first mask too, so
    /// that every error the constraint can show up front is a
    /// `ValidationError` naming its field.
    pub(crate) fn compile(
        &self,
        constraint: &Constraint,
    ) -> Result<CompiledConstraint, ValidationError> {
        let field = constraint.field();
        let source = constraint.source();
        let invalid = |reason: String| ValidationError::Constraint {
            field,
            reason: truncate(reason),
        };
        if source.len() > MAX_CONSTRAINT_BYTES {
            return Err(ValidationError::ConstraintTooLong {
                field,
                max: MAX_CONSTRAINT_BYTES,
                got: source.len(),
            });
        }
        if source.trim().is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        let grammar = match constraint {
            Constraint::JsonSchema(text) => {
                let schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|error| invalid(format!("not valid JSON: {error}")))?;
                TopLevelGrammar::from_json_schema(with_default_json_options(schema))
            }
            Constraint::Regex(text) => TopLevelGrammar::from_regex(text),
            Constraint::Grammar(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let what = match constraint {
            Constraint::JsonSchema(_) => "invalid JSON schema",
            Constraint::Regex(_) => "invalid regex",
            Constraint::Grammar(_) => "invalid grammar",
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|error| invalid(format!("{what}: {error}")))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(invalid(format!("{what}: {error}")));
        }
        matcher
            .compute_mask()
            .map_err(|error| invalid(format!("{what}: {error}")))?;
        Ok(CompiledConstraint {
            field,
            source: Arc::from(source),
            matcher,
            vocabulary: Arc::clone(&self.vocabulary),
        })
    }
}

/// JSON schemas default to compact JSON unless they say otherwise.
fn with_default_json_options(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
    {
        object.insert(
            "x-guidance".into(),
            serde_json::json!({"whitespace_flexible": false}),
        );
    }
    schema
}

fn truncate(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// A request's constraint, compiled for one model: ready to start a
/// `ConstraintState` per sequence. Compares by kind and text; its `Debug`
/// shows the kind and size, never the text.
#[derive(Clone)]
pub(crate) struct CompiledConstraint {
    field: &'static str,
    source: Arc<str>,
    /// Fresh: nothing consumed yet.
    matcher: Matcher,
    vocabulary: Arc<Vocabulary>,
}

impl CompiledConstraint {
    /// `json_schema`, `regex` or `grammar`.
    pub(crate) fn kind(&self) -> &'static str {
        self.field
    }
}

impl PartialEq for CompiledConstraint {
    fn eq(&self, other: &Self) -> bool {
        self.field == other.field && self.source == other.source
    }
}

impl std::fmt::Debug for CompiledConstraint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CompiledConstraint")
            .field("kind", &self.field)
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// First step of a reasoning model's answer: `<think>` or the constraint.
    Opening,
    /// Inside `<think>…`: free until `</think>`.
    Thinking,
    /// The answer, under the constraint.
    Constrained,
}

/// One running sequence's constraint. Lives on the engine thread.
pub(crate) struct ConstraintState {
    matcher: Matcher,
    vocabulary: Arc<Vocabulary>,
    phase: Phase,
}

impl ConstraintState {
    /// `starts_in_reasoning`: the prompt ends inside an open `<think>`.
    /// `may_open_reasoning`: the answer may begin with `<think>` (a chat
    /// with a model that thinks); otherwise the constraint applies from the
    /// first token.
    pub(crate) fn new(
        compiled: &CompiledConstraint,
        starts_in_reasoning: bool,
        may_open_reasoning: bool,
    ) -> Result<Self, String> {
        let vocabulary = Arc::clone(&compiled.vocabulary);
        let phase = match (starts_in_reasoning, vocabulary.think) {
            (true, Some(_)) => Phase::Thinking,
            (true, None) => {
                return Err("the prompt opens <think> but the model's tokenizer has no \
                            `</think>` token, so the constrained answer cannot be told apart"
                    .into());
            }
            (false, Some(_)) if may_open_reasoning => Phase::Opening,
            (false, _) => Phase::Constrained,
        };
        let matcher = compiled.matcher.clone();
        if let Some(error) = matcher.get_error() {
            return Err(format!("constraint failed: {error}"));
        }
        Ok(ConstraintState {
            matcher,
            vocabulary,
            phase,
        })
    }

    /// Sets every token the constraint forbids now to -inf in `logits`
    /// (length = model vocab). While the model is thinking (inside
    /// `<think>…</think>`) only ids that are no token and the end ids are
    /// masked.
    #[cfg(test)]
    pub(crate) fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.next_mask()?;
        self.apply(&allowed, logits)
    }

    /// The tokens allowed next. It depends only on the tokens committed so
    /// far, so the engine computes it while the forward pass runs.
    pub(crate) fn next_mask(&mut self) -> Result<SimpleVob, String> {
        match self.phase {
            Phase::Thinking => Ok(self.vocabulary.free_mask.clone()),
            Phase::Opening => {
                let mut allowed = self.constraint_mask()?;
                if let Some(think) = self.vocabulary.think {
                    allowed.allow_token(think.open);
                }
                Ok(allowed)
            }
            Phase::Constrained => self.constraint_mask(),
        }
    }

    /// Applies a mask from `next_mask` to a row of logits.
    pub(crate) fn apply(&self, allowed: &SimpleVob, logits: &mut [f32]) -> Result<(), String> {
        if logits.len() != self.vocabulary.size {
            return Err(format!(
                "logits have {} entries but the model's vocabulary has {}",
                logits.len(),
                self.vocabulary.size
            ));
        }
        apply_mask(allowed, logits)
    }

    /// What the constraint allows now: its mask, or only the end ids once
    /// it is complete.
    fn constraint_mask(&mut self) -> Result<SimpleVob, String> {
        if self.is_finished() {
            return Ok(self.vocabulary.eos_mask.clone());
        }
        if let Some(error) = self.matcher.get_error() {
            return Err(format!("constraint failed: {error}"));
        }
        match self.matcher.compute_mask() {
            Ok(mask) => Ok(mask),
            Err(_) if self.is_finished() => Ok(self.vocabulary.eos_mask.clone()),
            Err(error) => Err(format!("constraint failed: {error}")),
        }
    }

    /// Advances with the sampled token.
    pub(crate) fn commit(&mut self, token: u32) -> Result<(), String> {
        if token as usize >= self.vocabulary.size {
            return Err(format!(
                "token {token} is beyond the model's vocabulary of {}",
                self.vocabulary.size
            ));
        }
        match (self.phase, self.vocabulary.think) {
            (Phase::Opening, Some(think)) if token == think.open => {
                self.phase = Phase::Thinking;
                Ok(())
            }
            (Phase::Thinking, Some(think)) => {
                if token == think.close {
                    self.phase = Phase::Constrained;
                }
                Ok(())
            }
            _ => {
                self.phase = Phase::Constrained;
                if self.is_finished() {
                    return if self.vocabulary.eos.contains(&token) {
                        Ok(())
                    } else {
                        Err(format!(
                            "token {token} follows an answer the constraint has completed"
                        ))
                    };
                }
                self.matcher
                    .consume_token(token)
                    .map_err(|error| format!("token {token} breaks the constraint: {error}"))
            }
        }
    }

    /// True when the constraint is complete and nothing more may follow
    /// (the engine then finishes with reason Stop).
    pub(crate) fn is_finished(&self) -> bool {
        self.phase == Phase::Constrained
            && self.matcher.is_stopped()
            && matches!(
                self.matcher.stop_reason(),
                StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
            )
    }
}

/// Sets every logit whose bit is clear in `allowed` to -inf, a 32-token word
/// at a time; ids past the mask are forbidden too. An empty mask is an error
/// and leaves `logits` as they were.
fn apply_mask(allowed: &SimpleVob, logits: &mut [f32]) -> Result<(), String> {
    let words = allowed.as_slice();
    // The mask word for each 32-logit chunk; bits past the row do not count.
    let word_for = |index: usize, chunk_len: usize| {
        let word = words.get(index).copied().unwrap_or(0);
        if chunk_len < 32 {
            word & ((1u32 << chunk_len) - 1)
        } else {
            word
        }
    };
    let chunks = logits.len().div_ceil(32);
    let any = (0..chunks).any(|index| word_for(index, (logits.len() - index * 32).min(32)) != 0);
    if !any {
        return Err("the constraint allows no token here".into());
    }
    for (index, chunk) in logits.chunks_mut(32).enumerate() {
        match word_for(index, chunk.len()) {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            word => {
                // Branch-free, so that it vectorises.
                for (bit, logit) in chunk.iter_mut().enumerate() {
                    let keep = (word >> bit) & 1 == 1;
                    *logit = if keep { *logit } else { f32::NEG_INFINITY };
                }
            }
        }
    }
    Ok(())
}

/// The token env llguidance works with: the trie of every token's bytes,
/// and the model's own tokenizer for canonical tokenisation of forced text.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's own ids when they spell exactly `bytes` with text
    /// tokens; otherwise (special tokens, a prepended space, normalised
    /// text, partial UTF-8) the trie's greedy tokenisation, which always
    /// does.
    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        if let Ok(text) = std::str::from_utf8(bytes)
            && let Ok(encoding) = self.tokenizer.encode_fast(text, false)
        {
            let ids = encoding.get_ids();
            let mut spelled = Vec::with_capacity(bytes.len());
            let text_only = ids.iter().all(|&id| {
                let word = self.trie.token(id);
                spelled.extend_from_slice(word);
                !word.is_empty() && word[0] != TokTrie::SPECIAL_TOKEN_MARKER
            });
            if text_only && spelled == bytes {
                return ids.to_vec();
            }
        }
        self.trie.greedy_tokenize(bytes)
    }
}

/// How a tokenizer spells bytes in its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2 byte-level BPE: each byte is one printable character.
    ByteLevel,
    /// SentencePiece style: `space` stands for ' ', and with byte fallback
    /// `<0xNN>` pieces are single bytes.
    Metaspace { space: char, byte_fallback: bool },
}

/// The bytes of every id below `vocab_size`; empty for ids with none known.
fn token_bytes(
    tokenizer: &tokenizers::Tokenizer,
    vocab_size: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let style = piece_style(tokenizer)?;
    let byte_level = ByteLevelAlphabet::new();
    let mut words = vec![Vec::new(); vocab_size];
    for (piece, id) in tokenizer.get_vocab(false) {
        let Some(word) = words.get_mut(id as usize) else {
            continue;
        };
        let bytes = match style {
            PieceStyle::ByteLevel => byte_level.decode(&piece),
            PieceStyle::Metaspace {
                space,
                byte_fallback,
            } => Some(metaspace_bytes(&piece, space, byte_fallback)),
        };
        // Unknown spellings stay empty: such a token is never allowed.
        *word = bytes
            .filter(|bytes| bytes.len() <= MAX_TOKEN_BYTES)
            .unwrap_or_default();
    }
    for (id, token) in tokenizer.get_added_tokens_decoder() {
        let Some(word) = words.get_mut(id as usize) else {
            continue;
        };
        let bytes = if token.special {
            special_bytes(&token.content)
        } else {
            token.content.into_bytes()
        };
        *word = if bytes.len() <= MAX_TOKEN_BYTES {
            bytes
        } else {
            Vec::new()
        };
    }
    Ok(words)
}

/// A special token as llguidance spells it: a marker byte, then its text.
fn special_bytes(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
    bytes.extend_from_slice(text.as_bytes());
    bytes.truncate(MAX_TOKEN_BYTES);
    bytes
}

/// Reads the tokenizer's decoder (or, without one, its pre-tokenizer) to
/// learn how its pieces spell bytes.
fn piece_style(tokenizer: &tokenizers::Tokenizer) -> Result<PieceStyle, String> {
    let describe = |value: Option<serde_json::Result<serde_json::Value>>| match value {
        Some(Ok(value)) => value,
        _ => serde_json::Value::Null,
    };
    let decoder = describe(tokenizer.get_decoder().map(serde_json::to_value));
    let mut parts = Vec::new();
    flatten_components(&decoder, "decoders", &mut parts);
    let has = |kind: &str| parts.iter().any(|part| part["type"] == kind);
    if has("ByteLevel") {
        return Ok(PieceStyle::ByteLevel);
    }
    if has("ByteFallback") || has("Metaspace") || has("Replace") {
        let mut space = '▁';
        for part in &parts {
            let replaced = match part["type"].as_str() {
                Some("Replace") if part["content"] == " " => part["pattern"]["String"].as_str(),
                Some("Metaspace") => part["replacement"].as_str(),
                _ => None,
            };
            let mut chars = replaced.unwrap_or_default().chars();
            if let (Some(single), None) = (chars.next(), chars.next()) {
                space = single;
            }
        }
        return Ok(PieceStyle::Metaspace {
            space,
            byte_fallback: has("ByteFallback"),
        });
    }
    let pre_tokenizer = describe(tokenizer.get_pre_tokenizer().map(serde_json::to_value));
    let mut pre_parts = Vec::new();
    flatten_components(&pre_tokenizer, "pretokenizers", &mut pre_parts);
    if pre_parts.iter().any(|part| part["type"] == "ByteLevel") {
        return Ok(PieceStyle::ByteLevel);
    }
    Err(format!(
        "its tokenizer's pieces cannot be mapped to bytes (decoder {}); \
         byte-level BPE and byte-fallback tokenizers are supported",
        decoder.get("type").unwrap_or(&serde_json::Value::Null)
    ))
}

/// The components of a (possibly nested) `Sequence`, in order.
fn flatten_components<'a>(
    value: &'a serde_json::Value,
    list_key: &str,
    out: &mut Vec<&'a serde_json::Value>,
) {
    if let Some(items) = value.get(list_key).and_then(|items| items.as_array()) {
        for item in items {
            flatten_components(item, list_key, out);
        }
    } else if !value.is_null() {
        out.push(value);
    }
}

fn metaspace_bytes(piece: &str, space: char, byte_fallback: bool) -> Vec<u8> {
    if byte_fallback && let Some(byte) = byte_fallback_piece(piece) {
        return vec![byte];
    }
    piece.replace(space, " ").into_bytes()
}

/// `<0xNN>` → the byte NN.
fn byte_fallback_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the
/// other 68 (controls, space, DEL, NBSP, soft hyphen, …) are spelled with
/// the characters from U+0100 on, in byte order.
struct ByteLevelAlphabet {
    chars: HashMap<char, u8>,
}

impl ByteLevelAlphabet {
    fn new() -> Self {
        let printable = |byte: u8| matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut chars = HashMap::with_capacity(256);
        let mut next_stand_in = 0x100u32;
        for byte in 0..=255u8 {
            let character = if printable(byte) {
                char::from(byte)
            } else {
                let stand_in = char::from_u32(next_stand_in).unwrap_or(char::REPLACEMENT_CHARACTER);
                next_stand_in += 1;
                stand_in
            };
            chars.insert(character, byte);
        }
        ByteLevelAlphabet { chars }
    }

    /// `None` when the piece has a character outside the alphabet.
    fn decode(&self, piece: &str) -> Option<Vec<u8>> {
        piece
            .chars()
            .map(|character| self.chars.get(&character).copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::config::GenerationConfig;
    use crate::validation::{GenerateRequest, SamplingParams, Validator};

    /// Output rows beyond the tokenizer's ids, as padded embeddings have;
    /// not a multiple of 32, so the last mask word is a partial one.
    const EXTRA_ROWS: usize = 37;

    /// Multi-byte pieces of the test tokenizer, besides the 256 bytes.
    const PIECES: &[&str] = &[
        "{\"",
        "\":",
        "\",\"",
        "\"}",
        "\":\"",
        "\",",
        "\"]",
        "\":[",
        "]}",
        "\"name",
        "name",
        "age",
        "sex",
        "female",
        "male",
        "unknown",
        "allergies",
        "penicillin",
        "latex",
        "Patient",
        " the",
        " patient",
        "ing",
        "ed",
        "12",
        "123",
        "100",
        "AB",
        "-X",
        "\\n",
        "\\u00",
        "ü",
        "é",
        "中",
        " <",
        "> ",
        "true",
        "null",
    ];

    /// GPT-2's byte → character table, the inverse of `ByteLevelAlphabet`.
    fn byte_level_chars() -> Vec<char> {
        let alphabet = ByteLevelAlphabet::new();
        let mut chars = vec!['\0'; 256];
        for (&character, &byte) in &alphabet.chars {
            chars[byte as usize] = character;
        }
        chars
    }

    /// A byte-level BPE tokenizer: every byte, `PIECES` (and their
    /// prefixes) built by left-to-right merges, then the added tokens.
    /// Returns it and its number of ids.
    fn byte_level_tokenizer(with_think: bool) -> (tokenizers::Tokenizer, usize) {
        let chars = byte_level_chars();
        let mut vocab: Vec<String> = chars.iter().map(char::to_string).collect();
        let mut merges: Vec<(String, String)> = Vec::new();
        for piece in PIECES {
            let spelled: Vec<String> = piece
                .bytes()
                .map(|byte| chars[byte as usize].to_string())
                .collect();
            let mut current = spelled[0].clone();
            for next in &spelled[1..] {
                let merged = format!("{current}{next}");
                if !vocab.contains(&merged) {
                    merges.push((current.clone(), next.clone()));
                    vocab.push(merged.clone());
                }
                current = merged;
            }
        }
        let mut added = vec![
            ("<|im_end|>", true),
            ("<|endoftext|>", true),
            ("<|im_start|>", true),
        ];
        if with_think {
            // As Qwen3 and the project's tiny models have them: not special.
            added.extend([("<think>", false), ("</think>", false)]);
        }
        let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(id, piece)| (piece.clone(), serde_json::json!(id)))
            .collect();
        let added_json: Vec<serde_json::Value> = added
            .iter()
            .enumerate()
            .map(|(index, (content, special))| {
                serde_json::json!({
                    "id": vocab.len() + index, "content": content, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": special,
                })
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added_json,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab_json, "merges": merges,
            },
        });
        let tokenizer = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        (tokenizer, vocab.len() + added.len())
    }

    struct Fixture {
        tokenizer: Arc<tokenizers::Tokenizer>,
        compiler: ConstraintCompiler,
        /// The tokenizer's ids; the model has `EXTRA_ROWS` more.
        tokenizer_ids: usize,
        vocab_size: usize,
        eos: Vec<u32>,
    }

    impl Fixture {
        fn new(with_think: bool) -> Fixture {
            let (tokenizer, tokenizer_ids) = byte_level_tokenizer(with_think);
            let tokenizer = Arc::new(tokenizer);
            let id = |text: &str| tokenizer.token_to_id(text).unwrap();
            let eos = vec![id("<|im_end|>"), id("<|endoftext|>")];
            let vocab_size = tokenizer_ids + EXTRA_ROWS;
            // An out-of-range end id (a config error) is ignored.
            let mut configured = eos.clone();
            configured.push(u32::try_from(vocab_size).unwrap() + 5);
            let compiler =
                ConstraintCompiler::new(Arc::clone(&tokenizer), vocab_size, &configured).unwrap();
            Fixture {
                tokenizer,
                compiler,
                tokenizer_ids,
                vocab_size,
                eos,
            }
        }

        fn id(&self, text: &str) -> u32 {
            self.tokenizer.token_to_id(text).unwrap()
        }

        fn encode(&self, text: &str) -> Vec<u32> {
            self.tokenizer
                .encode(text, false)
                .unwrap()
                .get_ids()
                .to_vec()
        }

        fn compile(&self, constraint: Constraint) -> CompiledConstraint {
            self.compiler.compile(&constraint).unwrap()
        }

        fn validator(&self) -> Validator {
            let (tokenizer, _) = byte_level_tokenizer(true);
            let compiler =
                ConstraintCompiler::new(Arc::new(tokenizer), self.vocab_size, &self.eos).unwrap();
            Validator {
                model_name: "tiny".into(),
                max_context: 100,
                defaults: GenerationConfig::default(),
                constraints: Ok(Arc::new(compiler)),
            }
        }

        /// The tokens `mask_logits` leaves finite in a row of zeros.
        fn allowed(&self, state: &mut ConstraintState) -> Vec<u32> {
            let mut logits = vec![0.0; self.vocab_size];
            state.mask_logits(&mut logits).unwrap();
            allowed_ids(&logits)
        }
    }

    fn allowed_ids(logits: &[f32]) -> Vec<u32> {
        logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| logit.is_finite())
            .map(|(id, _)| u32::try_from(id).unwrap())
            .collect()
    }

    /// One generation with random logits, as an engine would drive it.
    struct Run {
        /// Every sampled token, reasoning included.
        tokens: Vec<u32>,
        /// The text after reasoning, end token excluded, as the tokenizer
        /// decodes it (special tokens kept, so none can hide).
        answer: String,
        finished: bool,
        mask_time: Duration,
        masks: u32,
    }

    fn run(
        fixture: &Fixture,
        compiled: &CompiledConstraint,
        rng: &mut StdRng,
        starts_in_reasoning: bool,
        max_steps: usize,
    ) -> Result<Run, String> {
        let mut state = ConstraintState::new(compiled, starts_in_reasoning, true)?;
        let mut logits = vec![0.0f32; fixture.vocab_size];
        let mut tokens = Vec::new();
        let mut answer_ids = Vec::new();
        let mut finished = false;
        let mut mask_time = Duration::ZERO;
        let mut masks = 0;
        let close = fixture.id("</think>");
        let thinking_budget = rng.random_range(0..20);
        let mut thought = 0;
        for _ in 0..max_steps {
            if state.is_finished() {
                finished = true;
                break;
            }
            for logit in logits.iter_mut() {
                *logit = rng.random::<f32>() * 10.0;
            }
            let in_answer = state.phase == Phase::Constrained;
            let started = Instant::now();
            state.mask_logits(&mut logits)?;
            mask_time += started.elapsed();
            masks += 1;
            let mut token = argmax(&logits);
            // A model that opened reasoning closes it after a while.
            if state.phase == Phase::Thinking {
                thought += 1;
                if thought >= thinking_budget {
                    assert!(logits[close as usize].is_finite(), "</think> is masked");
                    token = close;
                }
            }
            let opening = state.phase == Phase::Opening;
            state.commit(token)?;
            tokens.push(token);
            if fixture.eos.contains(&token) {
                finished = true;
                break;
            }
            if in_answer || (opening && state.phase == Phase::Constrained) {
                answer_ids.push(token);
            }
        }
        let answer = fixture.tokenizer.decode(&answer_ids, false).unwrap();
        Ok(Run {
            tokens,
            answer,
            finished,
            mask_time,
            masks,
        })
    }

    fn argmax(logits: &[f32]) -> u32 {
        let (best, value) = logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |(best, value), (id, &logit)| {
                if logit > value {
                    (id, logit)
                } else {
                    (best, value)
                }
            },
        );
        assert!(value.is_finite(), "nothing was allowed");
        u32::try_from(best).unwrap()
    }

    const SCHEMA: &str = r#"{
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "sex": {"enum": ["female", "male", "unknown"]},
            "allergies": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}
        },
        "required": ["name", "age", "sex", "allergies"],
        "additionalProperties": false
    }"#;

    /// Runs `count` random generations and checks each with `check`.
    fn sample_all(
        constraint: Constraint,
        count: usize,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> (Duration, u32) {
        let fixture = Fixture::new(true);
        let compiled = fixture.compile(constraint);
        let mut rng = StdRng::seed_from_u64(7);
        let (mut time, mut masks, mut reasoned) = (Duration::ZERO, 0, 0);
        let open = fixture.id("<think>");
        for index in 0..count {
            let run = run(&fixture, &compiled, &mut rng, false, 400).unwrap();
            reasoned += usize::from(run.tokens.first() == Some(&open));
            assert!(run.finished, "run {index} did not finish: {:?}", run.answer);
            if let Err(why) = check(&run.answer) {
                panic!("run {index}: {:?} fails: {why}", run.answer);
            }
            time += run.mask_time;
            masks += run.masks;
        }
        // Both ways of answering were taken.
        assert!(
            0 < reasoned && reasoned < count,
            "{reasoned} of {count} reasoned"
        );
        (time, masks)
    }

    #[test]
    fn json_schema_outputs_validate() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let (time, masks) = sample_all(Constraint::JsonSchema(SCHEMA.into()), 200, |answer| {
            let value: serde_json::Value =
                serde_json::from_str(answer).map_err(|error| error.to_string())?;
            if validator.is_valid(&value) {
                Ok(())
            } else {
                Err("does not validate".into())
            }
        });
        println!(
            "json_schema: {masks} masks, {:.1} µs per mask_logits (test tokenizer, {} ids)",
            time.as_secs_f64() * 1e6 / f64::from(masks),
            Fixture::new(true).vocab_size
        );
    }

    #[test]
    fn regex_outputs_match() {
        let pattern = regex::Regex::new(r"^\d{3}-[A-Z]{2}$").unwrap();
        sample_all(Constraint::Regex(r"\d{3}-[A-Z]{2}".into()), 200, |answer| {
            if pattern.is_match(answer) {
                Ok(())
            } else {
                Err("does not match".into())
            }
        });
    }

    #[test]
    fn grammar_outputs_parse() {
        let grammar = r#"
start: "Patient " name ", age " age ", " sex
name: /[A-Z][a-z]{1,8}/
age: /[1-9][0-9]?/
sex: "female" | "male"
"#;
        let pattern =
            regex::Regex::new(r"^Patient [A-Z][a-z]{1,8}, age [1-9][0-9]?, (female|male)$")
                .unwrap();
        sample_all(Constraint::Grammar(grammar.into()), 200, |answer| {
            if pattern.is_match(answer) {
                Ok(())
            } else {
                Err("is not a sentence of the grammar".into())
            }
        });
    }

    fn rejection(constraint: Constraint) -> ValidationError {
        let fixture = Fixture::new(true);
        let request = GenerateRequest {
            prompt: "abc".into(),
            sampling: SamplingParams::default(),
            constraint: Some(constraint),
        };
        fixture
            .validator()
            .validate(request, |text| Ok(text.bytes().map(u32::from).collect()))
            .unwrap_err()
    }

    #[test]
    fn invalid_constraints_are_validation_errors_naming_the_field() {
        let cases = [
            (
                Constraint::JsonSchema("{\"type\": ".into()),
                "json_schema",
                "not valid JSON",
            ),
            (
                Constraint::JsonSchema(r#"{"type": "strin"}"#.into()),
                "json_schema",
                "invalid JSON schema",
            ),
            (
                Constraint::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 1}"#.into()),
                "json_schema",
                "invalid JSON schema",
            ),
            (
                Constraint::Regex("(unclosed".into()),
                "regex",
                "invalid regex",
            ),
            (
                Constraint::Grammar("start: missing_rule".into()),
                "grammar",
                "invalid grammar",
            ),
            (
                Constraint::Grammar("  \n".into()),
                "grammar",
                "must not be empty",
            ),
        ];
        for (constraint, field, says) in cases {
            let error = rejection(constraint.clone());
            assert_eq!(error.kind(), "constraint", "{constraint:?}: {error}");
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("constraint.{field} was rejected: {says}")),
                "{message}"
            );
            assert!(message.len() < MAX_REASON_BYTES + 100, "{message}");
        }
        let long = "a".repeat(MAX_CONSTRAINT_BYTES + 1);
        let error = rejection(Constraint::Regex(long));
        assert_eq!(
            (error.kind(), error.to_string()),
            (
                "constraint_too_long",
                format!(
                    "constraint.regex must be at most 65536 bytes (got {})",
                    MAX_CONSTRAINT_BYTES + 1
                )
            )
        );
    }

    #[test]
    fn a_model_without_a_compiler_refuses_constraints() {
        let validator = Validator {
            model_name: "odd".into(),
            max_context: 100,
            defaults: GenerationConfig::default(),
            constraints: Err("no byte mapping".into()),
        };
        let request = GenerateRequest {
            prompt: "abc".into(),
            sampling: SamplingParams::default(),
            constraint: Some(Constraint::Regex("a".into())),
        };
        let error = validator
            .validate(request, |text| Ok(text.bytes().map(u32::from).collect()))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "constraint.regex was rejected: model `odd` cannot constrain its output: no byte mapping"
        );
    }

    #[test]
    fn valid_requests_carry_the_compiled_constraint() {
        let fixture = Fixture::new(true);
        let validator = fixture.validator();
        let request = |constraint| GenerateRequest {
            prompt: "abc".into(),
            sampling: SamplingParams::default(),
            constraint,
        };
        let by_bytes = |text: &str| Ok(text.bytes().map(u32::from).collect());
        let valid = validator
            .validate(
                request(Some(Constraint::JsonSchema(SCHEMA.into()))),
                by_bytes,
            )
            .unwrap();
        assert_eq!(valid.constraint_kind(), Some("json_schema"));
        let debug = format!("{valid:?}");
        assert!(debug.contains("kind: \"json_schema\""), "{debug}");
        assert!(!debug.contains("allergies"), "{debug}");
        let again = validator
            .validate(
                request(Some(Constraint::JsonSchema(SCHEMA.into()))),
                by_bytes,
            )
            .unwrap();
        assert_eq!(valid, again);
        let other = validator
            .validate(request(Some(Constraint::Regex("[a-z]+".into()))), by_bytes)
            .unwrap();
        assert_ne!(valid, other);
        let free = validator.validate(request(None), by_bytes).unwrap();
        assert_eq!(free.constraint_kind(), None);
    }

    #[test]
    fn reasoning_runs_free_until_think_closes() {
        let fixture = Fixture::new(true);
        let compiled = fixture.compile(Constraint::JsonSchema(SCHEMA.into()));
        let mut state = ConstraintState::new(&compiled, true, true).unwrap();
        let close = fixture.id("</think>");
        for token in fixture.encode("Not JSON at all } ] <think> 中文\n") {
            let allowed = fixture.allowed(&mut state);
            // Everything the tokenizer has but the end ids.
            assert_eq!(allowed.len(), fixture.tokenizer_ids - fixture.eos.len());
            assert!(allowed.contains(&token) && allowed.contains(&close));
            assert!(!state.is_finished());
            state.commit(token).unwrap();
        }
        state.commit(close).unwrap();
        // Now only the answer: it opens the JSON object.
        let allowed = fixture.allowed(&mut state);
        assert!(!allowed.is_empty());
        for id in &allowed {
            let text = fixture.tokenizer.decode(&[*id], false).unwrap();
            assert!(text.starts_with('{'), "{text:?} allowed after </think>");
        }
        // Random generations after the reasoning validate too.
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..20 {
            let mut state = ConstraintState::new(&compiled, true, true).unwrap();
            for token in fixture.encode("hmm, let me think") {
                fixture.allowed(&mut state);
                state.commit(token).unwrap();
            }
            fixture.allowed(&mut state);
            state.commit(close).unwrap();
            let run = continue_run(&fixture, state, &mut rng);
            let value: serde_json::Value = serde_json::from_str(&run).unwrap();
            assert!(jsonschema::is_valid(&schema, &value), "{run}");
        }
    }

    /// Finishes a started state with random logits; returns the text.
    fn continue_run(fixture: &Fixture, mut state: ConstraintState, rng: &mut StdRng) -> String {
        let mut ids = Vec::new();
        for _ in 0..400 {
            if state.is_finished() {
                break;
            }
            let mut logits: Vec<f32> = (0..fixture.vocab_size)
                .map(|_| rng.random::<f32>())
                .collect();
            state.mask_logits(&mut logits).unwrap();
            let token = argmax(&logits);
            state.commit(token).unwrap();
            if fixture.eos.contains(&token) {
                break;
            }
            ids.push(token);
        }
        fixture.tokenizer.decode(&ids, false).unwrap()
    }

    #[test]
    fn without_open_reasoning_the_first_step_may_think() {
        let fixture = Fixture::new(true);
        let compiled = fixture.compile(Constraint::Regex(r"\d{3}-[A-Z]{2}".into()));
        let open = fixture.id("<think>");
        let close = fixture.id("</think>");
        let x = fixture.id("x");

        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        let first = fixture.allowed(&mut state);
        assert!(first.contains(&open) && first.contains(&fixture.id("1")));
        assert!(!first.contains(&x) && !first.contains(&close));
        state.commit(open).unwrap();
        // Thinking: free, and never forced shut.
        let thinking = fixture.allowed(&mut state);
        assert!(thinking.contains(&x) && thinking.contains(&close) && thinking.contains(&open));
        state.commit(x).unwrap();
        fixture.allowed(&mut state);
        state.commit(close).unwrap();
        let answer = fixture.allowed(&mut state);
        assert!(!answer.contains(&x) && !answer.contains(&open));
        assert!(answer.contains(&fixture.id("7")));

        // Answering straight away: no `<think>` later.
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        fixture.allowed(&mut state);
        state.commit(fixture.id("1")).unwrap();
        let next = fixture.allowed(&mut state);
        assert!(!next.contains(&open) && next.contains(&fixture.id("2")));
        // A token the constraint rejects is an error, not a silent pass.
        let error = state.commit(x).unwrap_err();
        assert!(error.contains("breaks the constraint"), "{error}");
    }

    #[test]
    fn models_without_think_tokens() {
        let fixture = Fixture::new(false);
        let compiled = fixture.compile(Constraint::Regex("[a-c]+".into()));
        let error = ConstraintState::new(&compiled, true, true).err().unwrap();
        assert!(error.contains("</think>"), "{error}");
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        let allowed = fixture.allowed(&mut state);
        assert!(allowed.contains(&fixture.id("a")) && !allowed.contains(&fixture.id("<")));
    }

    #[test]
    fn ids_beyond_the_tokenizer_are_never_allowed() {
        let fixture = Fixture::new(true);
        assert_eq!(fixture.vocab_size, fixture.tokenizer_ids + EXTRA_ROWS);
        let compiled = fixture.compile(Constraint::Grammar("start: /(.|\\n)*/".into()));
        let check = |state: &mut ConstraintState| {
            let allowed = fixture.allowed(state);
            assert!(!allowed.is_empty());
            assert!(
                allowed
                    .iter()
                    .all(|&id| (id as usize) < fixture.tokenizer_ids),
                "{allowed:?}"
            );
        };
        let mut state = ConstraintState::new(&compiled, true, true).unwrap();
        check(&mut state);
        state.commit(fixture.id("</think>")).unwrap();
        check(&mut state);
        state.commit(fixture.id("a")).unwrap();
        check(&mut state);
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        check(&mut state);
        let extra = u32::try_from(fixture.vocab_size).unwrap() - 1;
        assert!(state.commit(extra).is_err());
        assert!(
            state
                .commit(u32::try_from(fixture.vocab_size).unwrap())
                .is_err()
        );
        let mut short = vec![0.0; fixture.vocab_size - 1];
        assert!(state.mask_logits(&mut short).is_err());
    }

    #[test]
    fn end_ids_when_the_constraint_may_or_must_end() {
        let fixture = Fixture::new(true);
        let compiled = fixture.compile(Constraint::Regex("x(yz)?".into()));
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        let first = fixture.allowed(&mut state);
        assert!(fixture.eos.iter().all(|eos| !first.contains(eos)));
        state.commit(fixture.id("x")).unwrap();
        // Complete but extendable: every end id, and `y`.
        let allowed = fixture.allowed(&mut state);
        assert!(fixture.eos.iter().all(|eos| allowed.contains(eos)));
        assert!(allowed.contains(&fixture.id("y")));
        assert!(!state.is_finished());
        state.commit(fixture.id("y")).unwrap();
        assert!(!state.is_finished());
        state.commit(fixture.id("z")).unwrap();
        // Complete and closed: finished, and only the end ids remain.
        assert!(state.is_finished());
        let mut allowed = fixture.allowed(&mut state);
        allowed.sort_unstable();
        let mut eos = fixture.eos.clone();
        eos.sort_unstable();
        assert_eq!(allowed, eos);
        assert!(state.commit(fixture.id("x")).is_err());
        state.commit(fixture.eos[1]).unwrap();

        // Ending by an end id where allowed.
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        state.commit(fixture.id("x")).unwrap();
        fixture.allowed(&mut state);
        state.commit(fixture.eos[1]).unwrap();
        assert!(state.is_finished());
    }

    #[test]
    fn special_tokens_never_appear_in_constrained_text() {
        let fixture = Fixture::new(true);
        // Any text at all: still no special token but through the end ids.
        let compiled = fixture.compile(Constraint::Grammar("start: /(.|\\n)*/".into()));
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        state.commit(fixture.id("a")).unwrap();
        let allowed = fixture.allowed(&mut state);
        assert!(!allowed.contains(&fixture.id("<|im_start|>")));
        assert!(fixture.eos.iter().all(|eos| allowed.contains(eos)));
        // Not-special added tokens are text.
        assert!(allowed.contains(&fixture.id("<think>")));
    }

    #[test]
    fn empty_masks_are_errors() {
        let mut logits = vec![1.0f32; 70];
        let mask = SimpleVob::alloc(70);
        assert!(apply_mask(&mask, &mut logits).is_err());
        assert!(logits.iter().all(|&logit| logit == 1.0));
        let mut mask = SimpleVob::alloc(70);
        mask.allow_token(69);
        mask.allow_token(3);
        apply_mask(&mask, &mut logits).unwrap();
        assert_eq!(allowed_ids(&logits), [3, 69]);
        // A mask shorter than the row forbids the rest.
        let mut logits = vec![1.0f32; 100];
        let mut mask = SimpleVob::alloc(64);
        mask.set_all(true);
        apply_mask(&mask, &mut logits).unwrap();
        assert_eq!(allowed_ids(&logits).len(), 64);
    }

    #[test]
    fn pieces_map_to_their_bytes() {
        let chars = byte_level_chars();
        let alphabet = ByteLevelAlphabet::new();
        assert_eq!(alphabet.decode("Ġthe"), Some(b" the".to_vec()));
        assert_eq!(alphabet.decode("Ċ"), Some(b"\n".to_vec()));
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[0xAD], 'Ń');
        assert_eq!(alphabet.decode("Ã©"), Some("é".as_bytes().to_vec()));
        assert_eq!(alphabet.decode("ŉ"), None);

        // A SentencePiece tokenizer with byte fallback, as Llama and Mistral have.
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xE4>": 4, "▁": 5, "h": 6, "i": 7, "▁h": 8, "▁hi": 9},
                "merges": [["▁", "h"], ["▁h", "i"]]
            }
        });
        let tokenizer = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        let words = token_bytes(&tokenizer, 12).unwrap();
        let expect: [&[u8]; 12] = [
            b"\xff<unk>",
            b"\xff<s>",
            b"\xff</s>",
            b"\n",
            b"\xe4",
            b" ",
            b"h",
            b"i",
            b" h",
            b" hi",
            b"",
            b"",
        ];
        assert_eq!(words, expect);
        let compiler = ConstraintCompiler::new(Arc::new(tokenizer), 12, &[2]).unwrap();
        let compiled = compiler.compile(&Constraint::Regex(" hi".into())).unwrap();
        let mut state = ConstraintState::new(&compiled, false, true).unwrap();
        let mut logits = vec![0.0; 12];
        state.mask_logits(&mut logits).unwrap();
        let allowed = allowed_ids(&logits);
        assert!(allowed.contains(&5) || allowed.contains(&9), "{allowed:?}");

        // A WordPiece tokenizer spells no bytes: no compiler.
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "a": 1, "##b": 2}}
        });
        let tokenizer = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        let error = ConstraintCompiler::new(Arc::new(tokenizer), 3, &[]).unwrap_err();
        assert!(error.contains("WordPiece"), "{error}");
    }

    #[test]
    fn forced_text_uses_the_tokenizers_own_ids() {
        let fixture = Fixture::new(true);
        let compiler = &fixture.compiler;
        let env = compiler.factory.tok_env();
        let ids = env.tokenize_bytes(b"Patient");
        assert_eq!(ids, fixture.encode("Patient"));
        // Text the tokenizer would read as a special token is spelled with
        // text tokens.
        let ids = env.tokenize_bytes(b"a<|im_end|>");
        assert_eq!(env.tok_trie().decode_raw(&ids), b"a<|im_end|>");
        assert!(!ids.contains(&fixture.id("<|im_end|>")));
        // Partial UTF-8 too.
        let ids = env.tokenize_bytes(&"中".as_bytes()[..2]);
        assert_eq!(env.tok_trie().decode_raw(&ids), &"中".as_bytes()[..2]);
    }

    #[test]
    fn constraint_types_cross_threads() {
        fn assert_send<T: Send>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send::<CompiledConstraint>();
        assert_send::<ConstraintState>();
        assert_send_sync::<ConstraintCompiler>();
    }

    /// A realistic vocabulary size (100k word-like pieces): every answer that
    /// ends is valid JSON. It also prints the per-step mask cost (see it with
    /// `cargo test --release -p medbox-runtime --lib large_vocabulary -- --nocapture`);
    /// the cost is reported, not asserted.
    #[test]
    fn a_large_vocabulary_gives_valid_json_and_prints_the_mask_cost() {
        let chars = byte_level_chars();
        let mut rng = StdRng::seed_from_u64(3);
        // Word-like pieces, as natural-language vocabularies mostly have:
        // letters with or without a leading space, some numbers, some
        // punctuation runs.
        let letters = b"abcdefghijklmnopqrstuvwxyz";
        let punctuation = b" \"{}[],:._-\n()'";
        let mut vocab: Vec<String> = chars.iter().map(char::to_string).collect();
        let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
        while vocab.len() < 100_000 {
            let kind = rng.random_range(0..100);
            let bytes: Vec<u8> = if kind < 80 {
                let mut word: Vec<u8> = (0..rng.random_range(2..9))
                    .map(|_| letters[rng.random_range(0..letters.len())])
                    .collect();
                if kind < 10 {
                    word[0] = word[0].to_ascii_uppercase();
                }
                if kind % 2 == 0 {
                    word.insert(0, b' ');
                }
                word
            } else if kind < 85 {
                rng.random_range(0..100_000u32).to_string().into_bytes()
            } else {
                (0..rng.random_range(2..4))
                    .map(|_| punctuation[rng.random_range(0..punctuation.len())])
                    .collect()
            };
            let piece: String = bytes.iter().map(|&byte| chars[byte as usize]).collect();
            if seen.insert(piece.clone()) {
                vocab.push(piece);
            }
        }
        let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(id, piece)| (piece.clone(), serde_json::json!(id)))
            .collect();
        let eos_id = vocab.len();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": eos_id, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab_json, "merges": []},
        });
        let tokenizer = Arc::new(tokenizers::Tokenizer::from_str(&json.to_string()).unwrap());
        let vocab_size = 100_032;
        let eos = u32::try_from(eos_id).unwrap();
        let started = Instant::now();
        let compiler = ConstraintCompiler::new(Arc::clone(&tokenizer), vocab_size, &[eos]).unwrap();
        println!(
            "compiler for {vocab_size} ids built in {:?}",
            started.elapsed()
        );
        // Tokens that close strings, arrays or objects: a model-like
        // sampler favours them now and then, so that unbounded strings end.
        let closing: Vec<bool> = (0..vocab_size)
            .map(|id| {
                let word = compiler.factory.tok_env().tok_trie().token(id as u32);
                word.iter().any(|byte| b"\"]}".contains(byte))
            })
            .collect();
        let typical = r#"{
            "type": "object",
            "properties": {
                "diagnosis": {"type": "string"},
                "icd10": {"type": "string", "pattern": "^[A-Z][0-9]{2}(\\.[0-9]{1,2})?$"},
                "severity": {"enum": ["mild", "moderate", "severe"]},
                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                "medications": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "dose_mg": {"type": "number"}},
                    "required": ["name", "dose_mg"]
                }},
                "notes": {"type": "string", "maxLength": 200}
            },
            "required": ["diagnosis", "icd10", "severity", "age", "medications"]
        }"#;
        for (name, schema, favour_closing) in [
            ("test schema (strings maxLength 10-12)", SCHEMA, 0.0),
            (
                "typical schema (free strings, pattern, nested array)",
                typical,
                0.15,
            ),
        ] {
            let started = Instant::now();
            let compiled = compiler
                .compile(&Constraint::JsonSchema(schema.into()))
                .unwrap();
            println!("{name}: compiled in {:?}", started.elapsed());
            let mut logits = vec![0.0f32; vocab_size];
            let mut samples = Vec::new();
            let mut finished = 0;
            for generation in 0..50 {
                let mut state = ConstraintState::new(&compiled, false, true).unwrap();
                let mut text = Vec::new();
                for _ in 0..300 {
                    if state.is_finished() {
                        break;
                    }
                    let favour = rng.random::<f32>() < favour_closing;
                    for (logit, &closes) in logits.iter_mut().zip(&closing) {
                        *logit = rng.random::<f32>() + if favour && closes { 1.0 } else { 0.0 };
                    }
                    let started = Instant::now();
                    state.mask_logits(&mut logits).unwrap();
                    // The first generations warm the lexer's caches.
                    if generation >= 10 {
                        samples.push(started.elapsed());
                    }
                    let token = argmax(&logits);
                    state.commit(token).unwrap();
                    if token == eos {
                        break;
                    }
                    text.extend_from_slice(compiler.factory.tok_env().tok_trie().token(token));
                }
                if state.is_finished() {
                    finished += 1;
                    let answer = String::from_utf8(text).expect("UTF-8 answer");
                    let parsed: Result<serde_json::Value, _> = serde_json::from_str(&answer);
                    assert!(parsed.is_ok(), "{name}: not JSON: {answer}");
                }
            }
            assert!(finished > 0, "{name}: no answer ended within 300 tokens");
            samples.sort_unstable();
            let mean = samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap();
            let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
            println!(
                "{name}: {} masks, mean {mean:?}, p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
                samples.len(),
                at(0.5),
                at(0.9),
                at(0.99),
                at(1.0)
            );
        }
        let mut logits = vec![0.0f32; vocab_size];
        // Applying a mask alone, half the tokens allowed.
        let mut mask = SimpleVob::alloc(vocab_size);
        for id in (0..vocab_size).step_by(2) {
            mask.set(id, true);
        }
        let started = Instant::now();
        for _ in 0..1000 {
            apply_mask(&mask, &mut logits).unwrap();
        }
        println!("apply_mask alone: {:?}", started.elapsed() / 1000);
    }
}
