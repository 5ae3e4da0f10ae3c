//! `GET /metrics`: Prometheus text for the fleet, rollouts and warnings.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;
use crate::api::ApiError;
use crate::clock::now_ms;
use crate::rollouts;

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
        "drover_update_tasks",
        "gauge",
        "Update tasks by target version, platform and status.",
    );
    for count in state.store.task_counts().await? {
        let _ = writeln!(
            out,
            "drover_update_tasks{{version=\"{}\",os=\"{}\",arch=\"{}\",status=\"{}\"}} {}",
            count.version,
            count.os,
            count.arch,
            count.status.as_str(),
            count.tasks
        );
    }

    metric(
        &mut out,
        "drover_rollout_halted",
        "gauge",
        "1 for each rollout halted by its failure rate.",
    );
    let mut halted: Vec<_> = state.halted().iter().cloned().collect();
    halted.sort();
    for (version, os, arch) in halted {
        let _ = writeln!(
            out,
            "drover_rollout_halted{{version=\"{version}\",os=\"{os}\",arch=\"{arch}\"}} 1"
        );
    }

    let records = state.store.rollout_records().await?;
    let index = state.releases.current();
    let lags = rollouts::stable_lag_ms(
        &index,
        &state.blocked_versions(),
        &rollouts::first_seen(&records),
        now_ms(),
    );
    let stale_after = state.settings.rollout_policy().stale_stable_after_ms;
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
