//! `/api/v1/releases` (offered and skipped builds, rescans, an offered build's bytes for
//! copying to a mirror) and `/api/v1/updates`, the server-wide update switch.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, Body, Caller, ErrorBody, Params, openapi};
use crate::releases::ReleaseIndex;
use crate::session::Outbound;
use crate::store::Role;
use crate::{AppState, UPDATES_ENABLED};

/// An offered build.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Release)]
pub(crate) struct ReleaseView {
    version: String,
    os: String,
    arch: String,
    #[schema(schema_with = openapi::channel)]
    channel: &'static str,
    /// Lower-case hex.
    sha256: String,
    size: u64,
    /// The file name in the downloads directory.
    file: String,
    /// Rolled back: offered to nobody until unblocked.
    blocked: bool,
    /// Has a `.sig` signature.
    signed: bool,
    /// Size of its compressed copy, which agents download instead; null until the copy
    /// is made, or when compressing does not make it smaller or is switched off.
    compressed_size: Option<u64>,
    /// Why making its compressed copy failed, while it has none (the build is served as
    /// it is; the copy is tried again at the next change of the downloads directory, or
    /// at the next start); null otherwise.
    compressed_error: Option<String>,
    /// The deltas to it that are ready, which agents running their base version
    /// download instead, oldest base first.
    deltas: Vec<DeltaView>,
}

/// A delta to a build, from the build of another version.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ReleaseDelta)]
pub(crate) struct DeltaView {
    /// The version whose build the delta starts from.
    from_version: String,
    /// Size of the delta in bytes.
    size: u64,
}

/// A file in the downloads directory that is not offered.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SkippedFile)]
pub(crate) struct SkippedView {
    file: String,
    reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReleasesAndSkipped {
    releases: Vec<ReleaseView>,
    skipped: Vec<SkippedView>,
}

/// The answer of `GET /releases`: a bare array unless skipped files were asked for.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum Listing {
    Releases(Vec<ReleaseView>),
    WithSkipped(ReleasesAndSkipped),
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// `skipped` also lists the files that are not offered, and why; the answer is then
    /// an object.
    #[param(schema_with = include)]
    include: Option<String>,
}

fn include() -> utoipa::openapi::schema::Object {
    openapi::string_enum(["skipped"])
}

fn releases(state: &AppState, index: &ReleaseIndex) -> Vec<ReleaseView> {
    let blocked = state.blocked_versions();
    index
        .releases
        .iter()
        .map(|r| ReleaseView {
            version: r.version.to_string(),
            os: r.os.clone(),
            arch: r.arch.clone(),
            channel: r.channel.as_str(),
            sha256: r.sha256.clone(),
            size: r.size,
            file: r.file.clone(),
            blocked: blocked.contains(&r.version.to_string()),
            signed: r.signature.is_some(),
            compressed_size: state.compressed.copy_of(&r.sha256).map(|copy| copy.size),
            compressed_error: state.compressed.failure_of(&r.sha256),
            deltas: state
                .deltas
                .to_build(&r.sha256)
                .into_iter()
                .map(|delta| DeltaView {
                    from_version: delta.base_version.to_string(),
                    size: delta.copy.size,
                })
                .collect(),
        })
        .collect()
}

fn with_skipped(state: &AppState, index: &ReleaseIndex) -> ReleasesAndSkipped {
    ReleasesAndSkipped {
        releases: releases(state, index),
        skipped: index
            .skipped
            .iter()
            .map(|s| SkippedView {
                file: s.file.clone(),
                reason: s.reason.clone(),
            })
            .collect(),
    }
}

/// The offered builds; with `?include=skipped`, also every skipped file and why.
#[utoipa::path(
    get,
    path = "/releases",
    operation_id = "list_releases",
    tag = "releases",
    params(ListQuery),
    responses(
        (status = 200, description = "An array of releases; with `include=skipped` an object with `releases` and `skipped`", body = Listing),
        (status = 400, description = "`include` is something other than `skipped`", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Params(query): Params<ListQuery>,
) -> Result<Json<Listing>, ApiError> {
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
    Ok(Json(if with_skipped {
        Listing::WithSkipped(self::with_skipped(&state, &index))
    } else {
        Listing::Releases(releases(&state, &index))
    }))
}

/// Rescans the downloads directory now; answers with the new listing and skips.
#[utoipa::path(
    post,
    path = "/releases/rescan",
    operation_id = "rescan_releases",
    tag = "releases",
    responses(
        (status = 200, description = "The listing after the scan", body = ReleasesAndSkipped),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn rescan(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<ReleasesAndSkipped>, ApiError> {
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
    // The other nodes rescan too: the directory may be a network share without events.
    state.registry.broadcast(|| Outbound::Check);
    Ok(Json(with_skipped(&state, &index)))
}

/// An offered build's bytes (Range works), or its `.sig` signature document, for copying
/// to a download mirror (`drover mirror sync`). Exactly what the scanner hashed: a file
/// changed since is not served.
#[utoipa::path(
    get,
    path = "/releases/files/{file}",
    operation_id = "release_file",
    tag = "mirrors",
    params(("file" = String, Path, description = "An offered build's file name, or that name with `.sig`")),
    responses(
        (status = 200, description = "The build's bytes (`application/octet-stream`), or its signature document", content_type = "application/octet-stream"),
        (status = 206, description = "The asked range of the build's bytes", content_type = "application/octet-stream"),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No offered build has this name, it is unsigned (for `.sig`), or it changed since it was scanned", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn file(
    caller: Caller,
    State(state): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let index = state.releases.current();
    let (name, signature) = match file.strip_suffix(".sig") {
        Some(build) => (build, true),
        None => (file.as_str(), false),
    };
    let not_offered = || ApiError::NotFound(format!("no offered build named {name:?}"));
    let release = index.by_file(name).ok_or_else(not_offered)?;
    if signature {
        let document = release
            .signature
            .clone()
            .ok_or_else(|| ApiError::NotFound(format!("{name} is not signed")))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response());
    }
    crate::downloads::send_build(&state, release, &headers).await
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdatesSwitch {
    /// False stops all update dispatch and downloads.
    enabled: bool,
}

#[utoipa::path(
    get,
    path = "/updates",
    operation_id = "get_updates_switch",
    tag = "releases",
    summary = "Whether updates are on server-wide",
    responses((status = 200, description = "The server-wide update switch", body = UpdatesSwitch)),
    security(("bearer" = ["viewer"])),
)]
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
#[utoipa::path(
    put,
    path = "/updates",
    tag = "releases",
    request_body = UpdatesSwitch,
    responses(
        (status = 200, description = "The switch as now set", body = UpdatesSwitch),
        (status = 400, description = "The body is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_updates_switch(
    caller: Caller,
    State(state): State<AppState>,
    body: Body<UpdatesSwitch>,
) -> Result<Json<UpdatesSwitch>, ApiError> {
    caller.require(Role::Operator)?;
    let body = body.take()?;
    state
        .store
        .set_setting(UPDATES_ENABLED, if body.enabled { "true" } else { "false" })
        .await?;
    state.updates_enabled.store(body.enabled, Ordering::Relaxed);
    state.events.settings(Some(UPDATES_ENABLED));
    state
        .audit(
            &caller.actor,
            "updates.switch",
            "server",
            None,
            if body.enabled { "enabled" } else { "disabled" },
        )
        .await;
    // Also when switching off: the other nodes re-read the switch on this signal.
    state.registry.broadcast(|| Outbound::Check);
    Ok(Json(body))
}
