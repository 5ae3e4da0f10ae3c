//! `drover-sim`: thousands of simulated agents in one process, speaking the real
//! protocol over real WebSockets, for benchmarks and end-to-end tests.

mod agent;
mod download;
mod identities;
mod nats;
mod net;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::sync::{Semaphore, watch};

use crate::agent::{FailurePlan, Fleet, SimAgent};
use crate::identities::Identities;
use crate::net::Endpoint;
use crate::stats::Stats;

/// Simulate a fleet of Drover agents against a server.
#[derive(Debug, Parser)]
#[command(
    name = "drover-sim",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// Server base URL, e.g. http://127.0.0.1:8080; several nodes of one fleet,
    /// comma-separated: each agent starts on one of them (round-robin) and moves to
    /// another (at random) whenever its session is lost
    #[arg(long, env = "DROVER_SERVER", value_delimiter = ',', required = true)]
    server: Vec<String>,
    /// Number the agents from this (their fingerprints and hostnames are `sim-N`), so
    /// several simulators can hold one fleet without sharing a name
    #[arg(long, default_value_t = 0)]
    first_index: usize,
    /// Site enrollment token
    #[arg(long, env = "DROVER_ENROLL_TOKEN")]
    enroll_token: String,
    /// Number of simulated agents
    #[arg(long)]
    agents: usize,
    /// Stop after this many seconds (default: run until SIGINT or SIGTERM)
    #[arg(long)]
    duration: Option<f64>,
    /// Source addresses to spread connections over, round-robin:
    /// `127.0.0.2-127.0.0.9` or a comma-separated list
    #[arg(long)]
    source_ips: Option<String>,
    /// JSON file of agent ids and secrets; read at start and written back, so a rerun
    /// reuses the same agents instead of enrolling new ones
    #[arg(long)]
    identities: Option<PathBuf>,
    /// At most this many downloads at once (default: unlimited)
    #[arg(long)]
    max_downloads: Option<usize>,
    /// Record pushed updates as received and do nothing else: no download, no
    /// progress, no result (measures fan-out alone)
    #[arg(long)]
    hold_updates: bool,
    /// These versions fail on every agent: downloaded and verified, then reported
    /// `rolled_back` (a build failure, as a failed probation) while the agent keeps its
    /// version
    #[arg(long, value_delimiter = ',', value_name = "V[,V...]")]
    fail_versions: Vec<String>,
    /// This share of the agents (0 to 1, spread evenly over them, the same on every run)
    /// fails every build it gets, as `--fail-versions` fails
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Each heartbeat interval varies by up to this fraction of itself (0 to 1)
    #[arg(long, default_value_t = 0.1)]
    heartbeat_jitter: f64,
    /// Heartbeat every this many milliseconds instead of the server's interval (load
    /// tests only: offers more than one heartbeat per agent per second)
    #[arg(long)]
    heartbeat_every_ms: Option<u64>,
    /// At most this many handshakes in flight at once
    #[arg(long, default_value_t = 1000)]
    connect_concurrency: usize,
    /// Version the simulated agents start on
    #[arg(long, default_value = "1.0.0")]
    agent_version: String,
    /// Operating system reported in the hello (selects builds)
    #[arg(long, default_value = "linux")]
    os: String,
    /// Architecture reported in the hello (selects builds)
    #[arg(long, default_value = "amd64")]
    arch: String,
    /// Seconds after every agent has connected before the steady-state heartbeat
    /// figures start counting
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Seconds between progress lines on stderr (0: none)
    #[arg(long, default_value_t = 5.0)]
    report_every: f64,
    /// Print the final report as one JSON object on stdout
    #[arg(long)]
    json: bool,
    /// Write when each agent first held each update (Unix milliseconds, one a line) to
    /// this file at the end, so several simulators' times can be merged exactly
    #[arg(long, value_name = "FILE")]
    update_times: Option<PathBuf>,
    /// The build the agents start on (--agent-version): an offered delta from it is
    /// fetched and applied instead of the compressed copy or the build
    #[arg(long, value_name = "FILE")]
    running_build: Option<PathBuf>,
}

// Other things to simulate than a Drover fleet; without one, the flags of `Args` apply.
// Kept out of `Args` because none of its required flags apply to them. (A plain
// comment: a doc comment here would replace the program's description in --help.)
#[derive(Debug, Subcommand)]
enum Mode {
    /// Hold the same number of connections on a NATS server instead, each publishing
    /// a heartbeat frame at the same rate (to compare the servers' cost)
    Nats(nats::NatsArgs),
}

