//! Splitting a thinking model's output into its reasoning (`<think>…</think>`)
//! and its answer, incrementally, so that a stream can carry each part as it
//! is decided and the unary answer is the same splitter fed all at once.
//!
//! The rules, applied the same way however the text is chunked:
//! - Only a `<think>` at the very start of the output opens reasoning (text
//!   before it must be whitespace, which is dropped); a request whose prompt
//!   already ends inside `<think>` (`starts_in_reasoning`) starts in it, and
//!   a repeated `<think>` at its start is dropped too.
//! - Reasoning ends at the first `</think>`; without one, everything after
//!   `<think>` is reasoning. Whitespace around the reasoning and at the
//!   start of the answer after `</think>` is dropped (as chat templates do
//!   when they put the reasoning back into the history).
//! - Output that does not start with `<think>` is all answer, byte for byte;
//!   tags after the reasoning (or in an answer without reasoning) are text.
//! - No part ever carries a partial tag: a possible tag prefix at the end of
//!   a chunk is held back until the next chunk (or `finish`) decides it.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// What one `push` (or `finish`) decided: new reasoning and new answer text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub answer: String,
}

impl ReasoningDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.answer.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace (and perhaps part of `<think>`) so far.
    Start,
    /// Inside `<think>`; `at_start` until the first non-whitespace.
    Reasoning { at_start: bool },
    /// After `</think>`; `at_start` until the first non-whitespace.
    AfterReasoning { at_start: bool },
    /// An answer without reasoning: everything passes through.
    Answer,
}

/// The streaming splitter; see the module docs for its rules.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    starts_in_reasoning: bool,
    /// Text not yet decided: a possible tag prefix, and whitespace that may
    /// be dropped.
    held: String,
}

impl ReasoningSplitter {
    /// `starts_in_reasoning`: the prompt ended inside an open `<think>`
    /// (`ValidGenerateRequest::starts_in_reasoning`).
    pub fn new(starts_in_reasoning: bool) -> Self {
        ReasoningSplitter {
            state: State::Start,
            starts_in_reasoning,
            held: String::new(),
        }
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, text: &str) -> ReasoningDelta {
        let mut delta = ReasoningDelta::default();
        self.held.push_str(text);
        self.advance(&mut delta, false);
        delta
    }

    /// The generation ended: decides what was held back.
    pub fn finish(&mut self) -> ReasoningDelta {
        let mut delta = ReasoningDelta::default();
        self.advance(&mut delta, true);
        delta
    }

    /// Splits a whole output at once: `push` then `finish`.
    pub fn split(text: &str, starts_in_reasoning: bool) -> ReasoningDelta {
        let mut splitter = ReasoningSplitter::new(starts_in_reasoning);
        let mut whole = splitter.push(text);
        let rest = splitter.finish();
        whole.reasoning.push_str(&rest.reasoning);
        whole.answer.push_str(&rest.answer);
        whole
    }

