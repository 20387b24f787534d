use std::collections::BTreeMap;

use medbox_deid::{Category, DeidConfig, Deidentifier};

use super::*;

fn report(format: DatasetFormat, text: &str) -> DatasetReport {
    parse_dataset(text.as_bytes(), format, &Limits::STANDARD)
}

fn accepted(format: DatasetFormat, text: &str) -> ValidDataset {
    match report(format, text).verdict {
        Verdict::Accepted(dataset) => dataset,
        Verdict::Rejected(rejection) => panic!("rejected: {:?}", rejection.first_errors),
    }
}

/// The second line of a dataset whose first line is valid is refused with `expect`.
fn check_bad_line(
    format: DatasetFormat,
    good_line: &str,
    bad_line: &str,
    expect: ErrorKind,
    expect_message: &str,
) {
    let text = format!("{good_line}\n{bad_line}\n{good_line}\n");
    let report = report(format, &text);
    assert_eq!(report.summary.lines, 3);
    assert_eq!(report.summary.valid, 2, "{bad_line}");
    assert_eq!(report.summary.invalid, 1, "{bad_line}");
    assert_eq!(
        report.summary.invalid_by_reason,
        BTreeMap::from([(expect, 1)])
    );
    let Verdict::Rejected(rejection) = report.verdict else {
        panic!("accepted a dataset with a bad line: {bad_line}");
    };
    assert_eq!(rejection.n_errors, 1);
    assert_eq!(rejection.first_errors.len(), 1);
    let error = &rejection.first_errors[0];
    assert_eq!(error.line, 2, "{error}");
    assert_eq!(error.reason.kind(), expect, "{error}");
    let message = error.to_string();
    assert!(
        message.contains(expect_message),
        "`{message}` should contain `{expect_message}`"
    );
}

const GOOD_CHAT: &str =
    r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
const GOOD_ALPACA: &str = r#"{"instruction":"flag","input":"K 6.1","output":"high"}"#;
const GOOD_TEXT: &str = r#"{"text":"potassium 6.1 mmol/L is high"}"#;

