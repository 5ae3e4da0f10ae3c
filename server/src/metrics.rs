//! `GET /metrics`: Prometheus text for the fleet, rollouts and warnings, and the few
//! process-wide counters the rest of the server bumps (`COUNTERS`). METRICS.md documents
//! every name; deploy/grafana/drover.json is built on them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::api::ApiError;

/// Counters bumped where things happen; read only here.
pub(crate) struct Counters {
    /// Downloads answered 503 because every slot was busy.
    pub(crate) downloads_refused_busy: AtomicU64,
    /// Downloads refused because updates or downloads are off, or the build is blocked.
    pub(crate) downloads_refused_off: AtomicU64,
    /// Downloads whose bytes this node began to send (a full build or a range of one).
    pub(crate) downloads_served: AtomicU64,
    /// Downloads answered 503 because their source address held its share of slots.
    pub(crate) downloads_refused_address: AtomicU64,
    /// Downloads answered 503 because their task was not written yet.
    pub(crate) downloads_refused_unwritten: AtomicU64,
    /// Connections closed at accept because the server held its maximum.
    pub(crate) connections_refused_full: AtomicU64,
    /// Connections closed at accept because their source address held its maximum.
    pub(crate) connections_refused_address: AtomicU64,
    /// Agent sessions answered 503 because the node held its most sessions.
    pub(crate) sessions_refused_full: AtomicU64,
    /// Database statements that failed for a reason other than "not found" or a conflict.
    pub(crate) database_errors: AtomicU64,
    /// Milliseconds between the oldest heartbeat of the last written batch and the end
    /// of its write.
    pub(crate) heartbeat_write_lag_ms: AtomicU64,
    /// Ended tasks by status and class, in `TASK_ENDINGS` order.
    task_endings: [AtomicU64; TASK_ENDINGS.len()],
    /// Times this node checked every agent connected to it.
    pub(crate) fleet_checks: AtomicU64,
    /// Sweeps for silent agents' tasks this node ran, holding the sweep's lease.
    pub(crate) silent_task_sweeps: AtomicU64,
    /// Signals this node received from the others, by kind (`SIGNALS` order).
    signals_received: [AtomicU64; SIGNALS.len()],
    /// Sessions re-checked after this node lost the other nodes' signals for a while:
    /// those that held what the database says, and those that had missed a change.
    rechecked_unchanged: AtomicU64,
    rechecked_refreshed: AtomicU64,
}

/// The kinds of signal between nodes.
pub(crate) const SIGNALS: [&str; 4] = ["refresh", "check_all", "blocked", "claimed"];

/// The (status, class) pairs a task ends with.
const TASK_ENDINGS: [(&str, &str); 9] = [
    ("succeeded", "none"),
    ("failed", "build"),
    ("failed", "environment"),
    ("failed", "transient"),
    ("rolled_back", "build"),
    ("timed_out", "build"),
    ("timed_out", "transient"),
    ("cancelled", "transient"),
    ("other", "other"),
];

