//! Reading and validating an uploaded dataset, line by line.
//!
//! Every line is read, even after the first error, so that one upload tells
//! the user everything that is wrong. Blank lines are skipped (and counted);
//! each other line is one example. A line's first fault is its reason; the
//! first [`Limits::max_detailed_errors`] faulty lines are kept in detail and
//! all of them are counted by [`ErrorKind`].

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::dataset::{ChatTurn, DatasetFormat, Example, Role};

/// Limits applied while validating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most characters (Unicode scalar values) of text in one example.
    pub max_characters: usize,
    /// How many faulty lines are reported in detail (the rest are counted).
    pub max_detailed_errors: usize,
}

impl Limits {
    /// 32 768 characters an example, the first 100 errors in detail.
    pub const STANDARD: Limits = Limits {
        max_characters: 32_768,
        max_detailed_errors: 100,
    };
}

/// Why a line was refused. Messages name the field at fault and never quote
/// the line's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineErrorReason {
    #[error("the line is not valid UTF-8")]
    BadEncoding,
    #[error("bad JSON: {0}")]
    BadJson(String),
    #[error("the line must be a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(String),
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("`{field}`: unknown role {role} (expected system, user or assistant)")]
    UnknownRole { field: String, role: String },
    #[error("`{field}`: empty assistant turn")]
    EmptyAssistantTurn { field: String },
    #[error("`{field}` is empty")]
    EmptyText { field: String },
    #[error("`messages` has no turns")]
    EmptyConversation,
    #[error("`messages` must end with an assistant turn; it ends with a {last} turn")]
    NotEndingWithAssistant { last: Role },
    #[error("{characters} characters of text, over the limit of {limit}")]
    TooLong { characters: usize, limit: usize },
}

/// The kind of a [`LineErrorReason`], for the summary's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    BadEncoding,
    BadJson,
    NotAnObject,
    MissingField,
    WrongType,
    UnknownRole,
    EmptyAssistantTurn,
    EmptyText,
    EmptyConversation,
    NotEndingWithAssistant,
    TooLong,
}

impl ErrorKind {
    pub fn key(self) -> &'static str {
        match self {
            ErrorKind::BadEncoding => "bad_encoding",
            ErrorKind::BadJson => "bad_json",
            ErrorKind::NotAnObject => "not_an_object",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::WrongType => "wrong_type",
            ErrorKind::UnknownRole => "unknown_role",
            ErrorKind::EmptyAssistantTurn => "empty_assistant_turn",
            ErrorKind::EmptyText => "empty_text",
            ErrorKind::EmptyConversation => "empty_conversation",
            ErrorKind::NotEndingWithAssistant => "not_ending_with_assistant",
            ErrorKind::TooLong => "too_long",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl LineErrorReason {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LineErrorReason::BadEncoding => ErrorKind::BadEncoding,
            LineErrorReason::BadJson(_) => ErrorKind::BadJson,
            LineErrorReason::NotAnObject => ErrorKind::NotAnObject,
            LineErrorReason::MissingField(_) => ErrorKind::MissingField,
            LineErrorReason::WrongType { .. } => ErrorKind::WrongType,
            LineErrorReason::UnknownRole { .. } => ErrorKind::UnknownRole,
            LineErrorReason::EmptyAssistantTurn { .. } => ErrorKind::EmptyAssistantTurn,
            LineErrorReason::EmptyText { .. } => ErrorKind::EmptyText,
            LineErrorReason::EmptyConversation => ErrorKind::EmptyConversation,
            LineErrorReason::NotEndingWithAssistant { .. } => ErrorKind::NotEndingWithAssistant,
            LineErrorReason::TooLong { .. } => ErrorKind::TooLong,
        }
    }
}

/// A refused line: its number (1-based) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    pub line: usize,
    pub reason: LineErrorReason,
}

/// What validation saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    /// Lines read (blank ones included; a final newline does not start a line).
    pub lines: usize,
    pub blank_lines: usize,
    pub valid: usize,
    pub invalid: usize,
    pub invalid_by_reason: BTreeMap<ErrorKind, usize>,
    /// Characters of text in the valid examples.
    pub total_characters: usize,
}

/// A dataset every line of which is valid: the raw examples with their line
/// numbers. It cannot be serialised; [`crate::deidentify_dataset`] is the way on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidDataset {
    format: DatasetFormat,
    examples: Vec<(usize, Example)>,
}

impl ValidDataset {
    pub fn format(&self) -> DatasetFormat {
        self.format
    }
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
    /// The examples with their line numbers, in file order.
    pub fn examples(&self) -> impl Iterator<Item = (usize, &Example)> {
        self.examples.iter().map(|(line, example)| (*line, example))
    }
    pub(crate) fn into_examples(self) -> Vec<(usize, Example)> {
        self.examples
    }
}

