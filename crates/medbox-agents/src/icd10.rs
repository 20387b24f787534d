//! ICD-10 lookup and search over a bundled subset of common codes
//! (`data/icd10.psv`) with English and Chinese titles.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bundled_table::{TableError, parse_rows};
use crate::{PureTool, Tool, ToolError, boxed, object_schema};

const TABLE_TEXT: &str = include_str!("../data/icd10.psv");
const EDITION: &str = "ICD-10 (WHO), bundled subset of common codes";

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        boxed(PureTool::new(
            "icd10_lookup",
            "Looks up an ICD-10 code (e.g. I10, E11.9) in the bundled subset: English and Chinese titles, its category and subcodes.",
            lookup_schema,
            icd10_lookup,
        )),
        boxed(PureTool::new(
            "icd10_search",
            "Searches the bundled ICD-10 subset by words in English or Chinese (all words must match), or by code prefix.",
            search_schema,
            icd10_search,
        )),
    ]
}

/// One bundled code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Icd10Code {
    pub code: &'static str,
    pub title_en: &'static str,
    pub title_zh: &'static str,
}

fn is_code(text: &str) -> bool {
    let bytes = text.as_bytes();
    let head = bytes.len() >= 3
        && bytes[0].is_ascii_uppercase()
        && bytes[1].is_ascii_digit()
        && bytes[2].is_ascii_alphanumeric();
    match text.split_once('.') {
        None => head && bytes.len() == 3,
        Some((category, sub)) => {
            head && category.len() == 3
                && (1..=4).contains(&sub.len())
                && sub.bytes().all(|b| b.is_ascii_alphanumeric())
        }
    }
}

fn parse_table() -> Result<Vec<Icd10Code>, TableError> {
    let rows = parse_rows("icd10.psv", TABLE_TEXT, &["code", "title_en", "title_zh"])?;
    let mut codes = Vec::with_capacity(rows.len());
    for row in rows {
        let code = row.required(0)?;
        if !is_code(code) {
            return Err(row.error(format!("`{code}` is not an ICD-10 code (A00 or A00.0)")));
        }
        if codes.iter().any(|known: &Icd10Code| known.code == code) {
            return Err(row.error(format!("code `{code}` appears twice")));
        }
        codes.push(Icd10Code {
            code,
            title_en: row.required(1)?,
            title_zh: row.required(2)?,
        });
    }
    codes.sort_by_key(|code| code.code);
    Ok(codes)
}

/// The bundled codes, sorted by code.
pub fn codes() -> Result<&'static [Icd10Code], ToolError> {
    static TABLE: OnceLock<Result<Vec<Icd10Code>, TableError>> = OnceLock::new();
    match TABLE.get_or_init(parse_table) {
        Ok(table) => Ok(table),
        Err(error) => Err(error.into()),
    }
}

