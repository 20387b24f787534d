//! Drug–drug interaction and dose-range checks over bundled tables:
//! `data/drugs.psv` (generic names in English and Chinese, with classes),
//! `data/drug_interactions.psv` (pairs of drugs or classes with severity,
//! effect and advice) and `data/drug_doses.psv` (usual and maximum adult doses).

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bundled_table::{TableError, parse_rows};
use crate::{PureTool, Tool, ToolError, boxed, check_range, object_schema, round_to};

const DRUGS_TEXT: &str = include_str!("../data/drugs.psv");
const INTERACTIONS_TEXT: &str = include_str!("../data/drug_interactions.psv");
const DOSES_TEXT: &str = include_str!("../data/drug_doses.psv");

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![boxed(PureTool::new(
        "medication_check",
        "Checks a medication list (English or Chinese generic names) for clinically significant drug-drug interactions and, where doses are given, against usual and maximum adult daily doses.",
        medication_check_schema,
        medication_check,
    ))]
}

/// A drug the checks recognise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drug {
    pub name: &'static str,
    pub name_zh: &'static str,
    pub classes: Vec<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Moderate,
    Major,
    Contraindicated,
}

/// One interaction rule between two drugs or classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InteractionRule {
    pub a: &'static str,
    pub b: &'static str,
    pub severity: Severity,
    pub effect: &'static str,
    pub advice: &'static str,
}

/// Usual and maximum adult daily doses for one drug.
#[derive(Debug, Clone, PartialEq)]
pub struct DoseRange {
    pub name: &'static str,
    pub unit: &'static str,
    pub usual_daily_min: f64,
    pub usual_daily_max: f64,
    pub max_daily: Option<f64>,
    pub max_single: Option<f64>,
    pub note: &'static str,
}

/// The three bundled tables, parsed and cross-checked together.
#[derive(Debug)]
pub struct DrugTables {
    pub drugs: Vec<Drug>,
    pub interactions: Vec<InteractionRule>,
    pub doses: Vec<DoseRange>,
}

fn parse_tables() -> Result<DrugTables, TableError> {
    let drugs: Vec<Drug> = parse_rows("drugs.psv", DRUGS_TEXT, &["name", "name_zh", "classes"])?
        .into_iter()
        .map(|row| {
            Ok(Drug {
                name: row.required(0)?,
                name_zh: row.required(1)?,
                classes: row.cells[2]
                    .split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect(),
            })
        })
        .collect::<Result<_, TableError>>()?;
    let known = |key: &str| {
        drugs
            .iter()
            .any(|drug| drug.name == key || drug.classes.contains(&key))
    };
    let interaction_rows = parse_rows(
        "drug_interactions.psv",
        INTERACTIONS_TEXT,
        &["a", "b", "severity", "effect", "advice"],
    )?;
    let mut interactions = Vec::with_capacity(interaction_rows.len());
    for row in interaction_rows {
        let (a, b) = (row.required(0)?, row.required(1)?);
        for side in [a, b] {
            if !known(side) {
                return Err(row.error(format!(
                    "`{side}` is neither a drug nor a class in drugs.psv"
                )));
            }
        }
        let severity = match row.required(2)? {
            "moderate" => Severity::Moderate,
            "major" => Severity::Major,
            "contraindicated" => Severity::Contraindicated,
            other => return Err(row.error(format!("unknown severity `{other}`"))),
        };
        interactions.push(InteractionRule {
            a,
            b,
            severity,
            effect: row.required(3)?,
            advice: row.required(4)?,
        });
    }
    let dose_rows = parse_rows(
        "drug_doses.psv",
        DOSES_TEXT,
        &[
            "name",
            "unit",
            "usual_daily_min",
            "usual_daily_max",
            "max_daily",
            "max_single",
            "note",
        ],
    )?;
    let mut doses = Vec::with_capacity(dose_rows.len());
    for row in dose_rows {
        let name = row.required(0)?;
        if !drugs.iter().any(|drug| drug.name == name) {
            return Err(row.error(format!("`{name}` is not in drugs.psv")));
        }
        let required_number = |column| {
            row.optional_number(column)?
                .ok_or_else(|| row.error(format!("column {} is empty", column + 1)))
        };
        let dose = DoseRange {
            name,
            unit: row.required(1)?,
            usual_daily_min: required_number(2)?,
            usual_daily_max: required_number(3)?,
            max_daily: row.optional_number(4)?,
            max_single: row.optional_number(5)?,
            note: row.cells[6],
        };
        if dose.usual_daily_min > dose.usual_daily_max
            || dose.max_daily.is_some_and(|max| max < dose.usual_daily_max)
        {
            return Err(row.error("usual_daily_min <= usual_daily_max <= max_daily must hold"));
        }
        doses.push(dose);
    }
    Ok(DrugTables {
        drugs,
        interactions,
        doses,
    })
}

