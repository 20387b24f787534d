//! Chat prompts: the model's own Jinja chat template, rendered the way
//! transformers' `apply_chat_template` renders it, so that a chat gives the
//! model exactly the tokens it was trained on.
//!
//! The template comes from `chat_template.jinja` beside the tokenizer when
//! there is one, else from `tokenizer_config.json` `chat_template` (a string,
//! or the named-list form, of which the `default` entry is used). It is
//! compiled once, at load, with transformers' settings: `trim_blocks` and
//! `lstrip_blocks`, Python string/dict methods (`minijinja_contrib::pycompat`),
//! loop controls, a `tojson` filter that writes what Python's `json.dumps`
//! writes, and a `raise_exception` global. A render sees `messages`,
//! `add_generation_prompt` (always true here), `tools` and `documents` (none),
//! and the special tokens of `tokenizer_config.json` (`bos_token`,
//! `eos_token`, …). The rendered prompt is tokenised without adding special
//! tokens again: the template writes them.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::constraint::Constraint;
use crate::error::{LoadError, ValidationError};
use crate::validation::SamplingParams;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

/// A chat request as a caller states it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// What the answer (after any reasoning) must match; `None`: free text.
    pub constraint: Option<Constraint>,
}

/// The roles a message may have.
pub(crate) const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The special tokens transformers hands to a template, by attribute name.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template and what it renders with.
pub(crate) struct ChatTemplate {
    environment: Environment<'static>,
    special_tokens: Vec<(&'static str, String)>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Reads and compiles the chat template of the model in `dir`; `None`
    /// when it has none.
    pub(crate) fn load(dir: &Path) -> Result<Option<ChatTemplate>, LoadError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str::<serde_json::Value>(&text).map_err(|error| {
                LoadError::InvalidConfig {
                    path: config_path.clone(),
                    message: error.to_string(),
                }
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(source) => {
                return Err(LoadError::Io {
                    path: config_path,
                    source,
                });
            }
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, path) = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => (source, jinja_path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match template_from_config(&config, &config_path)? {
                    Some(source) => (source, config_path),
                    None => return Ok(None),
                }
            }
            Err(source) => {
                return Err(LoadError::Io {
                    path: jinja_path,
                    source,
                });
            }
        };
        let special_tokens = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| Some((name, token_text(config.get(name)?)?)))
            .collect();
        ChatTemplate::compile(source, special_tokens)
            .map(Some)
            .map_err(|error| LoadError::ChatTemplate {
                path,
                message: error.to_string(),
            })
    }

    pub(crate) fn compile(
        source: String,
        special_tokens: Vec<(&'static str, String)>,
    ) -> Result<ChatTemplate, Error> {
        let mut environment = Environment::new();
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.set_keep_trailing_newline(false);
        environment.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_filter("tojson", tojson);
        environment.add_function("raise_exception", raise_exception);
        environment.add_template_owned(TEMPLATE_NAME, source.clone())?;
        Ok(ChatTemplate {
            environment,
            special_tokens,
            source,
        })
    }

    /// Whether the template itself writes `<think>`.
    pub(crate) fn mentions_think(&self) -> bool {
        self.source.contains("<think>")
    }

    /// Renders `messages` with `add_generation_prompt = true`.
    pub(crate) fn render(&self, messages: &[ChatMessage]) -> Result<String, Error> {
        self.render_with(messages, true)
    }

    /// Renders `messages`, with the generation prompt or without (training
    /// renders a conversation's turns one prefix at a time).
    pub(crate) fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|message| {
                Value::from_iter([
                    ("role", Value::from(message.role.as_str())),
                    ("content", Value::from(message.content.as_str())),
                ])
            })
            .collect();
        let mut context: Vec<(&str, Value)> = self
            .special_tokens
            .iter()
            .map(|(name, token)| (*name, Value::from(token.as_str())))
            .collect();
        context.extend([
            ("messages", Value::from(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        self.environment
            .get_template(TEMPLATE_NAME)?
            .render(Value::from_iter(context))
    }
}

/// Checks what a chat request must have whatever the template.
pub(crate) fn check_messages(messages: &[ChatMessage]) -> Result<(), ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::EmptyMessages);
    }
    for (index, message) in messages.iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(ValidationError::MessageRole {
                index,
                role: message.role.clone(),
            });
        }
    }
    Ok(())
}

