//! `GET /downloads/{file}`: streams offered builds to agents, with Range support, under a
//! concurrency limit. Only files the scanner offers are served, so no request can reach
//! a sidecar, an unlisted file or anything outside the directory.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::AppState;
use crate::api::ApiError;

/// Seconds an agent is asked to wait when every download slot is taken.
const RETRY_AFTER_SECS: u32 = 10;

pub(crate) async fn serve(
    State(state): State<AppState>,
    Path(file): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    if state.settings.max_concurrent_downloads == 0 || !state.updates_enabled() {
        return Err(ApiError::Forbidden(
            "downloads are switched off on this server".into(),
        ));
    }
    // The name must be one the scanner offers: that alone rules out `..`, absolute
    // paths, sidecars and stray files.
    let Some(release) = state.releases.current().by_file(&file).cloned() else {
        return Err(ApiError::NotFound(format!(
            "no offered build named {file:?}"
        )));
    };
    let Ok(permit) = state.downloads.clone().try_acquire_owned() else {
        let mut busy = ApiError::Unavailable(format!(
            "all {} download slots are busy; retry later",
            state.settings.max_concurrent_downloads
        ))
        .into_response();
        busy.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        return Ok(busy);
    };
    let path = state.settings.downloads.join(&release.file);
    let response = ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(|err| ApiError::Internal(format!("while serving {}: {err}", release.file)))?;
    if response.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::NotFound(format!("{} was removed", release.file)));
    }
    // The slot is held until the body has been sent (or the agent went away), not just
    // until the headers are out.
    let (parts, body) = response.into_parts();
    let body = Body::from_stream(Body::new(body).into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    }));
    Ok(Response::from_parts(parts, body))
}
