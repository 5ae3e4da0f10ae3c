//! The Drover server: agent sessions over WebSocket, the REST API, and storage.
//! `main` parses flags and prepares the data directory; `run` serves on a listener until
//! the shutdown token fires, which is what tests call too.

mod admission;
mod api;
mod auth;
mod backup;
mod bootstrap;
mod claims;
mod clock;
mod compressed;
mod conductor;
pub mod config;
mod dashboard;
mod deltas;
mod dispatch;
mod downloads;
mod engine;
mod events;
mod file_body;
mod heartbeats;
pub mod limits;
pub mod listen;
mod maintenance;
mod metrics;
mod mirrors;
mod nodes;
mod releases;
pub mod retention;
pub mod rollouts;
pub mod session;
pub mod store;
mod task_writer;
pub mod tls;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::heartbeats::HeartbeatSink;
use crate::metrics::{COUNTERS, Counters};
use crate::releases::{Channel, Releases, ScanOptions, WatchOptions};
use crate::session::{Outbound, Registry};
use crate::store::Store;

/// What `run` needs besides the store and the listener.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL agents reach this server at; download URLs start with it.
    pub public_url: String,
    /// Interval agents are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// How often batched heartbeats are written to the database.
    pub heartbeat_flush: Duration,
    pub downloads: PathBuf,
    /// Concurrent downloads served; beyond it 503 with `Retry-After`, and 0 serves none.
    pub max_concurrent_downloads: usize,
    /// A task without progress for this long is timed out.
    pub task_timeout: Duration,
    /// Channel of a build without a `.channel` sidecar.
    pub default_channel: String,
    pub require_signatures: bool,
    /// Rescan period for filesystems that send no change events.
    pub rescan_every: Duration,
    /// Beta successes (settled through the success bake) a promote needs.
    pub gate_min_successes: u64,
    /// Build failures over finished beta updates must stay under this share.
    pub gate_max_failure_rate: f64,
    /// Unfinished beta updates over the beta targets may not exceed this share.
    pub gate_max_unfinished: f64,
    /// A success counts for the gate once the new version stayed connected this long.
    pub success_bake: Duration,
    /// Waves of a promote that names none (cumulative shares, the last 100%).
    pub default_waves: Vec<rollouts::plan::Share>,
    /// How long a wave that passed bakes before the next starts.
    pub wave_bake: Duration,
    /// When a wave halts its rollout and when it passes.
    pub wave_thresholds: rollouts::plan::Thresholds,
    /// How often running rollouts are judged and moved along.
    pub rollout_tick: Duration,
    /// After a failure that was not the build's, the version is offered to that agent
    /// again only after this long.
    pub retry_delay: Duration,
    /// Beta ahead of stable for longer than this is a warning.
    pub stale_stable_after: Duration,
    /// How often agents per version are counted for the adoption history.
    pub snapshot_every: Duration,
    /// How long finished tasks, audit entries and snapshots are kept.
    pub retention: retention::Retention,
    /// When set, `/metrics` answers only requests bearing this token.
    pub metrics_token: Option<String>,
    /// The server-wide download mirror (base URL), for agents whose site and client set
    /// none; `None` serves every build from this server.
    pub download_url: Option<String>,
    /// Serve HTTPS and WSS with this certificate; plain HTTP when `None`.
    pub tls: Option<tls::TlsConfig>,
    /// Enrollment attempts accepted per source address (see `limits`).
    pub enrollment_limits: limits::EnrollmentLimits,
    /// How long a machine's record must have been offline and silent before an
    /// enrollment may re-bind it.
    pub rebind_after: Duration,
    /// Downloads one source address may hold at once; `None`: three quarters of
    /// `max_concurrent_downloads`, rounded up.
    pub max_downloads_per_address: Option<usize>,
    /// Connections held at once, per address, and the header and write timeouts.
    pub connections: listen::ConnectionLimits,
    /// Where the compressed copies of builds are kept (`compressed`); `None` offers
    /// builds only as they are.
    pub compressed_dir: Option<PathBuf>,
    /// The zstd level copies (and deltas) are made at.
    pub compression_level: i32,
    /// Where the deltas between builds are kept (`deltas`); `None` offers none.
    pub deltas_dir: Option<PathBuf>,
    /// Per os/arch, deltas start from this many of the versions most agents run.
    pub delta_bases: usize,
}

