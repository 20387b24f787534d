//! The one de-identification engine of medbox.
//!
//! A [`Deidentifier`] is built once from a [`DeidConfig`] and then replaces
//! personal identifiers in free text with category tags (`[ID]`, `[MOBILE]`,
//! `[PHONE]`, `[EMAIL]`, `[BANK_CARD]`, `[NAME]`, `[ADDRESS]`, a configured tag
//! for each record-number pattern; or the Chinese tags `[身份证号]` …) and
//! shifts calendar dates. It finds:
//! - Chinese resident IDs: 18 characters with the GB 11643-1999 check
//!   character, and the 15-digit legacy form, both with a known province code
//!   and a real birth date;
//! - mobile numbers `(+86)1[3-9]xxxxxxxxx` and landlines `0xx(x)-xxxxxxx(x)`;
//! - e-mail addresses; bank cards (16–19 digits passing Luhn);
//! - medical-record, inpatient and insurance numbers by configured patterns;
//! - names from a dictionary or marked by patterns, addresses by patterns;
//! - dates (`2024-03-05`, `2024/3/5`, `2024.3.5`, `2024年3月5日`,
//!   `March 5, 2024`, `5 Mar 2024`), moved by the same number of days
//!   everywhere in one record, so intervals between events survive; each is
//!   written back in its own form.
//!
//! **Architecture Invariant:** this crate is the only de-identifier. Fine-tuning
//! datasets (`medbox-finetune`) and the agents' `deidentify` tool
//! (`medbox-agents`) both call it, so a fix here reaches both.
//!
//! **Architecture Invariant:** recall first. An 18-character number with a real
//! province and birth date is masked as an ID even when its check character is
//! wrong (a typo in an ID is still an ID). Numbers that are not ID-shaped
//! (unknown province, impossible birth date) are masked only as bank cards,
//! when they pass Luhn, or by a configured record pattern.
//!
//! **Architecture Invariant:** deterministic. The same configuration, text and
//! record key give the same output; the date shift of a record is derived from
//! the configured seed and the record key (FNV-1a and SplitMix64, written out
//! here so that it never changes with a dependency's version).
//!
//! Precision and recall are measured on the labelled corpus of [`synthetic`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

pub mod checks;
pub mod synthetic;

pub use checks::{
    CivilDate, luhn_check_digit, luhn_valid, province, resident_id_check_character,
    resident_id_shaped, resident_id_valid,
};

/// What kind of identifier a span is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    ResidentId,
    Mobile,
    Landline,
    Email,
    BankCard,
    /// A record number matched by a configured [`RecordPattern`], by its category name
    /// (for example `medical_record`, `inpatient`, `insurance`).
    Record(String),
    Name,
    Address,
    Date,
}

