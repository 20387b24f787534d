//! Adult laboratory reference intervals and critical limits (bundled table
//! `data/lab_ranges.psv`), result flags as FHIR R4 `Observation.interpretation`
//! codes from v3-ObservationInterpretation (N, L, H, LL, HH), and unit
//! conversion between SI and conventional units for the common analytes.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bundled_table::{TableError, parse_rows};
use crate::{
    PureTool, Sex, Tool, ToolError, boxed, check_range, object_schema, round_to, sex_schema,
};

const TABLE_TEXT: &str = include_str!("../data/lab_ranges.psv");
const TABLE_HEADER: [&str; 13] = [
    "test_id",
    "name_en",
    "name_zh",
    "aliases",
    "loinc",
    "unit",
    "sex",
    "age_from",
    "age_to",
    "low",
    "high",
    "critical_low",
    "critical_high",
];

/// The code system of the interpretation codes.
pub const INTERPRETATION_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        boxed(PureTool::new(
            "lab_interpret",
            "Flags lab results against adult reference intervals by sex and age: FHIR interpretation N, L, H, LL (critical low), HH (critical high). Converts units where it can.",
            lab_interpret_schema,
            lab_interpret,
        )),
        boxed(PureTool::new(
            "lab_unit_convert",
            "Converts a lab value between SI and conventional units: glucose, creatinine, cholesterol, triglycerides, urea/BUN, haemoglobin, calcium, uric acid, bilirubin.",
            unit_convert_schema,
            lab_unit_convert,
        )),
    ]
}

/// One row of the table: a test's interval for one sex and age band.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferenceInterval {
    pub test_id: &'static str,
    pub name_en: &'static str,
    pub name_zh: &'static str,
    #[serde(skip)]
    pub aliases: Vec<&'static str>,
    pub loinc: &'static str,
    /// UCUM unit of the limits.
    pub unit: &'static str,
    /// `None`: applies to both sexes.
    pub sex: Option<Sex>,
    pub age_from_years: f64,
    pub age_to_years: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub critical_low: Option<f64>,
    pub critical_high: Option<f64>,
}

fn parse_table() -> Result<Vec<ReferenceInterval>, TableError> {
    parse_rows("lab_ranges.psv", TABLE_TEXT, &TABLE_HEADER)?
        .into_iter()
        .map(|row| {
            let sex = match row.required(6)? {
                "any" => None,
                "female" => Some(Sex::Female),
                "male" => Some(Sex::Male),
                other => {
                    return Err(row.error(format!("sex must be any/female/male, got `{other}`")));
                }
            };
            let bound = |column| {
                row.optional_number(column)?
                    .ok_or_else(|| row.error(format!("column {} is empty", column + 1)))
            };
            let interval = ReferenceInterval {
                test_id: row.required(0)?,
                name_en: row.required(1)?,
                name_zh: row.required(2)?,
                aliases: row.cells[3]
                    .split(';')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .collect(),
                loinc: row.required(4)?,
                unit: row.required(5)?,
                sex,
                age_from_years: bound(7)?,
                age_to_years: bound(8)?,
                low: row.optional_number(9)?,
                high: row.optional_number(10)?,
                critical_low: row.optional_number(11)?,
                critical_high: row.optional_number(12)?,
            };
            let ordered = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => a < b,
                _ => true,
            };
            if !(ordered(interval.critical_low, interval.low)
                && ordered(interval.low, interval.high)
                && ordered(interval.high, interval.critical_high)
                && interval.age_from_years < interval.age_to_years)
            {
                return Err(
                    row.error("limits must increase: critical low < low < high < critical high")
                );
            }
            Ok(interval)
        })
        .collect()
}

/// The bundled table, parsed once.
pub fn reference_intervals() -> Result<&'static [ReferenceInterval], ToolError> {
    static TABLE: OnceLock<Result<Vec<ReferenceInterval>, TableError>> = OnceLock::new();
    match TABLE.get_or_init(parse_table) {
        Ok(table) => Ok(table),
        Err(error) => Err(error.into()),
    }
}

fn normalize_name(name: &str) -> String {
    name.trim().to_lowercase()
}

/// The rows of the test a query names (test id, LOINC, English or Chinese name, or alias).
fn find_test<'a>(table: &'a [ReferenceInterval], query: &str) -> Vec<&'a ReferenceInterval> {
    let query = normalize_name(query);
    table
        .iter()
        .filter(|row| {
            row.test_id == query
                || row.loinc == query
                || normalize_name(row.name_en) == query
                || row.name_zh == query
                || row
                    .aliases
                    .iter()
                    .any(|alias| normalize_name(alias) == query)
        })
        .collect()
}