impl Settings {
    pub fn new(public_url: String, downloads: PathBuf) -> Settings {
        Settings {
            public_url,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_flush: Duration::from_secs(1),
            downloads,
            max_concurrent_downloads: 64,
            task_timeout: Duration::from_secs(600),
            default_channel: "stable".into(),
            require_signatures: false,
            rescan_every: Duration::from_secs(60),
            gate_min_successes: 3,
            gate_max_failure_rate: 0.1,
            gate_max_unfinished: 0.5,
            success_bake: Duration::from_secs(300),
            default_waves: rollouts::plan::DEFAULT_WAVES.to_vec(),
            wave_bake: Duration::from_secs(600),
            wave_thresholds: rollouts::plan::Thresholds::default(),
            rollout_tick: Duration::from_secs(1),
            retry_delay: Duration::from_secs(60),
            stale_stable_after: Duration::from_secs(7 * 24 * 3600),
            snapshot_every: Duration::from_secs(600),
            retention: retention::Retention::default(),
            metrics_token: None,
            download_url: None,
            tls: None,
            enrollment_limits: limits::EnrollmentLimits::default(),
            rebind_after: Duration::from_secs(600),
            max_downloads_per_address: None,
            connections: listen::ConnectionLimits::default(),
            compressed_dir: None,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            deltas_dir: None,
            delta_bases: DEFAULT_DELTA_BASES,
        }
    }

    fn downloads_per_address(&self) -> usize {
        self.max_downloads_per_address
            .unwrap_or_else(|| (self.max_concurrent_downloads * 3).div_ceil(4))
    }

    fn gate_policy(&self) -> rollouts::health::GatePolicy {
        rollouts::health::GatePolicy {
            min_successes: self.gate_min_successes,
            max_failure_rate: self.gate_max_failure_rate,
            max_unfinished: self.gate_max_unfinished,
        }
    }

    fn stale_stable_after_ms(&self) -> i64 {
        i64::try_from(self.stale_stable_after.as_millis()).unwrap_or(i64::MAX)
    }
}

/// The zstd level of compressed copies. A copy is made once per build, in the
/// background, and every agent downloads it, so the smallest copy wins: 19 (the highest
/// level without a window beyond 8 MiB) made the 5.76 MB agent 2.26 MB in 4.6 s of one
/// core (level 9: 2.49 MB in 0.4 s) and a 42 MB binary 11% smaller than level 9 in
/// 126 s; see BENCHMARKS.md.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 19;

/// Per os/arch, the versions most agents run that deltas are made from, to the newest
/// stable and beta builds: a few cover nearly every agent of a fleet that keeps up, and
/// each costs one delta per build.
pub const DEFAULT_DELTA_BASES: usize = 3;

/// The settings key of the server-wide update switch.
const UPDATES_ENABLED: &str = "updates_enabled";
/// How long a stopping server waits for its sessions to close before it writes their
/// releases and leaves (a session's close frame may take 5 s to go out).
const SESSIONS_END_WITHIN: Duration = Duration::from_secs(6);

/// Shared by every request and session.
#[derive(Clone)]
pub struct AppState {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    heartbeats: HeartbeatSink,
    /// Which sessions this node holds, written in batches.
    claims: claims::Claims,
    /// New update tasks, written in batches.
    tasks: task_writer::TaskWriter,
    releases: Releases,
    settings: Arc<Settings>,
    updates_enabled: Arc<AtomicBool>,
    blocked_versions: Arc<RwLock<HashSet<String>>>,
    /// The rollouts dispatch consults, re-read whenever one changes on any node.
    book: Arc<RwLock<Arc<rollouts::book::Book>>>,
    downloads: Arc<tokio::sync::Semaphore>,
    /// Agent sessions this node may still take (`ConnectionLimits::max_sessions`).
    sessions: Arc<tokio::sync::Semaphore>,
    /// Downloads under way per source address.
    downloads_per_source: Arc<limits::PerSource>,
    /// Signs the grants in download URLs, with the key the nodes share.
    url_signer: downloads::UrlSigner,
    /// The builds' compressed copies that are ready.
    compressed: compressed::Compressed,
    /// The deltas between builds that are ready.
    deltas: deltas::Deltas,
    /// Updates pushed by this node's sessions and not yet downloaded, and who waits.
    admission: Arc<admission::Admission>,
    /// This server process, as the `nodes` table knows it.
    node_id: Arc<str>,
    /// What changed, for the dashboard's live feed.
    events: events::Events,
    /// Enrollment attempts per source address.
    enrollments: Arc<limits::EnrollmentLimiter>,
    /// Dashboard logins per source address.
    logins: Arc<limits::EnrollmentLimiter>,
    shutdown: CancellationToken,
}

