//! `GET /downloads/{file}`: streams offered builds to agents, with Range support, under a
//! concurrency limit. Only files the scanner offers are served, so no request can reach
//! a sidecar, an unlisted file or anything outside the directory.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::AppState;
use crate::api::ApiError;
use crate::metrics::{COUNTERS, Counters};

/// Bytes read from the file per chunk. Every read is a trip to tokio's blocking pool,
/// so the default 64 KiB costs a core at loopback speeds; 256 KiB a slot keeps the
/// per-download buffer small (64 slots: 16 MiB) and the CPU per byte far lower.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Seconds an agent is asked to wait when every download slot is taken.
const RETRY_AFTER_SECS: u32 = 10;

pub(crate) async fn serve(
    State(state): State<AppState>,
    file: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Path(file) = file.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    if !is_plain_name(&file) {
        return Err(ApiError::BadRequest(format!(
            "{file:?} is not a file name in the downloads directory"
        )));
    }
    if state.settings.max_concurrent_downloads == 0 || !state.updates_enabled() {
        Counters::bump(&COUNTERS.downloads_refused_off);
        return Err(ApiError::Forbidden(
            "downloads are switched off on this server".into(),
        ));
    }
    // The name must be one the scanner offers: that alone rules out `..`, absolute
    // paths, sidecars and stray files; the check above only answers such names sooner.
    let Some(release) = state.releases.current().by_file(&file).cloned() else {
        return Err(ApiError::NotFound(format!(
            "no offered build named {file:?}"
        )));
    };
    // A rolled-back build is never served, also to an agent that was sent it before.
    if state
        .blocked_versions()
        .contains(&release.version.to_string())
    {
        Counters::bump(&COUNTERS.downloads_refused_off);
        return Err(ApiError::Forbidden(format!(
            "{} is rolled back and not served",
            release.version
        )));
    }
    let Ok(permit) = state.downloads.clone().try_acquire_owned() else {
        Counters::bump(&COUNTERS.downloads_refused_busy);
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
    // Served only while it is still what the scanner hashed: a regular file (a link
    // swapped in since is never followed) of the scanned size. Anything else is left
    // to the next scan to judge.
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_file() && meta.len() == release.size => {}
        _ => {
            state.releases.rescan().await;
            return Err(ApiError::NotFound(format!(
                "{} changed since it was scanned; it is offered again once verified",
                release.file
            )));
        }
    }
    let response = ServeFile::new(path)
        .with_buf_chunk_size(READ_CHUNK_BYTES)
        .oneshot(request)
        .await
        .map_err(|err| ApiError::Internal(format!("while serving {}: {err}", release.file)))?;
    if response.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::NotFound(format!("{} was removed", release.file)));
    }
    if response.status().is_success() {
        Counters::bump(&COUNTERS.downloads_served);
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

/// One ordinary path component: no separators, no `.` or `..`, no NUL or other control
/// characters, not empty.
fn is_plain_name(name: &str) -> bool {
    let mut components = std::path::Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
        && name.len() <= 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_pass() {
        let cases = [
            ("drover-agent-linux-amd64-1.2.3", true),
            ("drover-agent-windows-arm64-1.2.3-beta.1.exe", true),
            ("..", false),
            (".", false),
            ("", false),
            ("../etc/passwd", false),
            ("/etc/passwd", false),
            ("a/b", false),
            ("a\\..\\b", false),
            ("file\0.sha256", false),
            ("line\nbreak", false),
            ("x", true),
        ];
        for (name, ok) in cases {
            assert_eq!(is_plain_name(name), ok, "{name:?}");
        }
        assert!(!is_plain_name(&"a".repeat(256)));
    }
}
