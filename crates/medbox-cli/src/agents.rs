//! `medboxctl agents list | agents run AGENT --input JSON`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use medbox_proto::v1 as pb;
use serde_json::json;

use crate::{Client, grpc_error};

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// The agent catalogue: id, names, tools.
    List,
    /// Runs an agent; prints its output, status and trace.
    Run {
        /// The agent id (see `agents list`).
        agent: String,
        /// The input as JSON, valid against the agent's input schema; `@FILE` reads a file.
        #[arg(long)]
        input: String,
        /// A FHIR R4 Bundle (JSON file) with the patient's record.
        #[arg(long)]
        patient_bundle: Option<PathBuf>,
        /// Continue a session (see CreateSession).
        #[arg(long)]
        session: Option<String>,
    },
}

pub async fn agents(client: &Client, command: &AgentsCommand, as_json: bool) -> anyhow::Result<()> {
    let mut agents = pb::agents_client::AgentsClient::new(client.channel.clone());
    match command {
        AgentsCommand::List => {
            let list = agents
                .list_agents(client.request(pb::ListAgentsRequest {}))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .agents;
            if as_json {
                for agent in &list {
                    println!(
                        "{}",
                        json!({
                            "id": agent.id, "name": agent.name, "name_zh": agent.name_zh,
                            "name_en": agent.name_en, "version": agent.version,
                            "description": agent.description, "tools": agent.tools,
                            "required_tools": agent.required_tools,
                        })
                    );
                }
                return Ok(());
            }
            println!("{:<32} {:<4} {:<40} TOOLS", "ID", "VER", "NAME");
            for agent in &list {
                let name = format!("{} / {}", agent.name_zh, agent.name_en);
                println!(
                    "{:<32} {:<4} {:<40} {}",
                    agent.id,
                    agent.version,
                    name,
                    agent.tools.join(",")
                );
            }
            Ok(())
        }
        AgentsCommand::Run {
            agent,
            input,
            patient_bundle,
            session,
        } => {
            let input_json = match input.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --input file {path}"))?,
                None => input.clone(),
            };
            serde_json::from_str::<serde_json::Value>(&input_json)
                .context("--input is not JSON")?;
            let patient_bundle_json = patient_bundle
                .as_ref()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read --patient-bundle {}", path.display()))
                })
                .transpose()?;
            let response = agents
                .run_agent(client.request(pb::RunAgentRequest {
                    agent: agent.clone(),
                    input_json,
                    session_id: session.clone(),
                    patient_bundle_json,
                    request_id: String::new(),
                }))
                .await
                .map_err(grpc_error)?
                .into_inner();
            if as_json {
                let steps: Vec<serde_json::Value> = response
                    .steps
                    .iter()
                    .map(|step| {
                        json!({
                            "kind": step.kind, "model": step.model, "tool": step.tool,
                            "arguments_json": step.arguments_json, "result_json": step.result_json,
                            "error": step.error, "elapsed_ms": step.elapsed_ms, "required": step.required,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({
                        "run_id": response.run_id, "status": response.status,
                        "output_json": response.output_json, "models": response.models,
                        "elapsed_ms": response.elapsed_ms, "steps": steps,
                    })
                );
            } else {
                for step in &response.steps {
                    let what = match step.kind.as_str() {
                        "tool" => format!("tool {}", step.tool),
                        "model" => format!("model {}", step.model),
                        other => other.to_owned(),
                    };
                    let outcome = if step.error.is_empty() {
                        "ok"
                    } else {
                        "refused"
                    };
                    eprintln!("  {what:<40} {outcome:<8} {} ms", step.elapsed_ms);
                }
                eprintln!(
                    "run {}: {} in {} ms",
                    response.run_id, response.status, response.elapsed_ms
                );
                if !response.output_json.is_empty() {
                    let output: serde_json::Value = serde_json::from_str(&response.output_json)
                        .context("the server's output is not JSON")?;
                    println!("{}", serde_json::to_string_pretty(&output)?);
                }
            }
            if response.status != "completed" {
                bail!("the run ended with status {}", response.status);
            }
            Ok(())
        }
    }
}
