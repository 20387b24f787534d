//! Calculators against published formulas; expected values were derived by
//! hand (and in a separate script) from each published equation.

use serde_json::{Value, json};

use super::*;

/// Runs tool `name` through the registry and checks the listed result fields.
fn check(name: &str, arguments: Value, expect: Value) {
    let registry = crate::ToolRegistry::medical();
    let result = registry
        .call(name, &arguments)
        .unwrap_or_else(|error| panic!("{name}({arguments}) failed: {error}"));
    for (key, expected) in expect.as_object().expect("expect is an object") {
        assert_eq!(
            &result[key], expected,
            "{name}({arguments}) field `{key}` in {result}"
        );
    }
}

fn check_error(name: &str, arguments: Value, expect_field: &str) {
    let registry = crate::ToolRegistry::medical();
    match registry.call(name, &arguments) {
        Ok(result) => panic!("{name}({arguments}) should fail, got {result}"),
        Err(ToolError::BadArguments { field, .. } | ToolError::OutOfRange { field, .. }) => {
            assert_eq!(field, expect_field, "{name}({arguments})");
        }
        Err(other) => panic!("{name}({arguments}) unexpected error {other}"),
    }
}

#[test]
fn bmi_categories() {
    check(
        "bmi",
        json!({"weight_kg": 70, "height_cm": 175}),
        json!({"bmi": 22.9, "who_category": "normal", "chinese_category": "normal"}),
    );
    check(
        "bmi",
        json!({"weight_kg": 75, "height_cm": 170}),
        json!({"bmi": 26.0, "who_category": "pre_obese", "chinese_category": "overweight", "chinese_category_zh": "超重"}),
    );
    check(
        "bmi",
        json!({"weight_kg": 70, "height_cm": 170}),
        json!({"bmi": 24.2, "who_category": "normal", "chinese_category": "overweight"}),
    );
    check(
        "bmi",
        json!({"weight_kg": 85, "height_cm": 170}),
        json!({"bmi": 29.4, "who_category": "pre_obese", "chinese_category": "obese"}),
    );
    check(
        "bmi",
        json!({"weight_kg": 45, "height_cm": 165}),
        json!({"bmi": 16.5, "who_category": "underweight", "chinese_category": "underweight"}),
    );
    check(
        "bmi",
        json!({"weight_kg": 130, "height_cm": 175}),
        json!({"bmi": 42.4, "who_category": "obese_class_3"}),
    );
    check_error(
        "bmi",
        json!({"weight_kg": 70, "height_cm": 1.75}),
        "height_cm",
    );
    check_error(
        "bmi",
        json!({"weight_kg": "70", "height_cm": 175}),
        "weight_kg",
    );
    check_error("bmi", json!({"height_cm": 175}), "weight_kg");
    check_error(
        "bmi",
        json!({"weight_kg": 70, "height_cm": 175, "age": 3}),
        "age",
    );
}

#[test]
fn egfr_ckd_epi_2021_worked_examples() {
    // 142 × (0.9/0.7)^-1.2 × 0.9938^50 × 1.012 = 77.9.
    check(
        "egfr_ckd_epi_2021",
        json!({"sex": "female", "age_years": 50, "serum_creatinine": 0.9, "creatinine_unit": "mg/dL"}),
        json!({"egfr": 78.0, "ckd_g_stage": "G2", "formula": "CKD-EPI 2021 creatinine (race-free)"}),
    );
    // 142 × (1.2/0.9)^-1.2 × 0.9938^60 = 69.2.
    check(
        "egfr_ckd_epi_2021",
        json!({"sex": "male", "age_years": 60, "serum_creatinine": 1.2, "creatinine_unit": "mg/dL"}),
        json!({"egfr": 69.0, "ckd_g_stage": "G2"}),
    );
    // Below κ the α exponent applies: 142 × (0.6/0.7)^-0.241 × 0.9938^30 × 1.012 = 123.8.
    check(
        "egfr_ckd_epi_2021",
        json!({"sex": "F", "age_years": 30, "serum_creatinine": 0.6, "creatinine_unit": "mg/dL"}),
        json!({"egfr": 124.0, "ckd_g_stage": "G1"}),
    );
    check(
        "egfr_ckd_epi_2021",
        json!({"sex": "男", "age_years": 80, "serum_creatinine": 3.5, "creatinine_unit": "mg/dL"}),
        json!({"egfr": 17.0, "ckd_g_stage": "G4"}),
    );
    // 100 µmol/L = 1.131 mg/dL → 81.6.
    check(
        "egfr_ckd_epi_2021",
        json!({"sex": "male", "age_years": 45, "serum_creatinine": 100, "creatinine_unit": "µmol/L"}),
        json!({"egfr": 82.0, "serum_creatinine_mg_per_dl": 1.13}),
    );
    check_error(
        "egfr_ckd_epi_2021",
        json!({"sex": "male", "age_years": 12, "serum_creatinine": 0.5, "creatinine_unit": "mg/dL"}),
        "age_years",
    );
    check_error(
        "egfr_ckd_epi_2021",
        json!({"sex": "other", "age_years": 40, "serum_creatinine": 0.5, "creatinine_unit": "mg/dL"}),
        "sex",
    );
    check_error(
        "egfr_ckd_epi_2021",
        json!({"sex": "male", "age_years": 40, "serum_creatinine": 0.9, "creatinine_unit": "mmol/L"}),
        "creatinine_unit",
    );
}

