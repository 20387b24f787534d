//! Patient context: a FHIR R4 Bundle (Patient, Condition, MedicationStatement,
//! AllergyIntolerance, Observation) parsed into a [`PatientRecord`], and the
//! context tools through which an agent reads it: [`SUMMARY_TOOL`] (age, sex,
//! conditions, allergies, current drugs, latest observations) and
//! [`EGFR_TOOL`] (eGFR by CKD-EPI 2021 from the latest serum creatinine).
//!
//! Only what the tools read is parsed; other resource types and fields are
//! ignored. A bundle that is not JSON, not a `Bundle`, or has an entry of a
//! known type whose fields do not have FHIR's shape is a [`BundleError`]
//! naming the entry (its index and resource type) and the field.
//!
//! **Architecture Invariant:** the tools stay deterministic: the date ages are
//! computed at ([`CivilDate`]) is given by the caller, never read from a clock.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::calculators::{CreatinineUnit, EgfrArguments, egfr_ckd_epi_2021};
use crate::context::{ContextTool, ToolFuture};
use crate::{Sex, ToolError, object_schema};

/// The context tool that reads the patient's summary.
pub const SUMMARY_TOOL: &str = "patient_summary";
/// The context tool that computes the patient's eGFR from the latest creatinine.
pub const EGFR_TOOL: &str = "patient_egfr";
/// Every patient tool's name, for spec validation.
pub const TOOL_NAMES: [&str; 2] = [SUMMARY_TOOL, EGFR_TOOL];

/// LOINC codes of serum creatinine: mass (mg/dL) and moles (µmol/L).
const CREATININE_LOINC: [&str; 2] = ["2160-0", "14682-9"];
/// Largest bundle accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 2 * 1024 * 1024;

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("patient_bundle_json is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("patient_bundle_json is not JSON: {0}")]
    NotJson(String),
    #[error("patient_bundle_json: resourceType must be \"Bundle\", found {0}")]
    NotABundle(String),
    #[error("patient_bundle_json: entry[{index}] ({resource_type}): {reason}")]
    Entry {
        index: usize,
        resource_type: String,
        reason: String,
    },
    #[error("patient_bundle_json: entry[{index}] (Patient): a bundle holds one patient")]
    SecondPatient { index: usize },
}

pub use medbox_deid::CivilDate;