pub(crate) static COUNTERS: Counters = Counters {
    downloads_refused_busy: AtomicU64::new(0),
    downloads_refused_off: AtomicU64::new(0),
    downloads_served: AtomicU64::new(0),
    downloads_refused_address: AtomicU64::new(0),
    downloads_refused_unwritten: AtomicU64::new(0),
    connections_refused_full: AtomicU64::new(0),
    connections_refused_address: AtomicU64::new(0),
    sessions_refused_full: AtomicU64::new(0),
    database_errors: AtomicU64::new(0),
    heartbeat_write_lag_ms: AtomicU64::new(0),
    task_endings: [const { AtomicU64::new(0) }; TASK_ENDINGS.len()],
    fleet_checks: AtomicU64::new(0),
    silent_task_sweeps: AtomicU64::new(0),
    signals_received: [const { AtomicU64::new(0) }; SIGNALS.len()],
    rechecked_unchanged: AtomicU64::new(0),
    rechecked_refreshed: AtomicU64::new(0),
};

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A signal of `kind` (one of `SIGNALS`) arrived from another node, naming `items`
    /// agents (1 for a `check_all` or a `blocked`).
    pub(crate) fn signal_received(&self, kind: &str, items: usize) {
        if let Some(index) = SIGNALS.iter().position(|k| *k == kind) {
            self.signals_received[index].fetch_add(items as u64, Ordering::Relaxed);
        }
    }

    /// A session was re-checked after lost signals; `missed` when it had missed a change
    /// and re-read its agent.
    pub(crate) fn session_rechecked(&self, missed: bool) {
        let counter = if missed {
            &self.rechecked_refreshed
        } else {
            &self.rechecked_unchanged
        };
        Counters::bump(counter);
    }

    /// `tasks` tasks ended on this server with `status` and `class`.
    pub(crate) fn tasks_ended(&self, status: &str, class: Option<&str>, tasks: usize) {
        let class = class.unwrap_or("none");
        let index = TASK_ENDINGS
            .iter()
            .position(|&(s, c)| s == status && c == class)
            .unwrap_or(TASK_ENDINGS.len() - 1);
        self.task_endings[index].fetch_add(tasks as u64, Ordering::Relaxed);
    }
}

/// Whether a request may read `/metrics`: anyone, unless `--metrics-token` is set; then
/// only with `Authorization: Bearer <that token>`.
fn allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.settings.metrics_token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compared as digests: equal-length values, so the time taken says nothing.
    Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
}