#[test]
fn ckd_g_stage_boundaries() {
    let cases = [
        (90.0, "G1"),
        (89.0, "G2"),
        (60.0, "G2"),
        (59.0, "G3a"),
        (45.0, "G3a"),
        (44.0, "G3b"),
        (30.0, "G3b"),
        (29.0, "G4"),
        (15.0, "G4"),
        (14.0, "G5"),
    ];
    for (egfr, stage) in cases {
        assert_eq!(ckd_g_stage(egfr).0, stage, "eGFR {egfr}");
    }
}

#[test]
fn cockcroft_gault_examples() {
    // (140 − 60) × 72 / (72 × 1.0) = 80 mL/min; × 0.85 for a woman = 68.
    check(
        "creatinine_clearance_cockcroft_gault",
        json!({"sex": "male", "age_years": 60, "weight_kg": 72, "serum_creatinine": 1.0, "creatinine_unit": "mg/dL"}),
        json!({"creatinine_clearance": 80.0, "unit": "mL/min"}),
    );
    check(
        "creatinine_clearance_cockcroft_gault",
        json!({"sex": "female", "age_years": 60, "weight_kg": 72, "serum_creatinine": 1.0, "creatinine_unit": "mg/dL"}),
        json!({"creatinine_clearance": 68.0}),
    );
    // 88.4 µmol/L is 1.0 mg/dL: (140 − 80) × 60 / 72 = 50.
    check(
        "creatinine_clearance_cockcroft_gault",
        json!({"sex": "male", "age_years": 80, "weight_kg": 60, "serum_creatinine": 88.4, "creatinine_unit": "umol/L"}),
        json!({"creatinine_clearance": 50.0}),
    );
}

#[test]
fn cha2ds2_vasc_cases() {
    let none = json!({"sex": "male", "age_years": 50, "congestive_heart_failure": false, "hypertension": false, "diabetes": false, "stroke_tia_or_thromboembolism": false, "vascular_disease": false});
    check(
        "cha2ds2_vasc",
        none.clone(),
        json!({"score": 0, "risk_category": "low"}),
    );
    let mut woman = none.clone();
    woman["sex"] = json!("female");
    check(
        "cha2ds2_vasc",
        woman.clone(),
        json!({"score": 1, "risk_category": "low"}),
    );
    woman["hypertension"] = json!(true);
    check(
        "cha2ds2_vasc",
        woman,
        json!({"score": 2, "risk_category": "moderate"}),
    );
    let mut man = none.clone();
    man["age_years"] = json!(70);
    check(
        "cha2ds2_vasc",
        man.clone(),
        json!({"score": 1, "risk_category": "moderate"}),
    );
    // 78-year-old woman, hypertension, diabetes, prior stroke: 2 + 1 + 1 + 2 + 1 = 7.
    let all = json!({"sex": "female", "age_years": 78, "congestive_heart_failure": false, "hypertension": true, "diabetes": true, "stroke_tia_or_thromboembolism": true, "vascular_disease": false});
    check(
        "cha2ds2_vasc",
        all,
        json!({"score": 7, "risk_category": "high"}),
    );
    let max = json!({"sex": "female", "age_years": 90, "congestive_heart_failure": true, "hypertension": true, "diabetes": true, "stroke_tia_or_thromboembolism": true, "vascular_disease": true});
    check("cha2ds2_vasc", max, json!({"score": 9, "max_score": 9}));
}

