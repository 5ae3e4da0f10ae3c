//! `GET /downloads/{file}`: streams offered builds to agents, with Range support, under a
//! concurrency limit overall and per source address. Only files the scanner offers are
//! served, so no request can reach a sidecar, an unlisted file or anything outside the
//! directory; and only to a caller with a grant: the URL of an `update` message (its
//! task, while unfinished), of the install endpoint (for an hour), or an API token.
//! `server_url` and `install_url` are the one place such URLs are made. A build's
//! compressed copy (`compressed`) is served at the build's name plus `.zst`, and a delta
//! to it (`deltas`) at the build's name plus `.delta-from-` and the base's version, each
//! admitted by the same `admit`, with a grant of its own name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::AppState;
use crate::api::ApiError;
use crate::auth::hash_secret;
use crate::compressed;
use crate::file_body;
use crate::metrics::{COUNTERS, Counters};
use crate::releases::{Release, ReleaseIndex};
use crate::store::{Store, StoreError, StoreResult};

/// Seconds an agent is asked to wait when every download slot is taken.
const RETRY_AFTER_SECS: u32 = 10;

/// The settings row holding the key download grants are signed with, shared by every
/// node through the database.
const URL_KEY_SETTING: &str = "download_url_key";

/// How long the URL the install endpoint hands out stays valid.
const INSTALL_GRANT_SECS: u64 = 3600;

/// Bytes of the MAC a grant carries.
const CODE_BYTES: usize = 16;

/// Signs and checks the grants in download URLs. Cheap to clone.
#[derive(Clone)]
pub(crate) struct UrlSigner {
    key: Arc<[u8]>,
}

impl UrlSigner {
    /// The key every node shares: the first node to start stores a random one.
    pub(crate) async fn load(store: &dyn Store) -> StoreResult<UrlSigner> {
        let fresh = hex::encode(rand::random::<[u8; 32]>());
        let stored = store.setting_or_insert(URL_KEY_SETTING, &fresh).await?;
        let key = hex::decode(stored.trim())
            .ok()
            .filter(|key| key.len() >= 32)
            .ok_or_else(|| {
                StoreError::Other(format!(
                    "the setting {URL_KEY_SETTING} is not a hex key of 32 bytes or more"
                ))
            })?;
        Ok(UrlSigner { key: key.into() })
    }

    /// An HMAC-SHA-256 over the file and the grant.
    fn mac(&self, file: &str, grant: &Grant) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(format!("drover-download 1\n{file}\n{}\n", grant.signed_line()).as_bytes());
        mac
    }

    /// The grant's code: the first 128 bits of the MAC, in hex.
    fn code(&self, file: &str, grant: &Grant) -> String {
        hex::encode(&self.mac(file, grant).finalize().into_bytes()[..CODE_BYTES])
    }

    /// Whether `code` is the grant's code (compared in constant time).
    fn verify(&self, file: &str, grant: &Grant, code: &str) -> bool {
        match hex::decode(code) {
            Ok(code) if code.len() == CODE_BYTES => {
                self.mac(file, grant).verify_truncated_left(&code).is_ok()
            }
            _ => false,
        }
    }
}

/// What a download URL grants, besides the file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    /// The build of this task, while the task is unfinished.
    Task(String),
    /// The file until this Unix time (seconds).
    Until(u64),
}

impl Grant {
    fn signed_line(&self) -> String {
        match self {
            Grant::Task(id) => format!("task {id}"),
            Grant::Until(secs) => format!("until {secs}"),
        }
    }

    fn query(&self) -> String {
        match self {
            Grant::Task(id) => format!("task={id}"),
            Grant::Until(secs) => format!("until={secs}"),
        }
    }
}

/// The URL on this server an agent downloads a task's build from: valid while the
/// task is unfinished, for Range resumes and retries alike.
pub(crate) fn server_url(state: &AppState, file: &str, task_id: &str) -> String {
    signed_url(state, file, &Grant::Task(task_id.to_owned()))
}

/// The URL the install script downloads a build from: valid for an hour.
pub(crate) fn install_url(state: &AppState, file: &str) -> String {
    let until = crate::clock::now_ms().max(0) as u64 / 1000 + INSTALL_GRANT_SECS;
    signed_url(state, file, &Grant::Until(until))
}

fn signed_url(state: &AppState, file: &str, grant: &Grant) -> String {
    format!(
        "{}/downloads/{file}?{}&grant={}",
        state.settings.public_url,
        grant.query(),
        state.url_signer.code(file, grant)
    )
}

/// The query of a download URL.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct GrantQuery {
    task: Option<String>,
    until: Option<u64>,
    grant: Option<String>,
}

