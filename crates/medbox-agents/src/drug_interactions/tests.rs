use serde_json::{Value, json};

use super::*;

#[test]
fn bundled_tables_parse() {
    let tables = drug_tables().expect("drug tables parse");
    assert!(
        tables.interactions.len() >= 40,
        "{} interactions",
        tables.interactions.len()
    );
    assert!(
        tables.doses.len() >= 25,
        "{} dose ranges",
        tables.doses.len()
    );
    assert!(tables.drugs.len() >= 60, "{} drugs", tables.drugs.len());
}

fn run(medications: Value) -> Value {
    crate::ToolRegistry::medical()
        .call("medication_check", &json!({"medications": medications}))
        .unwrap_or_else(|error| panic!("{medications}: {error}"))
}

/// Checks the interactions found as `(drug_a, drug_b, severity)`, in order.
fn check_interactions(names: &[&str], expect: &[(&str, &str, &str)]) {
    let medications: Vec<Value> = names.iter().map(|name| json!({"name": name})).collect();
    let result = run(json!(medications));
    let found: Vec<(String, String, String)> = result["interactions"]
        .as_array()
        .expect("interactions")
        .iter()
        .map(|finding| {
            let text = |key: &str| finding[key].as_str().expect("string").to_owned();
            (text("drug_a"), text("drug_b"), text("severity"))
        })
        .collect();
    let expected: Vec<(String, String, String)> = expect
        .iter()
        .map(|(a, b, s)| (a.to_string(), b.to_string(), s.to_string()))
        .collect();
    assert_eq!(found, expected, "{names:?}");
}

#[test]
fn interactions() {
    check_interactions(
        &["warfarin", "ibuprofen"],
        &[("warfarin", "ibuprofen", "major")],
    );
    check_interactions(
        &["华法林", "胺碘酮"],
        &[("warfarin", "amiodarone", "major")],
    );
    check_interactions(
        &["simvastatin", "clarithromycin"],
        &[("simvastatin", "clarithromycin", "contraindicated")],
    );
    check_interactions(
        &["西地那非", "硝酸甘油片"],
        &[("sildenafil", "nitroglycerin", "contraindicated")],
    );
    check_interactions(
        &["sertraline", "linezolid", "tramadol"],
        &[
            ("linezolid", "tramadol", "contraindicated"),
            ("sertraline", "linezolid", "contraindicated"),
            ("sertraline", "tramadol", "major"),
        ],
    );
    // Two QT-prolonging drugs pair through their shared class.
    check_interactions(
        &["amiodarone", "levofloxacin"],
        &[("amiodarone", "levofloxacin", "major")],
    );
    check_interactions(
        &["enalapril", "spironolactone", "氯化钾"],
        &[
            ("enalapril", "potassium chloride", "major"),
            ("enalapril", "spironolactone", "major"),
            ("spironolactone", "potassium chloride", "major"),
        ],
    );
    check_interactions(
        &["clopidogrel", "omeprazole"],
        &[("clopidogrel", "omeprazole", "moderate")],
    );
    check_interactions(&["clopidogrel", "pantoprazole"], &[]);
    check_interactions(&["amlodipine", "atorvastatin", "metformin"], &[]);
    check_interactions(&["aspirin", "aspirin"], &[]);
}

#[test]
fn unrecognised_names_are_listed() {
    let result = run(json!([{"name": "warfarin"}, {"name": "unobtainium"}]));
    assert_eq!(result["unrecognised"], json!(["unobtainium"]));
    assert_eq!(result["recognised"][0]["name_zh"], "华法林");
}

fn check_dose(medication: Value, expect_status: &str, expect_daily: f64) {
    let result = run(json!([medication]));
    assert_eq!(
        result["doses"][0]["status"], expect_status,
        "{medication} → {result}"
    );
    assert_eq!(
        result["doses"][0]["daily_dose"],
        json!(expect_daily),
        "{medication}"
    );
}

#[test]
fn dose_ranges() {
    check_dose(
        json!({"name": "metformin", "dose": 500, "unit": "mg", "times_per_day": 2}),
        "within_usual_range",
        1000.0,
    );
    check_dose(
        json!({"name": "metformin", "dose": 1000, "unit": "mg", "times_per_day": 3}),
        "above_max_daily",
        3000.0,
    );
    check_dose(
        json!({"name": "对乙酰氨基酚", "dose": 1, "unit": "g", "times_per_day": 4}),
        "above_usual_range",
        4000.0,
    );
    check_dose(
        json!({"name": "acetaminophen", "dose": 1500, "unit": "mg", "times_per_day": 1}),
        "above_max_single",
        1500.0,
    );
    check_dose(
        json!({"name": "simvastatin", "dose": 5, "unit": "mg", "times_per_day": 1}),
        "below_usual_range",
        5.0,
    );
    check_dose(
        json!({"name": "levothyroxine", "dose": 100, "unit": "µg", "times_per_day": 1}),
        "within_usual_range",
        100.0,
    );
    check_dose(
        json!({"name": "valsartan", "dose": 160, "unit": "mg", "times_per_day": 2}),
        "above_usual_range",
        320.0,
    );
    let missing_frequency = crate::ToolRegistry::medical().call(
        "medication_check",
        &json!({"medications": [{"name": "metformin", "dose": 500, "unit": "mg"}]}),
    );
    assert!(
        matches!(missing_frequency, Err(ToolError::BadArguments { field, .. }) if field == "medications[0].times_per_day")
    );
    let no_reference =
        run(json!([{"name": "colchicine", "dose": 0.5, "unit": "mg", "times_per_day": 2}]));
    assert_eq!(no_reference["no_dose_reference"], json!(["colchicine"]));
}
