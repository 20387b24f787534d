//! `medboxctl datasets …` and `medboxctl finetune …`: the FineTuning service
//! for people (tables, progress bars) and scripts (`--json`, exit codes).

use std::path::Path;

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use medbox_proto::v1::{self as pb, fine_tuning_client::FineTuningClient};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{Client, format_time_ms, grpc_error};

/// Bytes per upload message.
const UPLOAD_CHUNK: usize = 1 << 20;

#[derive(Subcommand)]
pub enum DatasetsCommand {
    /// Upload a JSONL dataset: every line is checked (bad lines are listed
    /// by number and reason, and the dataset is then rejected whole), the
    /// accepted ones de-identified and split train/eval.
    Upload {
        file: std::path::PathBuf,
        /// The name jobs use (`finetune create --dataset NAME`).
        #[arg(long)]
        name: String,
        /// messages ({"messages":[…]}), alpaca ({"instruction","input","output"}) or text ({"text"}).
        #[arg(long, default_value = "messages")]
        format: String,
        /// Percent held out for evaluation, 1 to 50 (default 5).
        #[arg(long)]
        eval_percent: Option<u32>,
        /// Seed of the train/eval split (default 42).
        #[arg(long)]
        split_seed: Option<u64>,
    },
    /// Every upload, newest first.
    List,
}

#[derive(Subcommand)]
pub enum FinetuneCommand {
    /// Queue a fine-tuning job; prints its id.
    Create {
        /// The model to train (registered name or alias).
        #[arg(long = "base")]
        base: String,
        /// Dataset name (its newest upload) or id.
        #[arg(long)]
        dataset: String,
        /// lora, full or distill.
        #[arg(long)]
        method: String,
        /// The teacher model (method distill).
        #[arg(long)]
        teacher: Option<String>,
        #[arg(long)]
        epochs: Option<u32>,
        /// Peak learning rate (default: 2e-4 for lora, 1e-5 otherwise).
        #[arg(long)]
        lr: Option<f64>,
        #[arg(long)]
        batch_size: Option<u32>,
        /// LoRA rank (default 16).
        #[arg(long)]
        lora_r: Option<u32>,
        /// Stop after this many evaluations without a better eval loss.
        #[arg(long)]
        early_stopping_patience: Option<u32>,
        /// Seed of data order and initialisation (default 42).
        #[arg(long)]
        seed: Option<u64>,
        /// The name the result is registered under (a new version of it).
        #[arg(long)]
        output: String,
    },
    /// Follow a job with a live progress bar; exits 0 only when it succeeded.
    Watch { id: String },
    /// Jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
}

fn client(client: &Client) -> FineTuningClient<Channel> {
    FineTuningClient::new(client.channel.clone())
}

pub async fn datasets(
    client_: &Client,
    command: &DatasetsCommand,
    as_json: bool,
) -> anyhow::Result<()> {
    match command {
        DatasetsCommand::Upload {
            file,
            name,
            format,
            eval_percent,
            split_seed,
        } => {
            let header = pb::DatasetHeader {
                name: name.clone(),
                format: format.clone(),
                eval_percent: eval_percent.unwrap_or(0),
                split_seed: *split_seed,
            };
            upload(client_, file, header, as_json).await
        }
        DatasetsCommand::List => {
            let datasets = client(client_)
                .list_datasets(client_.request(pb::ListDatasetsRequest {}))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .datasets;
            if as_json {
                for dataset in &datasets {
                    println!("{}", dataset_json(dataset));
                }
                return Ok(());
            }
            println!(
                "{:<16} {:<24} {:<9} {:<9} {:>8} {:>7} {:>6} {:<21} SHA-256",
                "ID", "NAME", "FORMAT", "STATE", "EXAMPLES", "TRAIN", "EVAL", "UPLOADED"
            );
            for dataset in &datasets {
                println!(
                    "{:<16} {:<24} {:<9} {:<9} {:>8} {:>7} {:>6} {:<21} {}",
                    dataset.id,
                    dataset.name,
                    dataset.format,
                    dataset.state,
                    dataset.valid_lines,
                    dataset.train_examples,
                    dataset.eval_examples,
                    format_time_ms(dataset.created_at),
                    short_hash(&dataset.sha256)
                );
            }
            Ok(())
        }
    }
}