#[test]
fn each_bad_line_reason_with_its_line_number() {
    use DatasetFormat::{Alpaca, Messages, Text};
    let cases: &[(DatasetFormat, &str, &str, ErrorKind, &str)] = &[
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages": ["#,
            ErrorKind::BadJson,
            "line 2: bad JSON",
        ),
        (
            Messages,
            GOOD_CHAT,
            "[1, 2]",
            ErrorKind::NotAnObject,
            "JSON object",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"conversations": []}"#,
            ErrorKind::MissingField,
            "missing field `messages`",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"user"},{"role":"assistant","content":"x"}]}"#,
            ErrorKind::MissingField,
            "`messages[0].content`",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"user","content":3},{"role":"assistant","content":"x"}]}"#,
            ErrorKind::WrongType,
            "`messages[0].content` must be a string",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"doctor","content":"x"},{"role":"assistant","content":"y"}]}"#,
            ErrorKind::UnknownRole,
            "unknown role `doctor`",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"患者张伟 13812345678","content":"x"}]}"#,
            ErrorKind::UnknownRole,
            "(not shown)",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"  "}]}"#,
            ErrorKind::EmptyAssistantTurn,
            "`messages[1].content`: empty assistant turn",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[{"role":"assistant","content":"x"},{"role":"user","content":"y"}]}"#,
            ErrorKind::NotEndingWithAssistant,
            "ends with a user turn",
        ),
        (
            Messages,
            GOOD_CHAT,
            r#"{"messages":[]}"#,
            ErrorKind::EmptyConversation,
            "no turns",
        ),
        (
            Alpaca,
            GOOD_ALPACA,
            r#"{"instruction":"flag","input":"K 6.1"}"#,
            ErrorKind::MissingField,
            "`output`",
        ),
        (
            Alpaca,
            GOOD_ALPACA,
            r#"{"instruction":"flag","output":""}"#,
            ErrorKind::EmptyAssistantTurn,
            "`output`",
        ),
        (
            Alpaca,
            GOOD_ALPACA,
            r#"{"instruction":"","input":"","output":"x"}"#,
            ErrorKind::EmptyText,
            "`instruction` is empty",
        ),
        (
            Alpaca,
            GOOD_ALPACA,
            r#"{"instruction":"a","output":"b","history":[["q"]]}"#,
            ErrorKind::WrongType,
            "`history[0]`",
        ),
        (
            Alpaca,
            GOOD_ALPACA,
            r#"{"instruction":"a","output":"b","history":[["q",""]]}"#,
            ErrorKind::EmptyAssistantTurn,
            "`history[0][1]`",
        ),
        (
            Text,
            GOOD_TEXT,
            r#"{"content":"x"}"#,
            ErrorKind::MissingField,
            "`text`",
        ),
        (
            Text,
            GOOD_TEXT,
            r#"{"text":""}"#,
            ErrorKind::EmptyText,
            "`text` is empty",
        ),
    ];
    for (format, good, bad, kind, message) in cases {
        check_bad_line(*format, good, bad, *kind, message);
    }
    // Over the length limit, in characters (not bytes): 5 Chinese characters against a limit of 4.
    let limits = Limits {
        max_characters: 4,
        max_detailed_errors: 10,
    };
    let report = parse_dataset(
        "{\"text\":\"abcd\"}\n{\"text\":\"血红蛋白高\"}\n".as_bytes(),
        DatasetFormat::Text,
        &limits,
    );
    let Verdict::Rejected(rejection) = report.verdict else {
        panic!("accepted")
    };
    assert_eq!(rejection.first_errors[0].line, 2);
    assert_eq!(
        rejection.first_errors[0].reason,
        LineErrorReason::TooLong {
            characters: 5,
            limit: 4
        }
    );
    // Invalid UTF-8.
    let report = parse_dataset(
        b"{\"text\":\"a\"}\n{\"text\":\"\xff\"}\n",
        DatasetFormat::Text,
        &Limits::STANDARD,
    );
    assert_eq!(
        report.summary.invalid_by_reason,
        BTreeMap::from([(ErrorKind::BadEncoding, 1)])
    );
}

#[test]
fn every_line_is_read_and_only_the_first_errors_kept_in_detail() {
    let mut text = String::new();
    for index in 0..250 {
        text.push_str(if index % 2 == 0 {
            GOOD_TEXT
        } else {
            "not json"
        });
        text.push('\n');
    }
    text.push_str("\n   \n");
    let limits = Limits {
        max_characters: 1000,
        max_detailed_errors: 3,
    };
    let report = parse_dataset(text.as_bytes(), DatasetFormat::Text, &limits);
    assert_eq!(report.summary.lines, 252);
    assert_eq!(report.summary.blank_lines, 2);
    assert_eq!(report.summary.valid, 125);
    assert_eq!(report.summary.invalid, 125);
    let Verdict::Rejected(rejection) = report.verdict else {
        panic!("accepted")
    };
    assert_eq!(rejection.n_errors, 125);
    let lines: Vec<usize> = rejection
        .first_errors
        .iter()
        .map(|error| error.line)
        .collect();
    assert_eq!(lines, [2, 4, 6]);
    // No example at all is a rejection too.
    let empty = report_empty();
    assert!(matches!(
        empty.verdict,
        Verdict::Rejected(Rejection {
            no_examples: true,
            n_errors: 0,
            ..
        })
    ));
}

fn report_empty() -> DatasetReport {
    report(DatasetFormat::Messages, "\n")
}

