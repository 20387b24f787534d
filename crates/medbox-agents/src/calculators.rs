//! Clinical calculators: BMI, eGFR (CKD-EPI 2021), Cockcroft–Gault,
//! CHA₂DS₂-VASc, HAS-BLED, CURB-65, QTc, anion gap, albumin-corrected calcium,
//! Braden and Morse. Each follows its published formula; each result names the
//! formula and version, echoes its inputs, and gives the standard category.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    PureTool, Sex, Tool, ToolError, boxed, check_range, object_schema, round_to, sex_schema,
};

/// Micromoles per litre of creatinine in one mg/dL (molar mass 113.12 g/mol).
pub const CREATININE_UMOL_PER_L_PER_MG_PER_DL: f64 = 88.4;

pub fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        boxed(PureTool::new(
            "bmi",
            "Body-mass index from weight and height, with the WHO and the Chinese adult (WS/T 428-2013) categories.",
            bmi_schema,
            bmi,
        )),
        boxed(PureTool::new(
            "egfr_ckd_epi_2021",
            "Estimated GFR from serum creatinine, age and sex by the race-free CKD-EPI 2021 equation, with the KDIGO G stage. Adults only.",
            egfr_schema,
            egfr_ckd_epi_2021,
        )),
        boxed(PureTool::new(
            "creatinine_clearance_cockcroft_gault",
            "Creatinine clearance (mL/min) by Cockcroft–Gault from age, weight, sex and serum creatinine; used for drug dosing.",
            cockcroft_gault_schema,
            cockcroft_gault,
        )),
        boxed(PureTool::new(
            "cha2ds2_vasc",
            "CHA2DS2-VASc stroke-risk score in atrial fibrillation, with the ESC 2020 anticoagulation recommendation band.",
            cha2ds2_vasc_schema,
            cha2ds2_vasc,
        )),
        boxed(PureTool::new(
            "has_bled",
            "HAS-BLED major-bleeding risk score for patients on or considered for anticoagulation.",
            has_bled_schema,
            has_bled,
        )),
        boxed(PureTool::new(
            "curb_65",
            "CURB-65 severity score for community-acquired pneumonia, with the suggested site of care.",
            curb_65_schema,
            curb_65,
        )),
        boxed(PureTool::new(
            "qtc",
            "Heart-rate-corrected QT interval by Bazett and Fridericia from QT and either RR interval or heart rate.",
            qtc_schema,
            qtc,
        )),
        boxed(PureTool::new(
            "anion_gap",
            "Serum anion gap from sodium, chloride and bicarbonate (and with potassium when given).",
            anion_gap_schema,
            anion_gap,
        )),
        boxed(PureTool::new(
            "corrected_calcium",
            "Albumin-corrected total calcium (Payne) in SI or conventional units.",
            corrected_calcium_schema,
            corrected_calcium,
        )),
        boxed(PureTool::new(
            "braden_scale",
            "Braden scale for pressure-injury risk from its six subscale scores, with the risk band.",
            braden_schema,
            braden_scale,
        )),
        boxed(PureTool::new(
            "morse_fall_scale",
            "Morse Fall Scale total from its six items, with the risk band.",
            morse_schema,
            morse_fall_scale,
        )),
    ]
}

// ---------------------------------------------------------------------------
// BMI

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmiArguments {
    pub weight_kg: f64,
    pub height_cm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BmiResult {
    pub weight_kg: f64,
    pub height_cm: f64,
    pub bmi: f64,
    pub unit: &'static str,
    pub formula: &'static str,
    /// WHO adult categories: underweight < 18.5, normal 18.5–24.9, pre-obese
    /// 25–29.9, obese class I 30–34.9, class II 35–39.9, class III ≥ 40.
    pub who_category: &'static str,
    /// Chinese adults (WS/T 428-2013): underweight < 18.5, normal 18.5–23.9,
    /// overweight 24–27.9, obese ≥ 28.
    pub chinese_category: &'static str,
    pub chinese_category_zh: &'static str,
}

fn bmi_schema() -> Value {
    object_schema(
        json!({
            "weight_kg": {"type": "number", "description": "body weight in kg"},
            "height_cm": {"type": "number", "description": "height in cm"}
        }),
        &["weight_kg", "height_cm"],
    )
}

pub fn bmi(arguments: BmiArguments) -> Result<BmiResult, ToolError> {
    let weight_kg = check_range("weight_kg", arguments.weight_kg, 1.0, 500.0, "kg")?;
    let height_cm = check_range("height_cm", arguments.height_cm, 30.0, 272.0, "cm")?;
    let height_m = height_cm / 100.0;
    // Categories are read from the value as displayed (one decimal).
    let bmi = round_to(weight_kg / (height_m * height_m), 1);
    let who_category = match bmi {
        b if b < 18.5 => "underweight",
        b if b < 25.0 => "normal",
        b if b < 30.0 => "pre_obese",
        b if b < 35.0 => "obese_class_1",
        b if b < 40.0 => "obese_class_2",
        _ => "obese_class_3",
    };
    let (chinese_category, chinese_category_zh) = match bmi {
        b if b < 18.5 => ("underweight", "体重过低"),
        b if b < 24.0 => ("normal", "体重正常"),
        b if b < 28.0 => ("overweight", "超重"),
        _ => ("obese", "肥胖"),
    };
    Ok(BmiResult {
        weight_kg,
        height_cm,
        bmi,
        unit: "kg/m2",
        formula: "BMI = weight (kg) / height (m)^2; WHO and WS/T 428-2013 adult categories",
        who_category,
        chinese_category,
        chinese_category_zh,
    })
}

// ---------------------------------------------------------------------------
// Creatinine, eGFR and clearance

/// The unit of a serum creatinine value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum CreatinineUnit {
    #[serde(rename = "mg/dL")]
    MilligramsPerDecilitre,
    #[serde(rename = "umol/L", alias = "µmol/L", alias = "μmol/L")]
    MicromolesPerLitre,
}

