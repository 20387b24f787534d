//! Chat: prompts rendered with the model's own template must tokenise to
//! exactly what transformers' `apply_chat_template` gives, and reasoning is
//! split from the answer the same way streamed or whole.

use std::path::Path;
use std::process::{Command, Stdio};

use medbox_runtime::{
    ChatMessage, ChatRequest, Device, Engine, EngineConfig, GenerationEvent, ReasoningDelta,
    ReasoningSplitter, SamplingParams,
};

use crate::{collect, greedy, load_error_of, tiny_model};

/// A Qwen3-like template written for these tests: system first, reasoning
/// stripped from assistant turns before the last user message and kept (in
/// `<think>`) after it, tool results as user turns, and a generation prompt
/// that `enable_thinking = false` would close at once.
const QWEN_LIKE: &str = r#"{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}
    {%- if ns.last_user < 0 and message.role == 'user' %}
        {%- set ns.last_user = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('The system message must come first.') }}
        {%- endif %}
        {{- '<|im_start|>system\n' + message.content.strip() + '<|im_end|>\n' }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"#;

/// The same, but the generation prompt opens the reasoning itself, as
/// DeepSeek-R1 and Qwen3 thinking models do.
fn thinking_template() -> String {
    QWEN_LIKE.replace(
        "{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking",
        "{{- '<|im_start|>assistant\\n<think>\\n' }}\n    {%- if enable_thinking",
    )
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![message("user", "What is a normal blood pressure?")],
        vec![
            message("system", "  You are a careful clinical assistant.\n"),
            message("user", "发热三天，怎么办？"),
        ],
        vec![
            message("system", "Answer briefly."),
            message("user", "Fever for three days."),
            message(
                "assistant",
                "<think>\nFever, three days: check the blood count.\n</think>\n\nRepeat the full blood count.",
            ),
            message("user", "And if it persists?"),
        ],
        vec![
            message("user", "血压多少算正常？"),
            message("assistant", "<think>\n成人血压。\n</think>\n\n低于120/80。"),
            message("user", "老年人呢？"),
            message(
                "assistant",
                "<think>\n老年人目标更宽。\n</think>\n\n通常低于140/90。",
            ),
        ],
        vec![
            message("user", "Check the lab result."),
            message("tool", "{\"hb\": 9.1}"),
        ],
    ]
}

/// A copy of the tiny model with its chat template replaced: in
/// tokenizer_config.json, or (with `jinja_file`) in chat_template.jinja.
fn model_with_template(template: Option<&str>, jinja_file: bool) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let config_path = copy.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    match (template, jinja_file) {
        (Some(template), true) => {
            std::fs::write(copy.path().join("chat_template.jinja"), template).unwrap()
        }
        (Some(template), false) => config["chat_template"] = template.into(),
        (None, _) => {
            config.as_object_mut().unwrap().remove("chat_template");
        }
    }
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    copy
}

fn start_model(path: &Path) -> Engine {
    Engine::start(EngineConfig {
        name: "chat".into(),
        path: path.to_path_buf(),
        dtype: None,
        device: Device::Cpu,
        max_waiting: 4,
        batching: Default::default(),
    })
    .expect("model loads")
}

/// transformers' rendering and token ids for each conversation.
fn reference_chat(model: &Path, conversations: &[Vec<ChatMessage>]) -> Vec<(String, Vec<u32>)> {
    let json: Vec<Vec<serde_json::Value>> = conversations
        .iter()
        .map(|messages| {
            messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect()
        })
        .collect();
    let mut child = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/reference.py"))
        .arg("chat")
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    serde_json::to_writer(child.stdin.take().unwrap(), &json).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "reference.py chat failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    results
        .into_iter()
        .map(|result| {
            (
                result["text"].as_str().unwrap().to_string(),
                serde_json::from_value(result["ids"].clone()).unwrap(),
            )
        })
        .collect()
}

fn chat_request(messages: Vec<ChatMessage>, sampling: SamplingParams) -> ChatRequest {
    ChatRequest {
        messages,
        sampling,
        constraint: None,
    }
}