#[test]
fn has_bled_cases() {
    let base = json!({"age_years": 60, "uncontrolled_hypertension": false, "abnormal_renal_function": false, "abnormal_liver_function": false, "stroke_history": false, "bleeding_history_or_predisposition": false, "labile_inr": false, "antiplatelet_or_nsaid_use": false, "alcohol_excess": false});
    check(
        "has_bled",
        base.clone(),
        json!({"score": 0, "risk_category": "low"}),
    );
    let mut case = base.clone();
    case["age_years"] = json!(70);
    case["antiplatelet_or_nsaid_use"] = json!(true);
    check(
        "has_bled",
        case.clone(),
        json!({"score": 2, "risk_category": "moderate"}),
    );
    case["stroke_history"] = json!(true);
    check(
        "has_bled",
        case,
        json!({"score": 3, "risk_category": "high"}),
    );
    // Age 65 exactly is not "elderly (> 65)".
    let mut sixty_five = base;
    sixty_five["age_years"] = json!(65);
    check("has_bled", sixty_five, json!({"score": 0}));
}

#[test]
fn curb_65_cases() {
    check(
        "curb_65",
        json!({"confusion": false, "urea_mmol_per_l": 5.0, "respiratory_rate_per_min": 18, "systolic_bp_mmhg": 120, "diastolic_bp_mmhg": 80, "age_years": 40}),
        json!({"score": 0, "risk_category": "low"}),
    );
    check(
        "curb_65",
        json!({"confusion": false, "urea_mmol_per_l": 8.0, "respiratory_rate_per_min": 18, "systolic_bp_mmhg": 120, "diastolic_bp_mmhg": 80, "age_years": 70}),
        json!({"score": 2, "risk_category": "moderate"}),
    );
    check(
        "curb_65",
        json!({"confusion": true, "bun_mg_per_dl": 25, "respiratory_rate_per_min": 32, "systolic_bp_mmhg": 120, "diastolic_bp_mmhg": 60, "age_years": 70}),
        json!({"score": 5, "risk_category": "high"}),
    );
    // Thresholds: urea 7.0 is not > 7; RR 30 counts; SBP 90 with DBP 61 does not.
    check(
        "curb_65",
        json!({"confusion": false, "urea_mmol_per_l": 7.0, "respiratory_rate_per_min": 30, "systolic_bp_mmhg": 90, "diastolic_bp_mmhg": 61, "age_years": 64}),
        json!({"score": 1}),
    );
    check_error(
        "curb_65",
        json!({"confusion": false, "respiratory_rate_per_min": 18, "systolic_bp_mmhg": 120, "diastolic_bp_mmhg": 80, "age_years": 40}),
        "urea_mmol_per_l",
    );
}

#[test]
fn qtc_bazett_and_fridericia() {
    // QT 400 ms, RR 0.8 s: 400/√0.8 = 447.2; 400/∛0.8 = 430.9.
    check(
        "qtc",
        json!({"qt_ms": 400, "rr_s": 0.8}),
        json!({"qtc_bazett_ms": 447.0, "qtc_fridericia_ms": 431.0, "heart_rate_bpm": 75.0, "category": "normal"}),
    );
    check(
        "qtc",
        json!({"qt_ms": 400, "heart_rate_bpm": 75}),
        json!({"qtc_bazett_ms": 447.0}),
    );
    // RR 1 s: QTc equals QT.
    check(
        "qtc",
        json!({"qt_ms": 455, "heart_rate_bpm": 60, "sex": "male"}),
        json!({"qtc_bazett_ms": 455.0, "category": "prolonged"}),
    );
    check(
        "qtc",
        json!({"qt_ms": 455, "heart_rate_bpm": 60, "sex": "female"}),
        json!({"category": "normal"}),
    );
    check(
        "qtc",
        json!({"qt_ms": 520, "rr_s": 1.0}),
        json!({"category": "markedly_prolonged"}),
    );
    check_error(
        "qtc",
        json!({"qt_ms": 400, "rr_s": 0.8, "heart_rate_bpm": 75}),
        "rr_s",
    );
}

#[test]
fn anion_gap_cases() {
    check(
        "anion_gap",
        json!({"sodium_mmol_per_l": 140, "chloride_mmol_per_l": 104, "bicarbonate_mmol_per_l": 24}),
        json!({"anion_gap": 12.0, "category": "normal", "anion_gap_with_potassium": null}),
    );
    check(
        "anion_gap",
        json!({"sodium_mmol_per_l": 140, "chloride_mmol_per_l": 100, "bicarbonate_mmol_per_l": 12, "potassium_mmol_per_l": 4.5}),
        json!({"anion_gap": 28.0, "anion_gap_with_potassium": 32.5, "category": "high"}),
    );
    check(
        "anion_gap",
        json!({"sodium_mmol_per_l": 135, "chloride_mmol_per_l": 105, "bicarbonate_mmol_per_l": 25}),
        json!({"anion_gap": 5.0, "category": "low"}),
    );
}

