use super::*;

fn check(
    config: &DeidConfig,
    text: &str,
    record_key: &str,
    expect_text: &str,
    expect_counts: &[(&str, usize)],
) {
    let deidentifier = Deidentifier::new(config).expect("valid config");
    let result = deidentifier.deidentify(text, record_key);
    assert_eq!(result.text, expect_text, "input: {text}");
    let mut counts: Vec<(&str, usize)> = result
        .counts
        .iter()
        .map(|(category, count)| (category.key(), *count))
        .collect();
    counts.sort();
    let mut expect_counts = expect_counts.to_vec();
    expect_counts.sort();
    assert_eq!(counts, expect_counts, "input: {text}");
}

fn fixed_shift(days: i64) -> DeidConfig {
    DeidConfig {
        dates: DateShift::Fixed { days },
        ..DeidConfig::builtin(TagLanguage::En)
    }
}

#[test]
fn builtin_detectors() {
    check(
        &DeidConfig::builtin(TagLanguage::En),
        "ID 11010519491231002X, legacy 110105491231002, cell +86 139 1234 5678, tel 0755-1234567, card 6222 0212 3456 7894, e-mail a.b@example.com.",
        "r",
        "ID [ID], legacy [ID], cell [MOBILE], tel [PHONE], card [BANK_CARD], e-mail [EMAIL].",
        &[
            ("resident_id", 2),
            ("mobile", 1),
            ("landline", 1),
            ("bank_card", 1),
            ("email", 1),
        ],
    );
    check(
        &DeidConfig::builtin(TagLanguage::En),
        "cell 138.1234.5678, office 021 6234 5678, ID 110105-19491231-002X",
        "r",
        "cell [MOBILE], office [PHONE], ID [ID]",
        &[("mobile", 1), ("landline", 1), ("resident_id", 1)],
    );
    // A 19-digit card is found whole (not as an 18-character ID prefix).
    let body = "622202123456789012";
    let card = format!("{body}{}", luhn_check_digit(body).expect("digit"));
    check(
        &DeidConfig::builtin(TagLanguage::Zh),
        &format!("卡号{card}。"),
        "r",
        "卡号[银行卡]。",
        &[("bank_card", 1)],
    );
}

#[test]
fn hard_negatives_are_left_alone() {
    let config = DeidConfig::clinical(7, vec!["张伟".to_owned()]);
    for text in [
        // Lab values, a blood pressure, a dose, a compact date.
        "血红蛋白 128 g/L，血压 130/80 mmHg，阿莫西林 500 mg，19491231 出生。",
        // An 18-digit number with an unknown province and a wrong check character, failing Luhn.
        "订单号 201234567890123456。",
        // A 10-digit number with no inpatient keyword; a 12-digit barcode.
        "标本号 2024001234，条码 123456789012。",
        // A 12-digit number in a longer run is not a mobile.
        "流水号 1381234567812345678 结束",
    ] {
        check(&config, text, "r", text, &[]);
    }
}

#[test]
fn id_with_wrong_check_character_is_still_an_id() {
    check(
        &DeidConfig::builtin(TagLanguage::Zh),
        "身份证110105194912310021",
        "r",
        "身份证[身份证号]",
        &[("resident_id", 1)],
    );
}

#[test]
fn dates_shift_consistently_within_a_record() {
    check(
        &fixed_shift(10),
        "Admitted 2024-02-25, operated 2024/3/1, discharged 2024年3月5日.",
        "r",
        "Admitted 2024-03-06, operated 2024/3/11, discharged 2024年3月15日.",
        &[("date", 3)],
    );
    check(
        &fixed_shift(-1),
        "2024-03-01",
        "r",
        "2024-02-29",
        &[("date", 1)],
    );
    check(
        &fixed_shift(10),
        "seen March 5, 2024, 5 Mar 2024, Sept 25 2023, 2024.3.5 and 2024 年 3 月 5 号",
        "r",
        "seen March 15, 2024, 15 Mar 2024, October 5 2023, 2024.3.15 and 2024 年 3 月 15 号",
        &[("date", 5)],
    );
    // Not a date: month 13; part of a longer number.
    check(
        &fixed_shift(5),
        "2024-13-01 and 12024-01-01",
        "r",
        "2024-13-01 and 12024-01-01",
        &[],
    );
    let deidentifier = Deidentifier::new(&DeidConfig {
        dates: DateShift::PerRecord {
            seed: 42,
            max_days: 365,
        },
        ..DeidConfig::builtin(TagLanguage::En)
    })
    .expect("valid");
    let shifts: Vec<i64> = (0..50)
        .map(|index| deidentifier.date_shift_days(&format!("line-{index}")))
        .collect();
    assert!(
        shifts.iter().all(|days| *days != 0 && days.abs() <= 365),
        "{shifts:?}"
    );
    assert!(
        shifts.iter().any(|days| *days != shifts[0]),
        "shifts differ between records"
    );
    // The same record key always gives the same shift, and the interval survives.
    let shift = deidentifier.date_shift_days("line-3");
    let result = deidentifier.deidentify("in 2024-01-01, out 2024-01-11", "line-3");
    let moved = |date: CivilDate| {
        let moved = date.shifted(shift);
        format!("{:04}-{:02}-{:02}", moved.year, moved.month, moved.day)
    };
    assert_eq!(
        result.text,
        format!(
            "in {}, out {}",
            moved(CivilDate::new(2024, 1, 1).expect("date")),
            moved(CivilDate::new(2024, 1, 11).expect("date"))
        )
    );
}

