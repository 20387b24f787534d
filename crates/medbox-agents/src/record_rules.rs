//! Chinese medical-record quality rules, after 《病历书写基本规范》
//! (卫医政发〔2010〕11号): required sections per record type, the chief
//! complaint (≤ 20 characters, symptom + duration, not a diagnosis), writing
//! deadlines, sex and laterality contradictions, and copy-paste similarity
//! between notes. Each finding carries a rule id, severity, section, evidence
//! and a suggested fix, so a quality-control agent can cite it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    PureTool, Sex, Tool, ToolError, boxed, check_range, object_schema, round_to, sex_schema,
};

const STANDARD: &str = "病历书写基本规范 (卫医政发〔2010〕11号)";

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        boxed(PureTool::new(
            "record_required_sections",
            "Checks that a medical record has every section its type requires (admission record, first progress note, discharge record, outpatient record).",
            required_sections_schema,
            record_required_sections,
        )),
        boxed(PureTool::new(
            "chief_complaint_check",
            "Checks a chief complaint (主诉): at most 20 characters, a symptom with its duration, not a diagnosis.",
            chief_complaint_schema,
            chief_complaint_check,
        )),
        boxed(PureTool::new(
            "record_deadline_check",
            "Checks record writing deadlines against timestamps: admission record 24 h, first progress note 8 h, attending's first round 48 h, operation record 24 h, rescue record 6 h, discharge/death record 24 h.",
            deadline_schema,
            record_deadline_check,
        )),
        boxed(PureTool::new(
            "record_consistency_check",
            "Finds sex contradictions (e.g. a male patient with uterus or pregnancy terms) and left/right contradictions for the same organ across record sections.",
            consistency_schema,
            record_consistency_check,
        )),
        boxed(PureTool::new(
            "copy_paste_similarity",
            "Measures how similar two notes are (character n-gram Jaccard) and flags likely copy-paste above a threshold.",
            similarity_schema,
            copy_paste_similarity,
        )),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingSeverity {
    Warning,
    Error,
}

/// One rule that fired.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub rule_id: &'static str,
    pub severity: FindingSeverity,
    pub section: Option<String>,
    pub evidence: String,
    pub message: String,
    pub suggested_fix: String,
}

// ---------------------------------------------------------------------------
// Required sections

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordType {
    AdmissionRecord,
    FirstProgressNote,
    DischargeRecord,
    OutpatientRecord,
}

/// A section a record type requires, with the titles it is written under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionSpec {
    pub id: &'static str,
    pub title_zh: &'static str,
    pub title_en: &'static str,
    pub aliases: &'static [&'static str],
    /// Required only for patients of this sex (menstrual history).
    pub only_for: Option<Sex>,
}

const fn section(
    id: &'static str,
    title_zh: &'static str,
    title_en: &'static str,
    aliases: &'static [&'static str],
) -> SectionSpec {
    SectionSpec {
        id,
        title_zh,
        title_en,
        aliases,
        only_for: None,
    }
}

const GENERAL_INFORMATION: SectionSpec = section(
    "general_information",
    "一般项目",
    "general information",
    &["一般情况", "基本信息"],
);
const CHIEF_COMPLAINT: SectionSpec = section("chief_complaint", "主诉", "chief complaint", &["cc"]);
const PRESENT_ILLNESS: SectionSpec = section(
    "history_of_present_illness",
    "现病史",
    "history of present illness",
    &["hpi", "present illness"],
);
const PAST_HISTORY: SectionSpec = section(
    "past_history",
    "既往史",
    "past history",
    &["past medical history", "pmh"],
);
const PERSONAL_HISTORY: SectionSpec = section(
    "personal_history",
    "个人史",
    "personal history",
    &["social history"],
);
const MARITAL_OBSTETRIC_HISTORY: SectionSpec = section(
    "marital_obstetric_history",
    "婚育史",
    "marital and obstetric history",
    &["婚姻史", "生育史", "marital history"],
);
const MENSTRUAL_HISTORY: SectionSpec = SectionSpec {
    only_for: Some(Sex::Female),
    ..section("menstrual_history", "月经史", "menstrual history", &[])
};
const FAMILY_HISTORY: SectionSpec = section("family_history", "家族史", "family history", &[]);
const PHYSICAL_EXAMINATION: SectionSpec = section(
    "physical_examination",
    "体格检查",
    "physical examination",
    &["查体", "体检", "physical exam"],
);
const SPECIALTY_EXAMINATION: SectionSpec = section(
    "specialty_examination",
    "专科情况",
    "specialty examination",
    &["专科检查", "专科查体"],
);
const AUXILIARY_EXAMINATIONS: SectionSpec = section(
    "auxiliary_examinations",
    "辅助检查",
    "auxiliary examinations",
    &["辅助检查结果", "实验室及器械检查", "investigations"],
);
const INITIAL_DIAGNOSIS: SectionSpec = section(
    "initial_diagnosis",
    "初步诊断",
    "initial diagnosis",
    &["入院诊断", "admission diagnosis"],
);
const SIGNATURE: SectionSpec = section(
    "physician_signature",
    "医师签名",
    "physician signature",
    &["签名", "signature"],
);
const CASE_CHARACTERISTICS: SectionSpec = section(
    "case_characteristics",
    "病例特点",
    "case characteristics",
    &[],
);
const DIAGNOSTIC_REASONING: SectionSpec = section(
    "diagnostic_reasoning",
    "拟诊讨论",
    "diagnostic reasoning",
    &[
        "诊断依据及鉴别诊断",
        "诊断依据",
        "鉴别诊断",
        "differential diagnosis",
    ],
);
const TREATMENT_PLAN: SectionSpec =
    section("treatment_plan", "诊疗计划", "treatment plan", &["plan"]);
