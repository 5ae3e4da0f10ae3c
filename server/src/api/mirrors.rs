//! Download mirrors over the API: setting a site's or client's mirror, and every
//! mirror's health (`GET /api/v1/mirrors`). What a mirror may be and how its health is
//! judged belong to `crate::mirrors`.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::hierarchy::set_setting;
use super::{ApiError, Body, Caller, ErrorBody, openapi};
use crate::AppState;
use crate::clock::rfc3339;
use crate::mirrors::{self, MirrorHealth};
use crate::store::{ChannelScope, HierarchySetting, Role};

/// `{"url": "https://mirror.example.com/drover"}` sets, `{"url": null}` clears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MirrorChange {
    /// Base URL (`http` or `https`, no credentials, query or fragment); a build's file
    /// name is appended to it.
    #[schema(example = "https://mirror.example.com/drover", schema_with = openapi::mirror_url)]
    url: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MirrorSet {
    id: String,
    /// The mirror now set, normalised; null when cleared.
    download_mirror: Option<String>,
    /// Agents it governs (a site's mirror wins over its client's).
    agents_affected: usize,
}

#[utoipa::path(
    put,
    path = "/sites/{id}/download-mirror",
    tag = "mirrors",
    summary = "Set or clear the download mirror of every agent of the site",
    description = "Agents of the site download builds from the mirror and fall back to this server when it fails; they verify what it serves exactly as this server's own bytes. A site's mirror wins over its client's and the server-wide `--download-url`. Connected agents are checked again at once; updates under way keep the mirror they were offered.",
    params(("id" = String, Path, description = "The site's id")),
    request_body = MirrorChange,
    responses(
        (status = 200, description = "The mirror now set", body = MirrorSet),
        (status = 400, description = "The body is malformed or the URL is not a usable mirror (the detail says why)", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No site has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_site_mirror(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body<MirrorChange>,
) -> Result<Json<MirrorSet>, ApiError> {
    set_mirror(caller, state, id, body, ChannelScope::Site).await
}

#[utoipa::path(
    put,
    path = "/clients/{id}/download-mirror",
    tag = "mirrors",
    summary = "Set or clear the download mirror of every agent of the client",
    description = "Applies to the client's agents whose site sets no mirror of its own; it wins over the server-wide `--download-url`. Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The client's id")),
    request_body = MirrorChange,
    responses(
        (status = 200, description = "The mirror now set", body = MirrorSet),
        (status = 400, description = "The body is malformed or the URL is not a usable mirror (the detail says why)", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No client has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_client_mirror(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body<MirrorChange>,
) -> Result<Json<MirrorSet>, ApiError> {
    set_mirror(caller, state, id, body, ChannelScope::Client).await
}

async fn set_mirror(
    caller: Caller,
    state: AppState,
    id: String,
    body: Body<MirrorChange>,
    scope: ChannelScope,
) -> Result<Json<MirrorSet>, ApiError> {
    caller.require(Role::Operator)?;
    let url = body
        .take()?
        .url
        .map(|url| mirrors::check_base(&url).map_err(ApiError::BadRequest))
        .transpose()?;
    let affected = set_setting(
        &state,
        &caller,
        scope,
        &id,
        HierarchySetting::DownloadMirror,
        url.as_deref(),
    )
    .await?;
    Ok(Json(MirrorSet {
        id,
        download_mirror: url,
        agents_affected: affected,
    }))
}

/// Who set a mirror.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MirrorUserView {
    /// `site`, `client` or `server` (`--download-url`).
    #[schema(example = "site")]
    scope: &'static str,
    /// The site's or client's id; empty for the server.
    id: String,
    name: String,
}

/// A fallback from a mirror to this server.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FallbackView {
    /// RFC 3339.
    at: String,
    /// `unreachable`, `not_found`, `http_error`, `wrong_bytes` or `stalled`.
    #[schema(example = "wrong_bytes")]
    reason: String,
    /// What the agent saw.
    error: Option<String>,
}

/// One mirror and how its downloads went over the last 24 hours.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MirrorView {
    url: String,
    /// The sites and clients (and the server) that set it; empty for a mirror no
    /// longer set with downloads in the period.
    used_by: Vec<MirrorUserView>,
    /// Downloads of tasks created in the last 24 hours that it served (verified).
    served: i64,
    /// Those that fell back to this server instead.
    fell_back: i64,
    /// Fallbacks by reason.
    fallbacks: std::collections::BTreeMap<&'static str, i64>,
    /// The newest fallback recorded, whenever it was.
    last_fallback: Option<FallbackView>,
    /// Its last three downloads all fell back.
    failing: bool,
}

impl From<MirrorHealth> for MirrorView {
    fn from(health: MirrorHealth) -> MirrorView {
        MirrorView {
            fell_back: health.fell_back_total(),
            used_by: health
                .used_by
                .into_iter()
                .map(|user| MirrorUserView {
                    scope: user.scope.as_str(),
                    id: user.id,
                    name: user.name,
                })
                .collect(),
            url: health.url,
            served: health.served,
            fallbacks: health.fell_back,
            last_fallback: health
                .last_fallback
                .map(|(at, reason, error)| FallbackView {
                    at: rfc3339(at),
                    reason,
                    error,
                }),
            failing: health.failing,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MirrorList {
    /// The server-wide mirror (`--download-url`), for agents whose site and client set
    /// none; null when those download from this server.
    download_url: Option<String>,
    mirrors: Vec<MirrorView>,
}

#[utoipa::path(
    get,
    path = "/mirrors",
    tag = "mirrors",
    summary = "Every download mirror, who uses it, and its health",
    description = "Every mirror set on a site, a client or server-wide, and any other with downloads in the last 24 hours: how many downloads it served, how many fell back to this server and why, and whether it is failing (its last three downloads all fell back).",
    responses(
        (status = 200, description = "The mirrors", body = MirrorList),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<MirrorList>, ApiError> {
    caller.require(Role::Viewer)?;
    let mirrors = mirrors::health(&state).await?;
    Ok(Json(MirrorList {
        download_url: state.settings.download_url.clone(),
        mirrors: mirrors.into_iter().map(MirrorView::from).collect(),
    }))
}
