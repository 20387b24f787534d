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

mod agents;
mod finetune;
mod knowledge;

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
    /// API keys: create (the secret is printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit trail: list events, verify the hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Fine-tuning datasets: upload (every line checked, de-identified, split), list.
    Datasets {
        #[command(subcommand)]
        command: finetune::DatasetsCommand,
    },
    /// Fine-tuning jobs: create, watch with a live progress bar, list, cancel.
    Finetune {
        #[command(subcommand)]
        command: finetune::FinetuneCommand,
    },
    /// Agents: list the catalogue, run one.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// The knowledge base the agents cite: add documents, list, search, delete.
    Knowledge {
        #[command(subcommand)]
        command: knowledge::KnowledgeCommand,
    },
    /// Show how a model's tokenizer splits a text.
    Tokenize {
        #[arg(long)]
        model: String,
        text: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints its id and secret (shown this once).
    Create {
        #[arg(long)]
        label: String,
        /// Comma-separated: inference, agents, finetune, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Department or tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Expiry as unix seconds, or a duration from now such as 30d, 12h, 90m.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (no secrets).
    List,
    /// Revoke a key by id; it fails from the next request on.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Events oldest first; with --json, one JSON object per line (an export).
    List {
        /// Unix seconds, or a duration back from now such as 24h or 7d.
        #[arg(long)]
        since: Option<String>,
        /// Only this key's events (its id, mbk_…).
        #[arg(long)]
        key_id: Option<String>,
        /// e.g. medbox.v1.Inference/Generate
        #[arg(long)]
        method: Option<String>,
        /// gRPC status code number (0 = OK).
        #[arg(long)]
        status: Option<i32>,
        /// At most this many events (all when absent).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Recompute the hash chain; exits non-zero when it is broken.
    Verify,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the models and their state.
    List,
    /// Load a model folder under NAME while the others keep serving (with no
    /// --path: the registered folder of NAME). Aliases move to it when ready.
    Load {
        name: String,
        #[arg(long)]
        path: Option<String>,
        /// Repeatable: names clients may use for this model (e.g. medical).
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// causal-lm or embedding.
        #[arg(long)]
        kind: Option<String>,
        /// f32, bf16, f16 or int8 (weight-only).
        #[arg(long)]
        dtype: Option<String>,
        /// cpu or cuda:N.
        #[arg(long)]
        device: Option<String>,
    },
    /// Take a model out of service after its in-flight requests.
    Unload { name: String },
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
        Command::Agents { command } => agents::agents(&client, command, cli.json).await,
        Command::Knowledge { command } => knowledge::knowledge(&client, command, cli.json).await,
        Command::Models {
            command: ModelsCommand::List,
        } => models_list(&client, cli.json).await,
        Command::Models {
            command:
                ModelsCommand::Load {
                    name,
                    path,
                    aliases,
                    kind,
                    dtype,
                    device,
                },
        } => {
            let request = pb::LoadModelRequest {
                name: name.clone(),
                path: path.clone().unwrap_or_default(),
                aliases: aliases.clone(),
                kind: kind.clone().unwrap_or_default(),
                dtype: dtype.clone().unwrap_or_default(),
                device: device.clone().unwrap_or_default(),
            };
            models_load(&client, request, cli.json).await
        }
        Command::Models {
            command: ModelsCommand::Unload { name },
        } => {
            let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
            admin
                .unload_model(client.request(pb::UnloadModelRequest { name: name.clone() }))
                .await
                .map_err(grpc_error)?;
            if cli.json {
                println!("{}", json!({"name": name, "unloaded": true}));
            } else {
                println!("unloaded {name}");
            }
            Ok(())
        }
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
                constraint: None,
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
        Command::Keys { command } => keys(&client, command, cli.json).await,
        Command::Audit { command } => audit(&client, command, cli.json).await,
        Command::Tokenize { model, text } => tokenize(&client, model, text, cli.json).await,
        Command::Datasets { command } => finetune::datasets(&client, command, cli.json).await,
        Command::Finetune { command } => finetune::finetune(&client, command, cli.json).await,
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
        "base_model": model.base_model,
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
        if !model.base_model.is_empty() {
            println!("  adapter served on {}", model.base_model);
        }
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

async fn models_load(
    client: &Client,
    request: pb::LoadModelRequest,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
    let started = Instant::now();
    if !as_json {
        eprintln!("loading {} …", request.name);
    }
    let model = admin
        .load_model(client.request(request))
        .await
        .map_err(grpc_error)?
        .into_inner()
        .model
        .unwrap_or_default();
    if as_json {
        println!("{}", model_json(&model));
    } else {
        print_model_table(std::slice::from_ref(&model));
        eprintln!("[ready in {:.1} s]", started.elapsed().as_secs_f64());
    }
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
            constraint: None,
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

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

/// A duration such as `30d`, `12h`, `90m`, `45s`.
fn parse_duration_seconds(text: &str) -> Option<i64> {
    let (number, unit) = text.split_at(text.len().checked_sub(1)?);
    let number: i64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(number * scale)
}

/// Unix seconds, or a duration applied to now in `direction` (+1 ahead, -1 back); answered in milliseconds.
fn parse_time_ms(flag: &str, text: &str, direction: i64) -> anyhow::Result<i64> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds * 1000);
    }
    match parse_duration_seconds(text) {
        Some(seconds) => Ok((now_seconds() + direction * seconds) * 1000),
        None => {
            bail!("{flag} `{text}` is neither unix seconds nor a duration such as 30d, 12h, 90m")
        }
    }
}

fn format_time_ms(ms: i64) -> String {
    let seconds = ms / 1000;
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn key_json(key: &pb::ApiKey) -> serde_json::Value {
    json!({
        "id": key.id,
        "label": key.label,
        "scopes": key.scopes,
        "tenant": key.tenant,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "last_used_at": key.last_used_at,
    })
}

async fn keys(client: &Client, command: &KeysCommand, as_json: bool) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
    match command {
        KeysCommand::Create {
            label,
            scopes,
            tenant,
            expires,
        } => {
            let expires_at = match expires {
                Some(text) => Some(parse_time_ms("--expires", text, 1)?),
                None => None,
            };
            let created = admin
                .create_api_key(client.request(pb::CreateApiKeyRequest {
                    label: label.clone(),
                    scopes: scopes.clone(),
                    tenant: tenant.clone().unwrap_or_default(),
                    expires_at,
                }))
                .await
                .map_err(grpc_error)?
                .into_inner();
            if as_json {
                println!("{}", json!({"id": created.id, "key": created.key}));
            } else {
                println!("id:  {}", created.id);
                println!("key: {}", created.key);
                eprintln!("(the key is shown this once: store it now)");
            }
        }
        KeysCommand::List => {
            let keys = admin
                .list_api_keys(client.request(pb::ListApiKeysRequest {}))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .keys;
            if as_json {
                for key in &keys {
                    println!("{}", key_json(key));
                }
                return Ok(());
            }
            println!(
                "{:<18} {:<28} {:<30} {:<12} STATE",
                "ID", "LABEL", "SCOPES", "TENANT"
            );
            for key in &keys {
                let state = match (key.revoked_at, key.expires_at) {
                    (Some(at), _) => format!("revoked {}", format_time_ms(at)),
                    (None, Some(at)) if at <= now_seconds() * 1000 => {
                        format!("expired {}", format_time_ms(at))
                    }
                    (None, Some(at)) => format!("active until {}", format_time_ms(at)),
                    (None, None) => "active".to_owned(),
                };
                println!(
                    "{:<18} {:<28} {:<30} {:<12} {state}",
                    key.id,
                    key.label,
                    key.scopes.join(","),
                    key.tenant
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let reply = admin
                .revoke_api_key(client.request(pb::RevokeApiKeyRequest { id: id.clone() }))
                .await
                .map_err(grpc_error)?
                .into_inner();
            if as_json {
                println!("{}", json!({"id": id, "revoked": reply.revoked}));
            } else if reply.revoked {
                println!("revoked {id}");
            } else {
                println!("{id} was already revoked");
            }
        }
    }
    Ok(())
}

async fn audit(client: &Client, command: &AuditCommand, as_json: bool) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(client.channel.clone());
    match command {
        AuditCommand::List {
            since,
            key_id,
            method,
            status,
            limit,
        } => {
            let since = match since {
                Some(text) => parse_time_ms("--since", text, -1)?,
                None => 0,
            };
            let mut after_id = 0;
            let mut printed = 0u64;
            if !as_json {
                println!(
                    "{:>7} {:<21} {:<18} {:<40} {:<18} {:>4} {:>9} TOKENS",
                    "ID", "TIME", "KEY", "METHOD", "TARGET", "CODE", "MS"
                );
            }
            loop {
                let page_size = limit.map_or(1000, |limit| (limit - printed).min(1000)) as u32;
                if page_size == 0 {
                    break;
                }
                let events = admin
                    .list_audit_events(client.request(pb::ListAuditEventsRequest {
                        since,
                        key_id: key_id.clone().unwrap_or_default(),
                        method: method.clone().unwrap_or_default(),
                        status_code: *status,
                        after_id,
                        limit: page_size,
                        ..Default::default()
                    }))
                    .await
                    .map_err(grpc_error)?
                    .into_inner()
                    .events;
                let Some(last) = events.last() else { break };
                after_id = last.id;
                for event in &events {
                    if as_json {
                        println!(
                            "{}",
                            json!({
                                "id": event.id, "at": event.at, "key_id": event.key_id, "key_label": event.key_label,
                                "method": event.method, "target": event.target, "status_code": event.status_code,
                                "error_kind": event.error_kind, "latency_us": event.latency_us,
                                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                                "request_id": event.request_id, "client_addr": event.client_addr,
                                "prev_hash": event.prev_hash, "hash": event.hash,
                            })
                        );
                    } else {
                        println!(
                            "{:>7} {:<21} {:<18} {:<40} {:<18} {:>4} {:>9.1} {}+{}",
                            event.id,
                            format_time_ms(event.at),
                            event.key_id,
                            event.method,
                            event.target,
                            event.status_code,
                            event.latency_us as f64 / 1000.0,
                            event.prompt_tokens,
                            event.completion_tokens
                        );
                    }
                }
                printed += events.len() as u64;
            }
        }
        AuditCommand::Verify => {
            let verdict = admin
                .verify_audit_chain(client.request(pb::VerifyAuditChainRequest {}))
                .await
                .map_err(grpc_error)?
                .into_inner();
            if as_json {
                println!(
                    "{}",
                    json!({"ok": verdict.ok, "checked": verdict.checked, "first_broken_id": verdict.first_broken_id, "reason": verdict.reason})
                );
            } else if verdict.ok {
                println!("audit chain intact: {} events checked", verdict.checked);
            } else {
                println!(
                    "AUDIT CHAIN BROKEN at event {}: {} ({} events intact before it)",
                    verdict.first_broken_id, verdict.reason, verdict.checked
                );
            }
            if !verdict.ok {
                bail!("the audit chain is broken");
            }
        }
    }
    Ok(())
}
