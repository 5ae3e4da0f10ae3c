//! `/api/v1/releases` (offered and skipped builds, rescans) and `/api/v1/updates`, the
//! server-wide update switch.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, Body, Caller};
use crate::releases::{ReleaseIndex, Skipped};
use crate::session::Outbound;
use crate::store::Role;
use crate::{AppState, UPDATES_ENABLED};

#[derive(Debug, Serialize)]
struct ReleaseView<'a> {
    version: String,
    os: &'a str,
    arch: &'a str,
    channel: &'static str,
    sha256: &'a str,
    size: u64,
    file: &'a str,
    blocked: bool,
    signed: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    include: Option<String>,
}

fn listing(state: &AppState, index: &ReleaseIndex, with_skipped: bool) -> Value {
    let blocked = state.blocked_versions();
    let releases: Vec<ReleaseView<'_>> = index
        .releases
        .iter()
        .map(|r| ReleaseView {
            version: r.version.to_string(),
            os: &r.os,
            arch: &r.arch,
            channel: r.channel.as_str(),
            sha256: &r.sha256,
            size: r.size,
            file: &r.file,
            blocked: blocked.contains(&r.version.to_string()),
            signed: r.signature.is_some(),
        })
        .collect();
    if with_skipped {
        let skipped: &[Skipped] = &index.skipped;
        json!({ "releases": releases, "skipped": skipped })
    } else {
        json!(releases)
    }
}

/// The offered builds; with `?include=skipped`, also every skipped file and why.
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let with_skipped = match query.include.as_deref() {
        None => false,
        Some("skipped") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "include={other:?}: the only option is include=skipped"
            )));
        }
    };
    let index = state.releases.current();
    Ok(Json(listing(&state, &index, with_skipped)))
}

/// Rescans the downloads directory now; answers with the new listing and skips.
pub(crate) async fn rescan(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Operator)?;
    let index = state.releases.rescan().await;
    state
        .audit(
            &caller.actor,
            "releases.rescan",
            "downloads",
            Some(format!(
                "{} offered, {} skipped",
                index.releases.len(),
                index.skipped.len()
            )),
            "done",
        )
        .await;
    Ok(Json(listing(&state, &index, true)))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdatesSwitch {
    enabled: bool,
}

pub(crate) async fn updates_switch(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<UpdatesSwitch>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(UpdatesSwitch {
        enabled: state.updates_enabled(),
    }))
}

/// Switches all update dispatch and downloads off or on, for every agent.
pub(crate) async fn set_updates_switch(
    caller: Caller,
    State(state): State<AppState>,
    Body(body): Body<UpdatesSwitch>,
) -> Result<Json<UpdatesSwitch>, ApiError> {
    caller.require(Role::Operator)?;
    state
        .store
        .set_setting(UPDATES_ENABLED, if body.enabled { "true" } else { "false" })
        .await?;
    state.updates_enabled.store(body.enabled, Ordering::Relaxed);
    state
        .audit(
            &caller.actor,
            "updates.switch",
            "server",
            None,
            if body.enabled { "enabled" } else { "disabled" },
        )
        .await;
    if body.enabled {
        state.registry.broadcast(|| Outbound::Check);
    }
    Ok(Json(body))
}
