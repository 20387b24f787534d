//! Incremental detokenisation: turns generated ids into text pieces one token
//! at a time without ever splitting a multi-byte UTF-8 character. A byte-level
//! tokenizer can emit half a Chinese character; its partial bytes decode to
//! U+FFFD, so a piece is held back until the decoded text no longer ends in
//! U+FFFD. Decoding a window (`prefix_offset..`) rather than single tokens also
//! keeps the spaces that SentencePiece-style decoders strip from a lone token.

/// Decodes a run of ids to text (the tokenizer, or a fake in tests).
pub(crate) trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

impl Decode for tokenizers::Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        let tokenizer: &tokenizers::tokenizer::TokenizerImpl<_, _, _, _, _> = self;
        tokenizer
            .decode(ids, true)
            .map_err(|error| error.to_string())
    }
}

pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// Prompt tokens kept as left context, so the first piece decodes as it
/// would inside the full text.
const CONTEXT_TOKENS: usize = 4;

impl IncrementalDecoder {
    /// Starts after `prompt`, whose last few tokens serve as context only.
    pub(crate) fn new(prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDecoder {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one token; returns the text it completes (often empty while a
    /// character is incomplete).
    pub(crate) fn push(&mut self, decoder: &impl Decode, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let prefix_text = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = decoder.decode(&self.ids[self.prefix_offset..])?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(piece) => piece.to_string(),
            // The decoder rewrote earlier text (rare); emit what is new by length.
            None => new_text
                .get(prefix_text.len()..)
                .map(str::to_string)
                .unwrap_or_default(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }

    /// The text still held back at the end of generation (a character that
    /// never completed decodes as U+FFFD).
    pub(crate) fn flush(&mut self, decoder: &impl Decode) -> Result<String, String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = decoder.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new_text
            .strip_prefix(prefix_text.as_str())
            .or_else(|| new_text.get(prefix_text.len()..))
            .unwrap_or_default()
            .to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Each id is one byte (ids ≥ 256 are special and decode to nothing), so
    /// multi-byte characters arrive split across tokens, as with byte-level BPE.
    pub(crate) struct ByteDecoder;

    impl Decode for ByteDecoder {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids
                .iter()
                .filter(|&&id| id < 256)
                .map(|&id| id as u8)
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn check(prompt: &str, generated: &str, expect_pieces: &[&str]) {
        let prompt: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let mut decoder = IncrementalDecoder::new(&prompt);
        let mut pieces = Vec::new();
        for byte in generated.bytes() {
            let piece = decoder.push(&ByteDecoder, u32::from(byte)).unwrap();
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        let rest = decoder.flush(&ByteDecoder).unwrap();
        if !rest.is_empty() {
            pieces.push(rest);
        }
        assert_eq!(pieces, expect_pieces);
    }

    #[test]
    fn ascii_streams_per_token() {
        check("Hi ", "ok!", &["o", "k", "!"]);
    }

    #[test]
    fn chinese_streams_whole_characters() {
        // 发 and 热 are three bytes each.
        check("体温", "发热。", &["发", "热", "。"]);
        check("", "血压", &["血", "压"]);
    }

    #[test]
    fn incomplete_character_is_flushed_at_the_end() {
        let mut decoder = IncrementalDecoder::new(&[]);
        let bytes = "发".as_bytes();
        assert_eq!(decoder.push(&ByteDecoder, u32::from(bytes[0])).unwrap(), "");
        assert_eq!(decoder.push(&ByteDecoder, u32::from(bytes[1])).unwrap(), "");
        assert_eq!(decoder.flush(&ByteDecoder).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn special_tokens_add_no_text() {
        let mut decoder = IncrementalDecoder::new(&[300]);
        assert_eq!(decoder.push(&ByteDecoder, 301).unwrap(), "");
        assert_eq!(decoder.push(&ByteDecoder, u32::from(b'a')).unwrap(), "a");
    }
}