fn creatinine_unit_schema() -> Value {
    json!({"type": "string", "enum": ["mg/dL", "umol/L", "µmol/L", "μmol/L"], "description": "unit of serum_creatinine"})
}

/// Serum creatinine in mg/dL after a plausibility check on the given value.
fn creatinine_mg_per_dl(value: f64, unit: CreatinineUnit) -> Result<f64, ToolError> {
    match unit {
        CreatinineUnit::MilligramsPerDecilitre => {
            check_range("serum_creatinine", value, 0.1, 30.0, "mg/dL")
        }
        CreatinineUnit::MicromolesPerLitre => {
            check_range("serum_creatinine", value, 9.0, 2650.0, "umol/L")
                .map(|umol| umol / CREATININE_UMOL_PER_L_PER_MG_PER_DL)
        }
    }
}

fn adult_age(age_years: f64) -> Result<f64, ToolError> {
    check_range("age_years", age_years, 18.0, 120.0, "years (adults only)")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgfrArguments {
    pub sex: Sex,
    pub age_years: f64,
    pub serum_creatinine: f64,
    pub creatinine_unit: CreatinineUnit,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EgfrResult {
    pub sex: Sex,
    pub age_years: f64,
    pub serum_creatinine_mg_per_dl: f64,
    pub egfr: f64,
    pub unit: &'static str,
    pub formula: &'static str,
    /// KDIGO 2012 GFR category: G1 ≥ 90, G2 60–89, G3a 45–59, G3b 30–44, G4 15–29, G5 < 15.
    pub ckd_g_stage: &'static str,
    pub ckd_g_stage_description: &'static str,
}

fn egfr_schema() -> Value {
    object_schema(
        json!({
            "sex": sex_schema(),
            "age_years": {"type": "number", "description": "age in years, 18 or older"},
            "serum_creatinine": {"type": "number", "description": "serum creatinine (enzymatic, IDMS-traceable)"},
            "creatinine_unit": creatinine_unit_schema()
        }),
        &["sex", "age_years", "serum_creatinine", "creatinine_unit"],
    )
}

/// CKD-EPI 2021 creatinine equation (Inker et al., NEJM 2021), unrounded:
/// 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^−1.200 × 0.9938^age × 1.012 [female],
/// κ = 0.7 (female) / 0.9 (male), α = −0.241 (female) / −0.302 (male).
pub fn ckd_epi_2021(sex: Sex, age_years: f64, creatinine_mg_per_dl: f64) -> f64 {
    let (kappa, alpha, sex_factor) = match sex {
        Sex::Female => (0.7, -0.241, 1.012),
        Sex::Male => (0.9, -0.302, 1.0),
    };
    let ratio = creatinine_mg_per_dl / kappa;
    142.0
        * ratio.min(1.0).powf(alpha)
        * ratio.max(1.0).powf(-1.200)
        * 0.9938f64.powf(age_years)
        * sex_factor
}

/// KDIGO 2012 GFR category for a GFR in mL/min/1.73 m².
pub fn ckd_g_stage(egfr: f64) -> (&'static str, &'static str) {
    match egfr {
        g if g >= 90.0 => ("G1", "normal or high"),
        g if g >= 60.0 => ("G2", "mildly decreased"),
        g if g >= 45.0 => ("G3a", "mildly to moderately decreased"),
        g if g >= 30.0 => ("G3b", "moderately to severely decreased"),
        g if g >= 15.0 => ("G4", "severely decreased"),
        _ => ("G5", "kidney failure"),
    }
}

pub fn egfr_ckd_epi_2021(arguments: EgfrArguments) -> Result<EgfrResult, ToolError> {
    let age_years = adult_age(arguments.age_years)?;
    let creatinine = creatinine_mg_per_dl(arguments.serum_creatinine, arguments.creatinine_unit)?;
    // Reported as a whole number, as laboratories report eGFR; staged on that number.
    let egfr = ckd_epi_2021(arguments.sex, age_years, creatinine).round();
    let (ckd_g_stage, ckd_g_stage_description) = ckd_g_stage(egfr);
    Ok(EgfrResult {
        sex: arguments.sex,
        age_years,
        serum_creatinine_mg_per_dl: round_to(creatinine, 2),
        egfr,
        unit: "mL/min/{1.73_m2}",
        formula: "CKD-EPI 2021 creatinine (race-free)",
        ckd_g_stage,
        ckd_g_stage_description,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CockcroftGaultArguments {
    pub sex: Sex,
    pub age_years: f64,
    pub weight_kg: f64,
    pub serum_creatinine: f64,
    pub creatinine_unit: CreatinineUnit,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CockcroftGaultResult {
    pub sex: Sex,
    pub age_years: f64,
    pub weight_kg: f64,
    pub serum_creatinine_mg_per_dl: f64,
    pub creatinine_clearance: f64,
    pub unit: &'static str,
    pub formula: &'static str,
    pub note: &'static str,
}

fn cockcroft_gault_schema() -> Value {
    object_schema(
        json!({
            "sex": sex_schema(),
            "age_years": {"type": "number", "description": "age in years, 18 or older"},
            "weight_kg": {"type": "number", "description": "body weight in kg (actual, ideal or adjusted: the caller chooses)"},
            "serum_creatinine": {"type": "number"},
            "creatinine_unit": creatinine_unit_schema()
        }),
        &[
            "sex",
            "age_years",
            "weight_kg",
            "serum_creatinine",
            "creatinine_unit",
        ],
    )
}

pub fn cockcroft_gault(
    arguments: CockcroftGaultArguments,
) -> Result<CockcroftGaultResult, ToolError> {
    let age_years = adult_age(arguments.age_years)?;
    let weight_kg = check_range("weight_kg", arguments.weight_kg, 20.0, 500.0, "kg")?;
    let creatinine = creatinine_mg_per_dl(arguments.serum_creatinine, arguments.creatinine_unit)?;
    let sex_factor = match arguments.sex {
        Sex::Female => 0.85,
        Sex::Male => 1.0,
    };
    let clearance = (140.0 - age_years) * weight_kg / (72.0 * creatinine) * sex_factor;
    Ok(CockcroftGaultResult {
        sex: arguments.sex,
        age_years,
        weight_kg,
        serum_creatinine_mg_per_dl: round_to(creatinine, 2),
        creatinine_clearance: round_to(clearance, 1),
        unit: "mL/min",
        formula: "Cockcroft-Gault 1976: (140 - age) x weight / (72 x Scr mg/dL) x 0.85 if female",
        note: "not normalised to body surface area; the weight used changes the result",
    })
}

// ---------------------------------------------------------------------------
// Scores built from points

/// One item of a points score: what it is, whether it applied, its points.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreItem {
    pub item: &'static str,
    pub present: bool,
    pub points: u32,
}

fn item(item: &'static str, present: bool, points_if_present: u32) -> ScoreItem {
    ScoreItem {
        item,
        present,
        points: if present { points_if_present } else { 0 },
    }
}

fn total(items: &[ScoreItem]) -> u32 {
    items.iter().map(|item| item.points).sum()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cha2ds2VascArguments {
    pub sex: Sex,
    pub age_years: f64,
    pub congestive_heart_failure: bool,
    pub hypertension: bool,
    pub diabetes: bool,
    pub stroke_tia_or_thromboembolism: bool,
    pub vascular_disease: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreResult {
    pub score: u32,
    pub max_score: u32,
    pub items: Vec<ScoreItem>,
    pub rule: &'static str,
    pub risk_category: &'static str,
    pub interpretation: &'static str,
}

fn cha2ds2_vasc_schema() -> Value {
    object_schema(
        json!({
            "sex": sex_schema(),
            "age_years": {"type": "number"},
            "congestive_heart_failure": {"type": "boolean", "description": "heart failure or LV dysfunction"},
            "hypertension": {"type": "boolean"},
            "diabetes": {"type": "boolean"},
            "stroke_tia_or_thromboembolism": {"type": "boolean", "description": "prior stroke, TIA or thromboembolism"},
            "vascular_disease": {"type": "boolean", "description": "prior MI, peripheral artery disease or aortic plaque"}
        }),
        &[
            "sex",
            "age_years",
            "congestive_heart_failure",
            "hypertension",
            "diabetes",
            "stroke_tia_or_thromboembolism",
            "vascular_disease",
        ],
    )
}

pub fn cha2ds2_vasc(arguments: Cha2ds2VascArguments) -> Result<ScoreResult, ToolError> {
    let age = check_range("age_years", arguments.age_years, 18.0, 120.0, "years")?;
    let female = arguments.sex == Sex::Female;
    let items = vec![
        item(
            "congestive heart failure (C)",
            arguments.congestive_heart_failure,
            1,
        ),
        item("hypertension (H)", arguments.hypertension, 1),
        item("age >= 75 (A2)", age >= 75.0, 2),
        item("diabetes (D)", arguments.diabetes, 1),
        item(
            "stroke/TIA/thromboembolism (S2)",
            arguments.stroke_tia_or_thromboembolism,
            2,
        ),
        item("vascular disease (V)", arguments.vascular_disease, 1),
        item("age 65-74 (A)", (65.0..75.0).contains(&age), 1),
        item("female sex (Sc)", female, 1),
    ];
    let score = total(&items);
    // Female sex is a risk modifier: the bands shift by one point for women.
    let risk_points = if female { score - 1 } else { score };
    let (risk_category, interpretation) = match risk_points {
        0 => ("low", "oral anticoagulation not recommended"),
        1 => ("moderate", "oral anticoagulation should be considered"),
        _ => ("high", "oral anticoagulation recommended"),
    };
    Ok(ScoreResult {
        score,
        max_score: 9,
        items,
        rule: "CHA2DS2-VASc (Lip 2010); bands per ESC 2020 AF guideline (men 0/1/>=2, women 1/2/>=3)",
        risk_category,
        interpretation,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HasBledArguments {
    pub age_years: f64,
    /// Uncontrolled hypertension, systolic > 160 mmHg.
    pub uncontrolled_hypertension: bool,
    pub abnormal_renal_function: bool,
    pub abnormal_liver_function: bool,
    pub stroke_history: bool,
    pub bleeding_history_or_predisposition: bool,
    pub labile_inr: bool,
    pub antiplatelet_or_nsaid_use: bool,
    pub alcohol_excess: bool,
}

fn has_bled_schema() -> Value {
    object_schema(
        json!({
            "age_years": {"type": "number", "description": "elderly = age > 65"},
            "uncontrolled_hypertension": {"type": "boolean", "description": "systolic > 160 mmHg"},
            "abnormal_renal_function": {"type": "boolean", "description": "dialysis, transplant, or creatinine >= 200 umol/L"},
            "abnormal_liver_function": {"type": "boolean", "description": "cirrhosis, or bilirubin > 2x ULN with AST/ALT/ALP > 3x ULN"},
            "stroke_history": {"type": "boolean"},
            "bleeding_history_or_predisposition": {"type": "boolean"},
            "labile_inr": {"type": "boolean", "description": "time in therapeutic range < 60%"},
            "antiplatelet_or_nsaid_use": {"type": "boolean"},
            "alcohol_excess": {"type": "boolean", "description": ">= 8 drinks a week"}
        }),
        &[
            "age_years",
            "uncontrolled_hypertension",
            "abnormal_renal_function",
            "abnormal_liver_function",
            "stroke_history",
            "bleeding_history_or_predisposition",
            "labile_inr",
            "antiplatelet_or_nsaid_use",
            "alcohol_excess",
        ],
    )
}

pub fn has_bled(arguments: HasBledArguments) -> Result<ScoreResult, ToolError> {
    let age = check_range("age_years", arguments.age_years, 18.0, 120.0, "years")?;
    let items = vec![
        item(
            "uncontrolled hypertension (H)",
            arguments.uncontrolled_hypertension,
            1,
        ),
        item(
            "abnormal renal function (A)",
            arguments.abnormal_renal_function,
            1,
        ),
        item(
            "abnormal liver function (A)",
            arguments.abnormal_liver_function,
            1,
        ),
        item("stroke (S)", arguments.stroke_history, 1),
        item(
            "bleeding history or predisposition (B)",
            arguments.bleeding_history_or_predisposition,
            1,
        ),
        item("labile INR (L)", arguments.labile_inr, 1),
        item("elderly, age > 65 (E)", age > 65.0, 1),
        item(
            "antiplatelet or NSAID use (D)",
            arguments.antiplatelet_or_nsaid_use,
            1,
        ),
        item("alcohol excess (D)", arguments.alcohol_excess, 1),
    ];
    let score = total(&items);
    let (risk_category, interpretation) = match score {
        0..=1 => ("low", "low bleeding risk"),
        2 => ("moderate", "moderate bleeding risk"),
        _ => (
            "high",
            "high bleeding risk: correct modifiable factors and review more often; not by itself a reason to withhold anticoagulation",
        ),
    };
    Ok(ScoreResult {
        score,
        max_score: 9,
        items,
        rule: "HAS-BLED (Pisters 2010); >= 3 high risk",
        risk_category,
        interpretation,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curb65Arguments {
    pub confusion: bool,
    /// Serum urea in mmol/L (threshold > 7); give this or `bun_mg_per_dl`.
    #[serde(default)]
    pub urea_mmol_per_l: Option<f64>,
    /// Blood urea nitrogen in mg/dL (threshold > 19); give this or `urea_mmol_per_l`.
    #[serde(default)]
    pub bun_mg_per_dl: Option<f64>,
    pub respiratory_rate_per_min: f64,
    pub systolic_bp_mmhg: f64,
    pub diastolic_bp_mmhg: f64,
    pub age_years: f64,
}

fn curb_65_schema() -> Value {
    object_schema(
        json!({
            "confusion": {"type": "boolean", "description": "new mental confusion"},
            "urea_mmol_per_l": {"type": "number", "description": "serum urea in mmol/L (give this or bun_mg_per_dl)"},
            "bun_mg_per_dl": {"type": "number", "description": "blood urea nitrogen in mg/dL (give this or urea_mmol_per_l)"},
            "respiratory_rate_per_min": {"type": "number"},
            "systolic_bp_mmhg": {"type": "number"},
            "diastolic_bp_mmhg": {"type": "number"},
            "age_years": {"type": "number"}
        }),
        &[
            "confusion",
            "respiratory_rate_per_min",
            "systolic_bp_mmhg",
            "diastolic_bp_mmhg",
            "age_years",
        ],
    )
}

pub fn curb_65(arguments: Curb65Arguments) -> Result<ScoreResult, ToolError> {
    let urea_raised = match (arguments.urea_mmol_per_l, arguments.bun_mg_per_dl) {
        (Some(urea), None) => check_range("urea_mmol_per_l", urea, 0.0, 150.0, "mmol/L")? > 7.0,
        (None, Some(bun)) => check_range("bun_mg_per_dl", bun, 0.0, 420.0, "mg/dL")? > 19.0,
        _ => {
            return Err(ToolError::bad(
                "urea_mmol_per_l",
                "give exactly one of `urea_mmol_per_l` or `bun_mg_per_dl`",
            ));
        }
    };
    let respiratory_rate = check_range(
        "respiratory_rate_per_min",
        arguments.respiratory_rate_per_min,
        0.0,
        80.0,
        "/min",
    )?;
    let systolic = check_range(
        "systolic_bp_mmhg",
        arguments.systolic_bp_mmhg,
        0.0,
        300.0,
        "mmHg",
    )?;
    let diastolic = check_range(
        "diastolic_bp_mmhg",
        arguments.diastolic_bp_mmhg,
        0.0,
        200.0,
        "mmHg",
    )?;
    let age = check_range("age_years", arguments.age_years, 18.0, 120.0, "years")?;
    let items = vec![
        item("confusion (C)", arguments.confusion, 1),
        item("urea > 7 mmol/L or BUN > 19 mg/dL (U)", urea_raised, 1),
        item(
            "respiratory rate >= 30/min (R)",
            respiratory_rate >= 30.0,
            1,
        ),
        item(
            "SBP < 90 or DBP <= 60 mmHg (B)",
            systolic < 90.0 || diastolic <= 60.0,
            1,
        ),
        item("age >= 65 (65)", age >= 65.0, 1),
    ];
    let score = total(&items);
    let (risk_category, interpretation) = match score {
        0..=1 => ("low", "low 30-day mortality: consider treatment at home"),
        2 => (
            "moderate",
            "consider short hospital stay or closely supervised outpatient care",
        ),
        _ => (
            "high",
            "severe pneumonia: hospital care; consider ICU at 4-5",
        ),
    };
    Ok(ScoreResult {
        score,
        max_score: 5,
        items,
        rule: "CURB-65 (Lim 2003, BTS)",
        risk_category,
        interpretation,
    })
}

// ---------------------------------------------------------------------------
// QTc

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QtcArguments {
    pub qt_ms: f64,
    #[serde(default)]
    pub rr_s: Option<f64>,
    #[serde(default)]
    pub heart_rate_bpm: Option<f64>,
    #[serde(default)]
    pub sex: Option<Sex>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QtcResult {
    pub qt_ms: f64,
    pub rr_s: f64,
    pub heart_rate_bpm: f64,
    pub qtc_bazett_ms: f64,
    pub qtc_fridericia_ms: f64,
    pub unit: &'static str,
    pub formula: &'static str,
    /// From the Fridericia value, which is less distorted at fast and slow rates.
    pub category: &'static str,
    pub category_rule: &'static str,
}

fn qtc_schema() -> Value {
    object_schema(
        json!({
            "qt_ms": {"type": "number", "description": "measured QT interval in ms"},
            "rr_s": {"type": "number", "description": "RR interval in seconds (give this or heart_rate_bpm)"},
            "heart_rate_bpm": {"type": "number", "description": "heart rate in beats/min (give this or rr_s)"},
            "sex": sex_schema()
        }),
        &["qt_ms"],
    )
}

pub fn qtc(arguments: QtcArguments) -> Result<QtcResult, ToolError> {
    let qt_ms = check_range("qt_ms", arguments.qt_ms, 150.0, 800.0, "ms")?;
    let rr_s = match (arguments.rr_s, arguments.heart_rate_bpm) {
        (Some(rr), None) => check_range("rr_s", rr, 0.2, 3.0, "s")?,
        (None, Some(rate)) => 60.0 / check_range("heart_rate_bpm", rate, 20.0, 300.0, "beats/min")?,
        _ => {
            return Err(ToolError::bad(
                "rr_s",
                "give exactly one of `rr_s` or `heart_rate_bpm`",
            ));
        }
    };
    let bazett = qt_ms / rr_s.sqrt();
    let fridericia = qt_ms / rr_s.cbrt();
    let prolonged_above = match arguments.sex {
        Some(Sex::Female) => 460.0,
        Some(Sex::Male) | None => 450.0,
    };
    let category = match fridericia {
        q if q > 500.0 => "markedly_prolonged",
        q if q > prolonged_above => "prolonged",
        q if q < 350.0 => "short",
        _ => "normal",
    };
    Ok(QtcResult {
        qt_ms,
        rr_s: round_to(rr_s, 3),
        heart_rate_bpm: round_to(60.0 / rr_s, 0),
        qtc_bazett_ms: round_to(bazett, 0),
        qtc_fridericia_ms: round_to(fridericia, 0),
        unit: "ms",
        formula: "Bazett QT/RR^(1/2); Fridericia QT/RR^(1/3); RR in seconds",
        category,
        category_rule: "prolonged > 450 ms (men, or sex not given) / > 460 ms (women); markedly prolonged > 500 ms; short < 350 ms",
    })
}

// ---------------------------------------------------------------------------
// Anion gap and corrected calcium

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnionGapArguments {
    pub sodium_mmol_per_l: f64,
    pub chloride_mmol_per_l: f64,
    pub bicarbonate_mmol_per_l: f64,
    #[serde(default)]
    pub potassium_mmol_per_l: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnionGapResult {
    pub sodium_mmol_per_l: f64,
    pub chloride_mmol_per_l: f64,
    pub bicarbonate_mmol_per_l: f64,
    pub potassium_mmol_per_l: Option<f64>,
    pub anion_gap: f64,
    pub reference_range: &'static str,
    pub anion_gap_with_potassium: Option<f64>,
    pub reference_range_with_potassium: Option<&'static str>,
    pub unit: &'static str,
    pub formula: &'static str,
    /// From the gap without potassium: low, normal or high.
    pub category: &'static str,
}

fn anion_gap_schema() -> Value {
    object_schema(
        json!({
            "sodium_mmol_per_l": {"type": "number"},
            "chloride_mmol_per_l": {"type": "number"},
            "bicarbonate_mmol_per_l": {"type": "number", "description": "bicarbonate or total CO2"},
            "potassium_mmol_per_l": {"type": "number", "description": "optional; also reports the gap with potassium"}
        }),
        &[
            "sodium_mmol_per_l",
            "chloride_mmol_per_l",
            "bicarbonate_mmol_per_l",
        ],
    )
}

pub fn anion_gap(arguments: AnionGapArguments) -> Result<AnionGapResult, ToolError> {
    let sodium = check_range(
        "sodium_mmol_per_l",
        arguments.sodium_mmol_per_l,
        90.0,
        200.0,
        "mmol/L",
    )?;
    let chloride = check_range(
        "chloride_mmol_per_l",
        arguments.chloride_mmol_per_l,
        50.0,
        160.0,
        "mmol/L",
    )?;
    let bicarbonate = check_range(
        "bicarbonate_mmol_per_l",
        arguments.bicarbonate_mmol_per_l,
        1.0,
        60.0,
        "mmol/L",
    )?;
    let potassium = arguments
        .potassium_mmol_per_l
        .map(|k| check_range("potassium_mmol_per_l", k, 1.0, 12.0, "mmol/L"))
        .transpose()?;
    let gap = round_to(sodium - chloride - bicarbonate, 1);
    let category = match gap {
        g if g < 8.0 => "low",
        g if g > 12.0 => "high",
        _ => "normal",
    };
    Ok(AnionGapResult {
        sodium_mmol_per_l: sodium,
        chloride_mmol_per_l: chloride,
        bicarbonate_mmol_per_l: bicarbonate,
        potassium_mmol_per_l: potassium,
        anion_gap: gap,
        reference_range: "8-12 mmol/L (analyser-dependent; many modern analysers 3-11)",
        anion_gap_with_potassium: potassium
            .map(|k| round_to(sodium + k - chloride - bicarbonate, 1)),
        reference_range_with_potassium: potassium.map(|_| "12-16 mmol/L"),
        unit: "mmol/L",
        formula: "AG = Na - (Cl + HCO3); with K: (Na + K) - (Cl + HCO3)",
        category,
    })
}

/// The unit system of a calcium/albumin pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CalciumUnits {
    /// Calcium in mmol/L, albumin in g/L.
    Si,
    /// Calcium in mg/dL, albumin in g/dL.
    Conventional,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrectedCalciumArguments {
    pub total_calcium: f64,
    pub albumin: f64,
    pub units: CalciumUnits,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorrectedCalciumResult {
    pub units: CalciumUnits,
    pub total_calcium: f64,
    pub albumin: f64,
    pub corrected_calcium_mmol_per_l: f64,
    pub corrected_calcium_mg_per_dl: f64,
    pub formula: &'static str,
    pub reference_range: &'static str,
    pub category: &'static str,
}

fn corrected_calcium_schema() -> Value {
    object_schema(
        json!({
            "total_calcium": {"type": "number", "description": "total serum calcium"},
            "albumin": {"type": "number", "description": "serum albumin"},
            "units": {"type": "string", "enum": ["si", "conventional"], "description": "si: calcium mmol/L and albumin g/L; conventional: calcium mg/dL and albumin g/dL"}
        }),
        &["total_calcium", "albumin", "units"],
    )
}

/// mg/dL of calcium in one mmol/L (molar mass 40.08 g/mol).
pub const CALCIUM_MG_PER_DL_PER_MMOL_PER_L: f64 = 4.008;

pub fn corrected_calcium(
    arguments: CorrectedCalciumArguments,
) -> Result<CorrectedCalciumResult, ToolError> {
    let corrected_mmol = match arguments.units {
        CalciumUnits::Si => {
            let calcium =
                check_range("total_calcium", arguments.total_calcium, 0.5, 5.0, "mmol/L")?;
            let albumin = check_range("albumin", arguments.albumin, 5.0, 70.0, "g/L")?;
            calcium + 0.02 * (40.0 - albumin)
        }
        CalciumUnits::Conventional => {
            let calcium =
                check_range("total_calcium", arguments.total_calcium, 2.0, 20.0, "mg/dL")?;
            let albumin = check_range("albumin", arguments.albumin, 0.5, 7.0, "g/dL")?;
            (calcium + 0.8 * (4.0 - albumin)) / CALCIUM_MG_PER_DL_PER_MMOL_PER_L
        }
    };
    let category = match corrected_mmol {
        c if c < 2.10 => "low",
        c if c > 2.60 => "high",
        _ => "normal",
    };
    Ok(CorrectedCalciumResult {
        units: arguments.units,
        total_calcium: arguments.total_calcium,
        albumin: arguments.albumin,
        corrected_calcium_mmol_per_l: round_to(corrected_mmol, 2),
        corrected_calcium_mg_per_dl: round_to(corrected_mmol * CALCIUM_MG_PER_DL_PER_MMOL_PER_L, 1),
        formula: "Payne 1973: Ca + 0.02 x (40 - albumin g/L) mmol/L; Ca + 0.8 x (4.0 - albumin g/dL) mg/dL",
        reference_range: "2.10-2.60 mmol/L (8.4-10.4 mg/dL)",
        category,
    })
}

// ---------------------------------------------------------------------------
// Nursing scales

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BradenArguments {
    pub sensory_perception: u32,
    pub moisture: u32,
    pub activity: u32,
    pub mobility: u32,
    pub nutrition: u32,
    pub friction_and_shear: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BradenResult {
    pub sensory_perception: u32,
    pub moisture: u32,
    pub activity: u32,
    pub mobility: u32,
    pub nutrition: u32,
    pub friction_and_shear: u32,
    pub total: u32,
    pub rule: &'static str,
    pub risk_category: &'static str,
}

fn braden_schema() -> Value {
    let subscale = |description: &str| json!({"type": "integer", "minimum": 1, "maximum": 4, "description": description});
    object_schema(
        json!({
            "sensory_perception": subscale("1 completely limited .. 4 no impairment"),
            "moisture": subscale("1 constantly moist .. 4 rarely moist"),
            "activity": subscale("1 bedfast .. 4 walks frequently"),
            "mobility": subscale("1 completely immobile .. 4 no limitation"),
            "nutrition": subscale("1 very poor .. 4 excellent"),
            "friction_and_shear": {"type": "integer", "minimum": 1, "maximum": 3, "description": "1 problem, 2 potential problem, 3 no apparent problem"}
        }),
        &[
            "sensory_perception",
            "moisture",
            "activity",
            "mobility",
            "nutrition",
            "friction_and_shear",
        ],
    )
}

fn subscale(field: &str, value: u32, max: u32) -> Result<u32, ToolError> {
    check_range(field, f64::from(value), 1.0, f64::from(max), "points")?;
    Ok(value)
}

pub fn braden_scale(arguments: BradenArguments) -> Result<BradenResult, ToolError> {
    let sensory_perception = subscale("sensory_perception", arguments.sensory_perception, 4)?;
    let moisture = subscale("moisture", arguments.moisture, 4)?;
    let activity = subscale("activity", arguments.activity, 4)?;
    let mobility = subscale("mobility", arguments.mobility, 4)?;
    let nutrition = subscale("nutrition", arguments.nutrition, 4)?;
    let friction_and_shear = subscale("friction_and_shear", arguments.friction_and_shear, 3)?;
    let total =
        sensory_perception + moisture + activity + mobility + nutrition + friction_and_shear;
    let risk_category = match total {
        0..=9 => "very_high",
        10..=12 => "high",
        13..=14 => "moderate",
        15..=18 => "mild",
        _ => "no_risk",
    };
    Ok(BradenResult {
        sensory_perception,
        moisture,
        activity,
        mobility,
        nutrition,
        friction_and_shear,
        total,
        rule: "Braden scale (6-23): <=9 very high, 10-12 high, 13-14 moderate, 15-18 mild, >=19 no risk",
        risk_category,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmbulatoryAid {
    /// None, bed rest, or walks with a nurse's help: 0.
    NoneBedRestOrNurseAssist,
    /// Crutches, cane or walker: 15.
    CrutchesCaneOrWalker,
    /// Clutches the furniture to walk: 30.
    Furniture,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gait {
    /// Normal, bed rest or wheelchair: 0.
    NormalBedRestOrWheelchair,
    /// Weak: 10.
    Weak,
    /// Impaired: 20.
    Impaired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MentalStatus {
    /// Oriented to own ability: 0.
    OrientedToOwnAbility,
    /// Overestimates or forgets limitations: 15.
    OverestimatesOrForgetsLimitations,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MorseArguments {
    pub history_of_falling: bool,
    pub secondary_diagnosis: bool,
    pub ambulatory_aid: AmbulatoryAid,
    pub intravenous_therapy_or_heparin_lock: bool,
    pub gait: Gait,
    pub mental_status: MentalStatus,
}

fn morse_schema() -> Value {
    object_schema(
        json!({
            "history_of_falling": {"type": "boolean", "description": "fall during this admission or within 3 months (25)"},
            "secondary_diagnosis": {"type": "boolean", "description": "more than one medical diagnosis (15)"},
            "ambulatory_aid": {"type": "string", "enum": ["none_bed_rest_or_nurse_assist", "crutches_cane_or_walker", "furniture"], "description": "0 / 15 / 30"},
            "intravenous_therapy_or_heparin_lock": {"type": "boolean", "description": "20"},
            "gait": {"type": "string", "enum": ["normal_bed_rest_or_wheelchair", "weak", "impaired"], "description": "0 / 10 / 20"},
            "mental_status": {"type": "string", "enum": ["oriented_to_own_ability", "overestimates_or_forgets_limitations"], "description": "0 / 15"}
        }),
        &[
            "history_of_falling",
            "secondary_diagnosis",
            "ambulatory_aid",
            "intravenous_therapy_or_heparin_lock",
            "gait",
            "mental_status",
        ],
    )
}

pub fn morse_fall_scale(arguments: MorseArguments) -> Result<ScoreResult, ToolError> {
    let aid_points = match arguments.ambulatory_aid {
        AmbulatoryAid::NoneBedRestOrNurseAssist => 0,
        AmbulatoryAid::CrutchesCaneOrWalker => 15,
        AmbulatoryAid::Furniture => 30,
    };
    let gait_points = match arguments.gait {
        Gait::NormalBedRestOrWheelchair => 0,
        Gait::Weak => 10,
        Gait::Impaired => 20,
    };
    let items = vec![
        item("history of falling", arguments.history_of_falling, 25),
        item("secondary diagnosis", arguments.secondary_diagnosis, 15),
        item("ambulatory aid", aid_points > 0, aid_points),
        item(
            "IV therapy or heparin lock",
            arguments.intravenous_therapy_or_heparin_lock,
            20,
        ),
        item("gait", gait_points > 0, gait_points),
        item(
            "mental status: overestimates or forgets limitations",
            arguments.mental_status == MentalStatus::OverestimatesOrForgetsLimitations,
            15,
        ),
    ];
    let score = total(&items);
    let (risk_category, interpretation) = match score {
        0..=24 => ("low", "standard fall-prevention care"),
        25..=44 => ("moderate", "standard fall-prevention interventions"),
        _ => ("high", "high-risk fall-prevention interventions"),
    };
    Ok(ScoreResult {
        score,
        max_score: 125,
        items,
        rule: "Morse Fall Scale (Morse 1989): 0-24 low, 25-44 moderate, >=45 high (hospitals may set their own cut-offs)",
        risk_category,
        interpretation,
    })
}

#[cfg(test)]
mod tests;