/// Upper case, no spaces, a dot after the category: `e119` → `E11.9`.
pub fn normalize_code(code: &str) -> String {
    let compact: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '.')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if compact.len() > 3 && compact.is_ascii() {
        format!("{}.{}", &compact[..3], &compact[3..])
    } else {
        compact
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupArguments {
    pub code: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LookupResult {
    pub code: &'static str,
    pub title_en: &'static str,
    pub title_zh: &'static str,
    /// The three-character category, when it is bundled and differs from the code.
    pub category: Option<Icd10Code>,
    pub subcodes: Vec<Icd10Code>,
    pub edition: &'static str,
}

fn lookup_schema() -> Value {
    object_schema(
        json!({"code": {"type": "string", "description": "ICD-10 code, e.g. I10 or E11.9 (dot optional)"}}),
        &["code"],
    )
}

fn subcodes(table: &[Icd10Code], category: &str) -> Vec<Icd10Code> {
    table
        .iter()
        .filter(|code| {
            code.code.len() > 3
                && code.code.starts_with(category)
                && code.code.as_bytes()[3] == b'.'
        })
        .cloned()
        .collect()
}

pub fn icd10_lookup(arguments: LookupArguments) -> Result<LookupResult, ToolError> {
    let code = normalize_code(&arguments.code);
    if !is_code(&code) {
        return Err(ToolError::bad(
            "code",
            format!(
                "`{}` is not an ICD-10 code: a letter, two digits, optionally a dot and 1-4 more characters (e.g. I10, E11.9)",
                arguments.code
            ),
        ));
    }
    let table = codes()?;
    let category_code = &code[..3];
    let Some(found) = table.iter().find(|entry| entry.code == code) else {
        let mut near: Vec<&str> = table
            .iter()
            .filter(|entry| entry.code.starts_with(category_code))
            .map(|entry| entry.code)
            .collect();
        near.truncate(10);
        let hint = if near.is_empty() {
            "not in the bundled subset; try icd10_search with words from the diagnosis".to_owned()
        } else {
            format!(
                "not in the bundled subset; codes in the same category: {}",
                near.join(", ")
            )
        };
        return Err(ToolError::NotFound {
            what: "ICD-10 code",
            key: code,
            hint,
        });
    };
    let category = (found.code.len() > 3)
        .then(|| {
            table
                .iter()
                .find(|entry| entry.code == category_code)
                .cloned()
        })
        .flatten();
    Ok(LookupResult {
        code: found.code,
        title_en: found.title_en,
        title_zh: found.title_zh,
        category,
        subcodes: if found.code.len() == 3 {
            subcodes(table, found.code)
        } else {
            Vec::new()
        },
        edition: EDITION,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchArguments {
    pub query: String,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResult {
    pub query: String,
    pub matches: Vec<Icd10Code>,
    /// `all_words` when every word matched; `partial_chinese` when no entry held
    /// every word and entries sharing most Chinese character pairs are shown.
    pub match_kind: &'static str,
    pub edition: &'static str,
}

fn search_schema() -> Value {
    object_schema(
        json!({
            "query": {"type": "string", "description": "words in English or Chinese (e.g. 'heart failure', '2型糖尿病 肾'), or a code prefix (e.g. E11)"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 50, "description": "default 10"}
        }),
        &["query"],
    )
}

fn is_chinese(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c)
}

/// Whether one query word matches an entry: a code prefix, an English word
/// prefix, or a Chinese substring.
fn word_matches(entry: &Icd10Code, word: &str) -> bool {
    if word.chars().any(is_chinese) {
        return entry.title_zh.contains(word);
    }
    // A code or a code prefix (`E11`, `E1`, `E11.9`) matches codes that start with it.
    let upper = normalize_code(word);
    let code_prefix = upper.len() >= 2
        && upper.as_bytes()[0].is_ascii_uppercase()
        && upper.as_bytes()[1].is_ascii_digit()
        && (upper.len() <= 3 || is_code(&upper));
    if code_prefix && entry.code.starts_with(&upper) {
        return true;
    }
    let lower = word.to_lowercase();
    entry
        .title_en
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .any(|title_word| title_word.starts_with(&lower))
        || entry.title_zh.contains(word)
}

fn chinese_bigrams(text: &str) -> Vec<String> {
    let chars: Vec<char> = text
        .chars()
        .filter(|c| is_chinese(*c) || c.is_ascii_digit())
        .collect();
    chars.windows(2).map(|pair| pair.iter().collect()).collect()
}

pub fn icd10_search(arguments: SearchArguments) -> Result<SearchResult, ToolError> {
    let limit = arguments.limit.unwrap_or(10);
    if !(1..=50).contains(&limit) {
        return Err(ToolError::OutOfRange {
            field: "limit".to_owned(),
            value: limit as f64,
            expected: "expected 1 to 50".to_owned(),
        });
    }
    let words: Vec<&str> = arguments
        .query
        .split(|c: char| c.is_whitespace() || ",，、;；/".contains(c))
        .filter(|word| !word.is_empty())
        .collect();
    if words.is_empty() {
        return Err(ToolError::bad("query", "give at least one word or code"));
    }
    let table = codes()?;
    let mut matches: Vec<Icd10Code> = table
        .iter()
        .filter(|entry| words.iter().all(|word| word_matches(entry, word)))
        .cloned()
        .collect();
    let mut match_kind = "all_words";
    if matches.is_empty() {
        // A Chinese phrase rarely appears verbatim: rank by shared character pairs.
        let query_pairs = chinese_bigrams(&arguments.query);
        if !query_pairs.is_empty() {
            let mut scored: Vec<(usize, &Icd10Code)> = table
                .iter()
                .map(|entry| {
                    (
                        query_pairs
                            .iter()
                            .filter(|pair| entry.title_zh.contains(pair.as_str()))
                            .count(),
                        entry,
                    )
                })
                .filter(|(shared, _)| shared * 2 >= query_pairs.len() && *shared > 0)
                .collect();
            scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.code.cmp(b.1.code)));
            matches = scored.into_iter().map(|(_, entry)| entry.clone()).collect();
            match_kind = "partial_chinese";
        }
    }
    matches.truncate(limit);
    Ok(SearchResult {
        query: arguments.query,
        matches,
        match_kind,
        edition: EDITION,
    })
}

#[cfg(test)]
mod tests;
