//! Fetching a build into the staging area: resumes with `Range`, waits out 503
//! `Retry-After` with jitter, drops an attempt that stalls, never accepts more than the
//! declared size, and checks free disk space first. A write that fails (the disk filled
//! up after all) removes the partial file, so nothing is left to fill the disk or to be
//! resumed. How patient it is depends on the source (`Patience`: the server, or a
//! mirror that is given up on sooner). Every `FetchError` knows its failure class, and
//! what it says about a mirror.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use protocol::{FailureClass, MirrorFailure};
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use tokio::io::AsyncWriteExt;

/// The HTTP client downloads use, built on the first download: a worker that is never
/// sent an update never sets up TLS and the HTTP client (nor loads the web roots).
pub(crate) struct Client {
    /// The only CA trusted (`--ca-file`); the built-in web roots when `None`.
    pinned_tls: Option<Arc<rustls::ClientConfig>>,
    built: OnceLock<reqwest::Client>,
}

impl Client {
    pub(crate) fn new(pinned_tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            pinned_tls,
            built: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&reqwest::Client, FetchError> {
        if let Some(client) = self.built.get() {
            return Ok(client);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        if let Some(pinned) = &self.pinned_tls {
            builder = builder.use_preconfigured_tls(rustls::ClientConfig::clone(pinned));
        }
        let client = builder
            .build()
            .map_err(|err| FetchError::Client(err.to_string()))?;
        Ok(self.built.get_or_init(|| client))
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A read that waits longer than this fails the attempt (the stall limit is per source).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a download waits for its source, by source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Patience {
    /// Failed attempts before giving up (network errors, dropped connections, error
    /// statuses, stalls).
    pub(crate) attempts: u32,
    /// Wait between failed attempts (jittered).
    pub(crate) retry_wait: Duration,
    /// Wait out `503`/`429` with `Retry-After` without counting it: the server's
    /// download admission, which serves everyone in turn.
    pub(crate) waits_when_busy: bool,
    /// An attempt that receives nothing for this long is dropped (and counted).
    pub(crate) stall: Duration,
}

/// The Drover server: the last resort, so patient.
pub(crate) const SERVER: Patience = Patience {
    attempts: 20,
    retry_wait: Duration::from_secs(5),
    waits_when_busy: true,
    stall: Duration::from_secs(60),
};

/// A mirror: untrusted and optional; the server is there when it fails.
pub(crate) const MIRROR: Patience = Patience {
    attempts: 3,
    retry_wait: Duration::from_secs(2),
    waits_when_busy: false,
    stall: Duration::from_secs(20),
};

/// Wait when a busy server gives no usable `Retry-After`.
const DEFAULT_BUSY_WAIT: Duration = Duration::from_secs(5);
/// The least a busy server's `Retry-After` makes us wait: those waits are not counted,
/// so `Retry-After: 0` must not turn into a tight loop.
const MIN_BUSY_WAIT: Duration = Duration::from_secs(1);
/// The most a `Retry-After` makes us wait: a value from the network never decides more
/// (an absurd one could otherwise overflow, or park the update for ever).
const MAX_BUSY_WAIT: Duration = Duration::from_secs(600);
/// Headroom kept free besides the build's two copies (staged and installed).
const DISK_MARGIN: u64 = 16 * 1024 * 1024;

/// How long a busy server's `Retry-After` value makes us wait: its seconds, at most
/// `MAX_BUSY_WAIT`; an HTTP date (which Drover never sends) or none waits the default.
pub(crate) fn busy_wait(retry_after: Option<&str>) -> Duration {
    retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_BUSY_WAIT, Duration::from_secs)
        .min(MAX_BUSY_WAIT)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("not enough disk space: {needed} bytes needed, {available} available")]
    DiskFull { needed: u64, available: u64 },
    #[error("the disk filled up while downloading ({0}); the partial download was removed")]
    NoSpace(std::io::Error),
    #[error("could not write the download ({0}); the partial download was removed")]
    Write(std::io::Error),
    #[error("the server sent more than the declared {0} bytes")]
    TooLarge(u64),
    #[error("the server answered {0}")]
    Refused(StatusCode),
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Failure },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot set up the download client: {0}")]
    Client(String),
}

impl FetchError {
    /// Whose fault the failed download was: the machine's (disk, staging area), the
    /// build's (more bytes than it declared), or nobody's yet (the server refused or
    /// the network failed).
    pub(crate) fn class(&self) -> FailureClass {
        match self {
            FetchError::DiskFull { .. }
            | FetchError::NoSpace(_)
            | FetchError::Write(_)
            | FetchError::Io(_)
            | FetchError::Client(_) => FailureClass::Environment,
            FetchError::TooLarge(_) => FailureClass::Build,
            FetchError::Refused(_) | FetchError::GaveUp { .. } => FailureClass::Transient,
        }
    }