#[test]
fn corrected_calcium_cases() {
    // 2.10 + 0.02 × (40 − 25) = 2.40 mmol/L.
    check(
        "corrected_calcium",
        json!({"total_calcium": 2.10, "albumin": 25, "units": "si"}),
        json!({"corrected_calcium_mmol_per_l": 2.4, "category": "normal"}),
    );
    // 8.0 + 0.8 × (4.0 − 2.0) = 9.6 mg/dL.
    check(
        "corrected_calcium",
        json!({"total_calcium": 8.0, "albumin": 2.0, "units": "conventional"}),
        json!({"corrected_calcium_mg_per_dl": 9.6, "category": "normal"}),
    );
    check(
        "corrected_calcium",
        json!({"total_calcium": 2.70, "albumin": 30, "units": "si"}),
        json!({"corrected_calcium_mmol_per_l": 2.9, "category": "high"}),
    );
    check(
        "corrected_calcium",
        json!({"total_calcium": 1.80, "albumin": 45, "units": "si"}),
        json!({"corrected_calcium_mmol_per_l": 1.7, "category": "low"}),
    );
    check_error(
        "corrected_calcium",
        json!({"total_calcium": 9.0, "albumin": 40, "units": "si"}),
        "total_calcium",
    );
}

#[test]
fn braden_totals_and_bands() {
    let scale = |s: u32, m: u32, a: u32, mo: u32, n: u32, f: u32| json!({"sensory_perception": s, "moisture": m, "activity": a, "mobility": mo, "nutrition": n, "friction_and_shear": f});
    check(
        "braden_scale",
        scale(4, 4, 4, 4, 4, 3),
        json!({"total": 23, "risk_category": "no_risk"}),
    );
    check(
        "braden_scale",
        scale(3, 3, 3, 3, 3, 3),
        json!({"total": 18, "risk_category": "mild"}),
    );
    check(
        "braden_scale",
        scale(3, 2, 2, 2, 3, 2),
        json!({"total": 14, "risk_category": "moderate"}),
    );
    check(
        "braden_scale",
        scale(2, 2, 2, 2, 2, 2),
        json!({"total": 12, "risk_category": "high"}),
    );
    check(
        "braden_scale",
        scale(1, 1, 1, 1, 1, 1),
        json!({"total": 6, "risk_category": "very_high"}),
    );
    check_error(
        "braden_scale",
        scale(5, 1, 1, 1, 1, 1),
        "sensory_perception",
    );
    check_error(
        "braden_scale",
        scale(1, 1, 1, 1, 1, 4),
        "friction_and_shear",
    );
}

#[test]
fn morse_totals_and_bands() {
    let low = json!({"history_of_falling": false, "secondary_diagnosis": false, "ambulatory_aid": "none_bed_rest_or_nurse_assist", "intravenous_therapy_or_heparin_lock": false, "gait": "normal_bed_rest_or_wheelchair", "mental_status": "oriented_to_own_ability"});
    check(
        "morse_fall_scale",
        low.clone(),
        json!({"score": 0, "risk_category": "low"}),
    );
    let mut moderate = low.clone();
    moderate["history_of_falling"] = json!(true);
    check(
        "morse_fall_scale",
        moderate.clone(),
        json!({"score": 25, "risk_category": "moderate"}),
    );
    moderate["intravenous_therapy_or_heparin_lock"] = json!(true);
    check(
        "morse_fall_scale",
        moderate,
        json!({"score": 45, "risk_category": "high"}),
    );
    let max = json!({"history_of_falling": true, "secondary_diagnosis": true, "ambulatory_aid": "furniture", "intravenous_therapy_or_heparin_lock": true, "gait": "impaired", "mental_status": "overestimates_or_forgets_limitations"});
    check("morse_fall_scale", max, json!({"score": 125}));
    check_error(
        "morse_fall_scale",
        json!({"history_of_falling": false, "secondary_diagnosis": false, "ambulatory_aid": "wheelchair", "intravenous_therapy_or_heparin_lock": false, "gait": "weak", "mental_status": "oriented_to_own_ability"}),
        "ambulatory_aid",
    );
}
