//! `medbox-trainer --job-dir <data_dir>/jobs/<id>`: runs one fine-tuning job
//! for `medboxd` (the contract: `medbox_finetune::protocol` and
//! `docs/finetune.md`). Events on stdout, logs on stderr, SIGTERM cancels.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use medbox_finetune::protocol::{JOB_DIR_ARG, TrainerEvent};
use medbox_finetune::trainer::{self, TrainerError};
use nix::sys::signal::{SigSet, Signal};

/// Exit status after SIGTERM (128 + 15, as a shell reports it).
const CANCELLED_STATUS: u8 = 143;

fn job_dir() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == JOB_DIR_ARG => Ok(PathBuf::from(dir)),
        _ => bail!("usage: medbox-trainer {JOB_DIR_ARG} <job folder>"),
    }
}

/// Blocks SIGTERM in every thread (libtorch's included, which start later)
/// and waits for it on one thread of its own, which sets `stop`.
fn watch_for_sigterm(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("blocking SIGTERM for the signal thread")?;
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            while signals.wait().is_ok_and(|signal| signal != Signal::SIGTERM) {}
            tracing::info!("SIGTERM: stopping at the next micro-batch");
            stop.store(true, Ordering::SeqCst);
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDBOX_TRAINER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let stop = Arc::new(AtomicBool::new(false));
    let started = job_dir().and_then(|dir| watch_for_sigterm(Arc::clone(&stop)).map(|()| dir));
    let dir = match started {
        Ok(dir) => dir,
        Err(error) => {
            tracing::error!("{error:#}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout();
    let mut emit = |event: &TrainerEvent| -> std::io::Result<()> {
        let mut line = event.to_line();
        line.push('\n');
        stdout.write_all(line.as_bytes())?;
        stdout.flush()
    };
    match trainer::run(&dir, &mut emit, &stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(TrainerError::Cancelled) => {
            tracing::info!("cancelled; no output written");
            ExitCode::from(CANCELLED_STATUS)
        }
        Err(TrainerError::Disconnected) => {
            tracing::warn!("stdout is closed (medboxd is gone); stopping");
            ExitCode::FAILURE
        }
        Err(TrainerError::Failed { reason, detail }) => {
            tracing::error!(%reason, %detail, "job failed");
            let _stdout_may_be_closed = emit(&TrainerEvent::Failed { reason });
            ExitCode::FAILURE
        }
    }
}
