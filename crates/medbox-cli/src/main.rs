//! `medboxctl`: the command line for IT staff, administrators and scripts.
//!
//! It talks to `medboxd` over gRPC only; it never touches the database or
//! the model folders. `--json` prints one JSON object per result, and the exit
//! code is 0 only on success.

use std::{io::Write, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use medbox_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, metadata::MetadataValue, transport::Channel};

#[derive(Parser)]
#[command(
    name = "medboxctl",
    version,
    about = "Command line for the medbox appliance"
)]
struct Cli {
    /// medboxd's gRPC address.
    #[arg(
        long,
        env = "MEDBOX_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// API key sent as `authorization: Bearer KEY`.
    #[arg(long, env = "MEDBOX_KEY", global = true, conflicts_with = "key_file")]
    key: Option<String>,
    /// File holding the API key (for example <data_dir>/admin.key).
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Print one JSON object per result instead of text for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Version, uptime, storage and every model's state.
    Status,
    /// Served models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Generate a completion, streamed to the terminal as it arrives.
    Generate {
        /// Model name or alias.
        #[arg(long)]
        model: String,
        #[arg(long)]
        max_tokens: Option<u32>,
        /// 0 is greedy.
        #[arg(long)]
        temperature: Option<f32>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long)]
        top_k: Option<u32>,
        #[arg(long)]
        seed: Option<u64>,
        /// Stop before this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        prompt: String,
    },
    /// Talk with a model, turn by turn: each line you type is a user turn;
    /// an empty line or Ctrl-D ends the conversation.
    Chat {
        #[arg(long)]
        model: String,
        /// A system message that opens the conversation.
        #[arg(long)]
        system: Option<String>,
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long)]
        temperature: Option<f32>,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Embed texts with an embedding model (one vector per text).
    Embed {
        #[arg(long)]
        model: String,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Show how a model's tokenizer splits a text.
    Tokenize {
        #[arg(long)]
        model: String,
        text: String,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the models and their state.
    List,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("medboxctl: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("medboxctl: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connection and credentials shared by every command.
struct Client {
    channel: Channel,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    async fn connect(cli: &Cli) -> anyhow::Result<Client> {
        let uri = if cli.addr.contains("://") {
            cli.addr.clone()
        } else {
            format!("http://{}", cli.addr)
        };
        let channel = Channel::from_shared(uri.clone())
            .with_context(|| format!("--addr `{}` is not an address", cli.addr))?
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach medboxd at {uri} (is it running? see --addr)")
            })?;
        let key = match (&cli.key, &cli.key_file) {
            (Some(key), _) => Some(key.trim().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --key-file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let authorization = match key {
            Some(key) => Some(
                format!("Bearer {key}")
                    .parse()
                    .context("the API key holds characters that cannot be sent")?,
            ),
            None => None,
        };
        Ok(Client {
            channel,
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::connect(&cli).await?;
    match &cli.command {
        Command::Status => status(&client, cli.json).await,
        Command::Models {
            command: ModelsCommand::List,
        } => models_list(&client, cli.json).await,
        Command::Generate {
            model,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            prompt,
        } => {
            let request = pb::GenerateRequest {
                model: model.clone(),
                prompt: prompt.clone(),
                sampling: Some(pb::SamplingParams {
                    max_tokens: *max_tokens,
                    temperature: *temperature,
                    top_p: *top_p,
                    top_k: *top_k,
                    seed: *seed,
                    stop: stop.clone(),
                    ..Default::default()
                }),
                request_id: String::new(),
            };
            generate(&client, request, cli.json).await
        }
        Command::Chat {
            model,
            system,
            max_tokens,
            temperature,
            seed,
        } => {
            let sampling = pb::SamplingParams {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: *seed,
                ..Default::default()
            };
            chat(&client, model, system.as_deref(), sampling, cli.json).await
        }
        Command::Embed { model, texts } => embed(&client, model, texts, cli.json).await,
        Command::Tokenize { model, text } => tokenize(&client, model, text, cli.json).await,
    }
}

fn grpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn model_json(model: &pb::ModelStatus) -> serde_json::Value {
    json!({
        "name": model.name,
        "aliases": model.aliases,
        "kind": model.kind,
        "state": model.state,
        "error": model.error,
        "architecture": model.architecture,
        "dtype": model.dtype,
        "device": model.device,
        "max_context": model.max_context,
    })
}

fn print_model_table(models: &[pb::ModelStatus]) {
    println!(
        "{:<20} {:<10} {:<8} {:<20} {:<6} {:<8} ALIASES",
        "NAME", "KIND", "STATE", "ARCHITECTURE", "DTYPE", "DEVICE"
    );
    for model in models {
        println!(
            "{:<20} {:<10} {:<8} {:<20} {:<6} {:<8} {}",
            model.name,
            model.kind,
            model.state,
            model.architecture,
            model.dtype,
            model.device,
            model.aliases.join(",")
        );
        if !model.error.is_empty() {
            println!("  error: {}", model.error);
        }
    }
}

async fn status(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
    let status = admin
        .status(client.request(pb::StatusRequest {}))
        .await
        .map_err(grpc_error)?
        .into_inner();
    if as_json {
        println!(
            "{}",
            json!({
                "version": status.version,
                "uptime_seconds": status.uptime_seconds,
                "storage": status.storage,
                "models": status.models.iter().map(model_json).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!(
        "medboxd {} — up {}s — storage {}",
        status.version, status.uptime_seconds, status.storage
    );
    print_model_table(&status.models);
    Ok(())
}

async fn models_list(client: &Client, as_json: bool) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
    let models = admin
        .list_models(client.request(pb::ListModelsRequest {}))
        .await
        .map_err(grpc_error)?
        .into_inner()
        .models;
    if as_json {
        for model in &models {
            println!("{}", model_json(model));
        }
    } else {
        print_model_table(&models);
    }
    Ok(())
}

async fn generate(
    client: &Client,
    request: pb::GenerateRequest,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut inference = pb::inference_client::InferenceClient::new(client.channel.clone());
    let started = Instant::now();
    let mut stream = inference
        .generate_stream(client.request(request))
        .await
        .map_err(grpc_error)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut token_ids = Vec::new();
    let mut first_token = None;
    let mut finish_reason = String::new();
    let mut usage = pb::Usage::default();
    while let Some(chunk) = stream.message().await.map_err(grpc_error)? {
        if first_token.is_none() && !chunk.token_ids.is_empty() {
            first_token = Some(started.elapsed());
        }
        if !as_json {
            stdout.write_all(chunk.text.as_bytes())?;
            stdout.flush()?;
        }
        text.push_str(&chunk.text);
        token_ids.extend(chunk.token_ids);
        if !chunk.finish_reason.is_empty() {
            finish_reason = chunk.finish_reason;
            usage = chunk.usage.unwrap_or_default();
        }
    }
    if finish_reason.is_empty() {
        bail!("the stream ended without a finish reason");
    }
    let total = started.elapsed();
    let first_ms = first_token.map(|elapsed| elapsed.as_secs_f64() * 1000.0);
    if as_json {
        println!(
            "{}",
            json!({
                "text": text,
                "token_ids": token_ids,
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                "time_to_first_token_ms": first_ms,
                "total_ms": total.as_secs_f64() * 1000.0,
            })
        );
        return Ok(());
    }
    writeln!(stdout)?;
    let decode_seconds = first_token.map(|first| (total - first).as_secs_f64());
    let rate = match decode_seconds {
        Some(seconds) if seconds > 0.0 && usage.completion_tokens > 1 => {
            format!(
                ", {:.1} tokens/s",
                f64::from(usage.completion_tokens - 1) / seconds
            )
        }
        _ => String::new(),
    };
    eprintln!(
        "[{finish_reason}: {} prompt + {} completion tokens, first token in {:.0} ms{rate}]",
        usage.prompt_tokens,
        usage.completion_tokens,
        first_ms.unwrap_or(0.0),
    );
    Ok(())
}

async fn tokenize(client: &Client, model: &str, text: &str, as_json: bool) -> anyhow::Result<()> {
    let mut inference = pb::inference_client::InferenceClient::new(client.channel.clone());
    let tokens = inference
        .tokenize(client.request(pb::TokenizeRequest {
            model: model.to_owned(),
            text: text.to_owned(),
        }))
        .await
        .map_err(grpc_error)?
        .into_inner()
        .tokens;
    if as_json {
        println!(
            "{}",
            json!({"tokens": tokens.iter().map(|t| json!({"id": t.id, "text": t.text})).collect::<Vec<_>>()})
        );
    } else {
        for token in &tokens {
            println!("{:>8}  {:?}", token.id, token.text);
        }
        eprintln!("[{} tokens]", tokens.len());
    }
    Ok(())
}

async fn chat(
    client: &Client,
    model: &str,
    system: Option<&str>,
    sampling: pb::SamplingParams,
    as_json: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    let mut inference = pb::inference_client::InferenceClient::new(client.channel.clone());
    let mut messages: Vec<pb::ChatMessage> = system
        .map(|content| pb::ChatMessage {
            role: "system".into(),
            content: content.into(),
        })
        .into_iter()
        .collect();
    let interactive = std::io::stdin().is_terminal() && !as_json;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("you> ");
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim().to_owned();
        if line.is_empty() {
            break;
        }
        messages.push(pb::ChatMessage {
            role: "user".into(),
            content: line,
        });
        let request = pb::ChatRequest {
            model: model.to_owned(),
            messages: messages.clone(),
            sampling: Some(sampling.clone()),
            request_id: String::new(),
        };
        let mut stream = inference
            .chat_stream(client.request(request))
            .await
            .map_err(grpc_error)?
            .into_inner();
        let mut stdout = std::io::stdout().lock();
        let (mut answer, mut reasoning, mut finish_reason) =
            (String::new(), String::new(), String::new());
        let mut usage = pb::Usage::default();
        if interactive {
            eprint!("{model}> ");
        }
        while let Some(chunk) = stream.message().await.map_err(grpc_error)? {
            if !as_json {
                if !chunk.reasoning_text.is_empty() {
                    // Thinking goes to stderr, dimmed, so stdout holds only answers.
                    eprint!("\x1b[2m{}\x1b[0m", chunk.reasoning_text);
                }
                stdout.write_all(chunk.text.as_bytes())?;
                stdout.flush()?;
            }
            answer.push_str(&chunk.text);
            reasoning.push_str(&chunk.reasoning_text);
            if !chunk.finish_reason.is_empty() {
                finish_reason = chunk.finish_reason;
                usage = chunk.usage.unwrap_or_default();
            }
        }
        if as_json {
            println!(
                "{}",
                json!({
                    "text": answer,
                    "reasoning_text": reasoning,
                    "finish_reason": finish_reason,
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                })
            );
        } else {
            writeln!(stdout)?;
        }
        messages.push(pb::ChatMessage {
            role: "assistant".into(),
            content: answer,
        });
    }
    Ok(())
}

async fn embed(
    client: &Client,
    model: &str,
    texts: &[String],
    as_json: bool,
) -> anyhow::Result<()> {
    let mut inference = pb::inference_client::InferenceClient::new(client.channel.clone());
    let reply = inference
        .embed(client.request(pb::EmbedRequest {
            model: model.to_owned(),
            texts: texts.to_vec(),
            request_id: String::new(),
        }))
        .await
        .map_err(grpc_error)?
        .into_inner();
    for (text, embedding) in texts.iter().zip(&reply.embeddings) {
        if as_json {
            println!("{}", json!({"text": text, "values": embedding.values}));
        } else {
            let head: Vec<String> = embedding
                .values
                .iter()
                .take(6)
                .map(|v| format!("{v:+.4}"))
                .collect();
            println!(
                "{:>4} dims  [{} …]  {}",
                embedding.values.len(),
                head.join(" "),
                text
            );
        }
    }
    Ok(())
}