#[test]
fn each_format_parses() {
    let chat = accepted(
        DatasetFormat::Messages,
        &format!(
            "\u{feff}{GOOD_CHAT}\r\n{}\n",
            r#"{"id":7,"messages":[{"role":"system","content":"You are a nurse."},{"role":"user","content":"K 6.1?"},{"role":"assistant","content":"High."}]}"#
        ),
    );
    let examples: Vec<(usize, &Example)> = chat.examples().collect();
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[1].0, 2);
    let Example::Chat(turns) = examples[1].1 else {
        panic!("chat")
    };
    let roles: Vec<Role> = turns.iter().map(|turn| turn.role).collect();
    assert_eq!(roles, [Role::System, Role::User, Role::Assistant]);

    let alpaca = accepted(
        DatasetFormat::Alpaca,
        r#"{"instruction":"Flag the value.","input":"K 6.1 mmol/L","output":"H","system":"Be brief.","history":[["Na 140?","N"]]}"#,
    );
    let (_, example) = alpaca.examples().next().expect("one example");
    let expect = Example::Chat(vec![
        ChatTurn {
            role: Role::System,
            content: "Be brief.".to_owned(),
        },
        ChatTurn {
            role: Role::User,
            content: "Na 140?".to_owned(),
        },
        ChatTurn {
            role: Role::Assistant,
            content: "N".to_owned(),
        },
        ChatTurn {
            role: Role::User,
            content: "Flag the value.\n\nK 6.1 mmol/L".to_owned(),
        },
        ChatTurn {
            role: Role::Assistant,
            content: "H".to_owned(),
        },
    ]);
    assert_eq!(example, &expect);

    let text = accepted(DatasetFormat::Text, GOOD_TEXT);
    let (_, example) = text.examples().next().expect("one example");
    assert_eq!(
        example,
        &Example::Text("potassium 6.1 mmol/L is high".to_owned())
    );
    assert_eq!("alpaca".parse::<DatasetFormat>(), Ok(DatasetFormat::Alpaca));
    assert!("sharegpt".parse::<DatasetFormat>().is_err());
}

fn deidentifier() -> Deidentifier {
    Deidentifier::new(&DeidConfig::clinical(3, vec!["张伟".to_owned()])).expect("valid config")
}

#[test]
fn deidentification_of_every_field_with_counts() {
    let dataset = accepted(
        DatasetFormat::Messages,
        concat!(
            r#"{"messages":[{"role":"system","content":"病案号：1234567"},{"role":"user","content":"患者张伟，身份证11010519491231002X，手机13812345678，2024-03-01入院，2024-03-11出院。"},{"role":"assistant","content":"已记录，邮箱 a.b@example.com。"}]}"#,
            "\n",
            r#"{"messages":[{"role":"user","content":"2024-03-01"},{"role":"assistant","content":"卡号 6222 0212 3456 7894"}]}"#,
            "\n"
        ),
    );
    let deidentifier = deidentifier();
    let dataset = deidentify_dataset(dataset, &deidentifier);
    let counts: BTreeMap<&str, usize> = dataset
        .counts()
        .iter()
        .map(|(category, count)| (category.key(), *count))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("bank_card", 1),
            ("date", 3),
            ("email", 1),
            ("medical_record", 1),
            ("mobile", 1),
            ("name", 1),
            ("resident_id", 1),
        ])
    );
    let stored = dataset.canonical_jsonl();
    for secret in [
        "张伟",
        "11010519491231002X",
        "13812345678",
        "a.b@example.com",
        "1234567",
        "6222 0212",
        "2024-03-01",
    ] {
        assert!(
            !stored.contains(secret),
            "`{secret}` reached the stored dataset: {stored}"
        );
    }
    assert_eq!(stored.lines().count(), 2);
    // Dates in one line move together: the 10-day stay is still 10 days.
    let Example::Chat(turns) = &dataset.examples()[0] else {
        panic!("chat")
    };
    let shift = deidentifier.date_shift_days("line-1");
    let admitted = medbox_deid::CivilDate::new(2024, 3, 1)
        .expect("date")
        .shifted(shift);
    let discharged = admitted.shifted(10);
    let written = |date: medbox_deid::CivilDate| {
        format!("{:04}-{:02}-{:02}", date.year, date.month, date.day)
    };
    assert!(
        turns[1].content.contains(&format!(
            "{}入院，{}出院",
            written(admitted),
            written(discharged)
        )),
        "{}",
        turns[1].content
    );
    assert_eq!(dataset.source_lines(), [1, 2]);
    assert_eq!(dataset.counts().get(&Category::Landline), None);
}

