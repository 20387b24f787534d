//! The dataset formats users bring, the normalised [`Example`], and
//! de-identification of a validated dataset into the only form that is stored.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use medbox_deid::{Category, Deidentifier};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::validation::ValidDataset;

/// The JSONL shapes accepted, as LLaMA-Factory, axolotl and TRL users bring them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}`.
    Messages,
    /// `{"instruction", "input"?, "output", "system"?, "history"?: [["user", "assistant"], …]}`.
    Alpaca,
    /// `{"text": "…"}`.
    Text,
}

impl DatasetFormat {
    pub fn name(self) -> &'static str {
        match self {
            DatasetFormat::Messages => "messages",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Text => "text",
        }
    }
}

/// A format name that is not `messages`, `alpaca` or `text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`format` must be one of messages, alpaca, text; got `{0}`")]
pub struct UnknownFormat(pub String);

impl FromStr for DatasetFormat {
    type Err = UnknownFormat;
    fn from_str(name: &str) -> Result<DatasetFormat, UnknownFormat> {
        match name {
            "messages" => Ok(DatasetFormat::Messages),
            "alpaca" => Ok(DatasetFormat::Alpaca),
            "text" => Ok(DatasetFormat::Text),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
}

/// One training example, whatever format it came in.
///
/// `messages` and `alpaca` lines both become [`Example::Chat`] (alpaca:
/// `system` → a system turn, each `history` pair → a user and an assistant
/// turn, `instruction` and `input` joined by a blank line → the user turn,
/// `output` → the final assistant turn). A `text` line stays
/// [`Example::Text`]: it is trained as plain language modelling with the loss
/// on every token, whereas a chat is rendered through the model's chat
/// template with the loss on assistant tokens only. Turning text into an
/// assistant turn would wrap it in a template it was never written for.
///
/// **Invariant:** a `Chat` is non-empty, ends with a non-empty assistant turn;
/// a `Text` is non-empty (validation guarantees both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Chat(Vec<ChatTurn>),
    Text(String),
}

impl Example {
    /// Characters (Unicode scalar values) of text in the example.
    pub fn characters(&self) -> usize {
        match self {
            Example::Chat(turns) => turns.iter().map(|turn| turn.content.chars().count()).sum(),
            Example::Text(text) => text.chars().count(),
        }
    }

    /// The example with `f` applied to every text field.
    fn map_text(self, mut f: impl FnMut(&str) -> String) -> Example {
        match self {
            Example::Chat(turns) => Example::Chat(
                turns
                    .into_iter()
                    .map(|turn| ChatTurn {
                        role: turn.role,
                        content: f(&turn.content),
                    })
                    .collect(),
            ),
            Example::Text(text) => Example::Text(f(&text)),
        }
    }

    /// One canonical JSON line (keys sorted, no spaces, no newline):
    /// `{"messages":[{"content":…,"role":…},…]}` or `{"text":…}`.
    pub fn canonical_json(&self) -> String {
        let value = match self {
            Example::Chat(turns) => json!({
                "messages": turns
                    .iter()
                    .map(|turn| json!({"role": turn.role.as_str(), "content": turn.content}))
                    .collect::<Vec<_>>()
            }),
            Example::Text(text) => json!({ "text": text }),
        };
        value.to_string()
    }
}

/// A dataset after de-identification: the only form of a dataset that may be
/// stored. Its canonical JSONL is one [`Example::canonical_json`] line per
/// example, each ending in `\n`, and its SHA-256 identifies the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeidentifiedDataset {
    format: DatasetFormat,
    examples: Vec<Example>,
    source_lines: Vec<usize>,
    counts: BTreeMap<Category, usize>,
    canonical_jsonl: String,
    sha256: String,
}

impl DeidentifiedDataset {
    /// The format the dataset was uploaded in.
    pub fn format(&self) -> DatasetFormat {
        self.format
    }
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }
    /// The line of the upload each example came from (1-based), in order.
    pub fn source_lines(&self) -> &[usize] {
        &self.source_lines
    }
    /// Identifiers replaced (and dates shifted), per category, over the whole dataset.
    pub fn counts(&self) -> &BTreeMap<Category, usize> {
        &self.counts
    }
    /// The bytes to store.
    pub fn canonical_jsonl(&self) -> &str {
        &self.canonical_jsonl
    }
    /// Lowercase hex SHA-256 of [`Self::canonical_jsonl`].
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

/// The record key of a dataset line: all dates in one line shift together.
pub fn record_key(line: usize) -> String {
    format!("line-{line}")
}

/// De-identifies every text field of every example (system, user and
/// assistant turns, plain text), one record key per source line.
pub fn deidentify_dataset(
    dataset: ValidDataset,
    deidentifier: &Deidentifier,
) -> DeidentifiedDataset {
    let format = dataset.format();
    let mut counts: BTreeMap<Category, usize> = BTreeMap::new();
    let mut examples = Vec::with_capacity(dataset.len());
    let mut source_lines = Vec::with_capacity(dataset.len());
    for (line, example) in dataset.into_examples() {
        let key = record_key(line);
        let example = example.map_text(|text| {
            let result = deidentifier.deidentify(text, &key);
            for (category, count) in result.counts {
                *counts.entry(category).or_default() += count;
            }
            result.text
        });
        examples.push(example);
        source_lines.push(line);
    }
    let mut canonical_jsonl = String::new();
    for example in &examples {
        canonical_jsonl.push_str(&example.canonical_json());
        canonical_jsonl.push('\n');
    }
    let sha256 = hex::encode(Sha256::digest(canonical_jsonl.as_bytes()));
    DeidentifiedDataset {
        format,
        examples,
        source_lines,
        counts,
        canonical_jsonl,
        sha256,
    }
}