/// The bundled drug tables, parsed once.
pub fn drug_tables() -> Result<&'static DrugTables, ToolError> {
    static TABLES: OnceLock<Result<DrugTables, TableError>> = OnceLock::new();
    match TABLES.get_or_init(parse_tables) {
        Ok(tables) => Ok(tables),
        Err(error) => Err(error.into()),
    }
}

/// The drug a written name refers to: an exact English or Chinese generic
/// name, else the longest generic name contained in it ("阿司匹林肠溶片" → aspirin).
pub fn find_drug<'a>(drugs: &'a [Drug], written: &str) -> Option<&'a Drug> {
    let lower = written.trim().to_lowercase().replace('_', " ");
    if let Some(drug) = drugs.iter().find(|drug| {
        drug.name == lower || drug.name_zh == lower || drug.name.replace('-', " ") == lower
    }) {
        return Some(drug);
    }
    drugs
        .iter()
        .filter(|drug| lower.contains(drug.name) || lower.contains(drug.name_zh))
        .max_by_key(|drug| drug.name.len().max(drug.name_zh.len()))
}

fn matches_side(drug: &Drug, side: &str) -> bool {
    drug.name == side || drug.classes.contains(&side)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedicationArgument {
    pub name: String,
    /// Dose per administration.
    #[serde(default)]
    pub dose: Option<f64>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub times_per_day: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedicationCheckArguments {
    pub medications: Vec<MedicationArgument>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InteractionFinding {
    pub drug_a: &'static str,
    pub drug_b: &'static str,
    /// The rule's sides: drug names or classes (e.g. `nsaid`).
    pub rule: String,
    pub severity: Severity,
    pub effect: &'static str,
    pub advice: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DoseStatus {
    AboveMaxSingle,
    AboveMaxDaily,
    AboveUsualRange,
    BelowUsualRange,
    WithinUsualRange,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DoseFinding {
    pub drug: &'static str,
    pub single_dose: f64,
    pub daily_dose: f64,
    pub unit: &'static str,
    pub usual_daily_range: String,
    pub max_daily: Option<f64>,
    pub max_single: Option<f64>,
    pub status: DoseStatus,
    pub note: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecognisedDrug {
    pub written: String,
    pub name: &'static str,
    pub name_zh: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MedicationCheckResult {
    pub recognised: Vec<RecognisedDrug>,
    /// Names not in the bundled tables: not checked, not assumed safe.
    pub unrecognised: Vec<String>,
    /// Most severe first.
    pub interactions: Vec<InteractionFinding>,
    pub doses: Vec<DoseFinding>,
    /// Drugs with a dose given but no bundled dose range.
    pub no_dose_reference: Vec<&'static str>,
    pub source: &'static str,
}

fn medication_check_schema() -> Value {
    object_schema(
        json!({
            "medications": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "description": "generic name in English or Chinese, e.g. warfarin or 华法林"},
                        "dose": {"type": "number", "description": "dose per administration"},
                        "unit": {"type": "string", "enum": ["mg", "g", "ug", "µg", "mcg"]},
                        "times_per_day": {"type": "number", "description": "administrations per day"}
                    },
                    "required": ["name"],
                    "additionalProperties": false
                }
            }
        }),
        &["medications"],
    )
}

/// A dose in the table's unit; `None` when the units cannot be converted.
fn dose_in_unit(dose: f64, unit: &str, table_unit: &str) -> Option<f64> {
    let micrograms_per =
        |unit: &str| match unit.trim().to_lowercase().replace(['µ', 'μ'], "u").as_str() {
            "g" => Some(1.0e6),
            "mg" => Some(1.0e3),
            "ug" | "mcg" => Some(1.0),
            _ => None,
        };
    Some(dose * micrograms_per(unit)? / micrograms_per(table_unit)?)
}

fn check_dose(
    index: usize,
    range: &DoseRange,
    medication: &MedicationArgument,
    dose: f64,
) -> Result<DoseFinding, ToolError> {
    let field = |name: &str| format!("medications[{index}].{name}");
    let Some(unit) = medication.unit.as_deref() else {
        return Err(ToolError::bad(
            field("unit"),
            "give the unit with the dose (mg, g, ug)",
        ));
    };
    let Some(times_per_day) = medication.times_per_day else {
        return Err(ToolError::bad(
            field("times_per_day"),
            "give how many times a day the dose is taken",
        ));
    };
    let times_per_day = check_range(&field("times_per_day"), times_per_day, 0.0, 24.0, "per day")?;
    check_range(&field("dose"), dose, 0.0, 1.0e7, unit)?;
    let Some(single) = dose_in_unit(dose, unit, range.unit) else {
        return Err(ToolError::bad(
            field("unit"),
            format!("`{unit}` is not a mass unit: use mg, g or ug"),
        ));
    };
    let daily = single * times_per_day;
    let status = if range.max_single.is_some_and(|max| single > max) {
        DoseStatus::AboveMaxSingle
    } else if range.max_daily.is_some_and(|max| daily > max) {
        DoseStatus::AboveMaxDaily
    } else if daily > range.usual_daily_max {
        DoseStatus::AboveUsualRange
    } else if daily < range.usual_daily_min {
        DoseStatus::BelowUsualRange
    } else {
        DoseStatus::WithinUsualRange
    };
    Ok(DoseFinding {
        drug: range.name,
        single_dose: round_to(single, 4),
        daily_dose: round_to(daily, 4),
        unit: range.unit,
        usual_daily_range: format!(
            "{}-{} {}/day",
            range.usual_daily_min, range.usual_daily_max, range.unit
        ),
        max_daily: range.max_daily,
        max_single: range.max_single,
        status,
        note: range.note,
    })
}

pub fn medication_check(
    arguments: MedicationCheckArguments,
) -> Result<MedicationCheckResult, ToolError> {
    if arguments.medications.is_empty() {
        return Err(ToolError::bad(
            "medications",
            "give at least one medication",
        ));
    }
    let tables = drug_tables()?;
    let mut recognised: Vec<(&Drug, &MedicationArgument)> = Vec::new();
    let mut unrecognised = Vec::new();
    for medication in &arguments.medications {
        match find_drug(&tables.drugs, &medication.name) {
            Some(drug) => recognised.push((drug, medication)),
            None => unrecognised.push(medication.name.clone()),
        }
    }
    let mut interactions = Vec::new();
    for (i, (first, _)) in recognised.iter().enumerate() {
        for (second, _) in &recognised[i + 1..] {
            if first.name == second.name {
                continue;
            }
            for rule in &tables.interactions {
                let forward = matches_side(first, rule.a) && matches_side(second, rule.b);
                let backward = matches_side(first, rule.b) && matches_side(second, rule.a);
                if forward || backward {
                    interactions.push(InteractionFinding {
                        drug_a: first.name,
                        drug_b: second.name,
                        rule: format!("{} + {}", rule.a, rule.b),
                        severity: rule.severity,
                        effect: rule.effect,
                        advice: rule.advice,
                    });
                }
            }
        }
    }
    interactions.sort_by(|x, y| {
        y.severity
            .cmp(&x.severity)
            .then(x.drug_a.cmp(y.drug_a))
            .then(x.drug_b.cmp(y.drug_b))
    });
    let mut doses = Vec::new();
    let mut no_dose_reference = Vec::new();
    for (index, medication) in arguments.medications.iter().enumerate() {
        let (Some(dose), Some(drug)) =
            (medication.dose, find_drug(&tables.drugs, &medication.name))
        else {
            continue;
        };
        match tables.doses.iter().find(|range| range.name == drug.name) {
            Some(range) => doses.push(check_dose(index, range, medication, dose)?),
            None => no_dose_reference.push(drug.name),
        }
    }
    Ok(MedicationCheckResult {
        recognised: recognised
            .iter()
            .map(|(drug, medication)| RecognisedDrug {
                written: medication.name.clone(),
                name: drug.name,
                name_zh: drug.name_zh,
            })
            .collect(),
        unrecognised,
        interactions,
        doses,
        no_dose_reference,
        source: "bundled screening tables (public labelling and pharmacology references); not a complete interaction database",
    })
}

#[cfg(test)]
mod tests;
