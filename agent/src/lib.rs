//! The Drover agent: enrolls once, keeps its identity in its state directory, holds a
//! WebSocket session to the server and heartbeats, reconnecting with backoff.

mod backoff;
mod identity;
mod machine;
mod session;
pub mod version;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "drover-agent", version = version::current(), about = "Drover fleet update agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the server and stay connected
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Server URL, e.g. https://updates.example.com
    #[arg(long, env = "DROVER_SERVER")]
    server: String,

    /// Site enrollment token; needed only until the agent has enrolled
    #[arg(long, env = "DROVER_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,

    /// Directory for the agent's identity and update state
    #[arg(
        long,
        env = "DROVER_STATE_DIR",
        default_value = "/var/lib/drover-agent"
    )]
    state_dir: PathBuf,

    /// Machine fingerprint (default: derived from /etc/machine-id)
    #[arg(long, env = "DROVER_FINGERPRINT")]
    fingerprint: Option<String>,

    /// Hostname to report (default: the machine's)
    #[arg(long, env = "DROVER_HOSTNAME")]
    hostname: Option<String>,

    /// Decline updates pushed by the server
    #[arg(long, env = "DROVER_NO_AUTO_UPDATE")]
    no_auto_update: bool,
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub enroll_token: Option<String>,
    pub state_dir: PathBuf,
    pub fingerprint: String,
    pub hostname: String,
    pub auto_update: bool,
    /// First reconnect delay ceiling; doubles per failed attempt.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
}

/// Runs the agent until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    session::run(config, shutdown).await
}

/// The `drover-agent` binary.
pub fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let fingerprint = match args.fingerprint {
        Some(fingerprint) => fingerprint,
        None => machine::fingerprint()?,
    };
    let config = AgentConfig {
        server: args.server,
        enroll_token: args.enroll_token,
        state_dir: args.state_dir,
        fingerprint,
        hostname: args.hostname.unwrap_or_else(machine::hostname),
        auto_update: !args.no_auto_update,
        reconnect_base: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(60),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
            }
            stop.cancel();
        });
        run(config, shutdown).await
    })
}
