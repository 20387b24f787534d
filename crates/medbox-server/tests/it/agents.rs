//! The Agents service through medboxd in-process, with the real runtime and
//! the tiny model: every bundled agent runs to an output valid against its
//! schema under constrained decoding, sessions keep their turns, and errors
//! name what is at fault.
//!
//! The tiny model's config says 512 positions (it was trained on 64-token
//! sequences, so any length is as meaningless to it as 512); agent prompts
//! (system prompt, tool and output schemas, tool results) run to a few
//! thousand tokens, so the test serves a copy of it whose config allows
//! 16,384 positions. Everything else is the tiny model as made.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use medbox_proto::v1::{self as pb, agents_client::AgentsClient};
use serde_json::Value;
use tonic::Code;

use crate::{
    Authed, Bearer, TestServer,
    knowledge::{
        corpus::{self, Language},
        knowledge, knowledge_section, minilm_model, wait_for_ingestion,
    },
    load_config, start_in, tiny_model,
};

const LONG_CONTEXT: u64 = 16_384;

fn specs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../medbox-agents/specs")
}

/// The tiny model with `max_position_embeddings` raised (see the module docs).
fn long_context_tiny(into: &Path) -> PathBuf {
    let folder = into.join("tiny-long");
    std::fs::create_dir_all(&folder).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, folder.join(path.file_name().unwrap())).unwrap();
        }
    }
    let config_path = folder.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = LONG_CONTEXT.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    folder
}

/// The diabetes guideline of the knowledge test's corpus, in both languages:
/// what `guideline_qa`'s example question is about.
fn guideline_folder(into: &Path) -> PathBuf {
    let folder = into.join("guidelines");
    std::fs::create_dir_all(&folder).unwrap();
    for language in [Language::Chinese, Language::English] {
        std::fs::write(
            folder.join(format!("diabetes-{}.md", language.as_str())),
            corpus::document(DIABETES, language),
        )
        .unwrap();
    }
    folder
}

const DIABETES: usize = 1;

/// medboxd with the bundled agents on the long-context tiny model, and a
/// knowledge base (MiniLM) holding one guideline, indexed before it answers.
async fn start_agents() -> TestServer {
    let data = tempfile::tempdir().unwrap();
    let model = long_context_tiny(data.path());
    let guidelines = guideline_folder(data.path());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nshutdown_grace_seconds = 20\n\
         [storage]\ndata_dir = \"{}\"\n\
         [agents]\nspecs_dir = \"{}\"\ndefault_model = \"medical\"\n\
         {}\
         [[models]]\nname = \"tiny\"\npath = \"{}\"\naliases = [\"medical\"]\n{}",
        data.path().join("data").display(),
        specs_dir().display(),
        knowledge_section(&guidelines),
        model.display(),
        minilm_model(),
    );
    let test = start_in(data, &text).await;
    let indexed = wait_for_ingestion(&mut knowledge(&test, &test.admin_key)).await;
    assert_eq!(indexed.documents.len(), 2, "both guideline files indexed");
    test
}

impl TestServer {
    fn agents(&self) -> AgentsClient<Authed> {
        AgentsClient::with_interceptor(self.channel.clone(), Bearer::new(Some(&self.admin_key)))
    }
}

fn example(id: &str) -> String {
    std::fs::read_to_string(specs_dir().join(format!("examples/{id}.json"))).unwrap()
}