impl Category {
    /// A stable `snake_case` key for counts and reports (a record pattern's own name).
    pub fn key(&self) -> &str {
        match self {
            Category::ResidentId => "resident_id",
            Category::Mobile => "mobile",
            Category::Landline => "landline",
            Category::Email => "email",
            Category::BankCard => "bank_card",
            Category::Record(name) => name,
            Category::Name => "name",
            Category::Address => "address",
            Category::Date => "date",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The language of the replacement tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagLanguage {
    /// `[身份证号]` `[手机号]` `[电话]` `[邮箱]` `[银行卡]` `[姓名]` `[地址]`.
    Zh,
    /// `[ID]` `[MOBILE]` `[PHONE]` `[EMAIL]` `[BANK_CARD]` `[NAME]` `[ADDRESS]`.
    En,
}

fn builtin_tag(category: &Category, language: TagLanguage) -> &'static str {
    match (category, language) {
        (Category::ResidentId, TagLanguage::Zh) => "[身份证号]",
        (Category::Mobile, TagLanguage::Zh) => "[手机号]",
        (Category::Landline, TagLanguage::Zh) => "[电话]",
        (Category::Email, TagLanguage::Zh) => "[邮箱]",
        (Category::BankCard, TagLanguage::Zh) => "[银行卡]",
        (Category::Name, TagLanguage::Zh) => "[姓名]",
        (Category::Address, TagLanguage::Zh) => "[地址]",
        (Category::Record(_), TagLanguage::Zh) => "[编号]",
        (Category::Date, TagLanguage::Zh) => "[日期]",
        (Category::ResidentId, TagLanguage::En) => "[ID]",
        (Category::Mobile, TagLanguage::En) => "[MOBILE]",
        (Category::Landline, TagLanguage::En) => "[PHONE]",
        (Category::Email, TagLanguage::En) => "[EMAIL]",
        (Category::BankCard, TagLanguage::En) => "[BANK_CARD]",
        (Category::Name, TagLanguage::En) => "[NAME]",
        (Category::Address, TagLanguage::En) => "[ADDRESS]",
        (Category::Record(_), TagLanguage::En) => "[NUMBER]",
        (Category::Date, TagLanguage::En) => "[DATE]",
    }
}

/// A hospital's own record-number format: a category name, the tag that
/// replaces it, and a regular expression. When the expression has a capture
/// group, only group 1 is masked (so `住院号[:：]?\s*(\d{8})` keeps the keyword).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPattern {
    pub category: String,
    pub tag: String,
    pub pattern: String,
}

/// What happens to dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateShift {
    /// Dates are left as they are (and not reported).
    Keep,
    /// Every date moves by this many days.
    Fixed { days: i64 },
    /// Each record moves by its own number of days in `±1..=max_days`,
    /// derived from `seed` and the record key: the same in every call.
    PerRecord { seed: u64, max_days: u32 },
}

/// How a [`Deidentifier`] is set up. The built-in detectors (resident ID,
/// phones, e-mail, bank cards) are always on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeidConfig {
    pub tag_language: TagLanguage,
    pub record_patterns: Vec<RecordPattern>,
    /// Names masked wherever they occur (Chinese names anywhere, Latin names
    /// as whole words). Each must be at least two characters.
    pub names: Vec<String>,
    /// Regular expressions that mark names (group 1 when present).
    pub name_patterns: Vec<String>,
    /// Regular expressions that mark addresses (group 1 when present).
    pub address_patterns: Vec<String>,
    pub dates: DateShift,
}

/// Record-number keywords common in Chinese and English records.
pub fn standard_record_patterns() -> Vec<RecordPattern> {
    let pattern = |category: &str, tag: &str, pattern: &str| RecordPattern {
        category: category.to_owned(),
        tag: tag.to_owned(),
        pattern: pattern.to_owned(),
    };
    vec![
        pattern(
            "medical_record",
            "[MRN]",
            r"(?i)(?:病案号|病历号|MRN|medical record (?:no\.?|number))[:：#]?\s*([A-Z]{0,2}[0-9]{5,12})",
        ),
        pattern(
            "inpatient",
            "[INPATIENT_NO]",
            r"(?i)(?:住院号|inpatient (?:no\.?|number))[:：#]?\s*([A-Z]{0,2}[0-9]{5,12})",
        ),
        pattern(
            "insurance",
            "[INSURANCE_NO]",
            r"(?i)(?:医保号|医保卡号|社保卡号|insurance (?:no\.?|number|id))[:：#]?\s*([A-Z]{0,3}[0-9]{6,20}X?)",
        ),
    ]
}

/// Province and municipality names an address may start with.
const PROVINCES: &str = "北京|天津|上海|重庆|河北|山西|内蒙古|辽宁|吉林|黑龙江|江苏|浙江|安徽|福建|江西|山东|河南|湖北|湖南|广东|广西|海南|四川|贵州|云南|西藏|陕西|甘肃|青海|宁夏|新疆|台湾|香港|澳门";

