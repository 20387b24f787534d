//! Personal identifiers in Chinese and English clinical text: resident ID
//! numbers (GB 11643-1999, 18-digit with check digit and the legacy 15-digit
//! form), mobile and landline numbers, bank cards (Luhn), e-mail addresses;
//! and `deidentify`, which replaces them with category tags and counts them.
//!
//! De-identification is judged by recall first: an 18-digit number with a
//! valid birth date is masked as an ID even when its check digit is wrong (a
//! typo in an ID is still an ID).
//!
//! **Architecture Invariant:** detection is `medbox-deid`'s, the one
//! de-identifier of the project (fine-tuning datasets use it too); this module
//! keeps the tools' names, schemas and tags, and builds their results.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use medbox_deid::{Category, CivilDate, DeidConfig, Deidentifier, province};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{PureTool, Sex, Tool, ToolError, boxed, object_schema};

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        boxed(PureTool::new(
            "resident_id_check",
            "Validates a Chinese resident ID number (18-digit with GB 11643-1999 check digit, or legacy 15-digit): province, birth date, sex.",
            resident_id_schema,
            resident_id_check,
        )),
        boxed(PureTool::new(
            "bank_card_check",
            "Checks a bank-card number with the Luhn algorithm.",
            bank_card_schema,
            bank_card_check,
        )),
        boxed(PureTool::new(
            "deidentify",
            "Replaces resident IDs, mobile and landline numbers, bank cards and e-mail addresses in text with category tags, and counts them per category.",
            deidentify_schema,
            deidentify,
        )),
    ]
}

// ---------------------------------------------------------------------------
// Resident ID

pub use medbox_deid::{luhn_valid, resident_id_check_character};