    fn advance(&mut self, delta: &mut ReasoningDelta, at_end: bool) {
        loop {
            match self.state {
                State::Start => {
                    let body = self.held.trim_start();
                    if let Some(rest) = body.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning { at_start: true };
                    } else if !at_end && OPEN.starts_with(body) {
                        // Whitespace and perhaps the start of `<think>`.
                        return;
                    } else if self.starts_in_reasoning {
                        self.state = State::Reasoning { at_start: true };
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning { at_start } => {
                    if at_start {
                        let trimmed = self.held.trim_start();
                        if trimmed.is_empty() {
                            self.held.clear();
                            return;
                        }
                        self.held = trimmed.to_string();
                        self.state = State::Reasoning { at_start: false };
                    }
                    if let Some(end) = self.held.find(CLOSE) {
                        delta.reasoning.push_str(self.held[..end].trim_end());
                        self.held = self.held[end + CLOSE.len()..].to_string();
                        self.state = State::AfterReasoning { at_start: true };
                        continue;
                    }
                    if at_end {
                        delta.reasoning.push_str(self.held.trim_end());
                        self.held.clear();
                        return;
                    }
                    let keep = tag_prefix_start(&self.held, CLOSE);
                    let keep = self.held[..keep].trim_end().len();
                    delta.reasoning.push_str(&self.held[..keep]);
                    self.held.drain(..keep);
                    return;
                }
                State::AfterReasoning { at_start } => {
                    if at_start {
                        let trimmed = self.held.trim_start();
                        if trimmed.is_empty() {
                            self.held.clear();
                            return;
                        }
                        self.held = trimmed.to_string();
                        self.state = State::AfterReasoning { at_start: false };
                    }
                    delta.answer.push_str(&self.held);
                    self.held.clear();
                    return;
                }
                State::Answer => {
                    delta.answer.push_str(&self.held);
                    self.held.clear();
                    return;
                }
            }
        }
    }
}

/// Where the longest suffix of `text` that is a proper prefix of `tag`
/// starts (`text.len()` when there is none).
fn tag_prefix_start(text: &str, tag: &str) -> usize {
    let earliest = text.len().saturating_sub(tag.len() - 1);
    (earliest..text.len())
        .find(|&start| text.is_char_boundary(start) && tag.starts_with(&text[start..]))
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one by one and checks the joined parts, and that the
    /// unary split agrees.
    fn check(chunks: &[&str], starts_in: bool, expect_reasoning: &str, expect_answer: &str) {
        let mut splitter = ReasoningSplitter::new(starts_in);
        let mut reasoning = String::new();
        let mut answer = String::new();
        let mut deltas: Vec<ReasoningDelta> = chunks.iter().map(|c| splitter.push(c)).collect();
        deltas.push(splitter.finish());
        for delta in &deltas {
            reasoning.push_str(&delta.reasoning);
            answer.push_str(&delta.answer);
        }
        assert_eq!(
            (reasoning.as_str(), answer.as_str()),
            (expect_reasoning, expect_answer),
            "chunks {chunks:?}, starts_in {starts_in}"
        );
        let whole = ReasoningSplitter::split(&chunks.concat(), starts_in);
        assert_eq!(
            (whole.reasoning.as_str(), whole.answer.as_str()),
            (expect_reasoning, expect_answer)
        );
        // Deltas only append, so parts equal to the expected ones never
        // carried a partial tag along the way.
    }

    /// Checks `text` whole, split in two at every byte (char) position, and
    /// one character at a time.
    fn check_all_splits(text: &str, starts_in: bool, reasoning: &str, answer: &str) {
        check(&[text], starts_in, reasoning, answer);
        for cut in (0..=text.len()).filter(|&cut| text.is_char_boundary(cut)) {
            check(&[&text[..cut], &text[cut..]], starts_in, reasoning, answer);
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        check(&chars, starts_in, reasoning, answer);
    }

    #[test]
    fn reasoning_then_answer() {
        check_all_splits(
            "<think>\nThe patient has a fever.\n</think>\n\nGive paracetamol.",
            false,
            "The patient has a fever.",
            "Give paracetamol.",
        );
        check_all_splits(
            "  \n<think>a < b</think>answer </think> <think>",
            false,
            "a < b",
            "answer </think> <think>",
        );
    }

    #[test]
    fn chinese_text() {
        check_all_splits(
            "<think>\n患者发热三天。\n</think>\n\n建议复查血常规。",
            false,
            "患者发热三天。",
            "建议复查血常规。",
        );
        check_all_splits(
            "发热<think>不是推理</think>",
            false,
            "",
            "发热<think>不是推理</think>",
        );
    }

    #[test]
    fn no_reasoning_is_all_answer_byte_for_byte() {
        check_all_splits("  Hello <thin", false, "", "  Hello <thin");
        check_all_splits("\n<thin", false, "", "\n<thin");
        check_all_splits("<thinking>", false, "", "<thinking>");
        check_all_splits("", false, "", "");
        check_all_splits("  ", false, "", "  ");
    }

    #[test]
    fn no_closing_tag_is_all_reasoning() {
        check_all_splits(
            "<think>still thinking about 血压 </thi",
            false,
            "still thinking about 血压 </thi",
            "",
        );
        check_all_splits("<think>", false, "", "");
    }

    #[test]
    fn starts_in_reasoning() {
        check_all_splits("Fever.\n</think>\n\nRest.", true, "Fever.", "Rest.");
        check_all_splits("\n<think>Fever.</think>Rest.", true, "Fever.", "Rest.");
        check_all_splits("只有推理", true, "只有推理", "");
        check_all_splits("</think>直接回答", true, "", "直接回答");
        check_all_splits("", true, "", "");
    }

    #[test]
    fn tag_prefixes() {
        assert_eq!(tag_prefix_start("abc</th", CLOSE), 3);
        assert_eq!(tag_prefix_start("abc<", CLOSE), 3);
        assert_eq!(tag_prefix_start("abc", CLOSE), 3);
        assert_eq!(tag_prefix_start("血</", CLOSE), "血".len());
        assert_eq!(tag_prefix_start("", CLOSE), 0);
    }
}