/// Address patterns: a Chinese address down to the house number or estate,
/// starting at a province or a city; a city with its district; an English
/// street address.
pub fn standard_address_patterns() -> Vec<String> {
    // Characters that start the words leading into an address ("家住", "现居",
    // "住址为", "患者") are not part of a city name.
    let place = r"[\p{Han}--[家住址现居在于为是患者位的往自从到及和与即系]]";
    // A street and house number, or a named estate or village.
    let street = r"(?:[\p{Han}0-9]{1,10}?(?:路|街|大道|巷|弄|胡同)[0-9]+号|[\p{Han}0-9]{1,8}?(?:小区|花园|公寓|大厦|新村|村))(?:[0-9]+(?:号楼|栋|幢|单元|室|楼))*";
    vec![
        format!(
            r"(?:{PROVINCES})(?:省|市|自治区|壮族自治区|回族自治区|维吾尔自治区)?(?:\p{{Han}}{{1,5}}?(?:市|州|盟))?(?:\p{{Han}}{{1,5}}?(?:区|县|旗))?{street}"
        ),
        format!(r"{place}{{2,4}}?市\p{{Han}}{{1,5}}?(?:区|县){street}"),
        // A city and district alone: a place smaller than a province is an
        // identifier too (HIPAA Safe Harbor), so recall first.
        format!(r"{place}{{2,4}}?市\p{{Han}}{{1,5}}?(?:区|县)"),
        r"\b[0-9]{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Boulevard|Blvd|Way|Court)\b\.?".to_owned(),
    ]
}

/// Patterns that mark a name by its label or title.
pub fn standard_name_patterns() -> Vec<String> {
    vec![
        r"(?:姓名|患者姓名|联系人|家属|签名)[:：]\s*(\p{Han}{2,4})(?:[，,。；;、\s）)]|$)"
            .to_owned(),
        r"\b(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+([A-Z][a-z]+(?:\s[A-Z][a-z]+)?)".to_owned(),
        r"(?i:name)[:：]\s*([A-Z][a-z]+(?:\s[A-Z][a-z]+){1,2})".to_owned(),
    ]
}

impl DeidConfig {
    /// The built-in detectors only (resident ID, phones, e-mail, bank cards);
    /// dates are kept. This is what the agents' `deidentify` tool uses.
    pub fn builtin(tag_language: TagLanguage) -> DeidConfig {
        DeidConfig {
            tag_language,
            record_patterns: Vec::new(),
            names: Vec::new(),
            name_patterns: Vec::new(),
            address_patterns: Vec::new(),
            dates: DateShift::Keep,
        }
    }

    /// For training data: the built-ins plus the standard record-number,
    /// name and address patterns, the given name dictionary, and a per-record
    /// date shift of up to a year derived from `seed`.
    pub fn clinical(seed: u64, names: Vec<String>) -> DeidConfig {
        DeidConfig {
            tag_language: TagLanguage::En,
            record_patterns: standard_record_patterns(),
            names,
            name_patterns: standard_name_patterns(),
            address_patterns: standard_address_patterns(),
            dates: DateShift::PerRecord {
                seed,
                max_days: 365,
            },
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeidError {
    #[error("record pattern `{category}`: `{pattern}` is not a valid regular expression: {source}")]
    RecordPattern {
        category: String,
        pattern: String,
        source: regex::Error,
    },
    #[error(
        "record pattern `{category}`: the category name must be non-empty `snake_case` and not a built-in category"
    )]
    RecordCategory { category: String },
    #[error("`name_patterns`: `{pattern}` is not a valid regular expression: {source}")]
    NamePattern {
        pattern: String,
        source: regex::Error,
    },
    #[error("`address_patterns`: `{pattern}` is not a valid regular expression: {source}")]
    AddressPattern {
        pattern: String,
        source: regex::Error,
    },
    #[error("`names`: `{name}` must be at least two characters")]
    NameTooShort { name: String },
    #[error("`dates.max_days` must be at least 1")]
    ZeroMaxDays,
}

/// One identifier found: its category and its byte span in the input text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub category: Category,
    pub start: usize,
    pub end: usize,
}

