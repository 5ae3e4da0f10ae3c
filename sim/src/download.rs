//! Fetching a pushed build for real: streamed through SHA-256 and discarded, so a
//! simulated agent costs the server a full download but costs the simulator no disk.
//! An offered delta from the build the agents start on (`--running-build`), else an
//! offered compressed copy, is fetched instead, its digest checked and decompressed
//! (streaming, never beyond the build's size; a delta with the starting build as its
//! prefix) through the build's digest; one that fails is given up for the next (the
//! copy, then the build), as the agent does. Each `Failure` carries the failure class a
//! real agent would report for it.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use protocol::{CompressedBuild, DeltaBuild, FailureClass};
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
    /// The update's delta and the bytes of its base, fetched first while it has not
    /// failed.
    pub(crate) delta: Option<(DeltaBuild, Arc<[u8]>)>,
    pub(crate) delta_failed: AtomicBool,
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

    /// What to fetch now: the delta, then the compressed copy, while offered and not
    /// failed; else the build.
    fn form(&self) -> Option<Form<'_>> {
        if let Some((delta, base)) = &self.delta
            && !self.delta_failed.load(Ordering::Relaxed)
        {
            return Some(Form {
                url: &delta.url,
                size: delta.size,
                sha256: &delta.sha256,
                base: Some(base),
                failed: &self.delta_failed,
                name: "delta",
            });
        }
        self.compressed
            .as_ref()
            .filter(|_| !self.copy_failed.load(Ordering::Relaxed))
            .map(|copy| Form {
                url: &copy.url,
                size: copy.size,
                sha256: &copy.sha256,
                base: None,
                failed: &self.copy_failed,
                name: "compressed_copy",
            })
    }

    async fn attempt(&self) -> Attempt {
        let copy = self.form();
        let url = copy.as_ref().map_or(self.url.as_str(), |c| c.url);
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
            _ if copy.is_some() => {
                return self.give_up(copy.as_ref().unwrap(), "an error status");
            }
            status => {
                return Attempt::Done(Err(failure(
                    "download_status",
                    FailureClass::Transient,
                    format!("download answered {status}"),
                )));
            }
        }
        if let Some(copy) = copy {
            return self.receive_form(response, &copy).await;
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

    async fn receive_form(&self, mut response: reqwest::Response, copy: &Form<'_>) -> Attempt {
        let mut wire = Sha256::new();
        let mut received = 0u64;
        let raw = match copy.base {
            None => zstd::stream::raw::Decoder::new(),
            Some(base) => zstd::stream::raw::Decoder::with_ref_prefix(base).and_then(|mut raw| {
                raw.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    protocol::delta_window_log(base.len() as u64, self.size),
                ))?;
                Ok(raw)
            }),
        };
        let sink = BuildSink {
            hasher: Sha256::new(),
            written: 0,
            size: self.size,
        };
        let mut decoder = match raw {
            Ok(raw) => zstd::stream::write::Decoder::with_decoder(sink, raw),
            Err(_) => return self.give_up(copy, "no decoder"),
        };
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    self.stats
                        .download_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if received > copy.size {
                        return self.give_up(copy, "more bytes than offered");
                    }
                    wire.update(&chunk);
                    if decoder.write_all(&chunk).is_err() {
                        return self
                            .give_up(copy, "it does not decompress within the build's size");
                    }
                }
                Ok(None) => break,
                Err(err) => return Attempt::Network(err.to_string()),
            }
        }
        if received != copy.size || hex::encode(wire.finalize()) != copy.sha256.to_ascii_lowercase()
        {
            return self.give_up(copy, "its digest does not match");
        }
        if decoder.flush().is_err() {
            return self.give_up(copy, "it does not decompress");
        }
        let sink = decoder.into_inner();
        if sink.written != self.size
            || !hex::encode(sink.hasher.finalize()).eq_ignore_ascii_case(self.sha256.trim())
        {
            return self.give_up(copy, "it does not decompress to the build");
        }
        Attempt::Done(Ok(()))
    }

    /// The form failed: the next is fetched from now on.
    fn give_up(&self, form: &Form<'_>, why: &str) -> Attempt {
        form.failed.store(true, Ordering::Relaxed);
        self.stats.error(&format!("{}_failed: {why}", form.name));
        Attempt::Network(format!("the {} failed: {why}", form.name))
    }
}

/// A form of the build other than itself: the delta or the compressed copy.
struct Form<'a> {
    url: &'a str,
    size: u64,
    sha256: &'a str,
    /// A delta's base: the bytes the agents start on.
    base: Option<&'a [u8]>,
    /// Set when this form is given up on.
    failed: &'a AtomicBool,
    /// For errors: `delta` or `compressed_copy`.
    name: &'static str,
}

enum Attempt {
    Done(Result<(), Failure>),
    Busy(Duration),
    Network(String),
}