const ADMISSION_DATE: SectionSpec = section(
    "admission_date",
    "入院日期",
    "admission date",
    &["入院时间"],
);
const DISCHARGE_DATE: SectionSpec = section(
    "discharge_date",
    "出院日期",
    "discharge date",
    &["出院时间"],
);
const CONDITION_ON_ADMISSION: SectionSpec = section(
    "condition_on_admission",
    "入院情况",
    "condition on admission",
    &[],
);
const ADMISSION_DIAGNOSIS: SectionSpec = section(
    "admission_diagnosis",
    "入院诊断",
    "admission diagnosis",
    &[],
);
const COURSE_OF_TREATMENT: SectionSpec = section(
    "course_of_treatment",
    "诊疗经过",
    "course of treatment",
    &["住院经过", "hospital course"],
);
const DISCHARGE_DIAGNOSIS: SectionSpec = section(
    "discharge_diagnosis",
    "出院诊断",
    "discharge diagnosis",
    &[],
);
const CONDITION_ON_DISCHARGE: SectionSpec = section(
    "condition_on_discharge",
    "出院情况",
    "condition on discharge",
    &[],
);
const DISCHARGE_ORDERS: SectionSpec = section(
    "discharge_orders",
    "出院医嘱",
    "discharge orders",
    &["discharge instructions"],
);
const VISIT_TIME: SectionSpec = section("visit_time", "就诊时间", "visit time", &["就诊日期"]);
const DEPARTMENT: SectionSpec = section("department", "科别", "department", &["科室"]);
const DIAGNOSIS: SectionSpec = section("diagnosis", "诊断", "diagnosis", &["初步诊断"]);
const TREATMENT_ADVICE: SectionSpec = section(
    "treatment_advice",
    "治疗意见",
    "treatment advice",
    &["处理", "处理意见", "治疗", "plan"],
);

/// The sections each record type requires (规范 articles 18, 22, 24 and 13).
pub fn required_sections(record_type: RecordType) -> &'static [SectionSpec] {
    match record_type {
        RecordType::AdmissionRecord => &[
            GENERAL_INFORMATION,
            CHIEF_COMPLAINT,
            PRESENT_ILLNESS,
            PAST_HISTORY,
            PERSONAL_HISTORY,
            MARITAL_OBSTETRIC_HISTORY,
            MENSTRUAL_HISTORY,
            FAMILY_HISTORY,
            PHYSICAL_EXAMINATION,
            SPECIALTY_EXAMINATION,
            AUXILIARY_EXAMINATIONS,
            INITIAL_DIAGNOSIS,
            SIGNATURE,
        ],
        RecordType::FirstProgressNote => &[
            CASE_CHARACTERISTICS,
            DIAGNOSTIC_REASONING,
            TREATMENT_PLAN,
            SIGNATURE,
        ],
        RecordType::DischargeRecord => &[
            ADMISSION_DATE,
            DISCHARGE_DATE,
            CONDITION_ON_ADMISSION,
            ADMISSION_DIAGNOSIS,
            COURSE_OF_TREATMENT,
            DISCHARGE_DIAGNOSIS,
            CONDITION_ON_DISCHARGE,
            DISCHARGE_ORDERS,
            SIGNATURE,
        ],
        RecordType::OutpatientRecord => &[
            VISIT_TIME,
            DEPARTMENT,
            CHIEF_COMPLAINT,
            PRESENT_ILLNESS,
            PAST_HISTORY,
            PHYSICAL_EXAMINATION,
            AUXILIARY_EXAMINATIONS,
            DIAGNOSIS,
            TREATMENT_ADVICE,
            SIGNATURE,
        ],
    }
}

fn normalize_title(title: &str) -> String {
    title
        .trim()
        .trim_end_matches([':', '：'])
        .trim()
        .to_lowercase()
        .replace('_', " ")
}