/// A `YYYYMMDD` date that exists in the Gregorian calendar, 1900–2199, as `YYYY-MM-DD`.
fn valid_birth_date(yyyymmdd: &str) -> Option<String> {
    let date = CivilDate::from_yyyymmdd(yyyymmdd)?;
    Some(format!(
        "{:04}-{:02}-{:02}",
        date.year, date.month, date.day
    ))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidentIdArguments {
    pub id_number: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResidentIdResult {
    pub valid: bool,
    /// `18_digit` or `15_digit_legacy`.
    pub form: Option<&'static str>,
    pub province: Option<&'static str>,
    pub birth_date: Option<String>,
    pub sex: Option<Sex>,
    pub expected_check_character: Option<char>,
    /// The 18-digit form of a valid legacy 15-digit number (century 19 inserted).
    pub upgraded_18_digit: Option<String>,
    pub errors: Vec<String>,
    pub rule: &'static str,
}

fn resident_id_schema() -> Value {
    object_schema(
        json!({"id_number": {"type": "string", "description": "the ID number as written; spaces are ignored"}}),
        &["id_number"],
    )
}

pub fn resident_id_check(arguments: ResidentIdArguments) -> Result<ResidentIdResult, ToolError> {
    let id: String = arguments
        .id_number
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    Ok(check_resident_id(&id))
}

/// Validates an 18- or 15-character ID (uppercase `X`, no spaces).
pub fn check_resident_id(id: &str) -> ResidentIdResult {
    let mut result = ResidentIdResult {
        valid: false,
        form: None,
        province: None,
        birth_date: None,
        sex: None,
        expected_check_character: None,
        upgraded_18_digit: None,
        errors: Vec::new(),
        rule: "GB 11643-1999: weights 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2, sum mod 11 mapped through \"10X98765432\"",
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (body, birth_date_digits, sequence_digit) = match id.len() {
        18 if all_digits(&id[..17]) && (all_digits(&id[17..]) || &id[17..] == "X") => {
            result.form = Some("18_digit");
            (&id[..17], id[6..14].to_owned(), id.as_bytes()[16])
        }
        15 if all_digits(id) => {
            result.form = Some("15_digit_legacy");
            (id, format!("19{}", &id[6..12]), id.as_bytes()[14])
        }
        _ => {
            result.errors.push(format!(
                "expected 18 characters (17 digits and a digit or X) or 15 digits, got {} characters",
                id.chars().count()
            ));
            return result;
        }
    };
    result.province = province(&body[..2]);
    if result.province.is_none() {
        result
            .errors
            .push(format!("unknown province code `{}`", &body[..2]));
    }
    result.birth_date = valid_birth_date(&birth_date_digits);
    if result.birth_date.is_none() {
        result
            .errors
            .push(format!("`{birth_date_digits}` is not a valid birth date"));
    }
    result.sex = Some(if (sequence_digit - b'0') % 2 == 1 {
        Sex::Male
    } else {
        Sex::Female
    });
    if id.len() == 18 {
        result.expected_check_character = resident_id_check_character(body);
        let given = id.chars().nth(17);
        if given != result.expected_check_character {
            result.errors.push(format!(
                "check character is {}, expected {}",
                given.unwrap_or('?'),
                result.expected_check_character.unwrap_or('?')
            ));
        }
    } else {
        let first_17 = format!("{}19{}", &id[..6], &id[6..]);
        result.upgraded_18_digit =
            resident_id_check_character(&first_17).map(|check| format!("{first_17}{check}"));
    }
    result.valid = result.errors.is_empty();
    result
}

// ---------------------------------------------------------------------------
// Bank cards

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BankCardArguments {
    pub card_number: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BankCardResult {
    pub digits: usize,
    pub luhn_valid: bool,
    /// Card numbers are 12 to 19 digits (ISO/IEC 7812).
    pub plausible_length: bool,
    pub rule: &'static str,
}

fn bank_card_schema() -> Value {
    object_schema(
        json!({"card_number": {"type": "string", "description": "digits; spaces and hyphens are ignored"}}),
        &["card_number"],
    )
}

pub fn bank_card_check(arguments: BankCardArguments) -> Result<BankCardResult, ToolError> {
    let digits: String = arguments
        .card_number
        .chars()
        .filter(|c| *c != ' ' && *c != '-')
        .collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ToolError::bad(
            "card_number",
            "only digits, spaces and hyphens are allowed",
        ));
    }
    Ok(BankCardResult {
        digits: digits.len(),
        luhn_valid: luhn_valid(&digits),
        plausible_length: (12..=19).contains(&digits.len()),
        rule: "Luhn mod 10 (ISO/IEC 7812-1)",
    })
}

// ---------------------------------------------------------------------------
// De-identification

/// The identifier categories `deidentify` recognises, in the order they are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierCategory {
    Email,
    ResidentId,
    BankCard,
    Mobile,
    Landline,
}

impl IdentifierCategory {
    const ALL: [IdentifierCategory; 5] = [
        IdentifierCategory::Email,
        IdentifierCategory::ResidentId,
        IdentifierCategory::BankCard,
        IdentifierCategory::Mobile,
        IdentifierCategory::Landline,
    ];

    fn key(self) -> &'static str {
        match self {
            IdentifierCategory::Email => "email",
            IdentifierCategory::ResidentId => "resident_id",
            IdentifierCategory::BankCard => "bank_card",
            IdentifierCategory::Mobile => "mobile",
            IdentifierCategory::Landline => "landline",
        }
    }

    fn tag(self, language: TagLanguage) -> &'static str {
        match (self, language) {
            (IdentifierCategory::Email, TagLanguage::Zh) => "[邮箱]",
            (IdentifierCategory::ResidentId, TagLanguage::Zh) => "[身份证号]",
            (IdentifierCategory::BankCard, TagLanguage::Zh) => "[银行卡]",
            (IdentifierCategory::Mobile, TagLanguage::Zh) => "[手机号]",
            (IdentifierCategory::Landline, TagLanguage::Zh) => "[电话]",
            (IdentifierCategory::Email, TagLanguage::En) => "[EMAIL]",
            (IdentifierCategory::ResidentId, TagLanguage::En) => "[ID]",
            (IdentifierCategory::BankCard, TagLanguage::En) => "[BANK_CARD]",
            (IdentifierCategory::Mobile, TagLanguage::En) => "[MOBILE]",
            (IdentifierCategory::Landline, TagLanguage::En) => "[PHONE]",
        }
    }
}

