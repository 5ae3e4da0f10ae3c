//! Fetching a pushed build for real: streamed through SHA-256 and discarded, so a
//! simulated agent costs the server a full download but costs the simulator no disk.
//! Each `Failure` carries the failure class a real agent would report for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use protocol::FailureClass;
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
    pub(crate) limit: Option<Arc<Semaphore>>,
    pub(crate) stats: Arc<Stats>,
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

    async fn attempt(&self) -> Attempt {
        let mut response = match self.client.get(&self.url).send().await {
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
            status => {
                return Attempt::Done(Err(failure(
                    "download_status",
                    FailureClass::Transient,
                    format!("download answered {status}"),
                )));
            }
        }
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
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
}

enum Attempt {
    Done(Result<(), Failure>),
    Busy(Duration),
    Network(String),
}