/// Whether the caller may download `file` (the build `release` or its compressed copy):
/// a valid grant for that name, or an API token. `Ok(Err(response))` asks the caller to
/// come back (its task is still being written).
async fn authorize(
    state: &AppState,
    release: &Release,
    file: &str,
    query: &GrantQuery,
    headers: &HeaderMap,
) -> Result<Result<(), Response>, ApiError> {
    if let Some(code) = &query.grant {
        let grant = match (&query.task, query.until) {
            (Some(task), None) => Grant::Task(task.clone()),
            (None, Some(until)) => Grant::Until(until),
            _ => {
                return Err(ApiError::BadRequest(
                    "a download grant names either a task or an expiry".into(),
                ));
            }
        };
        if !state.url_signer.verify(file, &grant, code) {
            return Err(ApiError::Forbidden(
                "the download grant is not valid for this file".into(),
            ));
        }
        return match grant {
            Grant::Until(until) => {
                if (crate::clock::now_ms().max(0) as u64 / 1000) < until {
                    Ok(Ok(()))
                } else {
                    Err(ApiError::Forbidden(
                        "the download grant has expired; ask for a new one".into(),
                    ))
                }
            }
            Grant::Task(task) => task_allows(state, &task, release).await,
        };
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(ApiError::Unauthorized(
            "downloads need the URL of an update message or of the install endpoint, or an API token",
        ));
    };
    match state.store.api_token(&hash_secret(token)).await {
        Ok(_) => Ok(Ok(())),
        Err(StoreError::NotFound) => Err(ApiError::Unauthorized("unknown or revoked token")),
        Err(err) => Err(err.into()),
    }
}

/// How long a download waits for a free download slot before it is answered 503.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// A task named this recently that no node has written is still being written (on
/// another node behind the same address, or by a slow writer here): its download is
/// asked to come back rather than refused.
const UNWRITTEN_GRACE_MS: i64 = 60_000;

/// `Retry-After` for a download whose task is not written yet: writes take moments.
const UNWRITTEN_RETRY_SECS: u32 = 1;

/// Whether a task's grant lets `release` through: the task unfinished and for this
/// build. An update goes out before its task is written, so a download for a task this
/// node is writing waits for the write, and one for a task named within the last minute
/// that no node has written yet is answered 503 with `Retry-After`.
async fn task_allows(
    state: &AppState,
    task: &str,
    release: &Release,
) -> Result<Result<(), Response>, ApiError> {
    state.tasks.until_written(task).await;
    match state.store.task(task).await? {
        Some(t)
            if t.status.is_active()
                && t.to_version == release.version.to_string()
                && t.os == release.os
                && t.arch == release.arch =>
        {
            Ok(Ok(()))
        }
        None if crate::store::task_minted_ms(task)
            .is_some_and(|at| crate::clock::now_ms().saturating_sub(at) < UNWRITTEN_GRACE_MS) =>
        {
            Counters::bump(&COUNTERS.downloads_refused_unwritten);
            Ok(Err(ApiError::Unavailable(format!(
                "task {task} is not recorded yet; retry in a moment"
            ))
            .retry_after(UNWRITTEN_RETRY_SECS)))
        }
        _ => Err(ApiError::Forbidden(format!(
            "task {task} is finished or not for this build"
        ))),
    }
}

/// The name of a build's compressed copy under `/downloads`.
pub(crate) fn compressed_name(file: &str) -> String {
    format!("{file}{COMPRESSED_SUFFIX}")
}

const COMPRESSED_SUFFIX: &str = ".zst";

/// The name of a delta to a build from the build of `base` (same os and arch) under
/// `/downloads`.
pub(crate) fn delta_name(file: &str, base: &semver::Version) -> String {
    format!("{file}{DELTA_INFIX}{base}")
}

const DELTA_INFIX: &str = ".delta-from-";

/// What a name under `/downloads` serves: an offered build, its compressed copy, or a
/// delta to it from the build with SHA-256 `base`.
enum Served {
    Build,
    Compressed(compressed::Copy),
    Delta {
        copy: compressed::Copy,
        base: String,
    },
}

/// The build a name under `/downloads` is of, and what of it that name serves, if the
/// index offers it and it is ready.
fn served_by(state: &AppState, index: &ReleaseIndex, file: &str) -> Option<(Release, Served)> {
    if let Some(release) = index.by_file(file) {
        return Some((release.clone(), Served::Build));
    }
    if let Some(release) = file
        .strip_suffix(COMPRESSED_SUFFIX)
        .and_then(|build| index.by_file(build))
    {
        let copy = state.compressed.copy_of(&release.sha256)?;
        return Some((release.clone(), Served::Compressed(copy)));
    }
    let (build, base) = file.split_once(DELTA_INFIX)?;
    let release = index.by_file(build)?;
    let base = index.find(
        &semver::Version::parse(base).ok()?,
        &release.os,
        &release.arch,
    )?;
    let delta = state.deltas.delta(&release.sha256, &base.sha256)?;
    Some((
        release.clone(),
        Served::Delta {
            copy: delta.copy,
            base: base.sha256.clone(),
        },
    ))
}

/// A download let through: the build, what of it is served, and the slots it holds
/// until its body has been sent.
struct Admitted {
    release: Release,
    served: Served,
    permit: tokio::sync::OwnedSemaphorePermit,
    source_slot: crate::limits::SourceSlot,
}

