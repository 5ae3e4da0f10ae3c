//! `GET /api/v1/agent/install`: what a new machine should install, for the install
//! script. Authorized by a site enrollment token, the one secret a new machine has.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::AppState;
use crate::auth::hash_secret;
use crate::engine::channel_admits;
use crate::releases::Channel;
use crate::store::StoreError;

#[derive(Debug, Deserialize)]
pub(crate) struct Platform {
    os: String,
    arch: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Installable {
    version: String,
    file: String,
    url: String,
    sha256: String,
    size: u64,
}

/// The newest non-blocked stable build for the platform.
pub(crate) async fn newest_for_install(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(platform): Query<Platform>,
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
                "unknown or revoked enrollment token",
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
        url: format!("{}/downloads/{}", state.settings.public_url, release.file),
        file: release.file.clone(),
        sha256: release.sha256.clone(),
        size: release.size,
    }))
}
