//! `GET /metrics`: Prometheus text for the fleet, rollouts and warnings.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;
use crate::api::ApiError;

pub(crate) async fn render(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let mut out = String::new();
    let agents = state.store.list_agents().await?;
    metric(
        &mut out,
        "drover_agents",
        "gauge",
        "Agents known to the server.",
    );
    let _ = writeln!(out, "drover_agents {}", agents.len());
    metric(
        &mut out,
        "drover_agents_connected",
        "gauge",
        "Agents with a live session on this server.",
    );
    let _ = writeln!(
        out,
        "drover_agents_connected {}",
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
        "drover_rollout_agents",
        "gauge",
        "Targets of each open rollout by stage.",
    );
    let book = state.book();
    let open: Vec<_> = book
        .rollouts()
        .filter(|r| r.record.state.is_open())
        .map(|r| r.record.clone())
        .collect();
    for rollout in &open {
        let health = crate::conductor::health(&state, rollout, |_| true).await?;
        let t = &health.total;
        for (stage, agents) in [
            ("waiting", t.waiting),
            ("queued", t.queued),
            ("downloading", t.downloading),
            ("installing", t.installing),
            ("succeeded", t.succeeded),
            ("failed", t.failed),
            ("rolled_back", t.rolled_back),
            ("cancelled", t.cancelled),
            ("skipped", t.skipped),
        ] {
            let _ = writeln!(
                out,
                "drover_rollout_agents{{rollout=\"{}\",version=\"{}\",kind=\"{}\",state=\"{}\",stage=\"{stage}\"}} {agents}",
                rollout.id,
                rollout.version,
                rollout.kind.as_str(),
                rollout.state.as_str(),
            );
        }
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
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