fn deidentified(text: &str) -> DeidentifiedDataset {
    deidentify_dataset(accepted(DatasetFormat::Text, text), &deidentifier())
}

fn text_lines(n: usize) -> String {
    (0..n)
        .map(|index| format!("{{\"text\":\"example {index}\"}}\n"))
        .collect()
}

#[test]
fn sha256_is_stable() {
    let dataset = deidentified(r#"{"text":"a"}"#);
    assert_eq!(dataset.canonical_jsonl(), "{\"text\":\"a\"}\n");
    // printf '{"text":"a"}\n' | sha256sum
    assert_eq!(
        dataset.sha256(),
        "314d3a971f6f7c623e7dceb546ddde0687e41e9df02b0edc52ddb4a7a77f57e3"
    );
    // Spacing and key order of the upload do not change the canonical form.
    let chat =
        |text: &str| deidentify_dataset(accepted(DatasetFormat::Messages, text), &deidentifier());
    let compact =
        chat(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#);
    let spaced = chat(
        r#"{ "messages" : [ {"content":"q", "role":"user"}, {"content":"a","role":"assistant"} ] }"#,
    );
    assert_eq!(compact.sha256(), spaced.sha256());
    assert_eq!(
        deidentified(&text_lines(30)).sha256(),
        deidentified(&text_lines(30)).sha256()
    );
}

#[test]
fn split_sizes() {
    let cases: &[(usize, u8, usize)] = &[
        (1, 5, 0),
        (2, 5, 1),
        (10, 5, 1),
        (30, 5, 2),
        (100, 5, 5),
        (100, 10, 10),
        (100, 50, 50),
        (3, 50, 2),
        (1000, 1, 10),
    ];
    for (n, percent, expect_eval) in cases {
        let dataset = deidentified(&text_lines(*n));
        let split = split_dataset(
            &dataset,
            &SplitConfig {
                eval_percent: *percent,
                seed: 1,
            },
        )
        .expect("split");
        assert_eq!(split.eval.len(), *expect_eval, "{n} examples at {percent}%");
        assert_eq!(split.train.len() + split.eval.len(), *n);
        let mut all: Vec<usize> = split.train.iter().chain(&split.eval).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..*n).collect::<Vec<_>>());
        assert_eq!(split.dataset_sha256, dataset.sha256());
    }
    let dataset = deidentified(&text_lines(10));
    for percent in [0, 51] {
        assert_eq!(
            split_dataset(
                &dataset,
                &SplitConfig {
                    eval_percent: percent,
                    seed: 1
                }
            ),
            Err(SplitError::EvalPercent(percent))
        );
    }
    assert_eq!(SplitConfig::with_seed(9).eval_percent, DEFAULT_EVAL_PERCENT);
}

#[test]
fn split_is_deterministic_for_a_seed() {
    let dataset = deidentified(&text_lines(200));
    let split = |seed| {
        split_dataset(
            &dataset,
            &SplitConfig {
                eval_percent: 10,
                seed,
            },
        )
        .expect("split")
    };
    assert_eq!(split(7), split(7));
    assert_ne!(split(7).eval, split(8).eval);
    // Reordering the lines moves no example to the other side.
    let lines: Vec<String> = (0..200)
        .map(|index| format!("{{\"text\":\"example {index}\"}}\n"))
        .collect();
    let reversed = deidentified(&lines.iter().rev().cloned().collect::<String>());
    let reversed_split = split_dataset(
        &reversed,
        &SplitConfig {
            eval_percent: 10,
            seed: 7,
        },
    )
    .expect("split");
    let eval_texts = |dataset: &DeidentifiedDataset, split: &DatasetSplit| {
        let mut texts: Vec<String> = split
            .eval
            .iter()
            .map(|index| dataset.examples()[*index].canonical_json())
            .collect();
        texts.sort();
        texts
    };
    assert_eq!(
        eval_texts(&dataset, &split(7)),
        eval_texts(&reversed, &reversed_split)
    );
}
