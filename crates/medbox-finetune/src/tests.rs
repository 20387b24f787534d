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

// The protocol, hyper-parameters and manifests.

fn check_event(line: &str, expect: Result<TrainerEvent, &str>) {
    let parsed = TrainerEvent::parse_line(line).map_err(|error| error.to_string());
    match (&parsed, &expect) {
        (Ok(event), Ok(expected)) => {
            assert_eq!(event, expected, "{line}");
            // What a trainer writes, medboxd reads back the same.
            assert_eq!(
                TrainerEvent::parse_line(&event.to_line()).as_ref(),
                Ok(event)
            );
        }
        (Err(message), Err(needle)) => {
            assert!(
                message.contains(needle),
                "`{message}` should contain `{needle}`"
            )
        }
        _ => panic!("{line}: got {parsed:?}, expected {expect:?}"),
    }
}

#[test]
fn trainer_event_lines() {
    check_event(
        r#"{"event":"started","total_steps":120}"#,
        Ok(TrainerEvent::Started {
            total_steps: 120,
            resumed_from_step: 0,
        }),
    );
    check_event(
        r#" {"event":"progress","step":10,"total_steps":120,"epoch":0.25,"loss":2.5,"learning_rate":0.0002,"tokens_per_second":812.5,"extra":"ignored"} "#,
        Ok(TrainerEvent::Progress {
            step: 10,
            total_steps: 120,
            epoch: 0.25,
            loss: 2.5,
            learning_rate: 2e-4,
            tokens_per_second: 812.5,
        }),
    );
    check_event(
        r#"{"event":"eval","step":20,"eval_loss":1.75}"#,
        Ok(TrainerEvent::Eval {
            step: 20,
            eval_loss: 1.75,
        }),
    );
    check_event(
        r#"{"event":"checkpoint","step":20,"path":"checkpoints/step-20"}"#,
        Ok(TrainerEvent::Checkpoint {
            step: 20,
            path: "checkpoints/step-20".into(),
        }),
    );
    check_event(
        r#"{"event":"succeeded","output_dir":"output","metrics":{"eval_loss":0.5}}"#,
        Ok(TrainerEvent::Succeeded {
            output_dir: "output".into(),
            metrics: BTreeMap::from([("eval_loss".to_owned(), 0.5)]),
        }),
    );
    check_event(
        r#"{"event":"failed","reason":"out of GPU memory: lower batch_size"}"#,
        Ok(TrainerEvent::Failed {
            reason: "out of GPU memory: lower batch_size".into(),
        }),
    );
    check_event(r#"{"event":"exploded"}"#, Err("unknown variant `exploded`"));
    check_event(r#"{"step":1}"#, Err("missing field `event`"));
    check_event("loss=2.5", Err("not a trainer event line"));
    check_event(
        r#"{"event":"progress","step":121,"total_steps":120,"epoch":1,"loss":1,"learning_rate":0,"tokens_per_second":1}"#,
        Err("past `total_steps`"),
    );
    check_event(
        r#"{"event":"progress","step":1,"total_steps":120,"epoch":1,"loss":1,"learning_rate":-1,"tokens_per_second":1}"#,
        Err("cannot be negative"),
    );
    check_event(
        r#"{"event":"started","total_steps":10,"resumed_from_step":11}"#,
        Err("`resumed_from_step`"),
    );
}

fn sample_spec() -> JobSpec {
    JobSpec {
        protocol_version: protocol::PROTOCOL_VERSION,
        job_id: "job_0123456789ab".into(),
        method: Method::Lora,
        base_model: ModelRef {
            name: "tiny".into(),
            path: "/var/lib/medbox/models/tiny".into(),
        },
        teacher_model: None,
        dataset: DatasetRef {
            id: "ds_0123456789ab".into(),
            name: "lab-flags".into(),
            sha256: "ab".repeat(32),
            format: "messages".into(),
            train_file: "/var/lib/medbox/datasets/ds_0123456789ab/train.jsonl".into(),
            eval_file: "/var/lib/medbox/datasets/ds_0123456789ab/eval.jsonl".into(),
            train_examples: 95,
            eval_examples: 5,
        },
        hyperparameters: Hyperparameters::defaults(Method::Lora),
        seed: 42,
        checkpoint_every: 50,
        device: "cpu".into(),
        checkpoints_dir: "/var/lib/medbox/jobs/job_0123456789ab/checkpoints".into(),
        output_dir: "/var/lib/medbox/jobs/job_0123456789ab/output".into(),
        output_name: "tiny-lab-flags".into(),
    }
}

#[test]
fn job_spec_round_trips_and_refuses_other_versions() {
    let spec = sample_spec();
    let text = spec.to_json();
    assert!(text.contains("\"method\": \"lora\""), "{text}");
    assert!(text.contains("\"r\": 16"), "{text}");
    assert!(!text.contains("distill"), "{text}");
    assert_eq!(JobSpec::from_json(&text), Ok(spec.clone()));
    assert_eq!(spec.dataset_format(), Some(DatasetFormat::Messages));
    let newer = text.replace("\"protocol_version\": 1", "\"protocol_version\": 2");
    assert_eq!(
        JobSpec::from_json(&newer),
        Err(ProtocolError::VersionMismatch {
            found: 2,
            expected: 1
        })
    );
    assert!(matches!(
        JobSpec::from_json("{}"),
        Err(ProtocolError::BadSpec(_))
    ));
}

#[test]
fn hyperparameter_defaults_per_method() {
    let lora = Hyperparameters::defaults(Method::Lora);
    assert_eq!(lora.learning_rate, 2e-4);
    let adapter = lora.lora.as_ref().unwrap();
    assert_eq!(
        (adapter.r, adapter.alpha, adapter.dropout),
        (16, 32.0, 0.05)
    );
    assert_eq!(adapter.target_modules, ["all-linear"]);
    assert!(lora.distill.is_none());
    let full = Hyperparameters::defaults(Method::Full);
    assert_eq!(full.learning_rate, 1e-5);
    assert!(full.lora.is_none() && full.distill.is_none());
    let distill = Hyperparameters::defaults(Method::Distill);
    let settings = distill.distill.as_ref().unwrap();
    assert_eq!((settings.ratio, settings.temperature), (0.5, 2.0));
    assert_eq!(Method::Lora.output_kind(), OutputKind::Adapter);
    assert_eq!(Method::Distill.output_kind(), OutputKind::Merged);
    assert_eq!("distill".parse::<Method>(), Ok(Method::Distill));
    assert_eq!(
        "qlora".parse::<Method>().unwrap_err().to_string(),
        "`method` must be one of lora, full, distill; got `qlora`"
    );
}

fn check_overrides(
    method: Method,
    overrides: HyperparameterOverrides,
    expect: Result<fn(&Hyperparameters) -> bool, &str>,
) {
    match (Hyperparameters::resolve(method, &overrides), expect) {
        (Ok(resolved), Ok(holds)) => assert!(holds(&resolved), "{overrides:?} → {resolved:?}"),
        (Err(error), Err(message)) => assert_eq!(error.to_string(), message, "{overrides:?}"),
        (got, _) => panic!("{overrides:?}: unexpected {got:?}"),
    }
}

#[test]
fn hyperparameter_overrides_are_checked_by_field() {
    use HyperparameterOverrides as O;
    check_overrides(
        Method::Lora,
        O {
            epochs: Some(5),
            learning_rate: Some(1e-3),
            lora_r: Some(8),
            ..O::default()
        },
        Ok(|h| h.epochs == 5 && h.learning_rate == 1e-3 && h.lora.as_ref().unwrap().r == 8),
    );
    check_overrides(
        Method::Full,
        O {
            epochs: Some(0),
            ..O::default()
        },
        Err("`epochs` must be between 1 and 1000, got 0"),
    );
    check_overrides(
        Method::Full,
        O {
            learning_rate: Some(0.0),
            ..O::default()
        },
        Err("`learning_rate` must be > 0 and ≤ 1, got 0"),
    );
    check_overrides(
        Method::Full,
        O {
            learning_rate: Some(f64::NAN),
            ..O::default()
        },
        Err("`learning_rate` must be > 0 and ≤ 1, got NaN"),
    );
    check_overrides(
        Method::Full,
        O {
            lora_r: Some(8),
            ..O::default()
        },
        Err("`lora_r` applies only to method lora, and this job's method is full"),
    );
    check_overrides(
        Method::Lora,
        O {
            distill_temperature: Some(4.0),
            ..O::default()
        },
        Err("`distill_temperature` applies only to method distill, and this job's method is lora"),
    );
    check_overrides(
        Method::Distill,
        O {
            distill_ratio: Some(1.5),
            ..O::default()
        },
        Err("`distill_ratio` must be between 0 and 1, got 1.5"),
    );
    check_overrides(
        Method::Distill,
        O {
            distill_ratio: Some(0.7),
            ..O::default()
        },
        Ok(|h| h.distill.as_ref().unwrap().ratio == 0.7),
    );
}

#[test]
fn manifest_lists_every_file_and_catches_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), "{}").unwrap();
    std::fs::create_dir(dir.path().join("extra")).unwrap();
    std::fs::write(dir.path().join("extra/notes.txt"), "abc").unwrap();
    std::fs::write(dir.path().join(manifest::MANIFEST_FILE), "ignored").unwrap();
    let files = manifest::hash_folder(dir.path()).unwrap();
    let listed: Vec<(&str, u64)> = files.iter().map(|f| (f.path.as_str(), f.bytes)).collect();
    assert_eq!(listed, [("adapter_config.json", 2), ("extra/notes.txt", 3)]);
    assert_eq!(
        files[1].sha256,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let spec = sample_spec();
    let manifest = ModelManifest {
        format: manifest::MANIFEST_FORMAT.into(),
        name: spec.output_name.clone(),
        version: 1,
        kind: OutputKind::Adapter,
        method: spec.method,
        base_model: spec.base_model.clone(),
        teacher_model: None,
        dataset: manifest::ManifestDataset {
            id: spec.dataset.id.clone(),
            name: spec.dataset.name.clone(),
            sha256: spec.dataset.sha256.clone(),
        },
        hyperparameters: spec.hyperparameters.clone(),
        seed: spec.seed,
        metrics: BTreeMap::from([("eval_loss".to_owned(), 0.25)]),
        job_id: spec.job_id.clone(),
        created_at_ms: 1_700_000_000_000,
        files,
    };
    assert_eq!(
        ModelManifest::from_json(&manifest.to_json()).unwrap(),
        manifest
    );
    manifest::verify_folder(dir.path(), &manifest).unwrap();
    std::fs::write(dir.path().join("extra/notes.txt"), "abd").unwrap();
    let error = manifest::verify_folder(dir.path(), &manifest).unwrap_err();
    assert_eq!(
        error.to_string(),
        "`extra/notes.txt` differs from the manifest (its SHA-256 changed)"
    );
    std::fs::remove_file(dir.path().join("extra/notes.txt")).unwrap();
    let error = manifest::verify_folder(dir.path(), &manifest).unwrap_err();
    assert!(error.to_string().contains("(missing)"), "{error}");
}
