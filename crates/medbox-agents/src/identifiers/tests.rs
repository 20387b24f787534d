use serde_json::json;

use super::*;

fn check_id(id: &str, expect_valid: bool, expect_errors: &[&str]) {
    let result = check_resident_id(id);
    assert_eq!(result.valid, expect_valid, "{id}: {result:?}");
    assert_eq!(
        result.errors.len(),
        expect_errors.len(),
        "{id}: {:?}",
        result.errors
    );
    for (error, expected) in result.errors.iter().zip(expect_errors) {
        assert!(
            error.contains(expected),
            "{id}: `{error}` should mention `{expected}`"
        );
    }
}

#[test]
fn resident_id_check_digit() {
    // The GB 11643-1999 worked example: check character X.
    check_id("11010519491231002X", true, &[]);
    check_id("310115198507154324", true, &[]);
    // One digit changed: the check character no longer matches.
    check_id("11010519491231003X", false, &["check character"]);
    check_id("110105194912310021", false, &["expected X"]);
    check_id(
        "11010519490231002X",
        false,
        &["birth date", "check character"],
    );
    check_id(
        "99010519491231002X",
        false,
        &["province", "check character"],
    );
    check_id("1101051949123100", false, &["expected 18"]);
    check_id("11010519491231002Y", false, &["expected 18"]);
    assert_eq!(resident_id_check_character("11010519491231002"), Some('X'));
    assert_eq!(resident_id_check_character("1101051949123100"), None);
}

#[test]
fn resident_id_fields() {
    let result = resident_id_check(ResidentIdArguments {
        id_number: "11010519491231002x".to_owned(),
    })
    .expect("parses");
    assert_eq!(result.province, Some("北京"));
    assert_eq!(result.birth_date.as_deref(), Some("1949-12-31"));
    // Sequence 002: even, so female.
    assert_eq!(result.sex, Some(Sex::Female));
    assert_eq!(result.form, Some("18_digit"));
    // Legacy 15-digit: 110105 491231 002 → 1949-12-31, upgraded with its check character.
    let legacy = check_resident_id("110105491231002");
    assert!(legacy.valid, "{legacy:?}");
    assert_eq!(legacy.birth_date.as_deref(), Some("1949-12-31"));
    assert_eq!(
        legacy.upgraded_18_digit.as_deref(),
        Some("11010519491231002X")
    );
    let male = check_resident_id("110105491231003");
    assert_eq!(male.sex, Some(Sex::Male));
}

#[test]
fn luhn() {
    let cases = [
        ("4111111111111111", true),
        ("4111111111111112", false),
        ("6222021234567894", true),
        ("6222021234567890", false),
        ("0", true),
        ("", false),
        ("12a4", false),
    ];
    for (digits, expect) in cases {
        assert_eq!(luhn_valid(digits), expect, "{digits}");
    }
    let result = bank_card_check(BankCardArguments {
        card_number: "4111 1111 1111 1111".to_owned(),
    })
    .expect("parses");
    assert!(result.luhn_valid && result.plausible_length);
}

fn check_deidentify(
    text: &str,
    language: TagLanguage,
    expect_text: &str,
    expect_counts: &[(&str, usize)],
) {
    let result = deidentify(DeidentifyArguments {
        text: text.to_owned(),
        tag_language: language,
    })
    .expect("deidentify");
    assert_eq!(result.text, expect_text);
    for (category, count) in expect_counts {
        assert_eq!(
            result.counts[category], *count,
            "count of {category} in {:?}",
            result.counts
        );
    }
    assert_eq!(
        result.total,
        expect_counts.iter().map(|(_, count)| count).sum::<usize>()
    );
}

#[test]
fn deidentify_mixed_chinese_and_english() {
    check_deidentify(
        "患者张某，身份证号11010519491231002X，手机13812345678，家属电话010-62345678；Patient e-mail zhang.san@example.com, card 6222 0212 3456 7894, mobile +86 139 1234 5678.",
        TagLanguage::Zh,
        "患者张某，身份证号[身份证号]，手机[手机号]，家属电话[电话]；Patient e-mail [邮箱], card [银行卡], mobile [手机号].",
        &[
            ("resident_id", 1),
            ("mobile", 2),
            ("landline", 1),
            ("email", 1),
            ("bank_card", 1),
        ],
    );
    check_deidentify(
        "ID 11010519491231002X; tel 0755-1234567; cell 8613912345678.",
        TagLanguage::En,
        "ID [ID]; tel [PHONE]; cell [MOBILE].",
        &[("resident_id", 1), ("landline", 1), ("mobile", 1)],
    );
}

#[test]
fn deidentify_leaves_clinical_numbers() {
    // Lab values, dates, a 10-digit inpatient number and a 12-digit number
    // that fails Luhn are not identifiers.
    let text =
        "2024-03-05 血红蛋白 128 g/L，住院号 2024001234，血压 130/80 mmHg，标本号 123456789012。";
    check_deidentify(text, TagLanguage::Zh, text, &[]);
    // A 19-digit run is not a mobile number hiding inside a longer number.
    let long = "流水号 1381234567812345678 结束";
    let result = deidentify(DeidentifyArguments {
        text: long.to_owned(),
        tag_language: TagLanguage::Zh,
    })
    .expect("deidentify");
    assert_eq!(result.counts["mobile"], 0);
}

#[test]
fn deidentify_masks_id_with_wrong_check_digit() {
    // Recall first: a plausible ID with a typo in its check digit is masked.
    check_deidentify(
        "身份证110105194912310021",
        TagLanguage::Zh,
        "身份证[身份证号]",
        &[("resident_id", 1)],
    );
}

#[test]
fn deidentify_through_registry() {
    let registry = crate::ToolRegistry::medical();
    let result = registry
        .call(
            "deidentify",
            &json!({"text": "call 13812345678", "tag_language": "en"}),
        )
        .expect("call");
    assert_eq!(result["text"], "call [MOBILE]");
    assert_eq!(result["counts"]["mobile"], 1);
}