fn title_matches(spec: &SectionSpec, title: &str) -> bool {
    let title = normalize_title(title);
    title == spec.id.replace('_', " ")
        || title == spec.title_zh
        || title == spec.title_en
        || spec.aliases.iter().any(|alias| title == *alias)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiredSectionsArguments {
    pub record_type: RecordType,
    /// Section title → section text.
    pub sections: BTreeMap<String, String>,
    #[serde(default)]
    pub patient_sex: Option<Sex>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SectionPresence {
    pub id: &'static str,
    pub title_zh: &'static str,
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequiredSectionsResult {
    pub record_type: RecordType,
    pub sections: Vec<SectionPresence>,
    pub findings: Vec<Finding>,
    /// Titles given that are not required sections of this type.
    pub other_titles: Vec<String>,
    pub rule: &'static str,
}

fn required_sections_schema() -> Value {
    object_schema(
        json!({
            "record_type": {"type": "string", "enum": ["admission_record", "first_progress_note", "discharge_record", "outpatient_record"]},
            "sections": {"type": "object", "additionalProperties": {"type": "string"}, "description": "section title (Chinese or English) → section text"},
            "patient_sex": sex_schema()
        }),
        &["record_type", "sections"],
    )
}

pub fn record_required_sections(
    arguments: RequiredSectionsArguments,
) -> Result<RequiredSectionsResult, ToolError> {
    let specs = required_sections(arguments.record_type);
    let mut sections = Vec::new();
    let mut findings = Vec::new();
    for spec in specs {
        if spec
            .only_for
            .is_some_and(|sex| arguments.patient_sex != Some(sex))
        {
            continue;
        }
        let text = arguments
            .sections
            .iter()
            .find(|(title, _)| title_matches(spec, title))
            .map(|(_, text)| text.trim());
        let present = text.is_some_and(|text| !text.is_empty());
        if !present {
            findings.push(Finding {
                rule_id: "SECTION-MISSING",
                severity: FindingSeverity::Error,
                section: Some(spec.id.to_owned()),
                evidence: match text {
                    Some(_) => format!("{} is empty", spec.title_zh),
                    None => format!("no {} section", spec.title_zh),
                },
                message: format!(
                    "required section {} ({}) is missing or empty",
                    spec.title_zh, spec.title_en
                ),
                suggested_fix: format!("write the {} section", spec.title_zh),
            });
        }
        sections.push(SectionPresence {
            id: spec.id,
            title_zh: spec.title_zh,
            present,
        });
    }
    let other_titles = arguments
        .sections
        .keys()
        .filter(|title| !specs.iter().any(|spec| title_matches(spec, title)))
        .cloned()
        .collect();
    Ok(RequiredSectionsResult {
        record_type: arguments.record_type,
        sections,
        findings,
        other_titles,
        rule: STANDARD,
    })
}

// ---------------------------------------------------------------------------
// Chief complaint

/// Words that name a diagnosis rather than a symptom.
pub const DIAGNOSIS_WORDS_ZH: &[&str] = &[
    "高血压",
    "糖尿病",
    "冠心病",
    "心绞痛",
    "心肌梗死",
    "心梗",
    "心力衰竭",
    "心衰",
    "房颤",
    "心房颤动",
    "肺炎",
    "支气管炎",
    "哮喘",
    "慢阻肺",
    "慢性阻塞性肺疾病",
    "癌",
    "肿瘤",
    "淋巴瘤",
    "白血病",
    "结核",
    "脑梗",
    "脑出血",
    "卒中",
    "中风",
    "胃炎",
    "溃疡",
    "阑尾炎",
    "胆囊炎",
    "胆结石",
    "胰腺炎",
    "肝硬化",
    "肝炎",
    "肾炎",
    "肾衰",
    "尿毒症",
    "骨折",
    "痛风",
    "甲亢",
    "甲减",
    "类风湿",
    "红斑狼疮",
    "帕金森",
    "癫痫",
    "抑郁症",
    "精神分裂",
];
pub const DIAGNOSIS_WORDS_EN: &[&str] = &[
    "hypertension",
    "diabetes",
    "coronary",
    "angina",
    "myocardial infarction",
    "heart failure",
    "atrial fibrillation",
    "pneumonia",
    "bronchitis",
    "asthma",
    "copd",
    "cancer",
    "carcinoma",
    "tumour",
    "tumor",
    "lymphoma",
    "leukemia",
    "leukaemia",
    "tuberculosis",
    "stroke",
    "gastritis",
    "ulcer",
    "appendicitis",
    "cholecystitis",
    "pancreatitis",
    "cirrhosis",
    "hepatitis",
    "nephritis",
    "renal failure",
    "fracture",
    "gout",
    "epilepsy",
];
/// Words that name a symptom, sign or finding (what a chief complaint should say).
pub const SYMPTOM_WORDS_ZH: &[&str] = &[
    "痛",
    "疼",
    "咳",
    "痰",
    "热",
    "烧",
    "喘",
    "闷",
    "憋",
    "气短",
    "气促",
    "呼吸困难",
    "心悸",
    "心慌",
    "乏力",
    "头晕",
    "眩晕",
    "恶心",
    "呕",
    "泻",
    "便血",
    "黑便",
    "血尿",
    "尿频",
    "尿急",
    "水肿",
    "肿",
    "麻木",
    "无力",
    "抽搐",
    "意识",
    "昏迷",
    "晕厥",
    "出血",
    "咯血",
    "黄疸",
    "皮疹",
    "瘙痒",
    "消瘦",
    "体重下降",
    "多饮",
    "多尿",
    "视物模糊",
    "耳鸣",
    "发现",
    "升高",
    "异常",
    "包块",
    "肿物",
    "结节",
    "外伤",
    "摔伤",
    "停经",
    "腹胀",
    "纳差",
    "失眠",
    "排便",
    "不适",
];
pub const SYMPTOM_WORDS_EN: &[&str] = &[
    "pain",
    "ache",
    "cough",
    "fever",
    "dyspnea",
    "dyspnoea",
    "shortness of breath",
    "palpitation",
    "nausea",
    "vomiting",
    "diarrhea",
    "diarrhoea",
    "swelling",
    "bleeding",
    "dizziness",
    "headache",
    "weakness",
    "numbness",
    "rash",
    "lump",
    "mass",
    "found",
    "elevated",
    "abnormal",
    "fatigue",
];

static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:[0-9]+(?:\.[0-9]+)?|[一二两三四五六七八九十百半数几]+)\s*(?:余|多)?\s*个?\s*(?:分钟|小时|天|日|周|星期|月|年|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|h\b|d\b)")
        .expect("valid regex")
});