#[test]
fn records_names_and_addresses() {
    let config = DeidConfig::clinical(1, vec!["张伟".to_owned(), "John Smith".to_owned()]);
    check(
        &DeidConfig {
            dates: DateShift::Keep,
            ..config
        },
        "患者张伟，病案号：1234567，住院号 2024000123，医保卡号：110112345678，家住浙江省杭州市西湖区文三路100号3栋201室。姓名：宋晓东，Mr. Okafor and John Smith live at 221 Baker Street; Johnsmith is not a name.",
        "r",
        "患者[NAME]，病案号：[MRN]，住院号 [INPATIENT_NO]，医保卡号：[INSURANCE_NO]，家住[ADDRESS]。姓名：[NAME]，Mr. [NAME] and [NAME] live at [ADDRESS]; Johnsmith is not a name.",
        &[
            ("name", 4),
            ("medical_record", 1),
            ("inpatient", 1),
            ("insurance", 1),
            ("address", 2),
        ],
    );
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let bad_pattern = DeidConfig {
        record_patterns: vec![RecordPattern {
            category: "mrn".to_owned(),
            tag: "[MRN]".to_owned(),
            pattern: "(".to_owned(),
        }],
        ..DeidConfig::builtin(TagLanguage::En)
    };
    let error = Deidentifier::new(&bad_pattern)
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("record pattern `mrn`"), "{error}");
    let builtin_name = DeidConfig {
        record_patterns: vec![RecordPattern {
            category: "email".to_owned(),
            tag: "[X]".to_owned(),
            pattern: "x".to_owned(),
        }],
        ..DeidConfig::builtin(TagLanguage::En)
    };
    assert!(matches!(
        Deidentifier::new(&builtin_name),
        Err(DeidError::RecordCategory { .. })
    ));
    let short_name = DeidConfig {
        names: vec!["张".to_owned()],
        ..DeidConfig::builtin(TagLanguage::En)
    };
    assert!(matches!(
        Deidentifier::new(&short_name),
        Err(DeidError::NameTooShort { .. })
    ));
}

#[test]
fn civil_date_round_trip() {
    for days in [-25_567, -1, 0, 59, 365, 19_787, 80_000] {
        let date = CivilDate::from_days(days);
        assert_eq!(date.to_days(), days, "{date:?}");
    }
    assert_eq!(
        CivilDate::from_days(0),
        CivilDate {
            year: 1970,
            month: 1,
            day: 1
        }
    );
    assert_eq!(CivilDate::new(2023, 2, 29), None);
}

/// Precision and recall on the labelled synthetic corpus. Recall is what
/// matters: at least 0.99 overall and for IDs, phones, e-mail and bank cards.
#[test]
fn synthetic_corpus_precision_and_recall() {
    let corpus = synthetic::corpus(20_261_123, 3_000);
    let deidentifier = Deidentifier::new(&synthetic::corpus_config(1)).expect("valid config");
    let evaluation = synthetic::evaluate(&deidentifier, &corpus);
    let hard_negatives: usize = corpus.iter().map(|record| record.hard_negatives).sum();
    println!(
        "de-identification on {} synthetic records ({hard_negatives} hard negatives):\n{evaluation}",
        corpus.len()
    );
    for category in [
        Category::ResidentId,
        Category::Mobile,
        Category::Landline,
        Category::Email,
        Category::BankCard,
    ] {
        let scores = evaluation.per_category[&category];
        assert!(
            scores.labelled > 100,
            "{category}: too few labels ({})",
            scores.labelled
        );
        assert!(
            scores.recall() >= 0.99,
            "{category} recall {:.4}",
            scores.recall()
        );
    }
    assert!(
        evaluation.overall.recall() >= 0.99,
        "overall recall {:.4}",
        evaluation.overall.recall()
    );
    // The corpus is a function of its seed.
    assert_eq!(synthetic::corpus(20_261_123, 5), corpus[..5].to_vec());
    // Every label points at the text it labels (spans are byte offsets on char boundaries).
    for record in &corpus {
        for label in &record.labels {
            assert!(
                record
                    .text
                    .get(label.start..label.end)
                    .is_some_and(|s| !s.is_empty())
            );
        }
    }
}

/// The forms outside the detectors' patterns: figures printed, not asserted,
/// so that the closing note can say where recall ends.
#[test]
fn stress_corpus_figures() {
    let corpus = synthetic::stress_corpus(20_261_123, 3_000);
    let deidentifier = Deidentifier::new(&synthetic::corpus_config(1)).expect("valid config");
    let evaluation = synthetic::evaluate(&deidentifier, &corpus);
    println!(
        "de-identification on {} stress records (harder forms mixed in):\n{evaluation}",
        corpus.len()
    );
    assert!(evaluation.overall.labelled > 0);
}
