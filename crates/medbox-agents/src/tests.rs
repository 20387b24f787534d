//! Registry-wide checks: every tool's schema is a JSON object schema whose
//! required fields are among its properties, names are unique, and unknown
//! tools are reported by name.

use serde_json::{Value, json};

use crate::{ToolError, ToolRegistry};

#[test]
fn every_schema_is_an_object_schema() {
    let registry = ToolRegistry::medical();
    for schema in registry.schemas() {
        let name = schema["name"].as_str().expect("name");
        let description = schema["description"].as_str().expect("description");
        assert!(!description.is_empty(), "{name}");
        let parameters = &schema["parameters"];
        assert_eq!(parameters["type"], "object", "{name}");
        assert_eq!(parameters["additionalProperties"], false, "{name}");
        let properties = parameters["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: properties"));
        assert!(!properties.is_empty(), "{name}");
        for (property, property_schema) in properties {
            assert!(property_schema.is_object(), "{name}.{property}");
        }
        for required in parameters["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: required"))
        {
            let required = required.as_str().expect("required name");
            assert!(
                properties.contains_key(required),
                "{name}: required `{required}` is not a property"
            );
        }
    }
}

#[test]
fn registry_lists_every_tool_once() {
    let registry = ToolRegistry::medical();
    let names = registry.names();
    let expected = [
        "anion_gap",
        "bank_card_check",
        "bmi",
        "braden_scale",
        "cha2ds2_vasc",
        "chief_complaint_check",
        "copy_paste_similarity",
        "corrected_calcium",
        "creatinine_clearance_cockcroft_gault",
        "curb_65",
        "deidentify",
        "egfr_ckd_epi_2021",
        "has_bled",
        "icd10_lookup",
        "icd10_search",
        "lab_interpret",
        "lab_unit_convert",
        "medication_check",
        "morse_fall_scale",
        "qtc",
        "record_consistency_check",
        "record_deadline_check",
        "record_required_sections",
        "resident_id_check",
    ];
    assert_eq!(names, expected);
    let all: usize = [
        crate::calculators::tools().len(),
        crate::lab_ranges::tools().len(),
        crate::icd10::tools().len(),
        crate::drug_interactions::tools().len(),
        crate::record_rules::tools().len(),
        crate::identifiers::tools().len(),
    ]
    .iter()
    .sum();
    assert_eq!(all, names.len(), "a tool name is registered twice");
}

#[test]
fn registry_errors_are_for_the_model() {
    let registry = ToolRegistry::medical();
    match registry.call("no_such_tool", &json!({})) {
        Err(ToolError::NotFound { key, hint, .. }) => {
            assert_eq!(key, "no_such_tool");
            assert!(hint.contains("bmi"), "{hint}");
        }
        other => panic!("{other:?}"),
    }
    let not_object = registry.call("bmi", &Value::Null);
    assert!(
        matches!(not_object, Err(ToolError::BadArguments { field, .. }) if field == "arguments")
    );
    let message = registry
        .call("bmi", &json!({"weight_kg": 70}))
        .expect_err("missing field")
        .to_string();
    assert_eq!(
        message,
        "bad argument `height_cm`: missing field `height_cm`"
    );
}

#[test]
fn tools_are_deterministic() {
    let registry = ToolRegistry::medical();
    let arguments = json!({"text": "手机13812345678，邮箱a@b.cn"});
    assert_eq!(
        registry.call("deidentify", &arguments),
        registry.call("deidentify", &arguments)
    );
}