fn check_parity(model: &Path, expect_starts_in_reasoning: bool) {
    let engine = start_model(model);
    let conversations = conversations();
    let expected = reference_chat(model, &conversations);
    for (messages, (text, ids)) in conversations.into_iter().zip(expected) {
        let valid = engine
            .validate_chat(chat_request(messages.clone(), SamplingParams::default()))
            .unwrap_or_else(|error| panic!("{messages:?}: {error}"));
        assert_eq!(
            valid.prompt_token_ids(),
            &ids[..],
            "{}: {messages:?} renders in transformers as {text:?}",
            model.display()
        );
        assert_eq!(
            valid.starts_in_reasoning(),
            expect_starts_in_reasoning,
            "{text:?}"
        );
    }
    assert!(engine.thinks(), "the tiny tokenizer has <think>");
    engine.shutdown();
}

#[test]
fn tiny_chatml_prompts_match_transformers() {
    check_parity(tiny_model(), false);
}

#[test]
fn qwen_like_prompts_match_transformers() {
    let model = model_with_template(Some(QWEN_LIKE), false);
    check_parity(model.path(), false);
}

#[test]
fn thinking_prompts_match_transformers_and_start_in_reasoning() {
    // chat_template.jinja, beside the tokenizer, wins over tokenizer_config.json.
    let model = model_with_template(Some(&thinking_template()), true);
    check_parity(model.path(), true);
}

#[test]
fn chat_errors_name_the_field() {
    let engine = start_model(tiny_model());
    let error = |messages: Vec<ChatMessage>| {
        engine
            .validate_chat(chat_request(messages, SamplingParams::default()))
            .unwrap_err()
    };
    assert_eq!(error(vec![]).to_string(), "messages must not be empty");
    let robot = error(vec![
        message("system", "s"),
        message("user", "u"),
        message("robot", "r"),
    ]);
    assert_eq!(
        (robot.kind(), robot.to_string().as_str()),
        (
            "message_role",
            "messages[2].role `robot` is not one of system, user, assistant, tool"
        )
    );
    let too_long = error(vec![message("user", &"blood ".repeat(600))]);
    assert_eq!(too_long.kind(), "prompt_too_long");
    let max_tokens = engine
        .validate_chat(chat_request(
            vec![message("user", "hi")],
            SamplingParams {
                max_tokens: Some(0),
                ..SamplingParams::default()
            },
        ))
        .unwrap_err();
    assert_eq!(max_tokens.kind(), "max_tokens");
    engine.shutdown();

    let qwen = model_with_template(Some(QWEN_LIKE), false);
    let engine = start_model(qwen.path());
    let late_system = engine
        .validate_chat(chat_request(
            vec![message("user", "u"), message("system", "s")],
            SamplingParams::default(),
        ))
        .unwrap_err();
    assert_eq!(
        late_system.to_string(),
        "messages could not be rendered with the chat template: The system message must come first."
    );
    engine.shutdown();

    let none = model_with_template(None, false);
    let engine = start_model(none.path());
    let missing = engine
        .validate_chat(chat_request(
            vec![message("user", "u")],
            SamplingParams::default(),
        ))
        .unwrap_err();
    assert_eq!(missing.to_string(), "model `chat` has no chat template");
    engine.shutdown();
}