/// A UCUM-ish unit spelled for comparison: micro signs as `u`, lower case.
fn normalize_unit(unit: &str) -> String {
    unit.trim().replace(['µ', 'μ'], "u").to_lowercase()
}

// ---------------------------------------------------------------------------
// Unit conversion

/// An analyte with an SI and a conventional unit: conventional = SI × factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitConversion {
    pub analyte: &'static str,
    pub si_unit: &'static str,
    pub conventional_unit: &'static str,
    pub conventional_per_si: f64,
    pub basis: &'static str,
}

/// Conversion factors from molar masses, as printed in clinical chemistry references.
pub const UNIT_CONVERSIONS: [UnitConversion; 9] = [
    UnitConversion {
        analyte: "glucose",
        si_unit: "mmol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 18.0,
        basis: "glucose 180.16 g/mol; 1 mmol/L = 18 mg/dL (clinical convention)",
    },
    UnitConversion {
        analyte: "creatinine",
        si_unit: "umol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 1.0 / 88.4,
        basis: "creatinine 113.12 g/mol; 1 mg/dL = 88.4 umol/L",
    },
    UnitConversion {
        analyte: "cholesterol",
        si_unit: "mmol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 38.67,
        basis: "cholesterol 386.65 g/mol; 1 mmol/L = 38.67 mg/dL (total, HDL and LDL)",
    },
    UnitConversion {
        analyte: "triglycerides",
        si_unit: "mmol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 88.57,
        basis: "triolein 885.7 g/mol; 1 mmol/L = 88.57 mg/dL",
    },
    UnitConversion {
        analyte: "urea",
        si_unit: "mmol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 2.8,
        basis: "urea mmol/L to blood urea nitrogen (BUN) mg/dL: 2 N x 14.01 g/mol; 1 mmol/L = 2.8 mg/dL BUN",
    },
    UnitConversion {
        analyte: "hemoglobin",
        si_unit: "g/L",
        conventional_unit: "g/dL",
        conventional_per_si: 0.1,
        basis: "mass concentration; 10 g/L = 1 g/dL",
    },
    UnitConversion {
        analyte: "calcium",
        si_unit: "mmol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 4.008,
        basis: "calcium 40.08 g/mol; 1 mmol/L = 4.008 mg/dL",
    },
    UnitConversion {
        analyte: "uric_acid",
        si_unit: "umol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 1.0 / 59.48,
        basis: "uric acid 168.11 g/mol; 1 mg/dL = 59.48 umol/L",
    },
    UnitConversion {
        analyte: "bilirubin",
        si_unit: "umol/L",
        conventional_unit: "mg/dL",
        conventional_per_si: 1.0 / 17.1,
        basis: "bilirubin 584.66 g/mol; 1 mg/dL = 17.1 umol/L",
    },
];

/// The conversion for an analyte name or for any lab test that has one.
fn conversion_for(query: &str) -> Option<&'static UnitConversion> {
    let query = normalize_name(query);
    let analyte = match query.as_str() {
        "bun" | "blood urea nitrogen" | "尿素氮" => "urea",
        "cholesterol_total" | "hdl_cholesterol" | "ldl_cholesterol" | "total cholesterol" => {
            "cholesterol"
        }
        "bilirubin_total" | "bilirubin_direct" => "bilirubin",
        "hb" | "hgb" | "haemoglobin" | "血红蛋白" => "hemoglobin",
        "血糖" | "葡萄糖" => "glucose",
        "肌酐" => "creatinine",
        "尿素" => "urea",
        "钙" => "calcium",
        "尿酸" => "uric_acid",
        "胆固醇" | "总胆固醇" => "cholesterol",
        "甘油三酯" => "triglycerides",
        "总胆红素" | "直接胆红素" => "bilirubin",
        other => other,
    };
    if let Some(conversion) = UNIT_CONVERSIONS.iter().find(|c| c.analyte == analyte) {
        return Some(conversion);
    }
    // A lab test name or alias: follow it to its test id.
    let table = reference_intervals().ok()?;
    let test_id = find_test(table, &query).first()?.test_id;
    if test_id == query {
        return None;
    }
    conversion_for(test_id)
}

