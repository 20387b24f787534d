use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::test_support::{EXAMPLE_BUNDLE, block_on};

const TODAY: CivilDate = CivilDate {
    year: 2025,
    month: 11,
    day: 23,
};

#[test]
fn the_example_bundle_parses_into_what_the_tools_read() {
    let record = parse_bundle(EXAMPLE_BUNDLE).expect("valid bundle");
    assert_eq!(record.sex, Some(Sex::Female));
    assert_eq!(record.age_years(TODAY), Some(68));
    assert_eq!(record.conditions.len(), 2);
    assert_eq!(record.conditions[0].name, "高血压");
    assert_eq!(record.conditions[1].code.as_deref(), Some("E11.9"));
    let current: Vec<&str> = record
        .current_medications()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(current, ["metformin", "amlodipine"]);
    assert_eq!(record.allergies[0].substance, "penicillin");
    assert_eq!(record.allergies[0].reactions, ["urticaria"]);
    assert_eq!(record.latest_creatinine().and_then(|o| o.value), Some(1.3));
}

#[test]
fn the_patient_tools_answer_from_the_bundle() {
    let record = Arc::new(parse_bundle(EXAMPLE_BUNDLE).unwrap());
    let tools = patient_tools(Some(record), TODAY);
    let call = |name: &str, arguments: Value| {
        let tool = tools.iter().find(|tool| tool.name() == name).unwrap();
        block_on(tool.call(&arguments))
    };
    let summary = call(SUMMARY_TOOL, json!({})).unwrap();
    assert_eq!(summary["age_years"], 68);
    assert_eq!(summary["sex"], "female");
    assert_eq!(summary["allergies"][0]["substance"], "penicillin");
    assert_eq!(summary["current_medications"].as_array().unwrap().len(), 2);
    // Creatinine and HbA1c: the newer creatinine replaces the older.
    assert_eq!(summary["latest_observations"].as_array().unwrap().len(), 2);
    let egfr = call(EGFR_TOOL, json!({})).unwrap();
    // CKD-EPI 2021, female, 68 y, 1.3 mg/dL: 44.8, reported 45 mL/min/1.73 m², G3a.
    assert_eq!(egfr["egfr"], 45.0);
    assert_eq!(egfr["ckd_g_stage"], "G3a");
    assert_eq!(egfr["creatinine_date"], "2025-10-02T08:00:00+08:00");
    let refused = call(SUMMARY_TOOL, json!({"x": 1})).unwrap_err();
    assert!(refused.to_string().contains("no arguments"), "{refused}");
}

#[test]
fn without_a_bundle_the_tools_say_so() {
    let tools = patient_tools(None, TODAY);
    let error = block_on(tools[0].call(&json!({}))).unwrap_err();
    assert!(error.to_string().contains("no patient bundle"), "{error}");
}

fn check_refused(bundle: &str, expected: &str) {
    let error = parse_bundle(bundle).expect_err("refused").to_string();
    assert!(
        error.contains(expected),
        "expected `{expected}` in `{error}`"
    );
}

#[test]
fn malformed_bundles_are_refused_naming_the_entry() {
    check_refused("{", "not JSON");
    check_refused(r#"{"resourceType": "Patient"}"#, "must be \"Bundle\"");
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "gender": "female"}},
            {"resource": {"resourceType": "Observation", "code": {"text": "K"}, "valueQuantity": {"value": "high"}}}]}"#,
        "entry[1] (Observation): valueQuantity.value",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "gender": "woman"}}]}"#,
        "entry[0] (Patient): gender",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "birthDate": "15/06/1957"}}]}"#,
        "entry[0] (Patient): birthDate",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "MedicationStatement", "status": "active"}}]}"#,
        "entry[0] (MedicationStatement): medication[x]",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition"}}]}"#,
        "entry[0] (Condition): missing field `code`",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"fullUrl": "x"}]}"#,
        "entry[0] (none): has no `resource`",
    );
    check_refused(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}}, {"resource": {"resourceType": "Patient"}}]}"#,
        "entry[1] (Patient): a bundle holds one patient",
    );
}

#[test]
fn civil_dates_and_ages() {
    assert_eq!(
        CivilDate::from_days(0),
        CivilDate {
            year: 1970,
            month: 1,
            day: 1
        }
    );
    assert_eq!(
        CivilDate::from_days(20_415),
        CivilDate {
            year: 2025,
            month: 11,
            day: 23
        }
    );
    let birth = CivilDate::from_iso("1957-11-24").unwrap();
    assert_eq!(birth.years_until(TODAY), 67);
    assert_eq!(CivilDate::from_iso("1957").unwrap().years_until(TODAY), 68);
    assert_eq!(CivilDate::from_iso("1957-13-01"), None);
}