impl AppState {
    fn updates_enabled(&self) -> bool {
        self.updates_enabled.load(Ordering::Relaxed)
    }

    fn blocked_versions(&self) -> std::sync::RwLockReadGuard<'_, HashSet<String>> {
        self.blocked_versions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rollouts as last read; a cheap clone of a shared snapshot.
    fn book(&self) -> Arc<rollouts::book::Book> {
        self.book
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `decide` with the server-wide conditions of dispatch.
    fn with_policy<R>(&self, decide: impl FnOnce(&engine::Policy<'_>) -> R) -> R {
        let blocked = self.blocked_versions();
        decide(&engine::Policy {
            updates_enabled: self.updates_enabled(),
            blocked_versions: &blocked,
        })
    }

    /// Re-reads what another node may have changed: the update switch, blocks, halts.
    async fn reload_shared_state(&self) -> store::StoreResult<()> {
        let enabled = self.store.setting(UPDATES_ENABLED).await?.as_deref() != Some("false");
        self.updates_enabled.store(enabled, Ordering::Relaxed);
        self.reload_rollout_state(None).await?;
        // Another node acted (or this one started): which rollout or setting is unknown.
        self.events.rollout(None);
        self.events.settings(None);
        Ok(())
    }

    /// Re-reads the blocked versions from the database into memory.
    async fn reload_blocked_versions(&self) -> store::StoreResult<()> {
        let blocked: HashSet<String> = self.store.blocked_versions().await?.into_iter().collect();
        *self
            .blocked_versions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = blocked;
        Ok(())
    }

    /// Re-reads blocks and rollouts from the database into memory; `known` holds the
    /// targets of a rollout this node has just written.
    async fn reload_rollout_state(
        &self,
        known: Option<rollouts::book::KnownTargets>,
    ) -> store::StoreResult<()> {
        self.reload_blocked_versions().await?;
        let book = conductor::load_book(self, known).await?;
        *self
            .book
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(book);
        Ok(())
    }

    /// Writes an audit entry; a failure to write it is logged, never hidden.
    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: Option<String>,
        result: &str,
    ) {
        let entry = store::AuditEntry {
            id: 0,
            at_ms: clock::now_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail,
            result: result.to_owned(),
        };
        tracing::info!(
            actor,
            action,
            target,
            result,
            detail = entry.detail.as_deref().unwrap_or(""),
            "audit"
        );
        if let Err(err) = self.store.append_audit(&entry).await {
            tracing::error!(%err, action, target, "could not write the audit entry");
        }
        self.events.audit(action);
    }
}

/// Largest WebSocket message accepted at all. Frames above the protocol's own limit but
/// below this one get a `frame_too_large` reject before the session closes.
const WS_MESSAGE_LIMIT: usize = 1024 * 1024;

/// Serves until `shutdown` fires, then closes agent sessions and flushes heartbeats.
pub async fn run(
    store: Arc<dyn Store>,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let default_channel = Channel::parse(&settings.default_channel).with_context(|| {
        format!(
            "default channel {:?} is neither stable nor beta",
            settings.default_channel
        )
    })?;
    let releases = Releases::start(
        settings.downloads.clone(),
        ScanOptions {
            default_channel,
            require_signatures: settings.require_signatures,
        },
        WatchOptions {
            debounce: Duration::from_millis(300),
            fallback_every: settings.rescan_every,
        },
        shutdown.clone(),
    )
    .await?;
    let tls = settings.tls.clone();
    let connection_limits = settings.connections;
    let compressed = match &settings.compressed_dir {
        Some(dir) => compressed::Compressed::start(
            dir.clone(),
            settings.compression_level,
            settings.downloads.clone(),
            releases.clone(),
            shutdown.clone(),
        ),
        None => compressed::Compressed::default(),
    };
    let url_signer = downloads::UrlSigner::load(&*store)
        .await
        .context("while loading the key download URLs are signed with")?;
    let (heartbeats, writer) =
        heartbeats::start(store.clone(), settings.heartbeat_flush, shutdown.clone());
    let registry = Arc::new(Registry::default());
    let events = events::Events::default();
    let node_id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
    let claims = claims::Claims::start(
        store.clone(),
        node_id.clone(),
        registry.clone(),
        events.clone(),
    );
    let state = AppState {
        tasks: task_writer::TaskWriter::start(store.clone(), connection_limits.max_sessions()),
        store,
        registry: registry.clone(),
        heartbeats,
        claims: claims.clone(),
        releases,
        downloads: Arc::new(tokio::sync::Semaphore::new(
            settings.max_concurrent_downloads,
        )),
        downloads_per_source: Arc::new(limits::PerSource::new(settings.downloads_per_address())),
        sessions: Arc::new(tokio::sync::Semaphore::new(
            connection_limits.max_sessions(),
        )),
        url_signer,
        compressed,
        deltas: deltas::Deltas::default(),
        admission: Arc::new(admission::Admission::new(settings.max_concurrent_downloads)),
        enrollments: Arc::new(limits::EnrollmentLimiter::new(settings.enrollment_limits)),
        logins: Arc::new(limits::EnrollmentLimiter::of("login", limits::LOGIN_LIMITS)),
        settings: Arc::new(settings),
        updates_enabled: Arc::new(AtomicBool::new(true)),
        node_id,
        blocked_versions: Arc::default(),
        book: Arc::default(),
        events,
        shutdown: shutdown.clone(),
    };
    state.reload_shared_state().await?;
    if let Some(dir) = &state.settings.deltas_dir {
        deltas::Deltas::start(state.clone(), dir.clone());
    }
    nodes::start(state.clone()).await?;
    record_first_seen(&state).await;
    conductor::start_rollouts_of_new_builds(&state).await;
    tokio::spawn(nudge_on_new_releases(state.clone()));
    tokio::spawn(conductor::drive_all(state.clone()));
    tokio::spawn(snapshot_versions(state.clone()));
    tokio::spawn(retention::run(state.clone()));
    tokio::spawn(dispatch::time_out_silent_agents(state.clone()));
    listen::serve(listener, tls, router(state), connection_limits, shutdown).await;
    // Sessions close on shutdown within a few seconds (a close frame, then the socket).
    // Their releases are written before the process leaves, so the other nodes stop
    // counting its agents online at once, not when its lease runs out.
    let ending = tokio::time::Instant::now() + SESSIONS_END_WITHIN;
    while registry.online_count() > 0 && tokio::time::Instant::now() < ending {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    claims.flush().await;
    writer.await.context("heartbeat writer failed")?;
    Ok(())
}

/// Every change to the offered builds is checked against every agent connected here at
/// once, rather than at each one's next heartbeat. Every node watches the downloads
/// directory itself, so this tells no other node: one build change is one check per node,
/// not one per pair of nodes (a rollout it starts tells the others, once).
async fn nudge_on_new_releases(state: AppState) {
    let mut changes = state.releases.subscribe();
    while changes.changed().await.is_ok() {
        record_first_seen(&state).await;
        conductor::start_rollouts_of_new_builds(&state).await;
        state.events.release();
        state.registry.broadcast_here(|| Outbound::Check);
    }
}

/// Counts agents per version now and then, for the dashboard's adoption chart. With
/// several nodes each counts; the snapshot of one moment is written once. The moments
/// are the interval's boundaries (so nodes write the same ones), and each is counted when
/// it comes, so a snapshot's time is when it was taken.
async fn snapshot_versions(state: AppState) {
    let every = i64::try_from(state.settings.snapshot_every.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    // The first count at once, so a new fleet has a point to show.
    let mut at = clock::now_ms();
    loop {
        if let Err(err) = state.store.record_version_snapshot(at).await {
            tracing::warn!(%err, "could not record the version snapshot");
        }
        let next = (clock::now_ms() / every + 1) * every;
        let wait = u64::try_from(next - clock::now_ms()).unwrap_or(0);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            () = state.shutdown.cancelled() => return,
        }
        at = next;
    }
}

/// Notes when each build was first seen: the stale-stable warning counts from it.
async fn record_first_seen(state: &AppState) {
    let builds: Vec<rollouts::RolloutKey> = state
        .releases
        .current()
        .releases
        .iter()
        .map(|r| (r.version.to_string(), r.os.clone(), r.arch.clone()))
        .collect();
    if let Err(err) = state
        .store
        .record_first_seen(&builds, clock::now_ms())
        .await
    {
        tracing::warn!(%err, "could not record when builds were first seen");
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/downloads/{file}", get(downloads::serve))
        .route("/metrics", get(metrics::render))
        .merge(dashboard::routes())
        .nest(
            "/api/v1",
            api::router(state.clone()).route("/agent/ws", get(agent_socket)),
        )
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "agents_connected": state.registry.online_count(),
    }))
}