/// Why a dataset was refused: the first errors in detail, how many lines were
/// bad in all, and whether it held no example at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub first_errors: Vec<LineError>,
    pub n_errors: usize,
    pub no_examples: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(ValidDataset),
    Rejected(Rejection),
}

/// The outcome of [`parse_dataset`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetReport {
    pub format: DatasetFormat,
    pub summary: DatasetSummary,
    pub verdict: Verdict,
}

impl DatasetReport {
    pub fn is_accepted(&self) -> bool {
        matches!(self.verdict, Verdict::Accepted(_))
    }
}

/// Reads every line of `bytes` as `format`. Accepted only when no line is bad
/// and there is at least one example.
pub fn parse_dataset(bytes: &[u8], format: DatasetFormat, limits: &Limits) -> DatasetReport {
    let mut summary = DatasetSummary {
        lines: 0,
        blank_lines: 0,
        valid: 0,
        invalid: 0,
        invalid_by_reason: BTreeMap::new(),
        total_characters: 0,
    };
    let mut examples = Vec::new();
    let mut first_errors = Vec::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let lines = if bytes.is_empty() {
        Vec::new()
    } else {
        body.split(|byte| *byte == b'\n').collect()
    };
    for (index, raw_line) in lines.into_iter().enumerate() {
        let line = index + 1;
        summary.lines += 1;
        let raw_line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        let raw_line = if line == 1 {
            raw_line
                .strip_prefix("\u{feff}".as_bytes())
                .unwrap_or(raw_line)
        } else {
            raw_line
        };
        if raw_line.iter().all(u8::is_ascii_whitespace) {
            summary.blank_lines += 1;
            continue;
        }
        match parse_line(raw_line, format, limits) {
            Ok(example) => {
                summary.valid += 1;
                summary.total_characters += example.characters();
                examples.push((line, example));
            }
            Err(reason) => {
                summary.invalid += 1;
                *summary.invalid_by_reason.entry(reason.kind()).or_default() += 1;
                if first_errors.len() < limits.max_detailed_errors {
                    first_errors.push(LineError { line, reason });
                }
            }
        }
    }
    let verdict = if summary.invalid == 0 && !examples.is_empty() {
        Verdict::Accepted(ValidDataset { format, examples })
    } else {
        Verdict::Rejected(Rejection {
            first_errors,
            n_errors: summary.invalid,
            no_examples: summary.valid == 0,
        })
    };
    DatasetReport {
        format,
        summary,
        verdict,
    }
}

fn parse_line(
    raw_line: &[u8],
    format: DatasetFormat,
    limits: &Limits,
) -> Result<Example, LineErrorReason> {
    let text = std::str::from_utf8(raw_line).map_err(|_| LineErrorReason::BadEncoding)?;
    let value: Value = serde_json::from_str(text).map_err(|error| {
        // serde_json's messages name a position and what was expected, not the content.
        LineErrorReason::BadJson(error.to_string())
    })?;
    let Value::Object(object) = value else {
        return Err(LineErrorReason::NotAnObject);
    };
    let example = match format {
        DatasetFormat::Messages => parse_messages(&object)?,
        DatasetFormat::Alpaca => parse_alpaca(&object)?,
        DatasetFormat::Text => {
            let text = required_string(&object, "text")?;
            if text.trim().is_empty() {
                return Err(LineErrorReason::EmptyText {
                    field: "text".to_owned(),
                });
            }
            Example::Text(text.to_owned())
        }
    };
    let characters = example.characters();
    if characters > limits.max_characters {
        return Err(LineErrorReason::TooLong {
            characters,
            limit: limits.max_characters,
        });
    }
    Ok(example)
}

fn required_string<'v>(
    object: &'v Map<String, Value>,
    field: &str,
) -> Result<&'v str, LineErrorReason> {
    match object.get(field) {
        None | Some(Value::Null) => Err(LineErrorReason::MissingField(field.to_owned())),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(LineErrorReason::WrongType {
            field: field.to_owned(),
            expected: "a string",
        }),
    }
}

fn optional_string<'v>(
    object: &'v Map<String, Value>,
    field: &str,
) -> Result<Option<&'v str>, LineErrorReason> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(LineErrorReason::WrongType {
            field: field.to_owned(),
            expected: "a string",
        }),
    }
}