/// The result of [`Deidentifier::deidentify`]: the masked text, how many
/// replacements per category, and where they were in the input (byte offsets;
/// the original values are never kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deidentified {
    pub text: String,
    pub counts: BTreeMap<Category, usize>,
    pub spans: Vec<Span>,
}

struct RecordRule {
    category: Category,
    tag: String,
    regex: Regex,
}

/// A configured de-identifier; cheap to share (`&self` everywhere).
pub struct Deidentifier {
    tag_language: TagLanguage,
    record_rules: Vec<RecordRule>,
    name_dictionary: Option<Regex>,
    name_patterns: Vec<Regex>,
    address_patterns: Vec<Regex>,
    dates: DateShift,
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
        .expect("valid regex")
});
static LONG_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9]{17}[Xx]|[0-9]{15,19}|[0-9]{4}(?:[ -][0-9]{4}){3}(?:[ -][0-9]{1,3})?|[0-9]{6}[ -][0-9]{8}[ -][0-9]{3}[0-9Xx]")
        .expect("valid regex")
});
static MOBILE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+?86[ -]?)?1[3-9][0-9](?:[0-9]{8}|[ .-][0-9]{4}[ .-][0-9]{4})")
        .expect("valid regex")
});
static LANDLINE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:0[0-9]{2,3}[ -]?|\(0[0-9]{2,3}\) ?)(?:[0-9]{7,8}|[0-9]{3,4}[ -][0-9]{4})(?:-[0-9]{1,5})?",
    )
    .expect("valid regex")
});
/// Month names as written in English dates (full, three-letter, `Sept`).
const ENGLISH_MONTH: &str = r"(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// How a date is written: its expression and which capture groups hold the
/// year, the month and the day.
struct DateForm {
    regex: Regex,
    year: usize,
    month: usize,
    day: usize,
    english_month: bool,
}

/// `2024-03-05`, `2024/3/5`, `2024.3.5`, `2024年3月5日`, `March 5, 2024`, `5 Mar 2024`.
static DATE_FORMS: LazyLock<Vec<DateForm>> = LazyLock::new(|| {
    let numeric = |pattern: &str| DateForm {
        regex: Regex::new(pattern).expect("valid regex"),
        year: 1,
        month: 2,
        day: 3,
        english_month: false,
    };
    vec![
        numeric(r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})"),
        numeric(r"([0-9]{4})/([0-9]{1,2})/([0-9]{1,2})"),
        numeric(r"([0-9]{4})\.([0-9]{1,2})\.([0-9]{1,2})"),
        numeric(r"([0-9]{4}) ?年 ?([0-9]{1,2}) ?月 ?([0-9]{1,2}) ?[日号]"),
        DateForm {
            regex: Regex::new(&format!(
                r"\b{ENGLISH_MONTH}\.? ([0-9]{{1,2}})(?:st|nd|rd|th)?,? ([0-9]{{4}})"
            ))
            .expect("valid regex"),
            year: 3,
            month: 1,
            day: 2,
            english_month: true,
        },
        DateForm {
            regex: Regex::new(&format!(
                r"\b([0-9]{{1,2}}) {ENGLISH_MONTH}\.?,? ([0-9]{{4}})"
            ))
            .expect("valid regex"),
            year: 3,
            month: 2,
            day: 1,
            english_month: true,
        },
    ]
});

/// True when the characters either side of `start..end` are not ASCII letters
/// or digits, so a match is a whole number, not part of a longer one.
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let joins = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !joins(before) && !joins(after)
}

