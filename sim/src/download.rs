//! Fetching a pushed build for real: streamed through SHA-256 and discarded, so a
//! simulated agent costs the server a full download but costs the simulator no disk.
//! An offered compressed copy is fetched instead, its digest checked and decompressed
//! (streaming, never beyond the build's size) through the build's digest; a copy that
//! fails is given up for the build, as the agent does. Each `Failure` carries the
//! failure class a real agent would report for it.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use protocol::{CompressedBuild, FailureClass};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::net::parse_retry_after;
use crate::stats::Stats;

/// Network failures are retried this often before the task is reported failed.
const MAX_NETWORK_RETRIES: u32 = 5;
/// 503s are flow control rather than failure, so they get many more chances.
const MAX_BUSY_RETRIES: u32 = 200;

#[derive(Debug)]
pub(crate) struct Failure {
    /// The error kind in the report.
    pub(crate) kind: &'static str,
    pub(crate) class: FailureClass,
    pub(crate) message: String,
}

fn failure(kind: &'static str, class: FailureClass, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        class,
        message: message.into(),
    }
}

pub(crate) struct Fetch {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
    /// The update's compressed copy, fetched instead while it has not failed.
    pub(crate) compressed: Option<CompressedBuild>,
    pub(crate) copy_failed: AtomicBool,
    pub(crate) limit: Option<Arc<Semaphore>>,
    pub(crate) stats: Arc<Stats>,
}

/// The decompressed build: hashed and counted, refused beyond its size.
struct BuildSink {
    hasher: Sha256,
    written: u64,
    size: u64,
}

impl Write for BuildSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len() as u64;
        if self.written > self.size {
            return Err(std::io::Error::other("inflates beyond the build's size"));
        }
        self.hasher.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Fetch {
    /// Downloads and verifies size and digest; the bytes are not kept.
    pub(crate) async fn run(self) -> Result<(), Failure> {
        let _permit = match &self.limit {
            Some(limit) => Some(limit.clone().acquire_owned().await.map_err(|_| {
                failure(
                    "download_limit",
                    FailureClass::Transient,
                    "download limiter closed",
                )
            })?),
            None => None,
        };
        let (mut network_failures, mut busy) = (0u32, 0u32);
        loop {
            match self.attempt().await {
                Attempt::Done(result) => return result,
                Attempt::Busy(wait) => {
                    busy += 1;
                    if busy > MAX_BUSY_RETRIES {
                        return Err(failure(
                            "download_busy",
                            FailureClass::Transient,
                            "server stayed busy (503)",
                        ));
                    }
                    self.stats.download_retries.fetch_add(1, Ordering::Relaxed);
                    // Spread the retries, or every refused agent returns in the same tick.
                    let jitter = rand::rng().random_range(0..=wait.as_millis() as u64 / 4);
                    tokio::time::sleep(wait + Duration::from_millis(jitter)).await;
                }
                Attempt::Network(message) => {
                    network_failures += 1;
                    if network_failures > MAX_NETWORK_RETRIES {
                        return Err(failure(
                            "download_network",
                            FailureClass::Transient,
                            message,
                        ));
                    }
                    self.stats.download_retries.fetch_add(1, Ordering::Relaxed);
                    let ceiling = 250u64 << network_failures;
                    let wait = rand::rng().random_range(0..=ceiling);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }

    /// The compressed copy, while it is offered and has not failed.
    fn copy(&self) -> Option<&CompressedBuild> {
        self.compressed
            .as_ref()
            .filter(|_| !self.copy_failed.load(Ordering::Relaxed))
    }

    async fn attempt(&self) -> Attempt {
        let copy = self.copy();
        let url = copy.map_or(self.url.as_str(), |c| c.url.as_str());
        let mut response = match self.client.get(url).send().await {
            Ok(response) => response,
            Err(err) => return Attempt::Network(err.to_string()),
        };
        match response.status().as_u16() {
            200 => {}
            503 => {
                let wait = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after)
                    .unwrap_or(Duration::from_secs(1));
                return Attempt::Busy(wait);
            }
            403 => {
                return Attempt::Done(Err(failure(
                    "download_forbidden",
                    FailureClass::Transient,
                    "downloads are switched off (403)",
                )));
            }
            _ if copy.is_some() => return self.give_up_copy("an error status"),
            status => {
                return Attempt::Done(Err(failure(
                    "download_status",
                    FailureClass::Transient,
                    format!("download answered {status}"),
                )));
            }
        }
        if let Some(copy) = copy {
            return self.receive_copy(response, copy).await;
        }
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    self.stats
                        .download_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if received > self.size {
                        return Attempt::Done(Err(failure(
                            "download_too_long",
                            FailureClass::Build,
                            format!("more than the {} bytes announced", self.size),
                        )));
                    }
                    hasher.update(&chunk);
                }
                Ok(None) => break,
                Err(err) => return Attempt::Network(err.to_string()),
            }
        }
        if received != self.size {
            return Attempt::Done(Err(failure(
                "download_short",
                FailureClass::Transient,
                format!("{received} of {} bytes", self.size),
            )));
        }
        let digest = hex::encode(hasher.finalize());
        if !digest.eq_ignore_ascii_case(self.sha256.trim()) {
            return Attempt::Done(Err(failure(
                "checksum_mismatch",
                FailureClass::Build,
                format!("sha256 {digest}, expected {}", self.sha256),
            )));
        }
        Attempt::Done(Ok(()))
    }

    async fn receive_copy(
        &self,
        mut response: reqwest::Response,
        copy: &CompressedBuild,
    ) -> Attempt {
        let mut wire = Sha256::new();
        let mut received = 0u64;
        let mut decoder = match zstd::stream::write::Decoder::new(BuildSink {
            hasher: Sha256::new(),
            written: 0,
            size: self.size,
        }) {
            Ok(decoder) => decoder,
            Err(_) => return self.give_up_copy("no decoder"),
        };
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    self.stats
                        .download_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if received > copy.size {
                        return self.give_up_copy("more bytes than the copy has");
                    }
                    wire.update(&chunk);
                    if decoder.write_all(&chunk).is_err() {
                        return self.give_up_copy("it does not decompress within the build's size");
                    }
                }
                Ok(None) => break,
                Err(err) => return Attempt::Network(err.to_string()),
            }
        }
        if received != copy.size || hex::encode(wire.finalize()) != copy.sha256.to_ascii_lowercase()
        {
            return self.give_up_copy("the copy's digest does not match");
        }
        if decoder.flush().is_err() {
            return self.give_up_copy("it does not decompress");
        }
        let sink = decoder.into_inner();
        if sink.written != self.size
            || !hex::encode(sink.hasher.finalize()).eq_ignore_ascii_case(self.sha256.trim())
        {
            return self.give_up_copy("it does not decompress to the build");
        }
        Attempt::Done(Ok(()))
    }

    /// The copy failed: the build itself is fetched from now on.
    fn give_up_copy(&self, why: &str) -> Attempt {
        self.copy_failed.store(true, Ordering::Relaxed);
        self.stats.error(&format!("compressed_copy_failed: {why}"));
        Attempt::Network(format!("the compressed copy failed: {why}"))
    }
}

enum Attempt {
    Done(Result<(), Failure>),
    Busy(Duration),
    Network(String),
}
