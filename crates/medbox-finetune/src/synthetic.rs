//! A synthetic medical task for demos and acceptance tests: a lab result
//! (`血钾 6.1 mmol/L`) → its flag and phrase (`H 偏高`, `L 偏低`, `N 正常`).
//!
//! Deterministic: the same seed gives the same examples on any machine.
//! Deliberately easy: values are drawn well away from the reference limits
//! (potassium 3.5–5.5, fasting glucose 3.9–6.1 mmol/L), so that the flag
//! follows from the value's leading digit; two decimals give 600 distinct
//! prompts, so held-out examples are plentiful. A small model learns it in a
//! few dozen steps; a model that has not learnt it answers ~0%.
//! No patient data: every value is drawn here.

/// One example: the user's message and the expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabExample {
    pub prompt: String,
    pub answer: String,
}

/// A lab test: name, unit, and the value ranges drawn for each flag, in
/// hundredths of the unit (low, normal, high).
struct LabTest {
    name: &'static str,
    unit: &'static str,
    ranges: [(u32, u32); 3],
}

const TESTS: [LabTest; 2] = [
    LabTest {
        name: "血钾",
        unit: "mmol/L",
        ranges: [(200, 299), (400, 499), (600, 699)],
    },
    LabTest {
        name: "空腹血糖",
        unit: "mmol/L",
        ranges: [(200, 299), (500, 599), (900, 999)],
    },
];

const FLAGS: [&str; 3] = ["L 偏低", "N 正常", "H 偏高"];

/// `count` examples drawn with `seed`.
pub fn lab_flag_examples(seed: u64, count: usize) -> Vec<LabExample> {
    let mut generator = medbox_deid::SplitMix64::new(seed);
    let mut next = move || generator.next_u64();
    (0..count)
        .map(|_| {
            let test = &TESTS[(next() % TESTS.len() as u64) as usize];
            let flag = (next() % 3) as usize;
            let (low, high) = test.ranges[flag];
            let hundredths = low + (next() % u64::from(high - low + 1)) as u32;
            let value = format!("{}.{:02}", hundredths / 100, hundredths % 100);
            LabExample {
                prompt: format!("{} {value} {}", test.name, test.unit),
                answer: FLAGS[flag].to_owned(),
            }
        })
        .collect()
}

/// Examples as a `messages` JSONL dataset (one conversation a line).
pub fn to_messages_jsonl(examples: &[LabExample]) -> String {
    let mut text = String::new();
    for example in examples {
        let line = serde_json::json!({
            "messages": [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.answer},
            ]
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_flagged_by_range() {
        let examples = lab_flag_examples(7, 200);
        assert_eq!(examples, lab_flag_examples(7, 200));
        assert_ne!(examples, lab_flag_examples(8, 200));
        for flag in FLAGS {
            assert!(examples.iter().any(|example| example.answer == flag));
        }
        let first = &examples[0];
        assert!(first.prompt.ends_with(" mmol/L"), "{first:?}");
        let jsonl = to_messages_jsonl(&examples[..2]);
        assert_eq!(jsonl.lines().count(), 2);
        assert!(jsonl.contains(r#""role":"user""#), "{jsonl}");
    }
}
