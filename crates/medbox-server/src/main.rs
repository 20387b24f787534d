//! `medboxd --config FILE`: serves medbox over gRPC until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use medbox_server::config::Config;

/// The medbox appliance server.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The TOML configuration file; without it, the embedded defaults apply
    /// (every key can also be set as MEDBOX__SECTION__KEY).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("medboxd: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&config.server.log_format);
    if args.check {
        return match config.validate() {
            Ok(models) => {
                println!("configuration ok: {} model(s)", models.len());
                std::process::ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("medboxd: {err}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("medboxd: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("medboxd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = medbox_server::start(config).await?;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    server.wait().await.context("serving")?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops medboxd");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