/// What the tools read from a bundle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatientRecord {
    pub sex: Option<Sex>,
    pub birth_date: Option<CivilDate>,
    pub conditions: Vec<ConditionEntry>,
    pub medications: Vec<MedicationEntry>,
    pub allergies: Vec<AllergyEntry>,
    pub observations: Vec<ObservationEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConditionEntry {
    pub code: Option<String>,
    pub name: String,
    pub clinical_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MedicationEntry {
    pub name: String,
    pub status: String,
    pub dosage: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AllergyEntry {
    pub substance: String,
    pub criticality: Option<String>,
    pub reactions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservationEntry {
    pub code: Option<String>,
    pub name: String,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub value_text: Option<String>,
    pub effective: Option<String>,
}

// The FHIR shapes read, as far as the tools need them.

#[derive(Deserialize)]
struct Coding {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    display: Option<String>,
}

#[derive(Deserialize)]
struct CodeableConcept {
    #[serde(default)]
    coding: Vec<Coding>,
    #[serde(default)]
    text: Option<String>,
}

impl CodeableConcept {
    fn name(&self) -> Option<String> {
        self.text
            .clone()
            .or_else(|| self.coding.iter().find_map(|coding| coding.display.clone()))
            .or_else(|| self.coding.iter().find_map(|coding| coding.code.clone()))
    }

    fn code(&self) -> Option<String> {
        self.coding.iter().find_map(|coding| coding.code.clone())
    }

    fn has_loinc(&self, codes: &[&str]) -> bool {
        self.coding.iter().any(|coding| {
            coding
                .system
                .as_deref()
                .is_none_or(|system| system.contains("loinc"))
                && coding
                    .code
                    .as_deref()
                    .is_some_and(|code| codes.contains(&code))
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FhirPatient {
    #[serde(default)]
    gender: Option<String>,
    #[serde(default)]
    birth_date: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FhirCondition {
    code: CodeableConcept,
    #[serde(default)]
    clinical_status: Option<CodeableConcept>,
}

#[derive(Deserialize)]
struct Reference {
    #[serde(default)]
    display: Option<String>,
}

#[derive(Deserialize)]
struct Dosage {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FhirMedicationStatement {
    status: String,
    #[serde(default)]
    medication_codeable_concept: Option<CodeableConcept>,
    #[serde(default)]
    medication_reference: Option<Reference>,
    #[serde(default)]
    dosage: Vec<Dosage>,
}

#[derive(Deserialize)]
struct Reaction {
    #[serde(default)]
    manifestation: Vec<CodeableConcept>,
}

#[derive(Deserialize)]
struct FhirAllergy {
    code: CodeableConcept,
    #[serde(default)]
    criticality: Option<String>,
    #[serde(default)]
    reaction: Vec<Reaction>,
}

#[derive(Deserialize)]
struct Quantity {
    value: f64,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FhirObservation {
    code: CodeableConcept,
    #[serde(default)]
    value_quantity: Option<Quantity>,
    #[serde(default)]
    value_string: Option<String>,
    #[serde(default)]
    effective_date_time: Option<String>,
}

/// Parses a FHIR R4 Bundle; see the module documentation.
pub fn parse_bundle(text: &str) -> Result<PatientRecord, BundleError> {
    if text.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            max: MAX_BUNDLE_BYTES,
        });
    }
    let bundle: Value =
        serde_json::from_str(text).map_err(|error| BundleError::NotJson(error.to_string()))?;
    match bundle.get("resourceType") {
        Some(Value::String(kind)) if kind == "Bundle" => {}
        Some(other) => return Err(BundleError::NotABundle(other.to_string())),
        None => return Err(BundleError::NotABundle("nothing".to_owned())),
    }
    let entries = match bundle.get("entry") {
        None => return Ok(PatientRecord::default()),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(BundleError::Entry {
                index: 0,
                resource_type: "none".to_owned(),
                reason: "`entry` must be an array".to_owned(),
            });
        }
    };
    let mut record = PatientRecord::default();
    let mut seen_patient = false;
    for (index, entry) in entries.iter().enumerate() {
        let entry_error = |resource_type: &str, reason: String| BundleError::Entry {
            index,
            resource_type: resource_type.to_owned(),
            reason,
        };
        let Some(resource) = entry.get("resource") else {
            return Err(entry_error("none", "has no `resource`".to_owned()));
        };
        let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
            return Err(entry_error(
                "none",
                "`resource.resourceType` must be a string".to_owned(),
            ));
        };
        let fail = |reason: String| entry_error(resource_type, reason);
        match resource_type {
            "Patient" => {
                if seen_patient {
                    return Err(BundleError::SecondPatient { index });
                }
                seen_patient = true;
                let patient: FhirPatient = typed(resource).map_err(fail)?;
                record.sex = match patient.gender.as_deref() {
                    Some("female") => Some(Sex::Female),
                    Some("male") => Some(Sex::Male),
                    Some("other" | "unknown") | None => None,
                    Some(other) => {
                        return Err(fail(format!(
                            "gender: `{other}` is not one of male, female, other, unknown"
                        )));
                    }
                };
                record.birth_date =
                    match patient.birth_date.as_deref() {
                        None => None,
                        Some(text) => Some(CivilDate::from_iso(text).ok_or_else(|| {
                            fail(format!("birthDate: `{text}` is not a FHIR date"))
                        })?),
                    };
            }
            "Condition" => {
                let condition: FhirCondition = typed(resource).map_err(fail)?;
                record.conditions.push(ConditionEntry {
                    code: condition.code.code(),
                    name: condition
                        .code
                        .name()
                        .ok_or_else(|| fail("code: has no text, display or code".to_owned()))?,
                    clinical_status: condition.clinical_status.and_then(|status| status.code()),
                });
            }
            "MedicationStatement" => {
                let statement: FhirMedicationStatement = typed(resource).map_err(fail)?;
                let name = statement
                    .medication_codeable_concept
                    .and_then(|concept| concept.name())
                    .or_else(|| {
                        statement
                            .medication_reference
                            .and_then(|reference| reference.display)
                    })
                    .ok_or_else(|| {
                        fail(
                            "medication[x]: needs medicationCodeableConcept or a medicationReference with a display"
                                .to_owned(),
                        )
                    })?;
                record.medications.push(MedicationEntry {
                    name,
                    status: statement.status,
                    dosage: statement.dosage.into_iter().find_map(|dosage| dosage.text),
                });
            }
            "AllergyIntolerance" => {
                let allergy: FhirAllergy = typed(resource).map_err(fail)?;
                record.allergies.push(AllergyEntry {
                    substance: allergy
                        .code
                        .name()
                        .ok_or_else(|| fail("code: has no text, display or code".to_owned()))?,
                    criticality: allergy.criticality,
                    reactions: allergy
                        .reaction
                        .iter()
                        .flat_map(|reaction| &reaction.manifestation)
                        .filter_map(CodeableConcept::name)
                        .collect(),
                });
            }
            "Observation" => {
                let observation: FhirObservation = typed(resource).map_err(fail)?;
                let creatinine = observation.code.has_loinc(&CREATININE_LOINC);
                record.observations.push(ObservationEntry {
                    code: if creatinine {
                        observation
                            .code
                            .coding
                            .iter()
                            .find_map(|coding| {
                                coding
                                    .code
                                    .clone()
                                    .filter(|code| CREATININE_LOINC.contains(&code.as_str()))
                            })
                            .or_else(|| observation.code.code())
                    } else {
                        observation.code.code()
                    },
                    name: observation
                        .code
                        .name()
                        .ok_or_else(|| fail("code: has no text, display or code".to_owned()))?,
                    value: observation.value_quantity.as_ref().map(|q| q.value),
                    unit: observation
                        .value_quantity
                        .as_ref()
                        .and_then(|q| q.unit.clone().or_else(|| q.code.clone())),
                    value_text: observation.value_string,
                    effective: observation.effective_date_time,
                });
            }
            _ => {}
        }
    }
    Ok(record)
}

/// Deserializes a resource; the error names the field path.
fn typed<T: serde::de::DeserializeOwned>(resource: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(resource).map_err(|error| {
        let path = error.path().to_string();
        let reason = error.inner().to_string();
        if path == "." {
            reason
        } else {
            format!("{path}: {reason}")
        }
    })
}

impl PatientRecord {
    pub fn age_years(&self, on: CivilDate) -> Option<i32> {
        self.birth_date
            .map(|birth| i32::try_from(birth.years_until(on)).unwrap_or(i32::MAX))
    }

    /// Medications still taken (`active`, `intended`, `on-hold` excluded: not taken now).
    pub fn current_medications(&self) -> impl Iterator<Item = &MedicationEntry> {
        self.medications
            .iter()
            .filter(|medication| matches!(medication.status.as_str(), "active" | "intended"))
    }

    /// The most recent observation of serum creatinine with a value.
    pub fn latest_creatinine(&self) -> Option<&ObservationEntry> {
        self.observations
            .iter()
            .filter(|observation| {
                observation.value.is_some()
                    && observation
                        .code
                        .as_deref()
                        .is_some_and(|code| CREATININE_LOINC.contains(&code))
            })
            .max_by(|a, b| a.effective.cmp(&b.effective))
    }

    /// The summary [`SUMMARY_TOOL`] answers with.
    pub fn summary(&self, on: CivilDate) -> Value {
        json!({
            "age_years": self.age_years(on),
            "sex": self.sex,
            "conditions": self.conditions.iter().map(|c| json!({
                "name": c.name, "code": c.code, "clinical_status": c.clinical_status,
            })).collect::<Vec<_>>(),
            "allergies": self.allergies.iter().map(|a| json!({
                "substance": a.substance, "criticality": a.criticality, "reactions": a.reactions,
            })).collect::<Vec<_>>(),
            "current_medications": self.current_medications().map(|m| json!({
                "name": m.name, "dosage": m.dosage,
            })).collect::<Vec<_>>(),
            "latest_observations": self.latest_observations().iter().map(|o| json!({
                "name": o.name, "code": o.code, "value": o.value, "unit": o.unit,
                "value_text": o.value_text, "effective": o.effective,
            })).collect::<Vec<_>>(),
        })
    }

    /// The newest observation of each code (or name), in bundle order.
    fn latest_observations(&self) -> Vec<&ObservationEntry> {
        let mut latest: Vec<&ObservationEntry> = Vec::new();
        for observation in &self.observations {
            let key = |o: &ObservationEntry| o.code.clone().unwrap_or_else(|| o.name.clone());
            match latest.iter_mut().find(|kept| key(kept) == key(observation)) {
                Some(kept) if kept.effective < observation.effective => *kept = observation,
                Some(_) => {}
                None => latest.push(observation),
            }
        }
        latest
    }

    /// eGFR by CKD-EPI 2021 from the latest creatinine, sex and age on `on`.
    pub fn egfr(&self, on: CivilDate) -> Result<Value, ToolError> {
        let missing = |what: &'static str, hint: &str| ToolError::NotFound {
            what,
            key: "patient".to_owned(),
            hint: hint.to_owned(),
        };
        let sex = self.sex.ok_or_else(|| {
            missing(
                "sex",
                "the patient's gender is not male or female in the bundle",
            )
        })?;
        let age = self
            .age_years(on)
            .ok_or_else(|| missing("birth date", "the bundle's Patient has no birthDate"))?;
        let creatinine = self.latest_creatinine().ok_or_else(|| {
            missing(
                "serum creatinine",
                "no Observation with LOINC 2160-0 or 14682-9 and a valueQuantity",
            )
        })?;
        let unit = match creatinine.code.as_deref() {
            Some("14682-9") => CreatinineUnit::MicromolesPerLitre,
            _ => match creatinine.unit.as_deref() {
                Some(unit) if unit.contains("mol") => CreatinineUnit::MicromolesPerLitre,
                _ => CreatinineUnit::MilligramsPerDecilitre,
            },
        };
        let result = egfr_ckd_epi_2021(EgfrArguments {
            sex,
            age_years: f64::from(age),
            serum_creatinine: creatinine.value.unwrap_or_default(),
            creatinine_unit: unit,
        })?;
        let mut value =
            serde_json::to_value(result).map_err(|error| ToolError::ResultEncoding {
                tool: EGFR_TOOL,
                reason: error.to_string(),
            })?;
        if let Value::Object(map) = &mut value {
            map.insert("creatinine_date".to_owned(), json!(creatinine.effective));
        }
        Ok(value)
    }
}

/// The patient tools of one run: they read `record`, or say that the run has
/// no patient when it is `None`; ages are computed on `today`.
pub fn patient_tools(
    record: Option<Arc<PatientRecord>>,
    today: CivilDate,
) -> Vec<Arc<dyn ContextTool>> {
    [PatientToolKind::Summary, PatientToolKind::Egfr]
        .into_iter()
        .map(|kind| {
            Arc::new(PatientTool {
                record: record.clone(),
                today,
                kind,
            }) as Arc<dyn ContextTool>
        })
        .collect()
}

#[derive(Clone, Copy)]
enum PatientToolKind {
    Summary,
    Egfr,
}

struct PatientTool {
    record: Option<Arc<PatientRecord>>,
    today: CivilDate,
    kind: PatientToolKind,
}

impl PatientTool {
    fn answer(&self, arguments: &Value) -> Result<Value, ToolError> {
        if arguments.as_object().is_none_or(|map| !map.is_empty()) {
            return Err(ToolError::bad(
                "arguments",
                "this tool takes no arguments: pass {}",
            ));
        }
        let record = self.record.as_ref().ok_or_else(|| ToolError::NotFound {
            what: "patient record",
            key: "patient_bundle_json".to_owned(),
            hint: "this run was given no patient bundle; use the input alone".to_owned(),
        })?;
        match self.kind {
            PatientToolKind::Summary => Ok(record.summary(self.today)),
            PatientToolKind::Egfr => record.egfr(self.today),
        }
    }
}

impl ContextTool for PatientTool {
    fn name(&self) -> &str {
        match self.kind {
            PatientToolKind::Summary => SUMMARY_TOOL,
            PatientToolKind::Egfr => EGFR_TOOL,
        }
    }

    fn description(&self) -> &str {
        match self.kind {
            PatientToolKind::Summary => {
                "The patient's record from the run's FHIR bundle: age, sex, conditions, allergies, current medications and latest observations."
            }
            PatientToolKind::Egfr => {
                "The patient's eGFR (CKD-EPI 2021) from the latest serum creatinine in the run's FHIR bundle, with the KDIGO G stage."
            }
        }
    }

    fn parameters_schema(&self) -> Value {
        object_schema(json!({}), &[])
    }

    fn call<'a>(&'a self, arguments: &'a Value) -> ToolFuture<'a> {
        let answer = self.answer(arguments);
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests;