    /// What the error says about a mirror that served it; `None` when it is this
    /// machine's (disk, staging area): another source would fare no better.
    pub(crate) fn mirror_failure(&self) -> Option<MirrorFailure> {
        match self {
            FetchError::DiskFull { .. }
            | FetchError::NoSpace(_)
            | FetchError::Write(_)
            | FetchError::Io(_)
            | FetchError::Client(_) => None,
            FetchError::TooLarge(_) => Some(MirrorFailure::WrongBytes),
            FetchError::Refused(StatusCode::NOT_FOUND | StatusCode::GONE) => {
                Some(MirrorFailure::NotFound)
            }
            FetchError::Refused(_) => Some(MirrorFailure::HttpError),
            FetchError::GaveUp { last, .. } => Some(match last {
                Failure::Status(_) => MirrorFailure::HttpError,
                Failure::Stalled(_) => MirrorFailure::Stalled,
                Failure::Network(_) | Failure::Short { .. } | Failure::RangeNotSatisfiable => {
                    MirrorFailure::Unreachable
                }
            }),
        }
    }
}

/// Why one attempt failed, in a way worth another attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    #[error("{0}")]
    Network(String),
    #[error("the source answered {0}")]
    Status(StatusCode),
    #[error("no bytes arrived for {}s", .0.as_secs())]
    Stalled(Duration),
    #[error("connection ended after {done} of {size} bytes")]
    Short { done: u64, size: u64 },
    #[error("range not satisfiable")]
    RangeNotSatisfiable,
}

