//! The Drover server: agent sessions over WebSocket, the REST API, and storage.
//! `main` parses flags and prepares the data directory; `run` serves on a listener until
//! the shutdown token fires, which is what tests call too.

pub mod api;
mod auth;
mod bootstrap;
mod clock;
pub mod config;
mod heartbeats;
pub mod session;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::session::Registry;
use crate::store::Store;

/// What `run` needs besides the store and the listener.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Interval agents are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// How often batched heartbeats are written to the database.
    pub heartbeat_flush: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_flush: Duration::from_secs(1),
        }
    }
}

/// Shared by every request and session.
#[derive(Clone)]
pub struct AppState {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    heartbeats: HeartbeatSink,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
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
    let (heartbeats, writer) =
        heartbeats::start(store.clone(), settings.heartbeat_flush, shutdown.clone());
    let state = AppState {
        store,
        registry: Arc::new(Registry::default()),
        heartbeats,
        settings: Arc::new(settings),
        shutdown: shutdown.clone(),
    };
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
    .context("while serving")?;
    writer.await.context("heartbeat writer failed")?;
    Ok(())
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .nest(
            "/api/v1",
            api::router().route("/agent/ws", get(agent_socket)),
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
    // Small buffers: a server holds tens of thousands of mostly idle sessions, and the
    // library defaults (128 KiB each way) would cost far more than the session itself.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(WS_MESSAGE_LIMIT)
        .max_frame_size(WS_MESSAGE_LIMIT)
        .on_upgrade(move |socket| session::run(socket, state, peer.to_string()))
}

/// The `drover-server` binary.
pub fn main() -> anyhow::Result<()> {
    let args = config::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?
        .block_on(serve_from_args(args))
}

async fn serve_from_args(args: config::Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "while creating the data directory {}",
            args.data_dir.display()
        )
    })?;
    std::fs::create_dir_all(&args.downloads).with_context(|| {
        format!(
            "while creating the downloads directory {}",
            args.downloads.display()
        )
    })?;
    let (store, database) = store::open(args.database.as_deref(), &args.data_dir).await?;
    let tokens = bootstrap::first_start(&*store, &args.data_dir).await?;
    let listener = bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let ws_url = public_url.replacen("http", "ws", 1);

    println!(
        "drover-server {} listening on http://{addr}",
        env!("CARGO_PKG_VERSION")
    );
    println!("  REST API:          {public_url}/api/v1  (Authorization: Bearer <admin token>)");
    println!("  agent endpoint:    {ws_url}/api/v1/agent/ws");
    println!("  database:          {database}");
    println!("  downloads:         {}", args.downloads.display());
    println!("  admin token:       {}", tokens.admin);
    println!("  enrollment token:  {}", tokens.enroll);
    println!(
        "  start an agent:    drover-agent run --server {public_url} --enroll-token <enrollment token> --state-dir ./agent-state"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let settings = Settings {
        heartbeat_interval: args.heartbeat_interval,
        ..Settings::default()
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