fn short_hash(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

fn dataset_json(dataset: &pb::Dataset) -> serde_json::Value {
    json!({
        "id": dataset.id,
        "name": dataset.name,
        "format": dataset.format,
        "state": dataset.state,
        "sha256": dataset.sha256,
        "bytes": dataset.bytes,
        "lines": dataset.lines,
        "blank_lines": dataset.blank_lines,
        "valid_lines": dataset.valid_lines,
        "invalid_lines": dataset.invalid_lines,
        "train_examples": dataset.train_examples,
        "eval_examples": dataset.eval_examples,
        "eval_percent": dataset.eval_percent,
        "split_seed": dataset.split_seed,
        "deidentified": dataset.deidentified,
        "errors": dataset.errors.iter().map(|error| json!({
            "line": error.line, "kind": error.kind, "reason": error.reason,
        })).collect::<Vec<_>>(),
        "invalid_by_kind": dataset.invalid_by_kind,
        "summary": dataset.summary,
        "created_at": dataset.created_at,
    })
}

/// A bar on stderr when it is a terminal and the output is for people.
fn progress_bar(length: u64, template: &str, as_json: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if as_json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn upload(
    client_: &Client,
    path: &Path,
    header: pb::DatasetHeader,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let length = file
        .metadata()
        .await
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let bar = progress_bar(
        length,
        "uploading [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        as_json,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = {
        let bar = bar.clone();
        let shown = path.display().to_string();
        tokio::spawn(async move {
            let first = pb::UploadDatasetRequest {
                part: Some(pb::upload_dataset_request::Part::Header(header)),
            };
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            loop {
                let mut chunk = vec![0_u8; UPLOAD_CHUNK];
                let read = file
                    .read(&mut chunk)
                    .await
                    .with_context(|| format!("cannot read {shown}"))?;
                if read == 0 {
                    return Ok(());
                }
                chunk.truncate(read);
                let message = pb::UploadDatasetRequest {
                    part: Some(pb::upload_dataset_request::Part::Chunk(chunk)),
                };
                if tx.send(message).await.is_err() {
                    // The server answered early (an error); it says why.
                    return Ok(());
                }
                bar.inc(read as u64);
            }
        })
    };
    let mut request = client_.request(ReceiverStream::new(rx));
    // The server validates and de-identifies before answering: no deadline here.
    request.set_timeout(std::time::Duration::from_secs(3600));
    let answer = client(client_).upload_dataset(request).await;
    let read: anyhow::Result<()> = reader.await.context("the file reader stopped")?;
    read?;
    bar.finish_and_clear();
    let dataset = answer
        .map_err(grpc_error)?
        .into_inner()
        .dataset
        .context("the answer carries no dataset")?;
    if as_json {
        println!("{}", dataset_json(&dataset));
    } else {
        print_upload(&dataset);
    }
    if dataset.state != "accepted" {
        bail!(
            "dataset `{}` was rejected: {} bad lines",
            dataset.name,
            dataset.invalid_lines
        );
    }
    Ok(())
}

fn print_upload(dataset: &pb::Dataset) {
    println!(
        "{} `{}` ({}): {}",
        dataset.id, dataset.name, dataset.format, dataset.summary
    );
    if dataset.state == "accepted" {
        println!("sha256: {}", dataset.sha256);
        if !dataset.deidentified.is_empty() {
            let mut counts: Vec<String> = dataset
                .deidentified
                .iter()
                .map(|(category, count)| format!("{category} {count}"))
                .collect();
            counts.sort();
            println!("de-identified: {}", counts.join(", "));
        }
        return;
    }
    for error in &dataset.errors {
        println!("  line {}: {}", error.line, error.reason);
    }
    let shown = dataset.errors.len() as u64;
    if dataset.invalid_lines > shown {
        println!("  … and {} more bad lines", dataset.invalid_lines - shown);
    }
    if !dataset.invalid_by_kind.is_empty() {
        let mut kinds: Vec<String> = dataset
            .invalid_by_kind
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        kinds.sort();
        println!("bad lines by kind: {}", kinds.join(", "));
    }
}

fn job_json(job: &pb::Job) -> serde_json::Value {
    json!({
        "id": job.id,
        "state": job.state,
        "method": job.method,
        "base_model": job.base_model,
        "teacher_model": job.teacher_model,
        "dataset_id": job.dataset_id,
        "dataset_name": job.dataset_name,
        "hyperparameters": serde_json::from_str::<serde_json::Value>(&job.hyperparameters_json).unwrap_or_default(),
        "seed": job.seed,
        "output_name": job.output_name,
        "error": job.error,
        "attempts": job.attempts,
        "step": job.step,
        "total_steps": job.total_steps,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "model_version": job.model_version,
        "model_kind": job.model_kind,
    })
}

pub async fn finetune(
    client_: &Client,
    command: &FinetuneCommand,
    as_json: bool,
) -> anyhow::Result<()> {
    match command {
        FinetuneCommand::Create {
            base,
            dataset,
            method,
            teacher,
            epochs,
            lr,
            batch_size,
            lora_r,
            early_stopping_patience,
            seed,
            output,
        } => {
            let request = pb::CreateJobRequest {
                base_model: base.clone(),
                dataset: dataset.clone(),
                method: method.clone(),
                teacher_model: teacher.clone().unwrap_or_default(),
                hyperparameters: Some(pb::Hyperparameters {
                    epochs: *epochs,
                    learning_rate: *lr,
                    batch_size: *batch_size,
                    lora_r: *lora_r,
                    early_stopping_patience: *early_stopping_patience,
                    ..Default::default()
                }),
                output_name: output.clone(),
                seed: *seed,
            };
            let job = client(client_)
                .create_job(client_.request(request))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .job
                .context("the answer carries no job")?;
            if as_json {
                println!("{}", json!({"id": job.id}));
            } else {
                println!("{}", job.id);
                eprintln!(
                    "queued; follow it with: medboxctl finetune watch {}",
                    job.id
                );
            }
            Ok(())
        }
        FinetuneCommand::Watch { id } => watch(client_, id, as_json).await,
        FinetuneCommand::List { state } => {
            let jobs = client(client_)
                .list_jobs(client_.request(pb::ListJobsRequest {
                    state: state.clone().unwrap_or_default(),
                    limit: 0,
                }))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .jobs;
            if as_json {
                for job in &jobs {
                    println!("{}", job_json(job));
                }
                return Ok(());
            }
            println!(
                "{:<17} {:<10} {:<8} {:<16} {:<20} {:<24} {:>11} CREATED",
                "ID", "STATE", "METHOD", "BASE", "DATASET", "OUTPUT", "STEP"
            );
            for job in &jobs {
                let output = if job.model_version > 0 {
                    format!("{} v{}", job.output_name, job.model_version)
                } else {
                    job.output_name.clone()
                };
                println!(
                    "{:<17} {:<10} {:<8} {:<16} {:<20} {:<24} {:>11} {}",
                    job.id,
                    job.state,
                    job.method,
                    job.base_model,
                    job.dataset_name,
                    output,
                    format!("{}/{}", job.step, job.total_steps),
                    format_time_ms(job.created_at)
                );
                if !job.error.is_empty() {
                    println!("  error: {}", job.error);
                }
            }
            Ok(())
        }
        FinetuneCommand::Cancel { id } => {
            let job = client(client_)
                .cancel_job(client_.request(pb::CancelJobRequest { id: id.clone() }))
                .await
                .map_err(grpc_error)?
                .into_inner()
                .job
                .context("the answer carries no job")?;
            if as_json {
                println!("{}", job_json(&job));
            } else {
                println!("{} {}", job.id, job.state);
            }
            if job.state != "cancelled" {
                bail!(
                    "job {} ended {} before the cancel took effect",
                    job.id,
                    job.state
                );
            }
            Ok(())
        }
    }
}

fn event_json(event: &pb::JobEvent) -> serde_json::Value {
    let mut value = json!({"seq": event.seq, "job_id": event.job_id, "at": event.at});
    match &event.event {
        Some(pb::job_event::Event::State(change)) => {
            value["kind"] = json!("state");
            value["state"] = json!(change.state);
            value["message"] = json!(change.message);
        }
        Some(pb::job_event::Event::Progress(progress)) => {
            value["kind"] = json!("progress");
            value["step"] = json!(progress.step);
            value["total_steps"] = json!(progress.total_steps);
            value["epoch"] = json!(progress.epoch);
            value["loss"] = json!(progress.loss);
            value["learning_rate"] = json!(progress.learning_rate);
            value["tokens_per_second"] = json!(progress.tokens_per_second);
            value["eta_seconds"] = json!(progress.eta_seconds);
        }
        Some(pb::job_event::Event::Eval(eval)) => {
            value["kind"] = json!("eval");
            value["step"] = json!(eval.step);
            value["eval_loss"] = json!(eval.eval_loss);
        }
        Some(pb::job_event::Event::Checkpoint(checkpoint)) => {
            value["kind"] = json!("checkpoint");
            value["step"] = json!(checkpoint.step);
        }
        None => value["kind"] = json!("unknown"),
    }
    value
}

/// `1h02m`, `4m05s`, `12s`.
fn format_eta(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (hours, minutes, seconds) = (total / 3600, total % 3600 / 60, total % 60);
    if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m{seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

async fn watch(client_: &Client, id: &str, as_json: bool) -> anyhow::Result<()> {
    let mut stream = client(client_)
        .watch_job(client_.request(pb::WatchJobRequest { id: id.to_owned() }))
        .await
        .map_err(grpc_error)?
        .into_inner();
    let bar = progress_bar(0, "{prefix} [{bar:40}] {pos}/{len} steps {msg}", as_json);
    bar.set_prefix("queued");
    let mut eval_loss: Option<f64> = None;
    let mut final_state: Option<(String, String)> = None;
    while let Some(event) = stream.message().await.map_err(grpc_error)? {
        if as_json {
            println!("{}", event_json(&event));
        }
        match event.event {
            Some(pb::job_event::Event::State(change)) => {
                bar.set_prefix(change.state.clone());
                if !as_json && !change.message.is_empty() {
                    bar.println(format!("{}: {}", change.state, change.message));
                }
                if matches!(change.state.as_str(), "succeeded" | "failed" | "cancelled") {
                    final_state = Some((change.state, change.message));
                }
            }
            Some(pb::job_event::Event::Progress(progress)) => {
                bar.set_length(progress.total_steps);
                bar.set_position(progress.step);
                let eta = progress
                    .eta_seconds
                    .map(|eta| format!(" ETA {}", format_eta(eta)))
                    .unwrap_or_default();
                let eval = eval_loss
                    .map(|loss| format!(" eval {loss:.4}"))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "loss {:.4}{eval} lr {:.2e} {:.0} tok/s{eta}",
                    progress.loss, progress.learning_rate, progress.tokens_per_second
                ));
            }
            Some(pb::job_event::Event::Eval(eval)) => {
                eval_loss = Some(eval.eval_loss);
                if !as_json {
                    bar.println(format!(
                        "step {}: eval loss {:.4}",
                        eval.step, eval.eval_loss
                    ));
                }
            }
            Some(pb::job_event::Event::Checkpoint(_)) | None => {}
        }
    }
    bar.finish_and_clear();
    let Some((state, message)) = final_state else {
        bail!("the stream ended before job {id} finished (did medboxd stop?); watch it again");
    };
    match state.as_str() {
        "succeeded" => {
            if !as_json {
                println!("job {id} succeeded: {message}");
            }
            Ok(())
        }
        "failed" => bail!("job {id} failed: {message}"),
        _ => bail!("job {id} was {state}"),
    }
}
