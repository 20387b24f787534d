use serde_json::{Value, json};

use super::*;

fn call(name: &str, arguments: Value) -> Value {
    crate::ToolRegistry::medical()
        .call(name, &arguments)
        .unwrap_or_else(|error| panic!("{name}({arguments}): {error}"))
}

/// The rule ids of a result's findings, in order.
fn rule_ids(result: &Value) -> Vec<String> {
    result["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["rule_id"].as_str().expect("rule_id").to_owned())
        .collect()
}

fn check_sections(record_type: &str, sections: Value, sex: &str, expect_missing: &[&str]) {
    let result = call(
        "record_required_sections",
        json!({"record_type": record_type, "sections": sections, "patient_sex": sex}),
    );
    let missing: Vec<&str> = result["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["section"].as_str().expect("section"))
        .collect();
    assert_eq!(missing, expect_missing, "{result}");
}

#[test]
fn required_sections_fire_and_do_not_fire() {
    let full = json!({
        "一般项目": "张某，男，56岁", "主诉": "反复胸痛3天", "现病史": "…", "既往史": "…", "个人史": "…",
        "婚育史": "已婚", "家族史": "无", "体格检查": "…", "专科情况": "…", "辅助检查": "…",
        "初步诊断": "胸痛待查", "医师签名": "李医生"
    });
    check_sections("admission_record", full.clone(), "male", &[]);
    // A woman's admission record also needs the menstrual history.
    check_sections(
        "admission_record",
        full.clone(),
        "female",
        &["menstrual_history"],
    );
    let mut gaps = full;
    gaps["家族史"] = json!("  ");
    gaps.as_object_mut().expect("object").remove("专科情况");
    check_sections(
        "admission_record",
        gaps,
        "male",
        &["family_history", "specialty_examination"],
    );
    check_sections(
        "first_progress_note",
        json!({"病例特点": "…", "诊断依据及鉴别诊断": "…", "诊疗计划": "…", "签名": "王"}),
        "male",
        &[],
    );
    check_sections(
        "first_progress_note",
        json!({"Case characteristics": "…", "Plan:": "…"}),
        "male",
        &["diagnostic_reasoning", "physician_signature"],
    );
    check_sections(
        "discharge_record",
        json!({"入院日期": "…", "出院日期": "…", "入院情况": "…", "入院诊断": "…", "诊疗经过": "…", "出院诊断": "…", "出院情况": "…", "出院医嘱": "…", "医师签名": "…"}),
        "female",
        &[],
    );
    check_sections(
        "outpatient_record",
        json!({"就诊时间": "…", "科别": "内科", "主诉": "咳嗽3天", "现病史": "…", "既往史": "…", "查体": "…", "辅助检查": "…", "诊断": "…", "处理": "…"}),
        "female",
        &["physician_signature"],
    );
}

fn check_complaint(text: &str, expect_rules: &[&str]) {
    let result = call("chief_complaint_check", json!({"text": text}));
    assert_eq!(rule_ids(&result), expect_rules, "{text}: {result}");
}

#[test]
fn chief_complaint_rules() {
    check_complaint("反复胸痛3天", &[]);
    check_complaint("发现血压升高5年，头晕2天", &[]);
    check_complaint("咳嗽、咳痰伴发热一周", &[]);
    check_complaint("Cough and fever for 3 days", &[]);
    check_complaint("胸痛", &["CC-DURATION"]);
    check_complaint("高血压10年", &["CC-DIAGNOSIS", "CC-SYMPTOM"]);
    check_complaint("2型糖尿病5年，多饮多尿1月", &["CC-DIAGNOSIS"]);
    check_complaint("Pneumonia for 2 days", &["CC-DIAGNOSIS", "CC-SYMPTOM"]);
    check_complaint(
        "反复咳嗽咳痰10年，加重伴气促、双下肢水肿、夜间不能平卧1周",
        &["CC-LENGTH"],
    );
    let result = call("chief_complaint_check", json!({"text": "反复胸痛3天"}));
    assert_eq!(result["character_count"], 6);
    assert_eq!(result["passed"], true);
    assert_eq!(complaint_length("Cough and fever for 3 days"), 6);
    assert_eq!(complaint_length("咳嗽10天。"), 4);
}

fn check_deadline(
    kind: &str,
    reference: &str,
    written: Option<&str>,
    checked_at: Option<&str>,
    expect_status: &str,
) {
    let mut document = json!({"kind": kind, "reference_time": reference});
    if let Some(written) = written {
        document["written_time"] = json!(written);
    }
    let mut arguments = json!({"documents": [document]});
    if let Some(checked_at) = checked_at {
        arguments["checked_at"] = json!(checked_at);
    }
    let result = call("record_deadline_check", arguments);
    assert_eq!(result["documents"][0]["status"], expect_status, "{result}");
    let expect_findings = usize::from(!matches!(expect_status, "on_time" | "missing_not_yet_due"));
    assert_eq!(
        result["findings"].as_array().expect("findings").len(),
        expect_findings,
        "{result}"
    );
}

#[test]
fn writing_deadlines() {
    check_deadline(
        "admission_record",
        "2024-03-05 08:30",
        Some("2024-03-06 08:30"),
        None,
        "on_time",
    );
    check_deadline(
        "admission_record",
        "2024-03-05 08:30",
        Some("2024-03-06 08:31"),
        None,
        "late",
    );
    check_deadline(
        "first_progress_note",
        "2024-03-05 22:00",
        Some("2024-03-06 05:59"),
        None,
        "on_time",
    );
    check_deadline(
        "first_progress_note",
        "2024-03-05 22:00",
        Some("2024-03-06 06:30"),
        None,
        "late",
    );
    check_deadline(
        "attending_first_round",
        "2024-02-28 10:00",
        Some("2024-03-01 09:00"),
        None,
        "on_time",
    );
    check_deadline(
        "rescue_record",
        "2024-03-05T03:00:00+08:00",
        Some("2024-03-05T09:10:00+08:00"),
        None,
        "late",
    );
    // Offsets are honoured: 01:00Z is 09:00+08:00, within 6 h of 03:00+08:00.
    check_deadline(
        "rescue_record",
        "2024-03-05T03:00:00+08:00",
        Some("2024-03-05T01:00:00Z"),
        None,
        "on_time",
    );
    check_deadline(
        "operation_record",
        "2024-03-05 12:00",
        Some("2024-03-05 11:00"),
        None,
        "written_before_reference",
    );
    check_deadline(
        "discharge_record",
        "2024-03-05 12:00",
        None,
        Some("2024-03-06 13:00"),
        "missing_overdue",
    );
    check_deadline(
        "death_record",
        "2024-03-05 12:00",
        None,
        Some("2024-03-05 20:00"),
        "missing_not_yet_due",
    );
    check_deadline(
        "discharge_record",
        "2024-03-05 12:00",
        None,
        None,
        "missing",
    );
    let result = call(
        "record_deadline_check",
        json!({"documents": [{"kind": "admission_record", "reference_time": "2024-12-31 23:00"}]}),
    );
    assert_eq!(result["documents"][0]["deadline"], "2025-01-01 23:00");
    let bad = crate::ToolRegistry::medical().call(
        "record_deadline_check",
        &json!({"documents": [{"kind": "admission_record", "reference_time": "2024-02-30 08:00"}]}),
    );
    assert!(
        matches!(bad, Err(ToolError::BadArguments { field, .. }) if field == "documents[0].reference_time")
    );
}

#[test]
fn timestamps_round_trip() {
    for text in [
        "1970-01-01 00:00",
        "2000-02-29 12:34",
        "2024-12-31 23:59",
        "2100-03-01 00:00+08:00",
    ] {
        let parsed = parse_timestamp("t", text).expect("parses");
        assert_eq!(format_timestamp(parsed), text);
    }
}

fn check_consistency(sex: &str, sections: Value, expect_rules: &[&str]) {
    let result = call(
        "record_consistency_check",
        json!({"patient_sex": sex, "sections": sections}),
    );
    assert_eq!(rule_ids(&result), expect_rules, "{result}");
}

#[test]
fn sex_contradictions() {
    check_consistency(
        "male",
        json!({"现病史": "患者诉下腹痛2天，B超示子宫增大"}),
        &["CONSISTENCY-SEX"],
    );
    check_consistency(
        "male",
        json!({"hpi": "Prostate enlarged on ultrasound."}),
        &[],
    );
    check_consistency(
        "female",
        json!({"诊断": "前列腺增生"}),
        &["CONSISTENCY-SEX"],
    );
    check_consistency(
        "female",
        json!({"hpi": "Pregnant, 12 weeks; ovarian cyst."}),
        &[],
    );
    check_consistency(
        "M",
        json!({"history": "No history of pregnancy."}),
        &["CONSISTENCY-SEX"],
    );
}

#[test]
fn laterality_contradictions() {
    check_consistency(
        "female",
        json!({"主诉": "左膝疼痛3月", "手术记录": "行右膝关节置换术"}),
        &["CONSISTENCY-LATERALITY"],
    );
    check_consistency(
        "female",
        json!({"主诉": "左膝疼痛3月", "手术记录": "行左侧膝关节置换术"}),
        &[],
    );
    check_consistency(
        "male",
        json!({"diagnosis": "Right lung nodule", "ct": "Nodule in the left lung upper lobe"}),
        &["CONSISTENCY-LATERALITY"],
    );
    // Bilateral disease and a section naming both sides are not contradictions.
    check_consistency(
        "male",
        json!({"查体": "双下肢水肿", "护理记录": "左下肢水肿"}),
        &[],
    );
    check_consistency(
        "male",
        json!({"主诉": "右膝疼痛1月", "查体": "右膝肿胀，左膝正常"}),
        &[],
    );
}

#[test]
fn copy_paste() {
    let note = "患者神志清，精神可，诉胸闷较前好转，无发热、咳嗽，饮食睡眠可，二便正常。查体：双肺呼吸音清，未闻及干湿啰音。";
    let copied = "患者神志清，精神可，诉胸闷较前好转，无发热、咳嗽，饮食睡眠可，二便正常。查体：双肺呼吸音清，未闻及干湿啰音。继续当前治疗。";
    let different = "今日患者出现发热，体温38.5℃，伴咳嗽咳黄痰，双肺可闻及湿啰音，复查血常规白细胞升高，调整抗生素。";
    let same = call(
        "copy_paste_similarity",
        json!({"text_a": note, "text_b": copied}),
    );
    assert_eq!(same["suspected_copy"], true, "{same}");
    assert_eq!(rule_ids(&same), ["COPY-PASTE"]);
    let other = call(
        "copy_paste_similarity",
        json!({"text_a": note, "text_b": different}),
    );
    assert_eq!(other["suspected_copy"], false, "{other}");
    assert_eq!(ngram_jaccard("abcd", "abcd", 2).0, 1.0);
    // {ab, bc, cd} vs {ab, bc, ce}: 2 shared of 4.
    assert_eq!(ngram_jaccard("abcd", "abce", 2).0, 0.5);
    assert_eq!(ngram_jaccard("", "", 3).0, 0.0);
    let lowered = call(
        "copy_paste_similarity",
        json!({"text_a": note, "text_b": different, "threshold": 0.0}),
    );
    assert_eq!(lowered["suspected_copy"], true);
}