/// Downloads `url` into `part` until it holds `size` bytes, resuming from what `part`
/// holds already, as patient as `patience` says. `progress` is called with the bytes
/// held so far.
pub(crate) async fn fetch(
    http: &Client,
    url: &str,
    size: u64,
    part: &Path,
    patience: Patience,
    mut progress: impl FnMut(u64),
) -> Result<(), FetchError> {
    let http = http.get()?;
    let dir = crate::atomic_file::parent(part);
    if !tokio::fs::try_exists(dir).await? {
        tokio::fs::create_dir_all(dir).await?;
        // The staging directory's entry, so a resumable part survives a power cut.
        sync_dir(crate::atomic_file::parent(dir)).await?;
    }
    let held = held_bytes(part).await?;
    check_space(part, size, held)?;
    let mut failures = 0;
    loop {
        let wait = match fetch_once(http, url, size, part, &patience, &mut progress).await {
            Ok(()) => return Ok(()),
            Err(Attempt::Fatal(err)) => return Err(err),
            // Download admission, not a failure: the server will serve us in turn. The
            // wait ends with the task, which the session aborts on a cancel or a newer
            // update, so it needs no limit of its own.
            Err(Attempt::Busy(wait)) => {
                let wait = jittered(wait.max(MIN_BUSY_WAIT));
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "download server busy; waiting as it asked"
                );
                wait
            }
            Err(Attempt::Retry(wait, why)) => {
                failures += 1;
                if failures >= patience.attempts {
                    return Err(FetchError::GaveUp {
                        attempts: failures,
                        last: why,
                    });
                }
                let wait = jittered(wait);
                tracing::info!(failures, wait_ms = wait.as_millis() as u64, %why, "download will be retried");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

enum Attempt {
    Fatal(FetchError),
    /// The server asked us to come back after this long (`503`/`429` with `Retry-After`).
    Busy(Duration),
    /// A failed attempt worth repeating after this long; counts toward
    /// `Patience::attempts`.
    Retry(Duration, Failure),
}

async fn fetch_once(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    part: &Path,
    patience: &Patience,
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
    let retry = patience.retry_wait;
    let response = match tokio::time::timeout(patience.stall, request.send()).await {
        Ok(sent) => sent.map_err(|e| Attempt::Retry(retry, Failure::Network(e.to_string())))?,
        Err(_) => return Err(Attempt::Retry(retry, Failure::Stalled(patience.stall))),
    };
    let status = response.status();
    let append = match status {
        StatusCode::PARTIAL_CONTENT if resumes_at(&response, held) => true,
        StatusCode::OK | StatusCode::PARTIAL_CONTENT => false,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            if patience.waits_when_busy && response.headers().contains_key(RETRY_AFTER) =>
        {
            let wait = busy_wait(
                response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            );
            return Err(Attempt::Busy(wait));
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::Retry(Duration::ZERO, Failure::RangeNotSatisfiable));
        }
        // A 503 without `Retry-After` is an outage rather than admission: bounded.
        other if other.is_server_error() || other == StatusCode::TOO_MANY_REQUESTS => {
            return Err(Attempt::Retry(retry, Failure::Status(other)));
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
    loop {
        let chunk = match tokio::time::timeout(patience.stall, body.next()).await {
            Ok(Some(chunk)) => {
                chunk.map_err(|e| Attempt::Retry(retry, Failure::Network(e.to_string())))?
            }
            Ok(None) => break,
            Err(_) => return Err(Attempt::Retry(retry, Failure::Stalled(patience.stall))),
        };
        done += chunk.len() as u64;
        if done > size {
            drop(file);
            let _ = tokio::fs::remove_file(part).await;
            return Err(Attempt::Fatal(FetchError::TooLarge(size)));
        }
        if let Err(err) = file.write_all(&chunk).await {
            return Err(Attempt::Fatal(write_failed(file, part, err).await));
        }
        progress(done);
    }
    // A write's error can surface only at the flush; sync_all alone would swallow it.
    let flushed = match file.flush().await {
        Ok(()) => file.sync_all().await,
        Err(err) => Err(err),
    };
    if let Err(err) = flushed {
        return Err(Attempt::Fatal(write_failed(file, part, err).await));
    }
    sync_dir(crate::atomic_file::parent(part))
        .await
        .map_err(Attempt::Fatal)?;
    if done < size {
        return Err(Attempt::Retry(
            Duration::ZERO,
            Failure::Short { done, size },
        ));
    }
    Ok(())
}

/// Gives up on a partial file that could not be written: after a failed write its tail
/// is unknown, and on a full disk it only keeps the disk full.
async fn write_failed(file: tokio::fs::File, part: &Path, err: std::io::Error) -> FetchError {
    drop(file);
    if let Err(remove) = tokio::fs::remove_file(part).await {
        tracing::error!(error = %remove, "could not remove {}", part.display());
    }
    if is_disk_full(&err) {
        FetchError::NoSpace(err)
    } else {
        FetchError::Write(err)
    }
}

fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

async fn sync_dir(dir: &Path) -> Result<(), FetchError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || crate::platform::durable::sync_dir(&dir))
        .await
        .map_err(std::io::Error::other)??;
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
pub(crate) fn check_space(part: &Path, size: u64, held: u64) -> Result<(), FetchError> {
    let dir = part.parent().unwrap_or(Path::new("."));
    let needed = size
        .saturating_sub(held)
        .saturating_add(size)
        .saturating_add(DISK_MARGIN);
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
    wait.saturating_add(wait.mul_f64(extra))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn jitter_stays_within_half_again() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(10));
            assert!(wait >= Duration::from_secs(10) && wait <= Duration::from_secs(15));
        }
    }

    /// Serves `size` bytes once, to whatever is asked.
    #[cfg(unix)]
    async fn serve_once(size: usize) -> String {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/build", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let header =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(header.as_bytes()).await;
            let _ = stream.write_all(&vec![7u8; size]).await;
        });
        url
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_disk_that_fills_up_mid_download_fails_and_leaves_no_partial() {
        // Many chunks (a later write reports the failure) and one small chunk (only the
        // flush at the end can report it).
        for size in [4 << 20, 3] {
            let url = serve_once(size).await;
            let dir = tempfile::tempdir().unwrap();
            let part = dir.path().join("staging/task.part");
            std::fs::create_dir_all(part.parent().unwrap()).unwrap();
            // Every write to /dev/full fails with ENOSPC, as on a full disk; the
            // free-space check (of the real staging directory) passes.
            std::os::unix::fs::symlink("/dev/full", &part).unwrap();

            let client = Client::new(None);
            let err = fetch(&client, &url, size as u64, &part, SERVER, |_| {})
                .await
                .unwrap_err();
            assert!(matches!(err, FetchError::NoSpace(_)), "{size}: {err}");
            assert!(err.to_string().contains("disk filled up"), "{err}");
            assert!(
                part.symlink_metadata().is_err(),
                "the partial download is removed"
            );
        }
    }

    #[test]
    fn every_fetch_error_has_its_class() {
        let io = || std::io::Error::other("x");
        let cases = [
            (
                FetchError::DiskFull {
                    needed: 2,
                    available: 1,
                },
                FailureClass::Environment,
            ),
            (FetchError::NoSpace(io()), FailureClass::Environment),
            (FetchError::Write(io()), FailureClass::Environment),
            (FetchError::Io(io()), FailureClass::Environment),
            (FetchError::Client("x".into()), FailureClass::Environment),
            (FetchError::TooLarge(3), FailureClass::Build),
            (
                FetchError::Refused(StatusCode::FORBIDDEN),
                FailureClass::Transient,
            ),
            (
                FetchError::Refused(StatusCode::NOT_FOUND),
                FailureClass::Transient,
            ),
            (
                FetchError::GaveUp {
                    attempts: 20,
                    last: Failure::Network("reset".into()),
                },
                FailureClass::Transient,
            ),
        ];
        for (err, class) in cases {
            assert_eq!(err.class(), class, "{err}");
        }
    }

    /// Answers one request per connection with the next of `responses` (status line
    /// and headers, then a body of `body` bytes), then stops listening.
    async fn serve_in_turn(responses: Vec<(&'static str, usize)>) -> String {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/build", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for (head, body) in responses {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n")
                    && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    request.push(byte[0]);
                }
                let header =
                    format!("{head}\r\nContent-Length: {body}\r\nConnection: close\r\n\r\n");
                let _ = stream.write_all(header.as_bytes()).await;
                let _ = stream.write_all(&vec![7u8; body]).await;
            }
        });
        url
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_server_is_waited_out_beyond_the_attempt_limit() {
        let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0";
        let mut responses = vec![(busy, 0); SERVER.attempts as usize + 5];
        responses.push(("HTTP/1.1 200 OK", 3));
        let url = serve_in_turn(responses).await;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let started = tokio::time::Instant::now();
        fetch(&Client::new(None), &url, 3, &part, SERVER, |_| {})
            .await
            .expect("503 with Retry-After is waited out, however often");
        assert_eq!(std::fs::read(&part).unwrap(), [7u8; 3]);
        assert!(
            started.elapsed() >= MIN_BUSY_WAIT * (SERVER.attempts + 5),
            "even Retry-After: 0 waits a moment"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_retry_after_is_capped_and_never_panics() {
        let huge = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 18446744073709551615";
        let url = serve_in_turn(vec![(huge, 0), ("HTTP/1.1 200 OK", 3)]).await;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let started = tokio::time::Instant::now();
        fetch(&Client::new(None), &url, 3, &part, SERVER, |_| {})
            .await
            .expect("the download goes on after the capped wait");
        assert_eq!(std::fs::read(&part).unwrap(), [7u8; 3]);
        let waited = started.elapsed();
        assert!(
            waited >= MAX_BUSY_WAIT
                && waited <= MAX_BUSY_WAIT.mul_f64(1.5) + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_download_fails_at_once_as_transient() {
        let url = serve_in_turn(vec![("HTTP/1.1 403 Forbidden", 0)]).await;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let err = fetch(&Client::new(None), &url, 3, &part, SERVER, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Refused(StatusCode::FORBIDDEN)),
            "{err}"
        );
        assert_eq!(err.class(), FailureClass::Transient);
    }

    #[tokio::test(start_paused = true)]
    async fn network_errors_give_up_after_the_attempt_limit_as_transient() {
        // A port nobody listens on: every attempt is a refused connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/build", listener.local_addr().unwrap());
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let started = tokio::time::Instant::now();
        let err = fetch(&Client::new(None), &url, 3, &part, SERVER, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::GaveUp {
                    last: Failure::Network(_),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.class(), FailureClass::Transient);
        assert_eq!(err.mirror_failure(), Some(MirrorFailure::Unreachable));
        // One wait of at least the retry wait between each two of the attempts.
        let waits = SERVER.attempts - 1;
        assert!(started.elapsed() >= SERVER.retry_wait * waits);
        assert!(started.elapsed() <= SERVER.retry_wait.mul_f64(1.5) * waits);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_mirror_is_not_waited_out_but_given_up() {
        let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0";
        let url = serve_in_turn(vec![(busy, 0); MIRROR.attempts as usize]).await;
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let err = fetch(&Client::new(None), &url, 3, &part, MIRROR, |_| {})
            .await
            .unwrap_err();
        assert_eq!(
            err.mirror_failure(),
            Some(MirrorFailure::HttpError),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_download_that_stalls_is_dropped_and_counted() {
        use tokio::io::AsyncReadExt;
        // Headers and one byte of three, then silence with the connection open.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/build", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut byte = [0u8; 1];
                let mut request = Vec::new();
                while !request.ends_with(b"\r\n\r\n")
                    && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    request.push(byte[0]);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n\x07")
                    .await;
                open.push(stream);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("staging/task.part");
        let err = fetch(&Client::new(None), &url, 3, &part, MIRROR, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::GaveUp {
                    attempts: 3,
                    last: Failure::Stalled(_)
                }
            ),
            "{err}"
        );
        assert_eq!(err.mirror_failure(), Some(MirrorFailure::Stalled));
        assert_eq!(err.class(), FailureClass::Transient);
    }

    #[test]
    fn what_a_fetch_error_says_about_a_mirror() {
        let io = || std::io::Error::other("x");
        let gave_up = |last| FetchError::GaveUp { attempts: 3, last };
        let cases = [
            (FetchError::NoSpace(io()), None),
            (FetchError::Client("x".into()), None),
            (
                FetchError::DiskFull {
                    needed: 2,
                    available: 1,
                },
                None,
            ),
            (FetchError::TooLarge(3), Some(MirrorFailure::WrongBytes)),
            (
                FetchError::Refused(StatusCode::NOT_FOUND),
                Some(MirrorFailure::NotFound),
            ),
            (
                FetchError::Refused(StatusCode::GONE),
                Some(MirrorFailure::NotFound),
            ),
            (
                FetchError::Refused(StatusCode::FORBIDDEN),
                Some(MirrorFailure::HttpError),
            ),
            (
                gave_up(Failure::Status(StatusCode::BAD_GATEWAY)),
                Some(MirrorFailure::HttpError),
            ),
            (
                gave_up(Failure::Short { done: 1, size: 3 }),
                Some(MirrorFailure::Unreachable),
            ),
        ];
        for (err, expected) in cases {
            assert_eq!(err.mirror_failure(), expected, "{err}");
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

    /// One answer of a fuzzed download server.
    #[derive(Debug, Clone)]
    struct Answer {
        status: u16,
        retry_after: Option<String>,
        content_range: Option<String>,
        /// The `Content-Length` declared, whatever the body; none: the body ends at EOF.
        declared: Option<u64>,
        body: Vec<u8>,
    }

    fn header_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..5000, 0u64..5000).prop_map(|(a, b)| format!("bytes {a}-{b}/{}", a.max(b) + 1)),
            "bytes [0-9]{1,25}-[0-9]{0,25}/[0-9*]{1,25}",
            "-?[0-9]{1,30}",
            "[ -~]{0,60}",
        ]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        (
            prop_oneof![
                Just(200u16),
                Just(206),
                Just(503),
                Just(429),
                Just(416),
                Just(404),
                Just(403),
                Just(500),
                100u16..600,
            ],
            proptest::option::of(header_text()),
            proptest::option::of(header_text()),
            proptest::option::of(0u64..6000),
            proptest::collection::vec(any::<u8>(), 0..4000),
        )
            .prop_map(
                |(status, retry_after, content_range, declared, body)| Answer {
                    status,
                    retry_after,
                    content_range,
                    declared,
                    body,
                },
            )
    }

    /// Answers one request per connection with the next answer, then stops listening.
    async fn serve_answers(answers: Vec<Answer>) -> String {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/build", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n")
                    && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    request.push(byte[0]);
                }
                let mut head =
                    format!("HTTP/1.1 {} Fuzzed\r\nConnection: close\r\n", answer.status);
                if let Some(value) = &answer.retry_after {
                    head += &format!("Retry-After: {value}\r\n");
                }
                if let Some(value) = &answer.content_range {
                    head += &format!("Content-Range: {value}\r\n");
                }
                if let Some(length) = answer.declared {
                    head += &format!("Content-Length: {length}\r\n");
                }
                head += "\r\n";
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&answer.body).await;
                let _ = stream.shutdown().await;
            }
        });
        url
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever a download server answers (any status, `Retry-After`,
        /// `Content-Range`, `Content-Length` true or false, any body), the download ends
        /// with the bytes or an error, never a panic, within bounded (paused) time, and
        /// never holds more than the declared size.
        #[test]
        fn no_download_response_panics_the_agent(
            answers in proptest::collection::vec(answer(), 1..6),
            size in 1u64..5000,
            held in 0u64..6000,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let part = dir.path().join("staging/task.part");
            std::fs::create_dir_all(part.parent().unwrap()).unwrap();
            std::fs::write(&part, vec![1u8; held as usize]).unwrap();
            let outcome = runtime.block_on(async {
                let url = serve_answers(answers.clone()).await;
                let started = tokio::time::Instant::now();
                let outcome = fetch(&Client::new(None), &url, size, &part, SERVER, |done| {
                    assert!(done <= size, "{done} bytes held of {size}");
                })
                .await;
                // Each answer waits at most the longest Retry-After, and each failure
                // at most the retry wait (or a stall), with jitter.
                let bound = (MAX_BUSY_WAIT + SERVER.retry_wait + SERVER.stall).mul_f64(1.5)
                    * (answers.len() as u32 + SERVER.attempts);
                assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
                outcome
            });
            let on_disk = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            prop_assert!(on_disk <= size.max(held), "{} bytes on disk for {}", on_disk, size);
            if outcome.is_ok() {
                prop_assert_eq!(on_disk, size);
            }
        }

        /// A declared size never overflows the free-space check, however large.
        #[test]
        fn the_space_check_never_overflows(size in any::<u64>(), held in any::<u64>()) {
            let dir = tempfile::tempdir().unwrap();
            let part = dir.path().join("x.part");
            if let Err(FetchError::DiskFull { needed, .. }) = check_space(&part, size, held) {
                prop_assert!(needed >= size);
            }
        }
    }
}