fn main() -> anyhow::Result<()> {
    let matches = Mode::augment_subcommands(Args::command()).get_matches();
    let mode = matches
        .subcommand_name()
        .map(|_| Mode::from_arg_matches(&matches).unwrap_or_else(|err| err.exit()));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Mode::Nats(nats)) = mode {
        nats.validate()?;
        warn_about_open_files(nats.clients());
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("while starting the async runtime")?
            .block_on(nats::run(nats));
    }
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    if !(0.0..=1.0).contains(&args.heartbeat_jitter) {
        bail!("--heartbeat-jitter must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&args.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    if let Some(bad) = args
        .fail_versions
        .iter()
        .find(|v| semver::Version::parse(v.trim()).is_err())
    {
        bail!("--fail-versions takes strict semver versions, e.g. 1.1.0; {bad:?} is not one");
    }
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if semver::Version::parse(&args.agent_version).is_err() {
        bail!("--agent-version must be strict semver, e.g. 1.0.0");
    }
    warn_about_open_files(args.agents);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let sources = match &args.source_ips {
        Some(spec) => net::parse_source_ips(spec)?,
        None => Vec::new(),
    };
    let mut endpoints = Vec::new();
    for server in &args.server {
        endpoints.push(Endpoint::resolve(server, sources.clone()).await?);
    }
    let mut http = Vec::new();
    for source in sources.iter().copied().map(Some).chain(
        // No source addresses: one client, and the kernel picks.
        sources.is_empty().then_some(None),
    ) {
        http.push(
            reqwest::Client::builder()
                .local_address(source)
                .connect_timeout(Duration::from_secs(10))
                .build()
                .context("while building the HTTP client")?,
        );
    }
    let stats = Arc::new(Stats::new(
        args.agents,
        Duration::from_secs_f64(args.warmup.max(0.0)),
    ));
    let fleet = Arc::new(Fleet {
        endpoints,
        first_index: args.first_index,
        enroll_token: args.enroll_token.clone(),
        os: args.os.clone(),
        arch: args.arch.clone(),
        heartbeat_jitter: args.heartbeat_jitter,
        heartbeat_every: args
            .heartbeat_every_ms
            .map(|ms| Duration::from_millis(ms.max(1))),
        stats: stats.clone(),
        identities: Identities::load(args.identities.as_deref(), args.agents)?,
        handshakes: Semaphore::new(args.connect_concurrency.max(1)),
        downloads: args
            .max_downloads
            .map(|k| Arc::new(Semaphore::new(k.max(1)))),
        hold_updates: args.hold_updates,
        failures: FailurePlan {
            versions: args
                .fail_versions
                .iter()
                .filter_map(|v| semver::Version::parse(v.trim()).ok())
                .collect(),
            rate: args.fail_rate,
        },
        http,
        running_build: match &args.running_build {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("while reading --running-build {}", path.display()))?;
                Some(agent::RunningBuild {
                    version: args.agent_version.clone(),
                    sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                    bytes: bytes.into(),
                })
            }
            None => None,
        },
    });

    let (stop, stopped) = watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    for index in 0..args.agents {
        let agent = SimAgent::new(index, fleet.clone(), args.agent_version.clone());
        agents.spawn(agent.run(stopped.clone()));
    }

    let progress = {
        let (stats, fleet) = (stats.clone(), fleet.clone());
        report_progress(args.report_every, move || {
            eprintln!("{}", stats.report().progress_line());
            if let Err(err) = fleet.identities.save() {
                eprintln!("drover-sim: {err:#}");
            }
        })
    };

    wait_for_end(args.duration).await?;
    // Taken before the agents leave, so it says how many were connected at the end.
    let report = stats.report();
    stop_all(&stop, progress, &mut agents).await;
    fleet.identities.save()?;
    if let Some(path) = &args.update_times {
        let lines: String = stats
            .update_received_times()
            .iter()
            .map(|ms| format!("{ms}\n"))
            .collect();
        std::fs::write(path, lines).with_context(|| format!("while writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

/// Calls `report` every `every_secs` seconds (never when it is 0) until aborted.
fn report_progress(
    every_secs: f64,
    report: impl Fn() + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    (every_secs > 0.0).then(|| {
        let every = Duration::from_secs_f64(every_secs);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                report();
            }
        })
    })
}

/// Tells every simulated client to stop, ends the progress lines, and gives the clients
/// 10 s to leave politely before the rest are dropped.
async fn stop_all(
    stop: &watch::Sender<bool>,
    progress: Option<tokio::task::JoinHandle<()>>,
    clients: &mut tokio::task::JoinSet<()>,
) {
    let _ = stop.send(true);
    if let Some(progress) = progress {
        progress.abort();
    }
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        clients.abort_all();
    }
}

/// Until the duration has passed, or SIGINT or SIGTERM arrives.
async fn wait_for_end(duration: Option<f64>) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("while installing the SIGTERM handler")?;
    let timer = async {
        match duration {
            Some(secs) => tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = timer => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Every agent holds a socket, and some a download connection too. Raising the limit
/// needs a system call this crate may not make (unsafe code is forbidden), so the
/// caller raises it (`ulimit -n`) and we only say when it is too low.
fn warn_about_open_files(agents: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < agents + 64
    {
        eprintln!(
            "drover-sim: warning: the open-files limit is {soft}, too low for {agents} agents; \
             raise it first (ulimit -n {})",
            agents + 1024
        );
    }
}