/// Checks the messages and renders them; errors name the field at fault.
pub(crate) fn render_messages(
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<String, ValidationError> {
    check_messages(messages)?;
    template
        .render(messages)
        .map_err(|error| ValidationError::ChatTemplate(render_error_message(&error)))
}

/// `raise_exception("…")` gives its message alone; other errors say what
/// went wrong and where.
fn render_error_message(error: &Error) -> String {
    match (error.kind(), error.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => error.to_string(),
    }
}

/// Whether a rendered prompt ends inside an open `<think>`, as templates
/// that start the answer's reasoning themselves (DeepSeek-R1, Qwen3
/// thinking) leave it.
pub(crate) fn ends_in_reasoning(prompt: &str) -> bool {
    prompt.trim_end().ends_with("<think>")
}

fn template_from_config(
    config: &serde_json::Value,
    path: &Path,
) -> Result<Option<String>, LoadError> {
    let invalid = |message: &str| LoadError::ChatTemplate {
        path: PathBuf::from(path),
        message: message.to_string(),
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
        Some(serde_json::Value::Array(entries)) => {
            for entry in entries {
                let name = entry.get("name").and_then(|name| name.as_str());
                let source = entry.get("template").and_then(|source| source.as_str());
                match (name, source) {
                    (Some("default"), Some(source)) => return Ok(Some(source.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => return Err(invalid("each entry needs a `name` and a `template`")),
                }
            }
            Ok(None)
        }
        Some(_) => Err(invalid("`chat_template` must be a string or a list")),
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or an
/// object with `content`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(object) => object.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, with those keyword arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(indent) if indent.is_none() => None,
        Some(indent) => match (indent.as_i64(), indent.as_str()) {
            (Some(width), _) => Some(" ".repeat(usize::try_from(width).unwrap_or(0))),
            (None, Some(text)) => Some(text.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut writer = PyJson {
        out: String::new(),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    writer.write(value, 0)?;
    Ok(Value::from_safe_string(writer.out))
}

/// Writes values the way Python's `json.dumps` does.
struct PyJson {
    out: String,
    ensure_ascii: bool,
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(&mut self, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Some(integer) = value.as_i64().filter(|_| value.is_integer()) {
                    self.out.push_str(&integer.to_string());
                } else {
                    let float = f64::try_from(value.clone())?;
                    self.out.push_str(&python_float(float));
                }
            }
            ValueKind::String => self.write_string(value.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_cached_key(|key| key.to_string());
                }
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                self.out.push('{');
                for (index, key) in keys.iter().enumerate() {
                    self.separate(index, level + 1);
                    match key.as_str() {
                        Some(text) => self.write_string(text),
                        None => self.write_string(&key.to_string()),
                    }
                    self.out.push_str(&self.key.clone());
                    self.write(&value.get_item(key)?, level + 1)?;
                }
                self.close(level);
                self.out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (index, item) in items.iter().enumerate() {
                    self.separate(index, level + 1);
                    self.write(item, level + 1)?;
                }
                self.close(level);
                self.out.push(']');
            }
            _ => self.write_string(&value.to_string()),
        }
        Ok(())
    }

    /// Before the `index`th item of a container whose items sit at `level`.
    fn separate(&mut self, index: usize, level: usize) {
        if index > 0 {
            self.out.push_str(&self.item.clone());
        }
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            self.out.push_str(&indent.repeat(level));
        }
    }

    fn close(&mut self, level: usize) {
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            self.out.push_str(&indent.repeat(level));
        }
    }

    fn write_string(&mut self, text: &str) {
        self.out.push('"');
        for character in text.chars() {
            match character {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr` of a float, for the values JSON meets.
fn python_float(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // Rust writes `1e20`, Python `1e+20`.
        let text = format!("{value:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let mantissa = mantissa.to_string();
        return match exponent.strip_prefix('-') {
            Some(digits) => format!("{mantissa}e-{digits:0>2}"),
            None => format!("{mantissa}e+{exponent:0>2}"),
        };
    }
    format!("{value:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::compile(
            source.to_string(),
            vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())],
        )
        .unwrap()
    }

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, ValidationError> {
        render_messages(&template(source), messages)
    }

    #[test]
    fn renders_chatml_with_bos_and_generation_prompt() {
        let rendered = render(
            CHATML,
            &[message("system", "Be brief."), message("user", "发热？")],
        )
        .unwrap();
        assert_eq!(
            rendered,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n发热？<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trims_blocks_like_transformers() {
        let source = "{% for message in messages %}\n  {% if message.role == 'user' %}\nU:{{ message.content }}\n  {% endif %}\n{% endfor %}\n";
        let rendered = render(source, &[message("user", "a"), message("user", "b")]).unwrap();
        assert_eq!(rendered, "U:a\nU:b\n");
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let source = "{% for message in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}\
            {{ message.content.split('</think>')[-1].lstrip('\\n').strip().upper() }}|\
            {{ message.content.startswith('<think>') }}|{% endfor %}";
        let rendered = render(
            source,
            &[
                message("assistant", "<think>x</think>\n\n ok "),
                message("user", "b"),
                message("user", "never"),
            ],
        )
        .unwrap();
        // Booleans print as Python prints them, as in Jinja2.
        assert_eq!(rendered, "OK|True|B|False|");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let rendered = render(
            "{{ messages|tojson }}\n{{ messages[0]|tojson(indent=2) }}\n{{ {'b': 1.5, 'a': [1, none, true, 1e20]}|tojson(sort_keys=true, separators=[',', ':']) }}",
            &[message("user", "血压 \"<b>\"\n")],
        )
        .unwrap();
        assert_eq!(
            rendered,
            "[{\"role\": \"user\", \"content\": \"血压 \\\"<b>\\\"\\n\"}]\n\
             {\n  \"role\": \"user\",\n  \"content\": \"血压 \\\"<b>\\\"\\n\"\n}\n\
             {\"a\":[1,null,true,1e+20],\"b\":1.5}"
        );
    }

    #[test]
    fn errors_name_the_field_or_quote_the_template() {
        assert_eq!(
            render(CHATML, &[]).unwrap_err().to_string(),
            "messages must not be empty"
        );
        assert_eq!(
            render(
                CHATML,
                &[
                    message("user", "a"),
                    message("user", "b"),
                    message("robot", "c")
                ]
            )
            .unwrap_err()
            .to_string(),
            "messages[2].role `robot` is not one of system, user, assistant, tool"
        );
        let strict = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok";
        let error = render(strict, &[message("assistant", "hi")]).unwrap_err();
        assert_eq!(error.kind(), "chat_template");
        assert_eq!(
            error.to_string(),
            "messages could not be rendered with the chat template: Conversation must start with a user message"
        );
        let broken = render(
            "{{ messages[0].content.nonsense() }}",
            &[message("user", "a")],
        )
        .unwrap_err()
        .to_string();
        assert!(broken.contains("nonsense"), "{broken}");
        assert!(ChatTemplate::compile("{% if %}".into(), Vec::new()).is_err());
    }

    #[test]
    fn template_sources() {
        let path = Path::new("tokenizer_config.json");
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "plain"},
        ]});
        assert_eq!(
            template_from_config(&config, path).unwrap().as_deref(),
            Some("plain")
        );
        assert_eq!(
            template_from_config(&serde_json::json!({}), path).unwrap(),
            None
        );
        assert!(template_from_config(&serde_json::json!({"chat_template": 3}), path).is_err());
        assert_eq!(
            token_text(&serde_json::json!({"content": "<s>", "lstrip": false})).as_deref(),
            Some("<s>")
        );
    }

    #[test]
    fn generation_prompt_that_opens_reasoning() {
        assert!(ends_in_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!ends_in_reasoning(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!ends_in_reasoning("<|im_start|>assistant\n"));
    }

    #[test]
    fn python_floats() {
        for (value, expect) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e20, "1e+20"),
            (1.5e-7, "1.5e-07"),
            (-2.5, "-2.5"),
        ] {
            assert_eq!(python_float(value), expect);
        }
    }
}