fn contains_word(text: &str, lower: &str, word: &str) -> bool {
    if word.is_ascii() {
        lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .collect::<Vec<_>>()
            .windows(word.split(' ').count())
            .any(|window| window.join(" ") == word)
    } else {
        text.contains(word)
    }
}

/// The length the 20-character limit applies to: each Chinese character counts
/// one; a run of Latin letters or digits counts one (a word or a number);
/// whitespace and punctuation do not count.
pub fn complaint_length(text: &str) -> usize {
    let mut count = 0;
    let mut in_run = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            count += usize::from(!in_run);
            in_run = true;
            continue;
        }
        in_run = false;
        if c.is_alphanumeric() {
            count += 1;
        }
    }
    count
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChiefComplaintArguments {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChiefComplaintResult {
    pub text: String,
    /// Length counted for the limit (see [`complaint_length`]).
    pub character_count: usize,
    pub max_characters: usize,
    pub durations: Vec<String>,
    pub diagnosis_words: Vec<&'static str>,
    pub symptom_words: Vec<&'static str>,
    pub findings: Vec<Finding>,
    pub passed: bool,
    pub rule: &'static str,
}

fn chief_complaint_schema() -> Value {
    object_schema(
        json!({"text": {"type": "string", "description": "the chief complaint as written"}}),
        &["text"],
    )
}

pub fn chief_complaint_check(
    arguments: ChiefComplaintArguments,
) -> Result<ChiefComplaintResult, ToolError> {
    let text = arguments.text.trim().to_owned();
    if text.is_empty() {
        return Err(ToolError::bad("text", "the chief complaint is empty"));
    }
    let lower = text.to_lowercase();
    let character_count = complaint_length(&text);
    let durations: Vec<String> = DURATION
        .find_iter(&text)
        .map(|found| found.as_str().to_owned())
        .collect();
    let diagnosis_words: Vec<&'static str> = DIAGNOSIS_WORDS_ZH
        .iter()
        .chain(DIAGNOSIS_WORDS_EN)
        .copied()
        .filter(|word| contains_word(&text, &lower, word))
        .collect();
    let symptom_words: Vec<&'static str> = SYMPTOM_WORDS_ZH
        .iter()
        .chain(SYMPTOM_WORDS_EN)
        .copied()
        .filter(|word| contains_word(&text, &lower, word))
        .collect();
    let mut findings = Vec::new();
    let finding = |rule_id, severity, evidence: String, message: &str, fix: &str| Finding {
        rule_id,
        severity,
        section: Some("chief_complaint".to_owned()),
        evidence,
        message: message.to_owned(),
        suggested_fix: fix.to_owned(),
    };
    if character_count > 20 {
        findings.push(finding("CC-LENGTH", FindingSeverity::Error, format!("{character_count} characters"), "the chief complaint is longer than 20 characters", "keep the main symptom and its duration; move details to the history of present illness"));
    }
    if durations.is_empty() {
        findings.push(finding(
            "CC-DURATION",
            FindingSeverity::Error,
            text.clone(),
            "the chief complaint gives no duration",
            "add how long the symptom has lasted, e.g. 3天, 2周, 1年",
        ));
    }
    if !diagnosis_words.is_empty() {
        findings.push(finding("CC-DIAGNOSIS", FindingSeverity::Error, diagnosis_words.join(", "), "the chief complaint uses a diagnosis instead of the patient's symptom", "write the symptom or finding that brought the patient (e.g. 发现血压升高 instead of 高血压)"));
    }
    if symptom_words.is_empty() {
        findings.push(finding(
            "CC-SYMPTOM",
            FindingSeverity::Warning,
            text.clone(),
            "no symptom or finding recognised in the chief complaint",
            "name the main symptom or finding",
        ));
    }
    Ok(ChiefComplaintResult {
        passed: findings
            .iter()
            .all(|finding| finding.severity != FindingSeverity::Error),
        text,
        character_count,
        max_characters: 20,
        durations,
        diagnosis_words,
        symptom_words,
        findings,
        rule: "主诉: 患者就诊的主要症状（或体征）及持续时间, ≤ 20 characters, not a diagnosis",
    })
}

// ---------------------------------------------------------------------------
// Writing deadlines

/// A point in time as written: local wall-clock minutes since 1970-01-01 and
/// the UTC offset if the text gave one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub local_minutes: i64,
    pub offset_minutes: Option<i64>,
}

impl Timestamp {
    /// Minutes on one timeline; timestamps without an offset are taken to share one zone.
    fn comparable_minutes(self) -> i64 {
        self.local_minutes - self.offset_minutes.unwrap_or(0)
    }
}

/// Days since 1970-01-01 of a Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The Gregorian date of a day count since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

static TIMESTAMP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$",
    )
    .expect("valid regex")
});