async fn agent_socket(
    upgrade: WebSocketUpgrade,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Ok(place) = state.sessions.clone().try_acquire_owned() else {
        Counters::bump(&COUNTERS.sessions_refused_full);
        tracing::debug!(%peer, "session refused: the node holds its most sessions");
        return node_full();
    };
    // Small buffers: a server holds tens of thousands of mostly idle sessions, and the
    // library defaults (128 KiB each way) would cost far more than the session itself.
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(WS_MESSAGE_LIMIT)
        .max_frame_size(WS_MESSAGE_LIMIT)
        .on_upgrade(move |socket| async move {
            session::run(socket, state, peer).await;
            drop(place);
        })
}

/// 503 to an agent the node has no place for, with a spread-out `Retry-After`: the
/// agent tries its next server, or this one again later.
fn node_full() -> Response {
    api::ApiError::Unavailable(
        "this node holds its most agent sessions; try another node or later".into(),
    )
    .retry_after(rand::random_range(5..=30))
}

/// The `drover-server` binary.
pub fn main() -> anyhow::Result<()> {
    let args =
        config::Args::parse_from(config::CONFIG_FILE.expand(std::env::args_os().collect(), 1)?);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        // Colours only for a person at a terminal, not in log files and journals.
        config::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // The event's fields at the top level beside `timestamp`, `level`, `target`.
        config::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?
        .block_on(run_command(args))
}