/// Classifies a long digit run (spaces and hyphens removed) as an ID or a card.
fn classify_long_number(digits: &str) -> Option<Category> {
    let upper = digits.to_ascii_uppercase();
    // A mobile number written with its country code is left to the mobile rule.
    if upper.len() == 13 && upper.starts_with("861") && matches!(upper.as_bytes()[3], b'3'..=b'9') {
        return None;
    }
    // Recall first: a plausible ID with a wrong check character is still an
    // ID. A card number has a real birth date at digits 7–14 less than once in
    // a hundred, so an ID-shaped number is an ID before it is a card.
    if resident_id_shaped(&upper) {
        return Some(Category::ResidentId);
    }
    if (16..=19).contains(&upper.len()) && luhn_valid(&upper) {
        return Some(Category::BankCard);
    }
    None
}

/// The byte range a rule masks: group 1 when the expression has one, else the match.
fn rule_ranges<'t>(regex: &'t Regex, text: &'t str) -> impl Iterator<Item = (usize, usize)> + 't {
    let use_group = regex.captures_len() > 1;
    regex.captures_iter(text).filter_map(move |captures| {
        let found = if use_group {
            captures.get(1)
        } else {
            captures.get(0)
        }?;
        (found.start() < found.end()).then_some((found.start(), found.end()))
    })
}

/// FNV-1a over bytes: a stable hash for deriving per-record values.
fn fnv1a(bytes: &[u8], mut hash: u64) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// One SplitMix64 step (Steele, Lea, Flood 2014).
fn splitmix64(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64 as a generator: a sequence fixed by its seed forever (no
/// dependency, no version drift), for the project's seeded choices: date
/// shifts, synthetic corpora, training data order.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let output = splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        output
    }
}

impl Deidentifier {
    /// Compiles the configuration; every pattern is checked here, once.
    pub fn new(config: &DeidConfig) -> Result<Deidentifier, DeidError> {
        let builtin_keys = [
            "resident_id",
            "mobile",
            "landline",
            "email",
            "bank_card",
            "name",
            "address",
            "date",
        ];
        let mut record_rules = Vec::with_capacity(config.record_patterns.len());
        for record in &config.record_patterns {
            let snake_case = !record.category.is_empty()
                && record
                    .category
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !snake_case || builtin_keys.contains(&record.category.as_str()) {
                return Err(DeidError::RecordCategory {
                    category: record.category.clone(),
                });
            }
            let regex = Regex::new(&record.pattern).map_err(|source| DeidError::RecordPattern {
                category: record.category.clone(),
                pattern: record.pattern.clone(),
                source,
            })?;
            record_rules.push(RecordRule {
                category: Category::Record(record.category.clone()),
                tag: record.tag.clone(),
                regex,
            });
        }
        if let Some(name) = config.names.iter().find(|name| name.chars().count() < 2) {
            return Err(DeidError::NameTooShort { name: name.clone() });
        }
        let name_dictionary = if config.names.is_empty() {
            None
        } else {
            // Longest first, so "欧阳明华" wins over "欧阳明".
            let mut names: Vec<&str> = config.names.iter().map(String::as_str).collect();
            names.sort_by_key(|name| std::cmp::Reverse(name.chars().count()));
            names.dedup();
            let alternation: Vec<String> = names.iter().map(|name| regex::escape(name)).collect();
            Some(Regex::new(&alternation.join("|")).expect("escaped names form a valid regex"))
        };
        let compile = |patterns: &[String], error: fn(String, regex::Error) -> DeidError| {
            patterns
                .iter()
                .map(|pattern| Regex::new(pattern).map_err(|source| error(pattern.clone(), source)))
                .collect::<Result<Vec<_>, _>>()
        };
        let name_patterns = compile(&config.name_patterns, |pattern, source| {
            DeidError::NamePattern { pattern, source }
        })?;
        let address_patterns = compile(&config.address_patterns, |pattern, source| {
            DeidError::AddressPattern { pattern, source }
        })?;
        if let DateShift::PerRecord { max_days: 0, .. } = config.dates {
            return Err(DeidError::ZeroMaxDays);
        }
        Ok(Deidentifier {
            tag_language: config.tag_language,
            record_rules,
            name_dictionary,
            name_patterns,
            address_patterns,
            dates: config.dates,
        })
    }

