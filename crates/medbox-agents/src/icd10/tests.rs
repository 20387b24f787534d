use serde_json::json;

use super::*;

#[test]
fn bundled_table_parses() {
    let table = codes().expect("icd10.psv parses");
    assert!(table.len() >= 150, "{} codes", table.len());
}

fn check_lookup(code: &str, expect_code: &str, expect_zh: &str) {
    let result = icd10_lookup(LookupArguments {
        code: code.to_owned(),
    })
    .unwrap_or_else(|error| panic!("{code}: {error}"));
    assert_eq!(result.code, expect_code);
    assert_eq!(result.title_zh, expect_zh);
}

#[test]
fn lookup_by_code() {
    check_lookup("I10", "I10", "原发性高血压");
    check_lookup("e11.9", "E11.9", "2型糖尿病，无并发症");
    check_lookup("E119", "E11.9", "2型糖尿病，无并发症");
    check_lookup(" j18.9 ", "J18.9", "肺炎");
    let with_category = icd10_lookup(LookupArguments {
        code: "N18.5".into(),
    })
    .expect("N18.5");
    assert!(
        with_category.category.is_none(),
        "N18 itself is not bundled"
    );
    let category = icd10_lookup(LookupArguments { code: "I48".into() }).expect("I48");
    assert!(category.subcodes.is_empty());
}

#[test]
fn lookup_errors_name_the_problem() {
    match icd10_lookup(LookupArguments {
        code: "E11.8".into(),
    }) {
        Err(ToolError::NotFound { key, hint, .. }) => {
            assert_eq!(key, "E11.8");
            assert!(hint.contains("E11.9"), "{hint}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        icd10_lookup(LookupArguments {
            code: "Q99.9".into()
        }),
        Err(ToolError::NotFound { .. })
    ));
    assert!(
        matches!(icd10_lookup(LookupArguments { code: "高血压".into() }), Err(ToolError::BadArguments { field, .. }) if field == "code")
    );
}

fn check_search(query: &str, expect_codes: &[&str]) {
    let result = crate::ToolRegistry::medical()
        .call("icd10_search", &json!({"query": query, "limit": 50}))
        .expect("search");
    let found: Vec<&str> = result["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| m["code"].as_str().expect("code"))
        .collect();
    for code in expect_codes {
        assert!(found.contains(code), "{query}: {code} not in {found:?}");
    }
    if expect_codes.is_empty() {
        assert!(found.is_empty(), "{query}: {found:?}");
    }
}

#[test]
fn search_in_both_languages() {
    check_search("heart failure", &["I50.9"]);
    check_search("type 2 diabetes renal", &["E11.2"]);
    check_search("糖尿病", &["E10.9", "E11.9", "E11.2", "O24.4"]);
    check_search("2型糖尿病 肾", &["E11.2"]);
    check_search("冠心病", &["I25.1"]);
    check_search("E11", &["E11.1", "E11.9"]);
    check_search("2型糖尿病肾病", &["E11.2"]);
    check_search("xenotransplant", &[]);
}