/// A role as it may be shown in a report: a short identifier-like word, else
/// not shown (a misplaced field could hold patient text).
fn shown_role(role: &str) -> String {
    let identifier_like = role.len() <= 20
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if identifier_like {
        format!("`{role}`")
    } else {
        "(not shown)".to_owned()
    }
}

fn parse_messages(object: &Map<String, Value>) -> Result<Example, LineErrorReason> {
    let messages = match object.get("messages") {
        None | Some(Value::Null) => {
            return Err(LineErrorReason::MissingField("messages".to_owned()));
        }
        Some(Value::Array(messages)) => messages,
        Some(_) => {
            return Err(LineErrorReason::WrongType {
                field: "messages".to_owned(),
                expected: "an array of {role, content} objects",
            });
        }
    };
    let mut turns = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(LineErrorReason::WrongType {
                field: format!("messages[{index}]"),
                expected: "an object with `role` and `content`",
            });
        };
        let role_name =
            required_string(message, "role").map_err(|error| in_message(error, index))?;
        let Some(role) = Role::parse(role_name) else {
            return Err(LineErrorReason::UnknownRole {
                field: format!("messages[{index}].role"),
                role: shown_role(role_name),
            });
        };
        let content =
            required_string(message, "content").map_err(|error| in_message(error, index))?;
        if role == Role::Assistant && content.trim().is_empty() {
            return Err(LineErrorReason::EmptyAssistantTurn {
                field: format!("messages[{index}].content"),
            });
        }
        turns.push(ChatTurn {
            role,
            content: content.to_owned(),
        });
    }
    match turns.last() {
        None => Err(LineErrorReason::EmptyConversation),
        Some(last) if last.role != Role::Assistant => {
            Err(LineErrorReason::NotEndingWithAssistant { last: last.role })
        }
        Some(_) => Ok(Example::Chat(turns)),
    }
}

/// Qualifies a field error inside `messages[index]`.
fn in_message(error: LineErrorReason, index: usize) -> LineErrorReason {
    match error {
        LineErrorReason::MissingField(field) => {
            LineErrorReason::MissingField(format!("messages[{index}].{field}"))
        }
        LineErrorReason::WrongType { field, expected } => LineErrorReason::WrongType {
            field: format!("messages[{index}].{field}"),
            expected,
        },
        other => other,
    }
}

fn parse_alpaca(object: &Map<String, Value>) -> Result<Example, LineErrorReason> {
    let instruction = required_string(object, "instruction")?;
    let input = optional_string(object, "input")?.unwrap_or("");
    let output = required_string(object, "output")?;
    let system = optional_string(object, "system")?;
    let mut turns = Vec::new();
    if let Some(system) = system.filter(|system| !system.is_empty()) {
        turns.push(ChatTurn {
            role: Role::System,
            content: system.to_owned(),
        });
    }
    match object.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(history)) => {
            for (index, pair) in history.iter().enumerate() {
                let field = format!("history[{index}]");
                let pair = match pair {
                    Value::Array(pair) if pair.len() == 2 => pair,
                    _ => {
                        return Err(LineErrorReason::WrongType {
                            field,
                            expected: "a [user, assistant] pair of strings",
                        });
                    }
                };
                let (Value::String(user), Value::String(assistant)) = (&pair[0], &pair[1]) else {
                    return Err(LineErrorReason::WrongType {
                        field,
                        expected: "a [user, assistant] pair of strings",
                    });
                };
                if assistant.trim().is_empty() {
                    return Err(LineErrorReason::EmptyAssistantTurn {
                        field: format!("history[{index}][1]"),
                    });
                }
                turns.push(ChatTurn {
                    role: Role::User,
                    content: user.clone(),
                });
                turns.push(ChatTurn {
                    role: Role::Assistant,
                    content: assistant.clone(),
                });
            }
        }
        Some(_) => {
            return Err(LineErrorReason::WrongType {
                field: "history".to_owned(),
                expected: "an array of [user, assistant] pairs",
            });
        }
    }
    let prompt = match (instruction.is_empty(), input.is_empty()) {
        (false, false) => format!("{instruction}\n\n{input}"),
        (false, true) => instruction.to_owned(),
        (true, false) => input.to_owned(),
        (true, true) => {
            return Err(LineErrorReason::EmptyText {
                field: "instruction".to_owned(),
            });
        }
    };
    if output.trim().is_empty() {
        return Err(LineErrorReason::EmptyAssistantTurn {
            field: "output".to_owned(),
        });
    }
    turns.push(ChatTurn {
        role: Role::User,
        content: prompt,
    });
    turns.push(ChatTurn {
        role: Role::Assistant,
        content: output.to_owned(),
    });
    Ok(Example::Chat(turns))
}