/// Parses `YYYY-MM-DD HH:MM[:SS]` or RFC 3339 (`T`, optional `Z`/`±HH:MM`).
pub fn parse_timestamp(field: &str, text: &str) -> Result<Timestamp, ToolError> {
    let bad = || {
        ToolError::bad(
            field,
            format!(
                "`{text}` is not a timestamp: write YYYY-MM-DD HH:MM or RFC 3339 (2024-03-05T08:30:00+08:00)"
            ),
        )
    };
    let captures = TIMESTAMP.captures(text.trim()).ok_or_else(bad)?;
    let number = |index: usize| {
        captures
            .get(index)
            .map_or(Ok(0), |m| m.as_str().parse::<i64>().map_err(|_| bad()))
    };
    let (year, month, day, hour, minute) =
        (number(1)?, number(2)?, number(3)?, number(4)?, number(5)?);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || number(6)? > 60 {
        return Err(bad());
    }
    let offset_minutes = match captures.get(7).map(|m| m.as_str()) {
        None => None,
        Some("Z") => Some(0),
        Some(offset) => {
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let digits: String = offset[1..].chars().filter(char::is_ascii_digit).collect();
            let hours: i64 = digits[..2].parse().map_err(|_| bad())?;
            let minutes: i64 = digits[2..].parse().map_err(|_| bad())?;
            Some(sign * (hours * 60 + minutes))
        }
    };
    Ok(Timestamp {
        local_minutes: (days_from_civil(year, month, day) * 24 + hour) * 60 + minute,
        offset_minutes,
    })
}

/// Formats as `YYYY-MM-DD HH:MM`, with `±HH:MM` when the offset is known.
pub fn format_timestamp(timestamp: Timestamp) -> String {
    let days = timestamp.local_minutes.div_euclid(1440);
    let minute_of_day = timestamp.local_minutes.rem_euclid(1440);
    let (year, month, day) = civil_from_days(days);
    let offset = match timestamp.offset_minutes {
        None => String::new(),
        Some(0) => "Z".to_owned(),
        Some(offset) => format!(
            "{}{:02}:{:02}",
            if offset < 0 { '-' } else { '+' },
            offset.abs() / 60,
            offset.abs() % 60
        ),
    };
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}{offset}",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentKind {
    AdmissionRecord,
    FirstProgressNote,
    AttendingFirstRound,
    OperationRecord,
    RescueRecord,
    DischargeRecord,
    DeathRecord,
}

fn document_kind_id(kind: DocumentKind) -> &'static str {
    match kind {
        DocumentKind::AdmissionRecord => "admission_record",
        DocumentKind::FirstProgressNote => "first_progress_note",
        DocumentKind::AttendingFirstRound => "attending_first_round",
        DocumentKind::OperationRecord => "operation_record",
        DocumentKind::RescueRecord => "rescue_record",
        DocumentKind::DischargeRecord => "discharge_record",
        DocumentKind::DeathRecord => "death_record",
    }
}

