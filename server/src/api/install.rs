//! `GET /api/v1/agent/install`: what a new machine should install, for the install
//! script. Authorized by a site enrollment token, the one secret a new machine has.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody, Params};
use crate::AppState;
use crate::auth::hash_secret;
use crate::engine::channel_admits;
use crate::releases::Channel;
use crate::store::StoreError;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Platform {
    /// As agents report it, such as `linux`.
    os: String,
    /// As agents report it, such as `amd64`.
    arch: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Installable {
    version: String,
    file: String,
    /// Where to download it: `GET /downloads/{file}` on this server's public URL, with a
    /// grant valid for an hour.
    url: String,
    /// Lower-case hex.
    sha256: String,
    size: u64,
    /// The build's signature document (its `.sig`), when it is signed: the install
    /// script has the new agent check it and record its release counter.
    signature: Option<String>,
}

/// The newest non-blocked stable build for the platform.
#[utoipa::path(
    get,
    path = "/agent/install",
    tag = "install",
    params(Platform),
    responses(
        (status = 200, description = "The build to install", body = Installable),
        (status = 400, description = "`os` or `arch` is missing", body = ErrorBody),
        (status = 401, description = "The enrollment token is missing, unknown, revoked, expired or used up", body = ErrorBody),
        (status = 404, description = "No stable build is offered for the platform", body = ErrorBody),
    ),
    security(("enrollment_token" = [])),
)]
pub(crate) async fn newest_for_install(
    State(state): State<AppState>,
    headers: HeaderMap,
    Params(platform): Params<Platform>,
) -> Result<Json<Installable>, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized(
            "send the enrollment token as Authorization: Bearer <token>",
        ))?;
    match state
        .store
        .enrollment_site(&hash_secret(token.trim()))
        .await
    {
        Ok(_) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::Unauthorized(
                "unknown, revoked, expired or used-up enrollment token",
            ));
        }
        Err(err) => return Err(err.into()),
    }
    let index = state.releases.current();
    let blocked = state.blocked_versions();
    let release = index
        .newest(&platform.os, &platform.arch, |r| {
            channel_admits(Channel::Stable, r.channel) && !blocked.contains(&r.version.to_string())
        })
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no stable build for {}/{} is offered",
                platform.os, platform.arch
            ))
        })?;
    Ok(Json(Installable {
        version: release.version.to_string(),
        url: crate::downloads::install_url(&state, &release.file),
        file: release.file.clone(),
        sha256: release.sha256.clone(),
        size: release.size,
        signature: release.signature.clone(),
    }))
}