fn run_request(agent: &str, input_json: String) -> pb::RunAgentRequest {
    pb::RunAgentRequest {
        agent: agent.into(),
        input_json,
        session_id: None,
        patient_bundle_json: Some(medbox_agents::test_support::EXAMPLE_BUNDLE.into()),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_every_bundled_agent_answers_valid_against_its_schema() {
    let test = start_agents().await;
    let mut client = test.agents();
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 20, "ListAgents shows the catalogue");
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for agent in &agents {
        assert!(!agent.name_zh.is_empty() && !agent.name_en.is_empty());
        let started = Instant::now();
        let response = client
            .run_agent(run_request(&agent.id, example(&agent.id)))
            .await
            .unwrap_or_else(|status| panic!("{}: {status:?}", agent.id))
            .into_inner();
        let elapsed = started.elapsed();
        let model_steps = response.steps.iter().filter(|s| s.kind == "model").count();
        let tool_results = response
            .steps
            .iter()
            .filter(|s| s.kind == "tool" && !s.result_json.is_empty())
            .count();
        table.push(format!(
            "| {} | {} | {} | {} | {} | {:.1} s |",
            agent.id,
            if agent.tools.is_empty() {
                "—".to_owned()
            } else {
                agent.tools.join(", ")
            },
            response.status,
            model_steps,
            tool_results,
            elapsed.as_secs_f64()
        ));
        if response.status != "completed" {
            let last_errors: Vec<&str> = response
                .steps
                .iter()
                .filter(|s| !s.error.is_empty())
                .map(|s| s.error.as_str())
                .collect();
            failures.push(format!("{}: {} {last_errors:?}", agent.id, response.status));
            continue;
        }
        let output: Value = serde_json::from_str(&response.output_json).unwrap();
        let schema: Value = serde_json::from_str(&agent.output_schema_json).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&output)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", agent.id);
        assert_eq!(response.models, ["tiny"], "{}", agent.id);
        // The run is charged what its model steps read and wrote.
        let model_tokens =
            |tokens: fn(&pb::AgentStep) -> u32| -> u32 { response.steps.iter().map(tokens).sum() };
        assert!(response.prompt_tokens > 0 && response.completion_tokens > 0);
        assert_eq!(response.prompt_tokens, model_tokens(|s| s.prompt_tokens));
        assert_eq!(
            response.completion_tokens,
            model_tokens(|s| s.completion_tokens)
        );
        let last = response.steps.last().unwrap();
        assert_eq!(last.kind, "final");
        assert_eq!(last.result_json, response.output_json);
        // Every tool the orchestrator ran first answered, with its
        // arguments and result in the trace.
        for required in &agent.required_tools {
            let step = response
                .steps
                .iter()
                .find(|s| s.required && &s.tool == required)
                .unwrap_or_else(|| panic!("{}: no {required} step", agent.id));
            assert!(
                step.error.is_empty(),
                "{}: {required}: {}",
                agent.id,
                step.error
            );
            assert!(!step.arguments_json.is_empty() && !step.result_json.is_empty());
        }
        if agent.id == "guideline_qa" {
            // The question was searched first; the best passage is the
            // diabetes guideline's treatment section, in the question's
            // language, with what a citation needs.
            let search = response
                .steps
                .iter()
                .find(|s| s.required && s.tool == "knowledge_search")
                .expect("guideline_qa searched the knowledge base");
            let found: Value = serde_json::from_str(&search.result_json).unwrap();
            let best = &found["passages"][0];
            assert_eq!(best["source"], "diabetes-zh.md", "{found:#}");
            assert!(
                best["text"].as_str().unwrap().contains("二甲双胍"),
                "{found:#}"
            );
            assert!(!best["citation"].as_str().unwrap().is_empty());
        }
        if !agent.tools.is_empty() {
            assert!(
                tool_results > 0,
                "{}: no tool result in the trace",
                agent.id
            );
        }
    }
    println!("\n| agent | tools | status | model steps | tool results | run time |");
    println!("|---|---|---|---|---|---|");
    for row in &table {
        println!("{row}");
    }
    assert!(
        failures.is_empty(),
        "runs that did not complete: {failures:#?}"
    );
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sessions_streams_and_errors() {
    let test = start_agents().await;
    let mut client = test.agents();

    // NOT_FOUND names the agent; a malformed bundle names the entry.
    let status = client
        .run_agent(run_request("radiology_superhuman", "{}".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("radiology_superhuman"),
        "{status:?}"
    );
    let mut bad_bundle = run_request("triage", example("triage"));
    bad_bundle.patient_bundle_json = Some(
        r#"{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Observation", "code": {"text": "K"}, "valueQuantity": {"value": "high"}}}]}"#
            .into(),
    );
    let status = client.run_agent(bad_bundle).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("entry[1] (Observation)"),
        "{status:?}"
    );
    let status = client
        .run_agent(run_request("triage", r#"{"symptoms": 3}"#.into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("input_json"), "{status:?}");

    // A session keeps its turns in the store.
    let session = client
        .create_session(pb::CreateSessionRequest {
            agent: "health_consultation".into(),
            patient_bundle_json: Some(medbox_agents::test_support::EXAMPLE_BUNDLE.into()),
        })
        .await
        .unwrap()
        .into_inner();
    for (turn, message) in ["我最近头晕，血压160/95。", "我刚才说的血压要紧吗？"]
        .into_iter()
        .enumerate()
    {
        let reply = client
            .send_message(pb::SendMessageRequest {
                session_id: session.session_id.clone(),
                input_json: serde_json::json!({"message": message}).to_string(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let result = reply.result.unwrap();
        assert_eq!(result.status, "completed", "{:?}", result.steps);
        assert_eq!(result.session_id, session.session_id);
        assert_eq!(reply.turns as usize, turn + 1);
    }

    // The stream sends each step, then the result with the same steps.
    let mut stream = client
        .run_agent_stream(run_request("nursing_record", example("nursing_record")))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    let mut result = None;
    while let Some(message) = stream.message().await.unwrap() {
        match (message.step, message.result) {
            (Some(step), None) => steps.push(step),
            (None, Some(done)) => result = Some(done),
            other => panic!("unexpected stream message {other:?}"),
        }
    }
    let result = result.expect("the last message carries the result");
    assert_eq!(steps, result.steps);
    assert_eq!(steps[0].tool, "braden_scale");

    // GetAgent returns the spec; UpdateAgent needs a higher version.
    let got = client
        .get_agent(pb::GetAgentRequest {
            agent: "triage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.spec_toml.contains("id = \"triage\""));
    let status = client
        .update_agent(pb::UpdateAgentRequest {
            agent: "triage".into(),
            spec_toml: got.spec_toml.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("version"), "{status:?}");
    let updated = client
        .update_agent(pb::UpdateAgentRequest {
            agent: "triage".into(),
            spec_toml: got.spec_toml.replace("version = 1", "version = 2"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.agent.unwrap().version, 2);
    let status = client
        .create_agent(pb::CreateAgentRequest {
            spec_toml: got
                .spec_toml
                .replace("tools = []", "tools = [\"crystal_ball\"]"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("crystal_ball"), "{status:?}");
    test.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_a_bad_spec_stops_the_start_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(specs_dir().join("triage.toml"))
        .unwrap()
        .replace("max_steps = 3", "max_steps = 0");
    std::fs::write(dir.path().join("triage.toml"), text).unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = load_config(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = \"{}\"\n[agents]\nspecs_dir = \"{}\"\n",
            data.path().join("data").display(),
            dir.path().display()
        ),
        data.path(),
    );
    let error = medbox_server::start(config)
        .await
        .err()
        .expect("a bad spec stops the start")
        .to_string();
    assert!(
        error.contains("triage.toml") && error.contains("max_steps"),
        "{error}"
    );
}