    /// The number of days dates in the record `record_key` move by (0 when kept).
    pub fn date_shift_days(&self, record_key: &str) -> i64 {
        match self.dates {
            DateShift::Keep => 0,
            DateShift::Fixed { days } => days,
            DateShift::PerRecord { seed, max_days } => {
                let hash = fnv1a(
                    record_key.as_bytes(),
                    fnv1a(&seed.to_le_bytes(), 0xcbf2_9ce4_8422_2325),
                );
                let random = splitmix64(hash);
                let magnitude = 1 + (random >> 1) % u64::from(max_days);
                let magnitude = i64::try_from(magnitude).expect("max_days fits in i64");
                if random & 1 == 0 {
                    magnitude
                } else {
                    -magnitude
                }
            }
        }
    }

    /// Finds identifiers in `text`: non-overlapping, in text order. Earlier
    /// detectors win an overlap, in this order: e-mail, configured record
    /// numbers, resident IDs and bank cards, mobiles, landlines, dates,
    /// addresses, dictionary names, name patterns.
    pub fn find(&self, text: &str) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        let add = |spans: &mut Vec<Span>, category: &Category, start: usize, end: usize| {
            if spans
                .iter()
                .all(|span| end <= span.start || start >= span.end)
            {
                spans.push(Span {
                    category: category.clone(),
                    start,
                    end,
                });
            }
        };
        for found in EMAIL.find_iter(text) {
            add(&mut spans, &Category::Email, found.start(), found.end());
        }
        for rule in &self.record_rules {
            for (start, end) in rule_ranges(&rule.regex, text) {
                add(&mut spans, &rule.category, start, end);
            }
        }
        for found in LONG_NUMBER.find_iter(text) {
            if !stands_alone(text, found.start(), found.end()) {
                continue;
            }
            let digits: String = found
                .as_str()
                .chars()
                .filter(|c| *c != ' ' && *c != '-')
                .collect();
            if let Some(category) = classify_long_number(&digits) {
                add(&mut spans, &category, found.start(), found.end());
            }
        }
        for (regex, category) in [
            (&*MOBILE, Category::Mobile),
            (&*LANDLINE, Category::Landline),
        ] {
            for found in regex.find_iter(text) {
                if stands_alone(text, found.start(), found.end()) {
                    add(&mut spans, &category, found.start(), found.end());
                }
            }
        }
        if self.dates != DateShift::Keep {
            for form in DATE_FORMS.iter() {
                for captures in form.regex.captures_iter(text) {
                    let found = captures.get(0).expect("group 0 is the match");
                    if stands_alone(text, found.start(), found.end())
                        && form.date(&captures).is_some()
                    {
                        add(&mut spans, &Category::Date, found.start(), found.end());
                    }
                }
            }
        }
        for regex in &self.address_patterns {
            for (start, end) in rule_ranges(regex, text) {
                add(&mut spans, &Category::Address, start, end);
            }
        }
        if let Some(dictionary) = &self.name_dictionary {
            for found in dictionary.find_iter(text) {
                // A Latin-script name must be a whole word; a Chinese one has no word boundaries.
                let latin = found
                    .as_str()
                    .starts_with(|c: char| c.is_ascii_alphabetic());
                if !latin || stands_alone(text, found.start(), found.end()) {
                    add(&mut spans, &Category::Name, found.start(), found.end());
                }
            }
        }
        for regex in &self.name_patterns {
            for (start, end) in rule_ranges(regex, text) {
                add(&mut spans, &Category::Name, start, end);
            }
        }
        spans.sort_by_key(|span| span.start);
        spans
    }

    /// Masks every identifier in `text` and shifts its dates by the shift of
    /// `record_key` (use one key per record: a patient's note, a dataset line).
    pub fn deidentify(&self, text: &str, record_key: &str) -> Deidentified {
        let spans = self.find(text);
        let shift = self.date_shift_days(record_key);
        let mut counts: BTreeMap<Category, usize> = BTreeMap::new();
        let mut output = String::with_capacity(text.len());
        let mut copied_up_to = 0;
        for span in &spans {
            output.push_str(&text[copied_up_to..span.start]);
            let original = &text[span.start..span.end];
            match &span.category {
                Category::Date => match shift_date(original, shift) {
                    Some(shifted) => output.push_str(&shifted),
                    None => output.push_str(builtin_tag(&Category::Date, self.tag_language)),
                },
                Category::Record(_) => {
                    let rule = self
                        .record_rules
                        .iter()
                        .find(|rule| rule.category == span.category)
                        .expect("a record span comes from a configured rule");
                    output.push_str(&rule.tag);
                }
                category => output.push_str(builtin_tag(category, self.tag_language)),
            }
            copied_up_to = span.end;
            *counts.entry(span.category.clone()).or_default() += 1;
        }
        output.push_str(&text[copied_up_to..]);
        Deidentified {
            text: output,
            counts,
            spans,
        }
    }
}

