use serde_json::{Value, json};

use super::*;

#[test]
fn bundled_table_parses() {
    let table = reference_intervals().expect("lab_ranges.psv parses");
    let mut tests: Vec<&str> = table.iter().map(|row| row.test_id).collect();
    tests.dedup();
    assert!(tests.len() >= 30, "{} tests", tests.len());
    for row in table {
        assert!(
            row.loinc.contains('-'),
            "{}: LOINC {}",
            row.test_id,
            row.loinc
        );
    }
}

/// Interprets one result for a patient; checks the flag and the value used.
fn check(sex: &str, age: f64, test: Value, expect_code: &str, expect_value: f64) {
    let arguments = json!({"sex": sex, "age_years": age, "results": [test]});
    let result = crate::ToolRegistry::medical()
        .call("lab_interpret", &arguments)
        .expect("lab_interpret");
    let outcome = &result["results"][0];
    assert_eq!(outcome["status"], "interpreted", "{arguments} → {outcome}");
    assert_eq!(
        outcome["interpretation"]["code"], expect_code,
        "{arguments} → {outcome}"
    );
    assert_eq!(
        outcome["value"],
        json!(expect_value),
        "{arguments} → {outcome}"
    );
}

#[test]
fn flags_by_sex_age_and_critical_limits() {
    check(
        "male",
        45.0,
        json!({"test": "potassium", "value": 4.0}),
        "N",
        4.0,
    );
    check("male", 45.0, json!({"test": "K", "value": 3.2}), "L", 3.2);
    check(
        "male",
        45.0,
        json!({"test": "血钾", "value": 5.8}),
        "H",
        5.8,
    );
    check(
        "male",
        45.0,
        json!({"test": "2823-3", "value": 2.3}),
        "LL",
        2.3,
    );
    check(
        "female",
        45.0,
        json!({"test": "potassium", "value": 6.8}),
        "HH",
        6.8,
    );
    // Haemoglobin 125 g/L: low for a man, normal for a woman.
    check(
        "male",
        30.0,
        json!({"test": "hemoglobin", "value": 125}),
        "L",
        125.0,
    );
    check(
        "female",
        30.0,
        json!({"test": "Hb", "value": 125}),
        "N",
        125.0,
    );
    // Creatinine 105 µmol/L: high for a man of 45, normal for a man of 70.
    check(
        "male",
        45.0,
        json!({"test": "creatinine", "value": 105, "unit": "µmol/L"}),
        "H",
        105.0,
    );
    check(
        "male",
        70.0,
        json!({"test": "creatinine", "value": 105}),
        "N",
        105.0,
    );
    // A limit value is inside the interval.
    check(
        "female",
        30.0,
        json!({"test": "sodium", "value": 147}),
        "N",
        147.0,
    );
    // NT-proBNP 300 pg/mL: high under 75, normal from 75.
    check(
        "female",
        60.0,
        json!({"test": "NT-proBNP", "value": 300}),
        "H",
        300.0,
    );
    check(
        "female",
        80.0,
        json!({"test": "nt_probnp", "value": 300}),
        "N",
        300.0,
    );
}

#[test]
fn converts_units_before_flagging() {
    // 126 mg/dL glucose = 7.0 mmol/L: high.
    check(
        "male",
        50.0,
        json!({"test": "glucose", "value": 126, "unit": "mg/dL"}),
        "H",
        7.0,
    );
    // 1.0 mg/dL creatinine = 88.4 µmol/L: normal for a man of 50.
    check(
        "male",
        50.0,
        json!({"test": "creatinine", "value": 1.0, "unit": "mg/dL"}),
        "N",
        88.4,
    );
    // 9 g/dL haemoglobin = 90 g/L: low, not critical.
    check(
        "female",
        50.0,
        json!({"test": "hemoglobin", "value": 9, "unit": "g/dL"}),
        "L",
        90.0,
    );
}

#[test]
fn unknown_tests_and_units_are_reported_per_result() {
    let arguments = json!({"sex": "female", "age_years": 40, "results": [
        {"test": "unobtainium", "value": 1},
        {"test": "potassium", "value": 4, "unit": "mg/dL"},
        {"test": "albumin", "value": 12}
    ]});
    let result = crate::ToolRegistry::medical()
        .call("lab_interpret", &arguments)
        .expect("call");
    assert_eq!(result["results"][0]["status"], "unknown_test");
    assert_eq!(result["results"][1]["status"], "unit_mismatch");
    assert_eq!(result["results"][2]["interpretation"]["code"], "LL");
    assert_eq!(result["abnormal_count"], 1);
    assert_eq!(result["critical_count"], 1);
    let child =
        json!({"sex": "female", "age_years": 8, "results": [{"test": "potassium", "value": 4}]});
    assert!(matches!(
        crate::ToolRegistry::medical().call("lab_interpret", &child),
        Err(ToolError::OutOfRange { field, .. }) if field == "age_years"
    ));
}

fn check_convert(analyte: &str, value: f64, from: &str, to: &str, expect: f64) {
    let result = lab_unit_convert(UnitConvertArguments {
        analyte: analyte.to_owned(),
        value,
        from_unit: from.to_owned(),
        to_unit: to.to_owned(),
    })
    .unwrap_or_else(|error| panic!("{analyte} {value} {from}→{to}: {error}"));
    assert_eq!(
        result.converted_value, expect,
        "{analyte} {value} {from}→{to}"
    );
}

#[test]
fn unit_conversions() {
    check_convert("glucose", 5.5, "mmol/L", "mg/dL", 99.0);
    check_convert("glucose", 126.0, "mg/dL", "mmol/L", 7.0);
    check_convert("creatinine", 1.0, "mg/dL", "µmol/L", 88.4);
    check_convert("creatinine", 176.8, "umol/L", "mg/dL", 2.0);
    check_convert("cholesterol", 5.2, "mmol/L", "mg/dL", 201.08);
    check_convert("LDL-C", 100.0, "mg/dL", "mmol/L", 2.59);
    check_convert("triglycerides", 1.7, "mmol/L", "mg/dL", 150.57);
    check_convert("urea", 7.0, "mmol/L", "mg/dL", 19.6);
    check_convert("BUN", 28.0, "mg/dL", "mmol/L", 10.0);
    check_convert("hemoglobin", 135.0, "g/L", "g/dL", 13.5);
    check_convert("血红蛋白", 9.0, "g/dL", "g/L", 90.0);
    check_convert("calcium", 2.5, "mmol/L", "mg/dL", 10.02);
    check_convert("glucose", 5.5, "mmol/l", "mmol/L", 5.5);
    let wrong_unit = lab_unit_convert(UnitConvertArguments {
        analyte: "glucose".into(),
        value: 5.0,
        from_unit: "g/L".into(),
        to_unit: "mg/dL".into(),
    });
    assert!(
        matches!(wrong_unit, Err(ToolError::BadArguments { field, .. }) if field == "from_unit")
    );
    let unknown = lab_unit_convert(UnitConvertArguments {
        analyte: "sodium".into(),
        value: 140.0,
        from_unit: "mmol/L".into(),
        to_unit: "mg/dL".into(),
    });
    assert!(matches!(unknown, Err(ToolError::NotFound { .. })));
}