/// A document's deadline rule: rule id, hours allowed, and the event it runs from.
pub fn deadline_rule(kind: DocumentKind) -> (&'static str, i64, &'static str) {
    match kind {
        DocumentKind::AdmissionRecord => ("DEADLINE-ADMISSION-RECORD-24H", 24, "admission"),
        DocumentKind::FirstProgressNote => ("DEADLINE-FIRST-PROGRESS-NOTE-8H", 8, "admission"),
        DocumentKind::AttendingFirstRound => {
            ("DEADLINE-ATTENDING-FIRST-ROUND-48H", 48, "admission")
        }
        DocumentKind::OperationRecord => ("DEADLINE-OPERATION-RECORD-24H", 24, "end of operation"),
        DocumentKind::RescueRecord => ("DEADLINE-RESCUE-RECORD-6H", 6, "end of rescue"),
        DocumentKind::DischargeRecord => ("DEADLINE-DISCHARGE-RECORD-24H", 24, "discharge"),
        DocumentKind::DeathRecord => ("DEADLINE-DEATH-RECORD-24H", 24, "death"),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentTimes {
    pub kind: DocumentKind,
    /// When the event the deadline runs from happened (admission, operation end, …).
    pub reference_time: String,
    /// When the document was completed; absent when it is not written yet.
    #[serde(default)]
    pub written_time: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineArguments {
    pub documents: Vec<DocumentTimes>,
    /// The time of the check, to tell an overdue missing document from one not yet due.
    #[serde(default)]
    pub checked_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineStatus {
    OnTime,
    Late,
    WrittenBeforeReference,
    MissingOverdue,
    MissingNotYetDue,
    Missing,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadlineOutcome {
    pub kind: DocumentKind,
    pub rule_id: &'static str,
    pub limit_hours: i64,
    pub reference_event: &'static str,
    pub reference_time: String,
    pub deadline: String,
    pub written_time: Option<String>,
    pub elapsed_hours: Option<f64>,
    pub status: DeadlineStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadlineResult {
    pub documents: Vec<DeadlineOutcome>,
    pub findings: Vec<Finding>,
    pub rule: &'static str,
}

fn deadline_schema() -> Value {
    object_schema(
        json!({
            "documents": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": ["admission_record", "first_progress_note", "attending_first_round", "operation_record", "rescue_record", "discharge_record", "death_record"]},
                        "reference_time": {"type": "string", "description": "admission, end of operation, end of rescue, discharge or death time: YYYY-MM-DD HH:MM or RFC 3339"},
                        "written_time": {"type": "string", "description": "when the document was completed; omit if not written"}
                    },
                    "required": ["kind", "reference_time"],
                    "additionalProperties": false
                }
            },
            "checked_at": {"type": "string", "description": "time of the check, for documents not yet written"}
        }),
        &["documents"],
    )
}

pub fn record_deadline_check(arguments: DeadlineArguments) -> Result<DeadlineResult, ToolError> {
    if arguments.documents.is_empty() {
        return Err(ToolError::bad("documents", "give at least one document"));
    }
    let checked_at = arguments
        .checked_at
        .as_deref()
        .map(|text| parse_timestamp("checked_at", text))
        .transpose()?;
    let mut documents = Vec::new();
    let mut findings = Vec::new();
    for (index, document) in arguments.documents.iter().enumerate() {
        let (rule_id, limit_hours, reference_event) = deadline_rule(document.kind);
        let reference = parse_timestamp(
            &format!("documents[{index}].reference_time"),
            &document.reference_time,
        )?;
        let written = document
            .written_time
            .as_deref()
            .map(|text| parse_timestamp(&format!("documents[{index}].written_time"), text))
            .transpose()?;
        let deadline = Timestamp {
            local_minutes: reference.local_minutes + limit_hours * 60,
            ..reference
        };
        let elapsed_minutes =
            written.map(|written| written.comparable_minutes() - reference.comparable_minutes());
        let status = match (elapsed_minutes, checked_at) {
            (Some(elapsed), _) if elapsed < 0 => DeadlineStatus::WrittenBeforeReference,
            (Some(elapsed), _) if elapsed <= limit_hours * 60 => DeadlineStatus::OnTime,
            (Some(_), _) => DeadlineStatus::Late,
            (None, Some(now)) if now.comparable_minutes() > deadline.comparable_minutes() => {
                DeadlineStatus::MissingOverdue
            }
            (None, Some(_)) => DeadlineStatus::MissingNotYetDue,
            (None, None) => DeadlineStatus::Missing,
        };
        let problem = match status {
            DeadlineStatus::Late => Some((
                FindingSeverity::Error,
                format!(
                    "written {:.1} h after {reference_event}; the limit is {limit_hours} h",
                    round_to(elapsed_minutes.unwrap_or(0) as f64 / 60.0, 1)
                ),
            )),
            DeadlineStatus::WrittenBeforeReference => Some((
                FindingSeverity::Error,
                format!("written before the {reference_event}: check the timestamps"),
            )),
            DeadlineStatus::MissingOverdue => Some((
                FindingSeverity::Error,
                format!(
                    "not written and the {limit_hours} h limit after {reference_event} has passed"
                ),
            )),
            DeadlineStatus::Missing => Some((
                FindingSeverity::Warning,
                "not written; no check time given to tell whether it is overdue".to_owned(),
            )),
            DeadlineStatus::OnTime | DeadlineStatus::MissingNotYetDue => None,
        };
        if let Some((severity, message)) = problem {
            findings.push(Finding {
                rule_id,
                severity,
                section: Some(document_kind_id(document.kind).to_owned()),
                evidence: format!(
                    "{reference_event} {}, written {}, deadline {}",
                    format_timestamp(reference),
                    written.map_or_else(|| "-".to_owned(), format_timestamp),
                    format_timestamp(deadline)
                ),
                message,
                suggested_fix: format!("complete the document within {limit_hours} h of {reference_event}, or record the reason for the delay"),
            });
        }
        documents.push(DeadlineOutcome {
            kind: document.kind,
            rule_id,
            limit_hours,
            reference_event,
            reference_time: format_timestamp(reference),
            deadline: format_timestamp(deadline),
            written_time: written.map(format_timestamp),
            elapsed_hours: elapsed_minutes.map(|minutes| round_to(minutes as f64 / 60.0, 1)),
            status,
        });
    }
    Ok(DeadlineResult {
        documents,
        findings,
        rule: STANDARD,
    })
}

// ---------------------------------------------------------------------------
// Sex and laterality consistency

/// Terms that only apply to female patients.
pub const FEMALE_ONLY_TERMS: &[&str] = &[
    "子宫",
    "卵巢",
    "输卵管",
    "宫颈",
    "阴道",
    "妊娠",
    "怀孕",
    "孕周",
    "孕期",
    "产后",
    "分娩",
    "剖宫产",
    "月经",
    "停经",
    "绝经",
    "白带",
    "uterus",
    "uterine",
    "ovary",
    "ovaries",
    "ovarian",
    "fallopian",
    "vagina",
    "vaginal",
    "pregnancy",
    "pregnant",
    "postpartum",
    "menstruation",
    "menstrual",
    "menses",
    "menopause",
    "caesarean",
    "cesarean",
];
/// Terms that only apply to male patients.
pub const MALE_ONLY_TERMS: &[&str] = &[
    "前列腺",
    "睾丸",
    "阴囊",
    "精索",
    "阴茎",
    "附睾",
    "prostate",
    "prostatic",
    "testis",
    "testes",
    "testicle",
    "testicular",
    "scrotum",
    "scrotal",
    "penis",
    "penile",
    "epididymis",
];

/// Paired organs: canonical key, Chinese terms, English terms.
const PAIRED_ORGANS: &[(&str, &[&str], &[&str])] = &[
    ("lung", &["肺"], &["lung"]),
    ("kidney", &["肾"], &["kidney"]),
    ("eye", &["眼"], &["eye"]),
    ("ear", &["耳"], &["ear"]),
    ("knee", &["膝"], &["knee"]),
    ("hip", &["髋"], &["hip"]),
    ("shoulder", &["肩"], &["shoulder"]),
    ("elbow", &["肘"], &["elbow"]),
    ("wrist", &["腕"], &["wrist"]),
    ("ankle", &["踝"], &["ankle"]),
    ("hand", &["手"], &["hand"]),
    ("foot", &["足", "脚"], &["foot", "feet"]),
    ("lower_limb", &["下肢"], &["leg", "lower limb"]),
    ("upper_limb", &["上肢"], &["arm", "upper limb"]),
    ("breast", &["乳腺", "乳房"], &["breast"]),
    ("ovary", &["卵巢"], &["ovary"]),
    ("testis", &["睾丸"], &["testis", "testicle"]),
    ("femur", &["股骨"], &["femur", "femoral"]),
    ("radius", &["桡骨"], &["radius"]),
    ("tibia", &["胫骨"], &["tibia"]),
    ("clavicle", &["锁骨"], &["clavicle"]),
    ("inguinal", &["腹股沟"], &["inguinal", "groin"]),
];

static SIDED_ORGAN_ZH: LazyLock<Regex> = LazyLock::new(|| {
    let mut terms: Vec<&str> = PAIRED_ORGANS
        .iter()
        .flat_map(|(_, zh, _)| zh.iter().copied())
        .collect();
    terms.sort_by_key(|term| std::cmp::Reverse(term.chars().count()));
    Regex::new(&format!("(左|右|双)侧?({})", terms.join("|"))).expect("valid regex")
});
static SIDED_ORGAN_EN: LazyLock<Regex> = LazyLock::new(|| {
    let mut terms: Vec<&str> = PAIRED_ORGANS
        .iter()
        .flat_map(|(_, _, en)| en.iter().copied())
        .collect();
    terms.sort_by_key(|term| std::cmp::Reverse(term.len()));
    Regex::new(&format!(
        r"(?i)\b(left|right|bilateral|both)\s+({})s?\b",
        terms.join("|")
    ))
    .expect("valid regex")
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Left,
    Right,
    Both,
}

fn organ_key(term: &str) -> Option<&'static str> {
    let lower = term.to_lowercase();
    PAIRED_ORGANS
        .iter()
        .find(|(_, zh, en)| zh.contains(&term) || en.contains(&lower.as_str()))
        .map(|(key, _, _)| *key)
}

/// Every (organ, side, matched text) mentioned in a text.
fn sided_organs(text: &str) -> Vec<(&'static str, Side, String)> {
    let mut found = Vec::new();
    for captures in SIDED_ORGAN_ZH
        .captures_iter(text)
        .chain(SIDED_ORGAN_EN.captures_iter(text))
    {
        let side = match captures[1].to_lowercase().as_str() {
            "左" | "left" => Side::Left,
            "右" | "right" => Side::Right,
            _ => Side::Both,
        };
        if let Some(key) = organ_key(&captures[2]) {
            found.push((key, side, captures[0].to_owned()));
        }
    }
    found
}

fn sex_term_found(text: &str, lower: &str, term: &str) -> bool {
    if term.is_ascii() {
        lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == term)
    } else {
        text.contains(term)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyArguments {
    pub patient_sex: Sex,
    /// Section name → text (chief complaint, HPI, diagnosis, operation record, …).
    pub sections: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsistencyResult {
    pub patient_sex: Sex,
    pub findings: Vec<Finding>,
    pub rule: &'static str,
}

fn consistency_schema() -> Value {
    object_schema(
        json!({
            "patient_sex": sex_schema(),
            "sections": {"type": "object", "additionalProperties": {"type": "string"}, "description": "section name → text, e.g. {\"主诉\": \"左膝疼痛3月\", \"手术记录\": \"…\"}"}
        }),
        &["patient_sex", "sections"],
    )
}

pub fn record_consistency_check(
    arguments: ConsistencyArguments,
) -> Result<ConsistencyResult, ToolError> {
    let mut findings = Vec::new();
    let (wrong_terms, other_sex) = match arguments.patient_sex {
        Sex::Male => (FEMALE_ONLY_TERMS, "female"),
        Sex::Female => (MALE_ONLY_TERMS, "male"),
    };
    for (section, text) in &arguments.sections {
        let lower = text.to_lowercase();
        let terms: Vec<&str> = wrong_terms
            .iter()
            .copied()
            .filter(|term| sex_term_found(text, &lower, term))
            .collect();
        if !terms.is_empty() {
            findings.push(Finding {
                rule_id: "CONSISTENCY-SEX",
                severity: FindingSeverity::Error,
                section: Some(section.clone()),
                evidence: terms.join(", "),
                message: format!("{other_sex}-only terms in the record of a {} patient", if other_sex == "female" { "male" } else { "female" }),
                suggested_fix: "check the patient's sex and remove text copied from another patient or template".to_owned(),
            });
        }
    }
    // Laterality: compare sections that each name exactly one side of an organ.
    let mut sides_by_organ: BTreeMap<&str, Vec<(String, Side, String)>> = BTreeMap::new();
    for (section, text) in &arguments.sections {
        let mentions = sided_organs(text);
        let organs: BTreeSet<&str> = mentions.iter().map(|(organ, _, _)| *organ).collect();
        for organ in organs {
            let sides: BTreeSet<Side> = mentions
                .iter()
                .filter(|(o, _, _)| *o == organ)
                .map(|(_, side, _)| *side)
                .collect();
            let evidence = mentions
                .iter()
                .find(|(o, _, _)| *o == organ)
                .map(|(_, _, text)| text.clone())
                .unwrap_or_default();
            let side = if sides.len() == 1 {
                sides.first().copied()
            } else {
                Some(Side::Both)
            };
            if let Some(side) = side {
                sides_by_organ
                    .entry(organ)
                    .or_default()
                    .push((section.clone(), side, evidence));
            }
        }
    }
    for (organ, mentions) in sides_by_organ {
        if mentions.iter().any(|(_, side, _)| *side == Side::Both) {
            continue;
        }
        let left: Vec<&(String, Side, String)> = mentions
            .iter()
            .filter(|(_, side, _)| *side == Side::Left)
            .collect();
        let right: Vec<&(String, Side, String)> = mentions
            .iter()
            .filter(|(_, side, _)| *side == Side::Right)
            .collect();
        if left.is_empty() || right.is_empty() {
            continue;
        }
        let describe = |list: &[&(String, Side, String)]| {
            list.iter()
                .map(|(section, _, text)| format!("{section}: {text}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        findings.push(Finding {
            rule_id: "CONSISTENCY-LATERALITY",
            severity: FindingSeverity::Error,
            section: None,
            evidence: format!("{} | {}", describe(&left), describe(&right)),
            message: format!(
                "left and right disagree for the same organ ({organ}) across sections"
            ),
            suggested_fix:
                "confirm the side with the patient and the imaging, then correct every section"
                    .to_owned(),
        });
    }
    Ok(ConsistencyResult {
        patient_sex: arguments.patient_sex,
        findings,
        rule: "consistency: sex-specific terms; one side per organ across sections unless bilateral",
    })
}

// ---------------------------------------------------------------------------
// Copy-paste similarity

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityArguments {
    pub text_a: String,
    pub text_b: String,
    /// Character n-gram length, default 3.
    #[serde(default)]
    pub n: Option<usize>,
    /// Jaccard similarity at or above which copy-paste is suspected, default 0.8.
    #[serde(default)]
    pub threshold: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimilarityResult {
    pub similarity: f64,
    pub n: usize,
    pub threshold: f64,
    pub shared_ngrams: usize,
    pub total_ngrams: usize,
    pub suspected_copy: bool,
    pub findings: Vec<Finding>,
    pub method: &'static str,
}

fn similarity_schema() -> Value {
    object_schema(
        json!({
            "text_a": {"type": "string"},
            "text_b": {"type": "string"},
            "n": {"type": "integer", "minimum": 1, "maximum": 10, "description": "character n-gram length, default 3"},
            "threshold": {"type": "number", "minimum": 0, "maximum": 1, "description": "Jaccard similarity flagged as copy-paste, default 0.8"}
        }),
        &["text_a", "text_b"],
    )
}

/// The set of character n-grams of a text, ignoring whitespace and punctuation.
fn ngrams(text: &str, n: usize) -> BTreeSet<String> {
    let chars: Vec<char> = text
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    chars
        .windows(n)
        .map(|window| window.iter().collect())
        .collect()
}

/// Jaccard similarity of two texts' character n-gram sets, with the counts.
pub fn ngram_jaccard(text_a: &str, text_b: &str, n: usize) -> (f64, usize, usize) {
    let a = ngrams(text_a, n);
    let b = ngrams(text_b, n);
    let shared = a.intersection(&b).count();
    let total = a.union(&b).count();
    let similarity = if total == 0 {
        0.0
    } else {
        shared as f64 / total as f64
    };
    (similarity, shared, total)
}

pub fn copy_paste_similarity(
    arguments: SimilarityArguments,
) -> Result<SimilarityResult, ToolError> {
    let n = arguments.n.unwrap_or(3);
    check_range("n", n as f64, 1.0, 10.0, "characters")?;
    let threshold = check_range(
        "threshold",
        arguments.threshold.unwrap_or(0.8),
        0.0,
        1.0,
        "",
    )?;
    let (similarity, shared_ngrams, total_ngrams) =
        ngram_jaccard(&arguments.text_a, &arguments.text_b, n);
    let similarity = round_to(similarity, 3);
    let suspected_copy = total_ngrams > 0 && similarity >= threshold;
    let findings = if suspected_copy {
        vec![Finding {
            rule_id: "COPY-PASTE",
            severity: FindingSeverity::Warning,
            section: None,
            evidence: format!(
                "{shared_ngrams} of {total_ngrams} character {n}-grams shared (Jaccard {similarity})"
            ),
            message: "the two notes are nearly identical: likely copied".to_owned(),
            suggested_fix:
                "record today's findings and changes instead of repeating the earlier note"
                    .to_owned(),
        }]
    } else {
        Vec::new()
    };
    Ok(SimilarityResult {
        similarity,
        n,
        threshold,
        shared_ngrams,
        total_ngrams,
        suspected_copy,
        findings,
        method: "Jaccard similarity of character n-gram sets (whitespace and punctuation ignored)",
    })
}

#[cfg(test)]
mod tests;