pub(crate) async fn render(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if !allowed(&state, &headers) {
        return Err(ApiError::Unauthorized(
            "this server's /metrics needs its --metrics-token as a bearer token",
        ));
    }
    let mut out = String::new();
    // Counted in the database: a scrape reads no agent rows.
    let agents = state.store.count_agents().await?;
    metric(
        &mut out,
        "drover_agents",
        "gauge",
        "Agents known to the server.",
    );
    let _ = writeln!(out, "drover_agents {agents}");
    metric(
        &mut out,
        "drover_agents_connected",
        "gauge",
        "Agents with a live session on this server node.",
    );
    let _ = writeln!(
        out,
        "drover_agents_connected{{node=\"{}\"}} {}",
        state.node_id,
        state.registry.online_count()
    );
    metric(
        &mut out,
        "drover_updates_enabled",
        "gauge",
        "1 when updates are enabled server-wide.",
    );
    let _ = writeln!(
        out,
        "drover_updates_enabled {}",
        u8::from(state.updates_enabled())
    );

    metric(
        &mut out,
        "drover_download_queue",
        "gauge",
        "Agents whose update waits for a download slot on this server.",
    );
    let _ = writeln!(out, "drover_download_queue {}", state.admission.waiting());
    metric(
        &mut out,
        "drover_downloads_in_flight",
        "gauge",
        "Build downloads being served by this server now.",
    );
    let in_flight = state
        .settings
        .max_concurrent_downloads
        .saturating_sub(state.downloads.available_permits());
    let _ = writeln!(out, "drover_downloads_in_flight {in_flight}");
    metric(
        &mut out,
        "drover_downloads_served_total",
        "counter",
        "Build downloads this node began to send (a whole build, or the rest of one after a resume).",
    );
    let _ = writeln!(
        out,
        "drover_downloads_served_total {}",
        COUNTERS.downloads_served.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "drover_downloads_refused_total",
        "counter",
        "Build downloads refused: busy (503, every slot still taken after 5 s), address (503, the source address holds its share of slots), unwritten (503, the task's update went out before its row was written and no node has written it yet) or off (updates off, downloads off, or the build rolled back).",
    );
    let c = &COUNTERS;
    for (reason, counter) in [
        ("busy", &c.downloads_refused_busy),
        ("address", &c.downloads_refused_address),
        ("unwritten", &c.downloads_refused_unwritten),
        ("off", &c.downloads_refused_off),
    ] {
        let _ = writeln!(
            out,
            "drover_downloads_refused_total{{reason=\"{reason}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    metric(
        &mut out,
        "drover_connections_refused_total",
        "counter",
        "Connections closed as soon as accepted: full (the server holds --max-connections) or address (the source address holds --max-connections-per-address).",
    );
    for (reason, counter) in [
        ("full", &c.connections_refused_full),
        ("address", &c.connections_refused_address),
    ] {
        let _ = writeln!(
            out,
            "drover_connections_refused_total{{reason=\"{reason}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    metric(
        &mut out,
        "drover_sessions_refused_total",
        "counter",
        "Agent sessions answered 503 because the node held its most sessions (--max-connections less the connections kept for downloads, operators and health checks); those agents try another node.",
    );
    let _ = writeln!(
        out,
        "drover_sessions_refused_total {}",
        c.sessions_refused_full.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "drover_task_endings_total",
        "counter",
        "Update tasks this server node ended, by status and failure class.",
    );
    for ((status, class), counter) in TASK_ENDINGS.iter().zip(&c.task_endings) {
        let _ = writeln!(
            out,
            "drover_task_endings_total{{status=\"{status}\",class=\"{class}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    metric(
        &mut out,
        "drover_fleet_checks_total",
        "counter",
        "Times this node checked every agent connected to it (a build or rollout changed).",
    );
    let _ = writeln!(
        out,
        "drover_fleet_checks_total {}",
        c.fleet_checks.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "drover_silent_task_sweeps_total",
        "counter",
        "Sweeps for the tasks of agents gone silent that this node ran; one node at a time holds the sweep's lease.",
    );
    let _ = writeln!(
        out,
        "drover_silent_task_sweeps_total {}",
        c.silent_task_sweeps.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "drover_node_signals_received_total",
        "counter",
        "What other nodes asked of this one: refresh (an agent), check_all, blocked (re-read the blocked versions), claimed (an agent's session moved).",
    );
    for (kind, counter) in SIGNALS.iter().zip(&c.signals_received) {
        let _ = writeln!(
            out,
            "drover_node_signals_received_total{{signal=\"{kind}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    metric(
        &mut out,
        "drover_sessions_rechecked_total",
        "counter",
        "Sessions re-checked after this node's connection to the other nodes came back: unchanged, or refreshed because they had missed a change.",
    );
    for (outcome, counter) in [
        ("unchanged", &c.rechecked_unchanged),
        ("refreshed", &c.rechecked_refreshed),
    ] {
        let _ = writeln!(
            out,
            "drover_sessions_rechecked_total{{outcome=\"{outcome}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    metric(
        &mut out,
        "drover_heartbeat_write_lag_seconds",
        "gauge",
        "Age of the oldest heartbeat in the last batch written, when its write ended.",
    );
    let _ = writeln!(
        out,
        "drover_heartbeat_write_lag_seconds {:.3}",
        c.heartbeat_write_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );
    metric(
        &mut out,
        "drover_database_errors_total",
        "counter",
        "Database statements that failed (not counting rows not found and conflicts).",
    );
    let _ = writeln!(
        out,
        "drover_database_errors_total {}",
        c.database_errors.load(Ordering::Relaxed)
    );

    let book = state.book();
    let mut open = Vec::new();
    for live in book.rollouts().filter(|r| r.record.state.is_open()) {
        let rollout = &live.record;
        let health = crate::conductor::health(&state, rollout, |_| true).await?;
        let labels = format!(
            "rollout=\"{}\",version=\"{}\",kind=\"{}\",state=\"{}\"",
            rollout.id,
            rollout.version,
            rollout.kind.as_str(),
            rollout.state.as_str()
        );
        open.push((labels, health.total, rollout.current_wave));
    }
    metric(
        &mut out,
        "drover_rollout_agents",
        "gauge",
        "Targets of each open rollout by stage (the stages add up to its targets).",
    );
    for (labels, total, _) in &open {
        for stage in crate::rollouts::health::Stage::ALL {
            let _ = writeln!(
                out,
                "drover_rollout_agents{{{labels},stage=\"{}\"}} {}",
                stage.as_str(),
                total.of(stage)
            );
        }
    }
    metric(
        &mut out,
        "drover_rollout_failures",
        "gauge",
        "Ended tasks of each open rollout that failed, by failure class (only build failures halt).",
    );
    for (labels, total, _) in &open {
        let f = &total.failures;
        for (class, tasks) in [
            ("build", f.build),
            ("environment", f.environment),
            ("transient", f.transient),
        ] {
            let _ = writeln!(
                out,
                "drover_rollout_failures{{{labels},class=\"{class}\"}} {tasks}"
            );
        }
    }
    metric(
        &mut out,
        "drover_rollout_current_wave",
        "gauge",
        "The wave each open rollout has started last (0 is the first).",
    );
    for (labels, _, wave) in &open {
        let _ = writeln!(out, "drover_rollout_current_wave{{{labels}}} {wave}");
    }

    metric(
        &mut out,
        "drover_rollout_halted",
        "gauge",
        "1 for each version and platform whose rollout is halted.",
    );
    let mut halted: Vec<_> = book.halted().into_iter().collect();
    halted.sort();
    for (version, os, arch) in halted {
        let _ = writeln!(
            out,
            "drover_rollout_halted{{version=\"{version}\",os=\"{os}\",arch=\"{arch}\"}} 1"
        );
    }

    let lags = crate::conductor::stable_lags(&state).await?;
    let stale_after = state.settings.stale_stable_after_ms();
    metric(
        &mut out,
        "drover_stable_lag_seconds",
        "gauge",
        "How long beta has been ahead of stable, per platform.",
    );
    let mut lags: Vec<_> = lags.into_iter().collect();
    lags.sort();
    for ((os, arch), (version, lag)) in &lags {
        let _ = writeln!(
            out,
            "drover_stable_lag_seconds{{os=\"{os}\",arch=\"{arch}\",beta=\"{version}\"}} {}",
            lag / 1000
        );
    }
    metric(
        &mut out,
        "drover_stable_stale",
        "gauge",
        "1 when beta has been ahead of stable longer than the threshold.",
    );
    for ((os, arch), (_, lag)) in &lags {
        let _ = writeln!(
            out,
            "drover_stable_stale{{os=\"{os}\",arch=\"{arch}\"}} {}",
            u8::from(*lag > stale_after)
        );
    }
    mirrors(&mut out, &crate::mirrors::health(&state).await?);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

/// Each mirror's downloads over the health period, and which mirrors are failing.
fn mirrors(out: &mut String, mirrors: &[crate::mirrors::MirrorHealth]) {
    metric(
        out,
        "drover_mirror_downloads",
        "gauge",
        "Downloads of tasks created in the last 24 hours offered each mirror: served by it, or fell back to the server (by reason).",
    );
    for mirror in mirrors {
        let url = &mirror.url;
        let _ = writeln!(
            out,
            "drover_mirror_downloads{{mirror=\"{url}\",result=\"served\",reason=\"\"}} {}",
            mirror.served
        );
        for (reason, count) in &mirror.fell_back {
            let _ = writeln!(
                out,
                "drover_mirror_downloads{{mirror=\"{url}\",result=\"fell_back\",reason=\"{reason}\"}} {count}"
            );
        }
    }
    metric(
        out,
        "drover_mirror_failing",
        "gauge",
        "1 for a mirror whose last three downloads all fell back to the server.",
    );
    for mirror in mirrors {
        let _ = writeln!(
            out,
            "drover_mirror_failing{{mirror=\"{}\"}} {}",
            mirror.url,
            u8::from(mirror.failing)
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