async fn run_command(args: config::Args) -> anyhow::Result<()> {
    let location = || store::Location::of(args.database.as_deref(), &args.data_dir);
    match &args.command {
        None => serve_from_args(args).await,
        Some(config::Command::Backup { file }) => backup::backup(&location()?, file).await,
        Some(config::Command::Restore { file }) => backup::restore(&location()?, file).await,
    }
}

async fn serve_from_args(args: config::Args) -> anyhow::Result<()> {
    // Before anything is created: a bad certificate should leave no trace behind.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::load(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // A server holds a descriptor per agent: take all the system allows.
    let open_files =
        listen::raise_open_files_limit().context("while raising the open-files limit")?;
    // Tokens and (with SQLite) the database live here: the server's user only.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| {
            format!(
                "while creating the data directory {}",
                args.data_dir.display()
            )
        })?;
    if let Ok(meta) = std::fs::metadata(&args.data_dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            dir = %args.data_dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the data directory is readable by other users; chmod 700 it"
        );
    }
    std::fs::create_dir_all(&args.downloads).with_context(|| {
        format!(
            "while creating the downloads directory {}",
            args.downloads.display()
        )
    })?;
    // One server per SQLite database: a second one (or a restore) is refused while this
    // one runs. Held until the server returns.
    let _database_lock = backup::lock_database(&store::Location::of(
        args.database.as_deref(),
        &args.data_dir,
    )?)?;
    let (store, database) = store::open(args.database.as_deref(), &args.data_dir).await?;
    let tokens = bootstrap::first_start(&*store, &args.data_dir).await?;
    let listener = bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let public_url = args.public_url.as_deref().map_or_else(
        || format!("{scheme}://{addr}"),
        |url| url.trim_end_matches('/').to_owned(),
    );
    let ws_url = public_url.replacen("http", "ws", 1);

    println!(
        "drover-server {} listening on {scheme}://{addr}",
        env!("CARGO_PKG_VERSION")
    );
    println!("  dashboard:         {public_url}/  (log in with the admin token)");
    println!("  REST API:          {public_url}/api/v1  (Authorization: Bearer <admin token>)");
    println!(
        "  agent endpoint:    {ws_url}{}",
        protocol::AGENT_SOCKET_PATH
    );
    println!("  database:          {database}");
    println!("  downloads:         {}", args.downloads.display());
    println!("  admin token:       {}", tokens.admin);
    println!(
        "  enrollment token:  {} ({})",
        tokens.enroll, tokens.enroll_validity
    );
    println!(
        "  start an agent:    drover-agent run --server {public_url} --enroll-token <enrollment token> --state-dir ./agent-state"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let settings = Settings {
        heartbeat_interval: args.heartbeat_interval,
        max_concurrent_downloads: args.max_concurrent_downloads,
        task_timeout: args.task_timeout,
        default_channel: args.default_channel,
        require_signatures: args.require_signatures,
        rescan_every: args.rescan_interval,
        gate_min_successes: args.gate_min_successes,
        gate_max_failure_rate: args.gate_max_failure_rate,
        gate_max_unfinished: args.gate_max_unfinished,
        success_bake: args.success_bake,
        default_waves: rollouts::plan::Plan::parse_shares(std::slice::from_ref(
            &args.default_waves,
        ))
        .map_err(anyhow::Error::msg)?,
        wave_bake: args.wave_bake,
        wave_thresholds: rollouts::plan::Thresholds {
            max_failure_rate: args.halt_failure_rate,
            min_finished: args.halt_min_attempts,
            max_failures: args.halt_max_failures,
            min_success_share: args.wave_min_success_share,
        },
        retry_delay: args.retry_delay,
        rebind_after: args.rebind_after,
        stale_stable_after: args.stale_stable_after,
        snapshot_every: args.snapshot_interval,
        metrics_token: args.metrics_token.clone(),
        download_url: args.download_url.clone(),
        retention: retention::Retention {
            tasks: keep_for(args.retain_tasks),
            audit: keep_for(args.retain_audit),
            snapshots: keep_for(args.retain_snapshots),
            every: args.prune_interval,
        },
        tls,
        enrollment_limits: limits::EnrollmentLimits {
            attempts: args.enroll_limit,
            failures: args.enroll_failure_limit,
        },
        max_downloads_per_address: args.max_downloads_per_address,
        compressed_dir: (args.compression_level > 0).then(|| args.data_dir.join("compressed")),
        compression_level: args.compression_level,
        deltas_dir: (args.compression_level > 0 && args.delta_bases > 0)
            .then(|| args.data_dir.join("deltas")),
        delta_bases: args.delta_bases,
        connections: listen::ConnectionLimits {
            header_timeout: args.header_timeout,
            write_timeout: args.write_timeout,
            ..listen::ConnectionLimits::for_open_files(
                open_files,
                args.max_connections,
                args.max_connections_per_address,
            )
        },
        ..Settings::new(public_url.clone(), args.downloads.clone())
    };
    run(store, settings, listener, shutdown).await
}

/// Binds with a large accept backlog, so a reconnect storm after a restart queues rather
/// than being refused.
async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("while resolving --listen {listen}"))?
        .next()
        .with_context(|| format!("--listen {listen} resolves to no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("while binding {addr}"))?;
    Ok(socket.listen(4096)?)
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = interrupt => {}
        _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// A retention age from a flag: 0 keeps the rows forever.
fn keep_for(age: Duration) -> Option<Duration> {
    (!age.is_zero()).then_some(age)
}