impl DateForm {
    /// The date the captures hold, when it exists.
    fn date(&self, captures: &regex::Captures<'_>) -> Option<CivilDate> {
        let year = captures.get(self.year)?.as_str().parse().ok()?;
        let month_text = captures.get(self.month)?.as_str();
        let month = if self.english_month {
            let prefix = month_text.get(..3)?;
            let index = MONTH_NAMES
                .iter()
                .position(|name| name.starts_with(prefix))?;
            u32::try_from(index + 1).ok()?
        } else {
            month_text.parse().ok()?
        };
        let day = captures.get(self.day)?.as_str().parse().ok()?;
        CivilDate::new(year, month, day)
    }
}

/// Writes `written` (one whole date) moved by `days`, in the same form: the
/// year, month and day are replaced in place, keeping their zero-padding and
/// the month's spelling (full or abbreviated); everything else is kept.
fn shift_date(written: &str, days: i64) -> Option<String> {
    for form in DATE_FORMS.iter() {
        let Some(captures) = form.regex.captures(written) else {
            continue;
        };
        let whole = captures.get(0)?;
        if whole.start() != 0 || whole.end() != written.len() {
            continue;
        }
        let date = form.date(&captures)?.shifted(days);
        let text_of = |group: usize| captures.get(group).map_or("", |m| m.as_str());
        // Zero-padded when the original was: a leading zero, or (numeric forms)
        // a two-digit month and a two-digit day.
        let both_two_digits =
            !form.english_month && text_of(form.month).len() == 2 && text_of(form.day).len() == 2;
        let number = |group: usize, value: u32| {
            if text_of(group).starts_with('0') || both_two_digits {
                format!("{value:02}")
            } else {
                value.to_string()
            }
        };
        let month_name = |month: u32| {
            let original = captures.get(form.month).map_or("", |m| m.as_str());
            let name = MONTH_NAMES[month as usize - 1];
            if original.len() <= 3 {
                name[..3].to_owned()
            } else {
                name.to_owned()
            }
        };
        let mut replacements = [
            (form.year, format!("{:04}", date.year)),
            (
                form.month,
                if form.english_month {
                    month_name(date.month)
                } else {
                    number(form.month, date.month)
                },
            ),
            (form.day, number(form.day, date.day)),
        ];
        replacements.sort_by_key(|(group, _)| captures.get(*group).map_or(0, |m| m.start()));
        let mut output = String::with_capacity(written.len());
        let mut copied_up_to = 0;
        for (group, value) in replacements {
            let part = captures.get(group)?;
            output.push_str(&written[copied_up_to..part.start()]);
            output.push_str(&value);
            copied_up_to = part.end();
        }
        output.push_str(&written[copied_up_to..]);
        return Some(output);
    }
    None
}

#[cfg(test)]
mod tests;