/// Converts `value` from `from_unit` to `to_unit` for `conversion`; `None`
/// when either unit is not one of its two.
fn convert(conversion: &UnitConversion, value: f64, from_unit: &str, to_unit: &str) -> Option<f64> {
    let si = normalize_unit(conversion.si_unit);
    let conventional = normalize_unit(conversion.conventional_unit);
    let (from, to) = (normalize_unit(from_unit), normalize_unit(to_unit));
    match (
        from == si,
        from == conventional,
        to == si,
        to == conventional,
    ) {
        (true, _, true, _) | (_, true, _, true) => Some(value),
        (true, _, _, true) => Some(value * conversion.conventional_per_si),
        (_, true, true, _) => Some(value / conversion.conventional_per_si),
        _ => None,
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConvertArguments {
    pub analyte: String,
    pub value: f64,
    pub from_unit: String,
    pub to_unit: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnitConvertResult {
    pub analyte: &'static str,
    pub value: f64,
    pub from_unit: String,
    pub converted_value: f64,
    pub to_unit: String,
    pub conversion: &'static str,
}

fn unit_convert_schema() -> Value {
    object_schema(
        json!({
            "analyte": {"type": "string", "description": "glucose, creatinine, cholesterol, triglycerides, urea (to BUN), hemoglobin, calcium, uric_acid, bilirubin, or a lab test name"},
            "value": {"type": "number"},
            "from_unit": {"type": "string", "description": "e.g. mmol/L, mg/dL, umol/L, g/L, g/dL"},
            "to_unit": {"type": "string"}
        }),
        &["analyte", "value", "from_unit", "to_unit"],
    )
}

pub fn lab_unit_convert(arguments: UnitConvertArguments) -> Result<UnitConvertResult, ToolError> {
    let Some(conversion) = conversion_for(&arguments.analyte) else {
        let known: Vec<&str> = UNIT_CONVERSIONS.iter().map(|c| c.analyte).collect();
        return Err(ToolError::NotFound {
            what: "unit conversion for analyte",
            key: arguments.analyte,
            hint: format!("conversions exist for {}", known.join(", ")),
        });
    };
    let value = check_range("value", arguments.value, 0.0, 1.0e6, "")?;
    let Some(converted) = convert(conversion, value, &arguments.from_unit, &arguments.to_unit)
    else {
        return Err(ToolError::bad(
            "from_unit",
            format!(
                "{} converts between {} and {}; got `{}` to `{}`",
                conversion.analyte,
                conversion.si_unit,
                conversion.conventional_unit,
                arguments.from_unit,
                arguments.to_unit
            ),
        ));
    };
    Ok(UnitConvertResult {
        analyte: conversion.analyte,
        value,
        from_unit: arguments.from_unit,
        converted_value: round_to(converted, 2),
        to_unit: arguments.to_unit,
        conversion: conversion.basis,
    })
}

// ---------------------------------------------------------------------------
// Interpretation

/// A FHIR `interpretation` coding from v3-ObservationInterpretation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Interpretation {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

impl Interpretation {
    const fn new(code: &'static str, display: &'static str) -> Interpretation {
        Interpretation {
            system: INTERPRETATION_SYSTEM,
            code,
            display,
        }
    }
    pub const NORMAL: Interpretation = Interpretation::new("N", "Normal");
    pub const LOW: Interpretation = Interpretation::new("L", "Low");
    pub const HIGH: Interpretation = Interpretation::new("H", "High");
    pub const CRITICAL_LOW: Interpretation = Interpretation::new("LL", "Critical low");
    pub const CRITICAL_HIGH: Interpretation = Interpretation::new("HH", "Critical high");
}

/// Flags a value against an interval; limits are exclusive (a value equal to
/// a limit is inside it).
pub fn interpret(interval: &ReferenceInterval, value: f64) -> Interpretation {
    let below = |limit: Option<f64>| limit.is_some_and(|limit| value < limit);
    let above = |limit: Option<f64>| limit.is_some_and(|limit| value > limit);
    if below(interval.critical_low) {
        Interpretation::CRITICAL_LOW
    } else if above(interval.critical_high) {
        Interpretation::CRITICAL_HIGH
    } else if below(interval.low) {
        Interpretation::LOW
    } else if above(interval.high) {
        Interpretation::HIGH
    } else {
        Interpretation::NORMAL
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabResultArgument {
    pub test: String,
    pub value: f64,
    #[serde(default)]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabInterpretArguments {
    pub sex: Sex,
    pub age_years: f64,
    pub results: Vec<LabResultArgument>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferenceRangeUsed {
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub critical_low: Option<f64>,
    pub critical_high: Option<f64>,
    pub unit: &'static str,
    /// Who the interval applies to, e.g. `male, 60-130 y`.
    pub applies_to: String,
    pub text: String,
}

/// A result flagged against its reference interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InterpretedResult {
    pub test: String,
    pub test_id: &'static str,
    pub name_en: &'static str,
    pub name_zh: &'static str,
    pub loinc: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// The value and unit as given, when a conversion was applied.
    pub reported_value: Option<f64>,
    pub reported_unit: Option<String>,
    pub reference_range: ReferenceRangeUsed,
    pub interpretation: Interpretation,
}

/// One result's outcome: flagged, or why it could not be.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum LabResultOutcome {
    Interpreted(Box<InterpretedResult>),
    UnknownTest {
        test: String,
        hint: String,
    },
    UnitMismatch {
        test: String,
        unit: String,
        expected_unit: &'static str,
        hint: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabInterpretResult {
    pub sex: Sex,
    pub age_years: f64,
    pub results: Vec<LabResultOutcome>,
    pub abnormal_count: usize,
    pub critical_count: usize,
    pub source: &'static str,
}

fn lab_interpret_schema() -> Value {
    object_schema(
        json!({
            "sex": sex_schema(),
            "age_years": {"type": "number", "description": "18 or older: the bundled intervals are for adults"},
            "results": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "test": {"type": "string", "description": "test id, LOINC code, English or Chinese name, or abbreviation (e.g. K, 血钾, 2823-3)"},
                        "value": {"type": "number"},
                        "unit": {"type": "string", "description": "unit of the value; converted when it differs from the table's"}
                    },
                    "required": ["test", "value"],
                    "additionalProperties": false
                }
            }
        }),
        &["sex", "age_years", "results"],
    )
}

fn format_limit(limit: Option<f64>) -> String {
    limit.map_or_else(|| "-".to_owned(), |limit| limit.to_string())
}

fn interpret_one(
    table: &[ReferenceInterval],
    sex: Sex,
    age_years: f64,
    result: LabResultArgument,
) -> LabResultOutcome {
    let rows = find_test(table, &result.test);
    let Some(interval) = rows.iter().copied().find(|row| {
        row.sex.is_none_or(|row_sex| row_sex == sex)
            && row.age_from_years <= age_years
            && age_years < row.age_to_years
    }) else {
        let mut known: Vec<&str> = table.iter().map(|row| row.test_id).collect();
        known.dedup();
        return LabResultOutcome::UnknownTest {
            test: result.test,
            hint: format!("bundled tests: {}", known.join(", ")),
        };
    };
    let (value, reported_value, reported_unit) = match &result.unit {
        Some(unit) if normalize_unit(unit) != normalize_unit(interval.unit) => {
            let converted = conversion_for(interval.test_id)
                .and_then(|conversion| convert(conversion, result.value, unit, interval.unit));
            let Some(converted) = converted else {
                return LabResultOutcome::UnitMismatch {
                    test: result.test,
                    unit: unit.clone(),
                    expected_unit: interval.unit,
                    hint: format!("give the value in {}", interval.unit),
                };
            };
            (
                round_to(converted, 2),
                Some(result.value),
                Some(unit.clone()),
            )
        }
        _ => (result.value, None, None),
    };
    let applies_to = format!(
        "{}, {}-{} y",
        match interval.sex {
            None => "any sex",
            Some(Sex::Female) => "female",
            Some(Sex::Male) => "male",
        },
        interval.age_from_years,
        interval.age_to_years
    );
    LabResultOutcome::Interpreted(Box::new(InterpretedResult {
        test: result.test,
        test_id: interval.test_id,
        name_en: interval.name_en,
        name_zh: interval.name_zh,
        loinc: interval.loinc,
        value,
        unit: interval.unit,
        reported_value,
        reported_unit,
        reference_range: ReferenceRangeUsed {
            low: interval.low,
            high: interval.high,
            critical_low: interval.critical_low,
            critical_high: interval.critical_high,
            unit: interval.unit,
            text: format!(
                "{}-{} {}",
                format_limit(interval.low),
                format_limit(interval.high),
                interval.unit
            ),
            applies_to,
        },
        interpretation: interpret(interval, value),
    }))
}

pub fn lab_interpret(arguments: LabInterpretArguments) -> Result<LabInterpretResult, ToolError> {
    let age_years = check_range(
        "age_years",
        arguments.age_years,
        18.0,
        129.9,
        "years (the bundled intervals are for adults)",
    )?;
    if arguments.results.is_empty() {
        return Err(ToolError::bad("results", "give at least one result"));
    }
    let table = reference_intervals()?;
    let results: Vec<LabResultOutcome> = arguments
        .results
        .into_iter()
        .map(|result| interpret_one(table, arguments.sex, age_years, result))
        .collect();
    let codes = || {
        results.iter().filter_map(|outcome| match outcome {
            LabResultOutcome::Interpreted(result) => Some(result.interpretation.code),
            _ => None,
        })
    };
    Ok(LabInterpretResult {
        sex: arguments.sex,
        age_years,
        abnormal_count: codes().filter(|code| *code != "N").count(),
        critical_count: codes()
            .filter(|code| *code == "LL" || *code == "HH")
            .count(),
        results,
        source: "bundled adult reference intervals (WS/T 404/405 and textbook values); the hospital laboratory's own intervals take precedence",
    })
}

#[cfg(test)]
mod tests;
