//! Fetching a build into the staging area: resumes with `Range`, waits out 503
//! `Retry-After` with jitter, never accepts more than the declared size, and checks free
//! disk space first.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use tokio::io::AsyncWriteExt;

/// Attempts per download before giving up (busy server, dropped connections).
const MAX_ATTEMPTS: u32 = 20;
/// Wait when a busy server gives no `Retry-After`, or a connection drops.
const DEFAULT_RETRY: Duration = Duration::from_secs(5);
/// Headroom kept free besides the build's two copies (staged and installed).
const DISK_MARGIN: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("not enough disk space: {needed} bytes needed, {available} available")]
    DiskFull { needed: u64, available: u64 },
    #[error("the server sent more than the declared {0} bytes")]
    TooLarge(u64),
    #[error("the server answered {0}")]
    Refused(StatusCode),
    #[error("gave up after {MAX_ATTEMPTS} attempts: {0}")]
    GaveUp(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Downloads `url` into `part` until it holds `size` bytes, resuming from what `part`
/// holds already. `progress` is called with the bytes held so far.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    part: &Path,
    mut progress: impl FnMut(u64),
) -> Result<(), FetchError> {
    if let Some(dir) = part.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let held = held_bytes(part).await?;
    check_space(part, size, held)?;
    let mut last_error = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        match fetch_once(http, url, size, part, &mut progress).await {
            Ok(()) => return Ok(()),
            Err(Attempt::Fatal(err)) => return Err(err),
            Err(Attempt::RetryAfter(wait, why)) => {
                let wait = jittered(wait);
                tracing::info!(attempt, wait_ms = wait.as_millis() as u64, %why, "download will be retried");
                last_error = why;
                tokio::time::sleep(wait).await;
            }
        }
    }
    Err(FetchError::GaveUp(last_error))
}

enum Attempt {
    Fatal(FetchError),
    RetryAfter(Duration, String),
}

async fn fetch_once(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    part: &Path,
    progress: &mut impl FnMut(u64),
) -> Result<(), Attempt> {
    let mut held = held_bytes(part)
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?;
    if held > size {
        // More than the build can hold: not this build's bytes; start over.
        tokio::fs::remove_file(part)
            .await
            .map_err(|e| Attempt::Fatal(e.into()))?;
        held = 0;
    }
    if held == size {
        return Ok(());
    }
    let mut request = http.get(url);
    if held > 0 {
        request = request.header(RANGE, format!("bytes={held}-"));
    }
    let response = request
        .send()
        .await
        .map_err(|e| Attempt::RetryAfter(DEFAULT_RETRY, e.to_string()))?;
    let status = response.status();
    let append = match status {
        StatusCode::PARTIAL_CONTENT if resumes_at(&response, held) => true,
        StatusCode::OK | StatusCode::PARTIAL_CONTENT => false,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            let wait = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_RETRY, Duration::from_secs);
            return Err(Attempt::RetryAfter(wait, format!("server busy ({status})")));
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::RetryAfter(
                Duration::ZERO,
                "range not satisfiable".into(),
            ));
        }
        other if other.is_server_error() => {
            return Err(Attempt::RetryAfter(
                DEFAULT_RETRY,
                format!("server error {other}"),
            ));
        }
        other => return Err(Attempt::Fatal(FetchError::Refused(other))),
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?;
    let mut done = if append { held } else { 0 };
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Attempt::RetryAfter(DEFAULT_RETRY, e.to_string()))?;
        done += chunk.len() as u64;
        if done > size {
            drop(file);
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::Fatal(FetchError::TooLarge(size)));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| Attempt::Fatal(e.into()))?;
        progress(done);
    }
    file.sync_all()
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?;
    if done < size {
        return Err(Attempt::RetryAfter(
            Duration::ZERO,
            format!("connection ended after {done} of {size} bytes"),
        ));
    }
    Ok(())
}

fn resumes_at(response: &reqwest::Response, held: u64) -> bool {
    response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|start| start.parse::<u64>().ok())
        == Some(held)
}

async fn held_bytes(part: &Path) -> std::io::Result<u64> {
    match tokio::fs::metadata(part).await {
        Ok(meta) => Ok(meta.len()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(err),
    }
}

/// The rest of the download plus a second copy for installing, plus a margin.
fn check_space(part: &Path, size: u64, held: u64) -> Result<(), FetchError> {
    let dir = part.parent().unwrap_or(Path::new("."));
    let needed = size.saturating_sub(held) + size + DISK_MARGIN;
    let available = fs4::available_space(dir)?;
    if available < needed {
        return Err(FetchError::DiskFull { needed, available });
    }
    Ok(())
}

/// Between the asked wait and half as long again, so agents told the same thing at the
/// same moment do not all return at once.
fn jittered(wait: Duration) -> Duration {
    let extra = rand::rng().random_range(0.0..0.5);
    wait + wait.mul_f64(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_again() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(10));
            assert!(wait >= Duration::from_secs(10) && wait <= Duration::from_secs(15));
        }
    }

    #[test]
    fn refuses_when_the_disk_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("x.part");
        assert!(check_space(&part, 1024, 0).is_ok());
        let err = check_space(&part, u64::MAX / 4, 0).unwrap_err();
        assert!(
            err.to_string().starts_with("not enough disk space"),
            "{err}"
        );
    }
}