#[test]
fn invalid_template_is_a_load_error_naming_the_file() {
    let error = load_error_of(tiny_model(), |dir| {
        let path = dir.join("tokenizer_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["chat_template"] = "{% for message in messages %}{{ message.content }".into();
        std::fs::write(&path, config.to_string()).unwrap();
    });
    assert_eq!(error.kind(), "chat_template");
    assert!(
        error.to_string().contains("tokenizer_config.json"),
        "{error}"
    );
}

/// Streams a greedy chat through the splitter and checks it against the
/// unary split of the whole text.
fn check_stream_matches_unary(
    engine: &Engine,
    messages: Vec<ChatMessage>,
) -> (String, ReasoningDelta) {
    let request = engine
        .validate_chat(chat_request(messages.clone(), greedy(48)))
        .unwrap();
    let starts_in = request.starts_in_reasoning();
    let whole = collect(engine.submit(request.clone()).unwrap());
    let unary = ReasoningSplitter::split(&whole.text, starts_in);

    let mut stream = engine.submit(request).unwrap();
    let mut splitter = ReasoningSplitter::new(starts_in);
    let mut streamed = ReasoningDelta::default();
    let mut append = |delta: ReasoningDelta| {
        streamed.reasoning.push_str(&delta.reasoning);
        streamed.answer.push_str(&delta.answer);
    };
    loop {
        match stream.blocking_next().unwrap() {
            GenerationEvent::Delta { text, .. } => append(splitter.push(&text)),
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(error) => panic!("{error}"),
        }
    }
    append(splitter.finish());
    assert_eq!(streamed, unary, "{messages:?} gave {:?}", whole.text);
    eprintln!("{messages:?} -> {unary:?}");
    (whole.text, unary)
}

#[test]
fn streamed_chat_splits_like_unary() {
    let engine = start_model(tiny_model());
    let (text, plain) =
        check_stream_matches_unary(&engine, vec![message("user", "发热三天，怎么办？")]);
    // The tiny model does not think on its own: all of it is the answer.
    if !text.trim_start().starts_with("<think>") {
        assert_eq!(
            plain,
            ReasoningDelta {
                reasoning: String::new(),
                answer: text
            }
        );
    }
    engine.shutdown();

    // A prompt that opens the reasoning: everything up to </think> (here,
    // everything) is reasoning.
    let thinking = model_with_template(Some(&thinking_template()), false);
    let engine = start_model(thinking.path());
    let (text, split) = check_stream_matches_unary(
        &engine,
        vec![
            message("system", "Answer briefly."),
            message("user", "What is a normal blood pressure?"),
        ],
    );
    if !text.contains("think>") {
        assert_eq!(
            split,
            ReasoningDelta {
                reasoning: text.trim().to_string(),
                answer: String::new()
            }
        );
    }
    engine.shutdown();
}

/// The pieces the engine would stream for `text`: its tokens decoded one at
/// a time, holding back incomplete characters.
fn recorded_stream(text: &str) -> Vec<String> {
    let tokenizer = tokenizers::Tokenizer::from_file(tiny_model().join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut pieces = Vec::new();
    let mut sent = 0;
    for end in 1..=ids.len() {
        let decoded = tokenizer.decode(&ids[..end], true).unwrap();
        if decoded.len() > sent && !decoded.ends_with('\u{FFFD}') {
            pieces.push(decoded[sent..].to_string());
            sent = decoded.len();
        }
    }
    assert_eq!(pieces.concat(), text, "the stream decodes back to the text");
    pieces
}

#[test]
fn recorded_token_streams_split_into_reasoning_and_answer() {
    let cases = [
        (
            "<think>\n患者发热三天，血常规正常。\n</think>\n\n建议多饮水，复查。",
            false,
            "患者发热三天，血常规正常。",
            "建议多饮水，复查。",
        ),
        (
            "Blood pressure first.\n</think>\n\nBelow 120/80 is normal.",
            true,
            "Blood pressure first.",
            "Below 120/80 is normal.",
        ),
        (
            "No reasoning here: 120/80.",
            false,
            "",
            "No reasoning here: 120/80.",
        ),
        ("<think>\nStill thinking", false, "Still thinking", ""),
    ];
    for (text, starts_in, reasoning, answer) in cases {
        let pieces = recorded_stream(text);
        let mut splitter = ReasoningSplitter::new(starts_in);
        let mut joined = ReasoningDelta::default();
        for piece in &pieces {
            let delta = splitter.push(piece);
            joined.reasoning.push_str(&delta.reasoning);
            joined.answer.push_str(&delta.answer);
        }
        let rest = splitter.finish();
        joined.reasoning.push_str(&rest.reasoning);
        joined.answer.push_str(&rest.answer);
        assert_eq!(
            (joined.reasoning.as_str(), joined.answer.as_str()),
            (reasoning, answer),
            "{pieces:?}"
        );
    }
}