/// The language of the replacement tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TagLanguage {
    #[default]
    Zh,
    En,
}

/// One identifier found: its category and its byte span in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdentifierSpan {
    pub category: IdentifierCategory,
    pub start: usize,
    pub end: usize,
}

/// The shared engine with its built-in detectors only (no dates, records,
/// names or addresses); the tags are this module's.
static DEIDENTIFIER: LazyLock<Deidentifier> = LazyLock::new(|| {
    Deidentifier::new(&DeidConfig::builtin(medbox_deid::TagLanguage::Zh))
        .expect("the built-in configuration is valid")
});

fn identifier_category(category: &Category) -> Option<IdentifierCategory> {
    match category {
        Category::Email => Some(IdentifierCategory::Email),
        Category::ResidentId => Some(IdentifierCategory::ResidentId),
        Category::BankCard => Some(IdentifierCategory::BankCard),
        Category::Mobile => Some(IdentifierCategory::Mobile),
        Category::Landline => Some(IdentifierCategory::Landline),
        // Not configured for this tool, so never found.
        Category::Record(_) | Category::Name | Category::Address | Category::Date => None,
    }
}

/// Finds identifiers in `text`, non-overlapping, in text order.
pub fn find_identifiers(text: &str) -> Vec<IdentifierSpan> {
    DEIDENTIFIER
        .find(text)
        .into_iter()
        .filter_map(|span| {
            Some(IdentifierSpan {
                category: identifier_category(&span.category)?,
                start: span.start,
                end: span.end,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidentifyArguments {
    pub text: String,
    #[serde(default)]
    pub tag_language: TagLanguage,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeidentifyResult {
    pub text: String,
    /// Replacements per category, every category listed (zero included).
    pub counts: BTreeMap<&'static str, usize>,
    pub total: usize,
    /// Where each replacement was, as byte offsets into the input; the
    /// original values are never echoed.
    pub replacements: Vec<IdentifierSpan>,
    pub rule: &'static str,
}

fn deidentify_schema() -> Value {
    object_schema(
        json!({
            "text": {"type": "string"},
            "tag_language": {"type": "string", "enum": ["zh", "en"], "description": "zh: [身份证号] [手机号] [电话] [银行卡] [邮箱]; en: [ID] [MOBILE] [PHONE] [BANK_CARD] [EMAIL]; default zh"}
        }),
        &["text"],
    )
}

pub fn deidentify(arguments: DeidentifyArguments) -> Result<DeidentifyResult, ToolError> {
    let text = arguments.text;
    let spans = find_identifiers(&text);
    let mut counts: BTreeMap<&'static str, usize> = IdentifierCategory::ALL
        .iter()
        .map(|category| (category.key(), 0))
        .collect();
    let mut output = String::with_capacity(text.len());
    let mut copied_up_to = 0;
    for span in &spans {
        output.push_str(&text[copied_up_to..span.start]);
        output.push_str(span.category.tag(arguments.tag_language));
        copied_up_to = span.end;
        *counts.entry(span.category.key()).or_default() += 1;
    }
    output.push_str(&text[copied_up_to..]);
    Ok(DeidentifyResult {
        text: output,
        counts,
        total: spans.len(),
        replacements: spans,
        rule: "resident ID (GB 11643-1999, valid birth date), bank card (Luhn, 16-19 digits), mobile (+86)1[3-9]xxxxxxxxx, landline 0xx(x)-xxxxxxx(x), e-mail",
    })
}

#[cfg(test)]
mod tests;
