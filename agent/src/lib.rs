//! The Drover agent: enrolls once, keeps its identity in its state directory, holds a
//! WebSocket session to the server and heartbeats, reconnecting with backoff, and applies
//! pushed updates. `drover-agent run` is a supervisor; the session lives in a worker
//! process (`drover-agent worker`) that the supervisor restarts, and reverts when a new
//! version fails its probation.

mod atomic_file;
mod backoff;
mod config_file;
mod decompress;
mod download;
mod identity;
mod install;
mod journal;
mod machine;
mod platform;
mod service;
mod session;
mod signing;
mod status;
mod supervisor;
mod tls;
mod updater;
pub mod version;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "drover-agent",
    version = version::current(),
    about = "Drover fleet update agent"
)]
struct Cli {
    /// Log lines as `text` or `json` (one object a line, for log collectors); which
    /// lines is set with RUST_LOG (default `info`)
    #[arg(long, global = true, env = "DROVER_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the server and stay connected, applying pushed updates
    Run(RunArgs),
    /// The session process the supervisor starts (not for direct use)
    #[command(hide = true)]
    Worker(RunArgs),
    /// Install, remove, start, stop or query the agent's system service
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// What the Windows service control manager starts (not for direct use)
    #[command(hide = true)]
    ServiceMain(RunArgs),
    /// Show, without the server, what this agent last knew: its id and server, its
    /// version, its connection, the update under way and the last result
    Status(StatusArgs),
    /// Record the release counter of the build being installed (the install scripts
    /// run it with the new executable): checks the build's `.sig` document with the
    /// pinned keys against this executable's bytes, version and platform, and refuses
    /// a build older than one the state directory recorded
    RecordRelease(RecordReleaseArgs),
}

#[derive(Debug, clap::Args)]
struct RecordReleaseArgs {
    /// The agent's state directory (as given to `run`)
    #[arg(long, env = "DROVER_STATE_DIR", default_value_os_t = platform::paths::state_dir())]
    state_dir: PathBuf,
    /// The release key the agent runs with
    #[arg(long, env = "DROVER_PUBLIC_KEY")]
    public_key: String,
    /// A second trusted release key, while rotating
    #[arg(long, env = "DROVER_PUBLIC_KEY_2")]
    public_key_2: Option<String>,
    /// The build's signature document (its `.sig`, as the install endpoint answers it)
    #[arg(long, value_name = "FILE")]
    signature: PathBuf,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The agent's state directory (as given to `run`)
    #[arg(long, env = "DROVER_STATE_DIR", default_value_os_t = platform::paths::state_dir())]
    state_dir: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Config file of `key = value` lines named like these flags (flags win over it)
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,

    /// Server URL, e.g. https://updates.example.com; repeat it (or separate URLs with
    /// commas) to fail over between several servers
    #[arg(
        long = "server",
        env = "DROVER_SERVER",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,

    /// Site enrollment token; needed only until the agent has enrolled
    #[arg(long, env = "DROVER_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,

    /// Directory for the agent's identity and update state [default:
    /// /var/lib/drover-agent on Linux, %ProgramData%\Drover\Agent on Windows,
    /// /Library/Application Support/Drover/Agent on macOS]
    #[arg(long, env = "DROVER_STATE_DIR", default_value_os_t = platform::paths::state_dir(), hide_default_value = true)]
    state_dir: PathBuf,

    /// Machine fingerprint (default: derived from the machine id: /etc/machine-id,
    /// the registry's MachineGuid, or macOS's IOPlatformUUID)
    #[arg(long, env = "DROVER_FINGERPRINT")]
    fingerprint: Option<String>,

    /// Hostname to report (default: the machine's)
    #[arg(long, env = "DROVER_HOSTNAME")]
    hostname: Option<String>,

    /// Decline updates pushed by the server
    #[arg(long, env = "DROVER_NO_AUTO_UPDATE")]
    no_auto_update: bool,

    /// Hex ed25519 release key (`drover keygen`'s .pub): only builds signed with it
    /// are installed, never an older counter, and older versions only when rollback-signed
    #[arg(long, env = "DROVER_PUBLIC_KEY")]
    public_key: Option<String>,

    /// A second trusted release key, for rotation (needs --public-key)
    #[arg(long, env = "DROVER_PUBLIC_KEY_2")]
    public_key_2: Option<String>,

    /// PEM file of the CA to trust for https:// and wss:// servers and downloads,
    /// instead of the built-in web roots
    #[arg(long, env = "DROVER_CA_FILE", value_name = "PATH")]
    ca_file: Option<PathBuf>,

    /// How long a new version has to connect and heartbeat before it is reverted
    #[arg(long, env = "DROVER_PROBATION_TIMEOUT", default_value = "120", value_parser = parse_seconds)]
    probation_timeout: Duration,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .trim_end_matches('s')
        .parse::<u64>()
        .ok()
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server URLs, tried in turn.
    pub servers: Vec<String>,
    /// Dropped once the agent is enrolled (see `session`).
    pub enroll_token: Option<String>,
    /// The config file the settings came from, if any: the enrollment token is removed
    /// from it once the agent is enrolled.
    pub config_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub fingerprint: String,
    pub hostname: String,
    pub auto_update: bool,
    /// The executable updates replace.
    pub exe: PathBuf,
    /// The trusted release keys, when builds must be signed.
    pub(crate) public_key: Option<signing::ReleaseKeys>,
    /// The only CA trusted for TLS (`--ca-file`); the built-in web roots when `None`.
    pub pinned_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// First reconnect delay ceiling; doubles per failed attempt.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
}