/// The one admission of every download, the build or its compressed copy alike:
/// downloads switched on, an offered build not rolled back, a grant for this name, a
/// share of this address's downloads and a download slot. `Ok(Err(response))` is the
/// 503 with `Retry-After` a busy server answers.
async fn admit(
    state: &AppState,
    peer: SocketAddr,
    file: &str,
    query: &GrantQuery,
    headers: &HeaderMap,
) -> Result<Result<Admitted, Response>, ApiError> {
    if !is_plain_name(file) {
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
    // The name must be one the scanner offers (or its compressed copy's, or a delta's):
    // that alone rules out `..`, absolute paths, sidecars and stray files; the check
    // above only answers such names sooner.
    let index = state.releases.current();
    let (release, served) = served_by(state, &index, file)
        .ok_or_else(|| ApiError::NotFound(format!("no offered build named {file:?}")))?;
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
    if let Err(unwritten) = authorize(state, &release, file, query, headers).await? {
        return Ok(Err(unwritten));
    }
    let Some(source_slot) = state.downloads_per_source.try_take(peer.ip()) else {
        Counters::bump(&COUNTERS.downloads_refused_address);
        return Ok(Err(busy(format!(
            "this address already has {} downloads under way; retry later",
            state.downloads_per_source.max()
        ))));
    };
    // Every slot taken: wait a moment for one before sending the agent away for
    // `RETRY_AFTER_SECS`. Admission pushes a few more agents than there are slots, so
    // that a slot freed is taken at once, and a slot frees as soon as a body is sent.
    let slot = tokio::time::timeout(SLOT_WAIT, state.downloads.clone().acquire_owned()).await;
    let Ok(Ok(permit)) = slot else {
        Counters::bump(&COUNTERS.downloads_refused_busy);
        return Ok(Err(busy(format!(
            "all {} download slots are busy; retry later",
            state.settings.max_concurrent_downloads
        ))));
    };
    Ok(Ok(Admitted {
        release,
        served,
        permit,
        source_slot,
    }))
}

fn busy(message: String) -> Response {
    ApiError::Unavailable(message).retry_after(RETRY_AFTER_SECS)
}

pub(crate) async fn serve(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    file: Result<Path<String>, PathRejection>,
    query: Result<Query<GrantQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(file) = file.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let admitted = match admit(&state, peer, &file, &query, &headers).await? {
        Ok(admitted) => admitted,
        Err(busy) => return Ok(busy),
    };
    let response = send(&state, &admitted.release, &admitted.served, &headers).await?;
    if response.status().is_success() {
        Counters::bump(&COUNTERS.downloads_served);
    }
    // The slot is held until the body has been sent (or the agent went away), not just
    // until the headers are out.
    let (parts, body) = response.into_parts();
    let (permit, source_slot) = (admitted.permit, admitted.source_slot);
    let body = Body::from_stream(Body::new(body).into_data_stream().map(move |chunk| {
        let _held = (&permit, &source_slot);
        chunk
    }));
    Ok(Response::from_parts(parts, body))
}

/// The response carrying `release`'s bytes (whole, or the range `headers` ask for), sent
/// only while its file is still what the scanner hashed. The mirror copy endpoint sends
/// builds through here; `/downloads` through `send`.
pub(crate) async fn send_build(
    state: &AppState,
    release: &Release,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    send(state, release, &Served::Build, headers).await
}

/// Sends what was admitted only while its file is still what was hashed: a regular
/// file (a link swapped in since is never followed) of that size, opened once and sent
/// from that handle. Anything else is left to a rescan to judge, or for a compressed
/// copy, no longer offered.
async fn send(
    state: &AppState,
    release: &Release,
    served: &Served,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (path, size, etag, name) = match served {
        Served::Build => (
            state.settings.downloads.join(&release.file),
            release.size,
            release.sha256.as_str(),
            release.file.clone(),
        ),
        Served::Compressed(copy) => (
            copy.path.clone(),
            copy.size,
            copy.sha256.as_str(),
            compressed_name(&release.file),
        ),
        Served::Delta { copy, .. } => (
            copy.path.clone(),
            copy.size,
            copy.sha256.as_str(),
            format!("a delta to {}", release.file),
        ),
    };
    let opened = match file_body::open(&path, size) {
        Ok(Some(opened)) => Ok(opened),
        Ok(None) => Err(format!(
            "{name} changed since it was made; it is offered again once verified"
        )),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{name} was removed"))
        }
        Err(err) => {
            return Err(ApiError::Internal(format!("while opening {name}: {err}")));
        }
    };
    match opened {
        Ok(opened) => Ok(file_body::respond(opened, headers, etag)),
        Err(why) => {
            match served {
                Served::Build => {
                    state.releases.rescan().await;
                }
                Served::Compressed(_) => state.compressed.forget(&release.sha256),
                Served::Delta { base, .. } => state.deltas.forget(&release.sha256, base),
            }
            Err(ApiError::NotFound(why))
        }
    }
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