/// The `drover-agent` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(config_file::expand(std::env::args_os().collect())?);
    if let Command::ServiceMain(args) = &cli.command {
        // A service has no terminal: its lines (and its workers') go to a file.
        service::log_to_file(&args.state_dir);
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Colours only for a person at a terminal, not in log files and journals.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(async {
            let shutdown = platform::process::stop_signal();
            supervise(args, shutdown).await
        }),
        Command::Service(command) => service::run(command),
        Command::Status(args) => {
            let status = status::read(&args.state_dir)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(())
        }
        Command::RecordRelease(args) => record_release(&args),
        Command::ServiceMain(args) => {
            drop(runtime);
            service::serve(move |shutdown| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("while starting the async runtime")?
                    .block_on(supervise(args, shutdown))
            })
        }
        Command::Worker(args) => {
            let exit = runtime.block_on(work(args))?;
            if matches!(exit, session::Exit::Restart) {
                std::process::exit(supervisor::RESTART_STATUS);
            }
            Ok(())
        }
    }
}

async fn supervise(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Checked here so that a bad flag fails at once rather than in every worker start.
    let config = config_from(&args)?;
    // `config.exe`: handed over to, this process runs from `<exe>.next` (see supervisor).
    let exe = config.exe.clone();
    let worker_args: Vec<String> = std::env::args()
        .skip_while(|arg| arg != "run" && arg != "service-main")
        .skip(1)
        .collect();
    supervisor::Supervisor {
        state_dir: config.state_dir,
        exe,
        worker_args,
        probation: args.probation_timeout,
    }
    .run(shutdown)
    .await
}

async fn work(args: RunArgs) -> anyhow::Result<session::Exit> {
    let config = config_from(&args)?;
    let shutdown = platform::process::stop_signal();
    // The supervisor holds our stdin open; when it goes away, so do we.
    let orphaned = shutdown.clone();
    tokio::spawn(async move {
        let ended = platform::process::stdin_closed().await;
        tracing::warn!(%ended, "the supervisor is gone; stopping");
        orphaned.cancel();
    });
    session::run(config, shutdown).await
}

fn record_release(args: &RecordReleaseArgs) -> anyhow::Result<()> {
    let keys = release_keys(Some(&args.public_key), args.public_key_2.as_deref())?
        .context("--public-key is required")?;
    let document = std::fs::read_to_string(&args.signature)
        .with_context(|| format!("while reading {}", args.signature.display()))?;
    let exe = std::env::current_exe().context("cannot find this agent's executable")?;
    let digest = install::sha256_file(&exe)?;
    platform::permissions::create_private_dir(&args.state_dir).with_context(|| {
        format!(
            "while creating the state directory {}",
            args.state_dir.display()
        )
    })?;
    let version = version::current();
    let counter = signing::record_release(
        &keys,
        &args.state_dir,
        &document,
        &signing::InstalledBuild {
            version,
            os: machine::os(),
            arch: machine::arch(),
            digest: &digest,
        },
    )
    .with_context(|| format!("the signature of {version} does not hold"))?;
    println!("recorded release counter {counter} of {version}");
    Ok(())
}

/// The trusted release keys from the flags; `None` without `--public-key`.
fn release_keys(
    primary: Option<&str>,
    secondary: Option<&str>,
) -> anyhow::Result<Option<signing::ReleaseKeys>> {
    let key = |text: Option<&str>, flag: &str| {
        text.map(signing::parse_public_key)
            .transpose()
            .with_context(|| format!("bad {flag}"))
    };
    match (
        key(primary, "--public-key")?,
        key(secondary, "--public-key-2")?,
    ) {
        (Some(primary), secondary) => Ok(Some(signing::ReleaseKeys { primary, secondary })),
        (None, Some(_)) => anyhow::bail!("--public-key-2 is a second key: give --public-key too"),
        (None, None) => Ok(None),
    }
}

fn config_from(args: &RunArgs) -> anyhow::Result<AgentConfig> {
    let fingerprint = match &args.fingerprint {
        Some(fingerprint) => fingerprint.clone(),
        None => machine::fingerprint()?,
    };
    let exe = match std::env::var_os(supervisor::EXE_ENV) {
        Some(path) => PathBuf::from(path),
        None => install::installed_path(
            std::env::current_exe().context("cannot find this agent's executable")?,
        ),
    };
    let public_key = release_keys(args.public_key.as_deref(), args.public_key_2.as_deref())?;
    let pinned_tls = args.ca_file.as_deref().map(tls::pinned).transpose()?;
    if pinned_tls.is_some()
        && let Some(plain) = args
            .servers
            .iter()
            .find(|s| !s.trim().starts_with("https://") && !s.trim().starts_with("wss://"))
    {
        tracing::warn!(server = %plain, "--ca-file is set, but this server URL does not use TLS");
    }
    Ok(AgentConfig {
        servers: args
            .servers
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        enroll_token: args.enroll_token.clone(),
        config_file: args.config.clone(),
        state_dir: args.state_dir.clone(),
        fingerprint,
        hostname: args.hostname.clone().unwrap_or_else(machine::hostname),
        auto_update: !args.no_auto_update,
        exe,
        public_key,
        pinned_tls,
        reconnect_base: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(60),
    })
}
