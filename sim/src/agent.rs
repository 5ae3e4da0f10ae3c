//! One simulated agent: a single task that connects, enrolls or authenticates,
//! heartbeats, applies pushed updates by downloading and verifying them, and comes
//! back on the new version, reconnecting with full-jitter backoff after any loss. A
//! `FailurePlan` makes chosen agents or versions fail their probation on purpose.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{
    AgentMessage, FailureClass, Heartbeat, Hello, RejectCode, ServerMessage, Update, UpdateOutcome,
    UpdateProgress, UpdateResult, UpdateStage,
};
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::download::{Failure, Fetch};
use crate::identities::{Identities, Identity};
use crate::net::{Endpoint, Socket};
use crate::stats::Stats;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The server ends a session silent for 3 intervals; we give up on it after the same.
const MISSED_HEARTBEATS: u32 = 3;
const MAX_PINGS_IN_FLIGHT: usize = 64;

/// What every agent shares.
pub(crate) struct Fleet {
    /// The server's nodes; an agent moves to the next when its session is lost.
    pub(crate) endpoints: Vec<Endpoint>,
    /// The first agent's number in its name (`sim-N`).
    pub(crate) first_index: usize,
    pub(crate) enroll_token: String,
    pub(crate) os: String,
    pub(crate) arch: String,
    pub(crate) heartbeat_jitter: f64,
    /// Heartbeat this often instead of the welcome's interval, to offer a server more
    /// than one heartbeat per agent per second.
    pub(crate) heartbeat_every: Option<Duration>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) identities: Identities,
    /// Bounds handshakes in flight, so a start of tens of thousands of agents does not
    /// overflow the kernel's accept queue and turn into SYN retransmits.
    pub(crate) handshakes: Semaphore,
    pub(crate) downloads: Option<Arc<Semaphore>>,
    /// Record updates as received and do nothing else (fan-out measurements).
    pub(crate) hold_updates: bool,
    /// Which verified builds fail their simulated probation.
    pub(crate) failures: FailurePlan,
    /// One HTTP client per source address, so downloads are spread like sessions.
    pub(crate) http: Vec<reqwest::Client>,
    /// The build the agents start on, which deltas start from.
    pub(crate) running_build: Option<RunningBuild>,
}

/// The build the agents start on (`--running-build`): its version, SHA-256 and bytes.
pub(crate) struct RunningBuild {
    pub(crate) version: String,
    pub(crate) sha256: String,
    pub(crate) bytes: Arc<[u8]>,
}

/// Builds that fail on purpose, as a build failing its probation would: the agent
/// downloads and verifies it, then reports `rolled_back` (class `build`) and keeps its
/// version. Lets a test or a benchmark set the server's failure counts, gates and halts
/// against what the simulator knows it did.
#[derive(Debug, Clone, Default)]
pub(crate) struct FailurePlan {
    /// Every agent fails these versions.
    pub(crate) versions: Vec<semver::Version>,
    /// This share of the agents (0 to 1) fails every build.
    pub(crate) rate: f64,
}

impl FailurePlan {
    pub(crate) fn fails(&self, index: usize, version: &str) -> bool {
        self.always_fails(index)
            || semver::Version::parse(version).is_ok_and(|v| self.versions.contains(&v))
    }

    /// The failing share is spread evenly over agent indices (so `sim-{index}`), the
    /// same agents on every run: of the first n agents, ⌊n · rate⌋ fail.
    fn always_fails(&self, index: usize) -> bool {
        let failing_before = |n: usize| (n as f64 * self.rate).floor();
        failing_before(index + 1) > failing_before(index)
    }
}

impl Fleet {
    fn http_client(&self, index: usize) -> reqwest::Client {
        self.http[index % self.http.len()].clone()
    }
}

/// An installed update waiting for the new version's first acknowledged heartbeat.
struct Owed {
    task_id: String,
    received: Instant,
}

/// An update being downloaded.
struct Working {
    task_id: String,
    version: String,
    received: Instant,
    size: u64,
    fetch: Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>,
}

enum Ended {
    Shutdown,
    /// The new version is installed; come back as it at once, as a restart would.
    Restart,
    Lost {
        kind: String,
        welcomed: bool,
        retry_after: Option<Duration>,
    },
}

fn lost(kind: impl Into<String>, welcomed: bool) -> Ended {
    Ended::Lost {
        kind: kind.into(),
        welcomed,
        retry_after: None,
    }
}

pub(crate) struct SimAgent {
    index: usize,
    fleet: Arc<Fleet>,
    version: String,
    owed: Option<Owed>,
    /// Tasks this agent has finished; a repeated `update` for one is not started again.
    finished: Vec<String>,
    /// Set until the first welcome: connect time is measured from here.
    first_attempt: Option<Instant>,
    welcomed_once: bool,
    /// The stored credentials were refused; enroll again (the fingerprint re-binds).
    reenroll: bool,
    /// Which of the fleet's endpoints this agent connects to.
    node: usize,
}

impl SimAgent {
    pub(crate) fn new(index: usize, fleet: Arc<Fleet>, version: String) -> SimAgent {
        SimAgent {
            index,
            node: index % fleet.endpoints.len().max(1),
            fleet,
            version,
            owed: None,
            finished: Vec::new(),
            first_attempt: None,
            welcomed_once: false,
            reenroll: false,
        }
    }

    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.session(&mut shutdown).await {
                Ended::Shutdown => return,
                Ended::Restart => {
                    self.fleet.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    attempt = 0;
                }
                Ended::Lost {
                    kind,
                    welcomed,
                    retry_after,
                } => {
                    self.fleet.stats.error(&kind);
                    self.fleet.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    // Another node of the fleet may hold the session instead: any other,
                    // so the agents of a node that went away spread over the rest.
                    let nodes = self.fleet.endpoints.len();
                    if nodes > 1 {
                        self.node = (self.node + rand::rng().random_range(1..nodes)) % nodes;
                    }
                    if welcomed {
                        attempt = 0;
                    }
                    let delay = retry_after.unwrap_or_else(|| backoff(attempt));
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Ended {
        let fleet = self.fleet.clone();
        let stats = &fleet.stats;
        if !self.welcomed_once {
            self.first_attempt.get_or_insert_with(Instant::now);
        }
        let permit = tokio::select! {
            permit = fleet.handshakes.acquire() => permit.expect("the handshake limiter is never closed"),
            _ = shutdown.changed() => return Ended::Shutdown,
        };
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake());
        let (mut socket, welcome) = tokio::select! {
            result = handshake => match result {
                Ok(Ok(done)) => done,
                Ok(Err(ended)) => return ended,
                Err(_) => return lost("handshake_timeout", false),
            },
            _ = shutdown.changed() => return Ended::Shutdown,
        };
        drop(permit);
        let _in_session = stats.session_open();
        if let Some(started) = self.first_attempt.take() {
            stats.record_connect(started.elapsed());
        }
        self.welcomed_once = true;
        if let Some(secret) = welcome.secret {
            self.reenroll = false;
            stats.enrolled.fetch_add(1, Ordering::Relaxed);
            fleet.identities.set(
                self.index,
                Identity {
                    agent_id: welcome.agent_id,
                    secret,
                },
            );
        } else {
            stats.reused_identities.fetch_add(1, Ordering::Relaxed);
        }

        let silence_limit = Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1)))
            * MISSED_HEARTBEATS;
        let interval = fleet
            .heartbeat_every
            .unwrap_or(silence_limit / MISSED_HEARTBEATS);
        // Agents started together would otherwise heartbeat in lockstep forever.
        let first_beat = if self.owed.is_some() {
            Duration::ZERO
        } else {
            interval.mul_f64(rand::rng().random_range(0.0..1.0))
        };
        let mut next_beat = Instant::now() + first_beat;
        let mut seq = 0u64;
        // Pings awaiting their pong, oldest first. A slow server answers a ping after the
        // next heartbeat went out; dropping those would hide exactly the slow round trips.
        let mut pings: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut last_heard = Instant::now();
        let mut working: Option<Working> = None;

        loop {
            tokio::select! {
                // Frames first: one already received counts as heard, so a process that was
                // not scheduled for a while does not take its own delay for a silent server.
                biased;
                frame = socket.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Pong(payload))) => {
                            let Ok(acked) = <[u8; 8]>::try_from(payload.as_ref()).map(u64::from_be_bytes) else { continue };
                            let Some(at) = take_ping(&mut pings, acked) else { continue };
                            stats.record_heartbeat_ack(at.elapsed());
                            if let Some(owed) = self.owed.take() {
                                let result = AgentMessage::UpdateResult(UpdateResult {
                                    task_id: owed.task_id.clone(),
                                    outcome: UpdateOutcome::Succeeded,
                                    version: self.version.clone(),
                                    error: None,
                                    failure_class: None,
                                    transfer: None,
                                });
                                if let Err(kind) = send(&mut socket, &result).await {
                                    self.owed = Some(owed);
                                    return lost(kind, true);
                                }
                                stats.updates_completed.fetch_add(1, Ordering::Relaxed);
                                stats.record_update_completion(owed.received.elapsed());
                                self.finished.push(owed.task_id);
                            }
                        }
                        Some(Ok(Message::Binary(bytes))) => match ServerMessage::decode(&bytes) {
                            Ok(ServerMessage::Update(update)) => {
                                if let Err(kind) = self.take_update(&mut socket, &mut working, *update).await {
                                    return lost(kind, true);
                                }
                            }
                            Ok(ServerMessage::Cancel(cancel)) => {
                                if working.as_ref().is_some_and(|w| w.task_id == cancel.task_id) {
                                    working = None;
                                    self.finished.push(cancel.task_id);
                                }
                            }
                            Ok(ServerMessage::Reject(reject)) => {
                                return lost(format!("rejected_{}", reject_name(reject.code)), true);
                            }
                            Ok(_) => {}
                            Err(_) => {
                                let _ = socket.close(None).await;
                                return lost("bad_server_frame", true);
                            }
                        },
                        Some(Ok(Message::Close(_))) | None => return lost("disconnected", true),
                        Some(Ok(_)) => {}
                        Some(Err(_)) => return lost("socket_error", true),
                    }
                }
                result = async { working.as_mut().expect("guarded by the branch condition").fetch.as_mut().await }, if working.is_some() => {
                    let task = working.take().expect("guarded by the branch condition");
                    match result {
                        Ok(()) if fleet.failures.fails(self.index, &task.version) => {
                            stats.updates_verified.fetch_add(1, Ordering::Relaxed);
                            if let Err(kind) = self.fail_probation(&mut socket, task).await {
                                return lost(kind, true);
                            }
                        }
                        Ok(()) => {
                            stats.updates_verified.fetch_add(1, Ordering::Relaxed);
                            for stage in [UpdateStage::Verifying, UpdateStage::Installing, UpdateStage::Restarting] {
                                let progress = progress(&task.task_id, stage, task.size, task.size);
                                if let Err(kind) = send(&mut socket, &progress).await {
                                    return lost(kind, true);
                                }
                            }
                            self.version = task.version;
                            self.owed = Some(Owed { task_id: task.task_id, received: task.received });
                            let _ = socket.close(None).await;
                            return Ended::Restart;
                        }
                        Err(failure) => {
                            stats.updates_failed.fetch_add(1, Ordering::Relaxed);
                            stats.error(failure.kind);
                            if failure.class == FailureClass::Build {
                                stats.record_build_failure(&task.version);
                            }
                            let result = AgentMessage::UpdateResult(UpdateResult {
                                task_id: task.task_id.clone(),
                                outcome: UpdateOutcome::Failed,
                                version: self.version.clone(),
                                error: Some(failure.message),
                                failure_class: Some(failure.class),
                                transfer: None,
                            });
                            self.finished.push(task.task_id);
                            if let Err(kind) = send(&mut socket, &result).await {
                                return lost(kind, true);
                            }
                        }
                    }
                }
                _ = shutdown.changed() => {
                    let _ = socket.close(None).await;
                    return Ended::Shutdown;
                }
                _ = tokio::time::sleep_until(next_beat) => {
                    if last_heard.elapsed() > silence_limit {
                        return lost("server_silent", true);
                    }
                    seq += 1;
                    let beat = AgentMessage::Heartbeat(Heartbeat { seq, version: self.version.clone() });
                    if let Err(kind) = send(&mut socket, &beat).await {
                        return lost(kind, true);
                    }
                    stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                    // The server handles a session's frames in order, so the pong to this
                    // ping proves the heartbeat before it was handled.
                    if socket.send(Message::Ping(seq.to_be_bytes().to_vec().into())).await.is_err() {
                        return lost("send", true);
                    }
                    if pings.len() == MAX_PINGS_IN_FLIGHT {
                        pings.pop_front();
                    }
                    pings.push_back((seq, Instant::now()));
                    next_beat += self.jittered(interval);
                }
            }
        }
    }

    /// TCP and WebSocket connect, hello, and the server's answer.
    async fn handshake(&mut self) -> Result<(Socket, protocol::Welcome), Ended> {
        let fleet = &self.fleet;
        let endpoint = &fleet.endpoints[self.node];
        let mut socket = endpoint
            .connect(endpoint.next_source())
            .await
            .map_err(|err| {
                tracing::debug!(agent = self.index, %err, "connect failed");
                let retry_after = match &err {
                    crate::net::ConnectError::Status { retry_after, .. } => *retry_after,
                    _ => None,
                };
                Ended::Lost {
                    kind: err.kind(),
                    welcomed: false,
                    retry_after,
                }
            })?;
        let identity = fleet.identities.get(self.index).filter(|_| !self.reenroll);
        let name = format!("sim-{}", fleet.first_index + self.index);
        let hello = AgentMessage::Hello(Hello {
            agent_id: identity.as_ref().map(|i| i.agent_id.clone()),
            secret: identity.as_ref().map(|i| i.secret.clone()),
            enroll_token: identity.is_none().then(|| fleet.enroll_token.clone()),
            fingerprint: name.clone(),
            hostname: name,
            version: self.version.clone(),
            os: fleet.os.clone(),
            arch: fleet.arch.clone(),
            auto_update: true,
        });
        send(&mut socket, &hello)
            .await
            .map_err(|kind| lost(kind, false))?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Binary(bytes))) => match ServerMessage::decode(&bytes) {
                    Ok(ServerMessage::Welcome(welcome)) => return Ok((socket, welcome)),
                    Ok(ServerMessage::Reject(reject)) => {
                        tracing::debug!(agent = self.index, code = ?reject.code, message = %reject.message, "rejected");
                        if reject.code == RejectCode::BadCredentials && identity.is_some() {
                            self.reenroll = true;
                        }
                        return Err(lost(
                            format!("rejected_{}", reject_name(reject.code)),
                            false,
                        ));
                    }
                    Ok(_) => continue,
                    Err(_) => return Err(lost("bad_server_frame", false)),
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(lost("closed_before_welcome", false));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) => return Err(lost("socket_error", false)),
            }
        }
    }

    async fn take_update(
        &mut self,
        socket: &mut Socket,
        working: &mut Option<Working>,
        update: Update,
    ) -> Result<(), &'static str> {
        let stats = &self.fleet.stats;
        stats.updates_received.fetch_add(1, Ordering::Relaxed);
        if update.sent_at_ms > 0 {
            stats.record_update_notify(Duration::from_millis(
                crate::stats::unix_ms().saturating_sub(update.sent_at_ms),
            ));
        }
        let repeated = self.finished.contains(&update.task_id)
            || working
                .as_ref()
                .is_some_and(|w| w.task_id == update.task_id)
            || self
                .owed
                .as_ref()
                .is_some_and(|o| o.task_id == update.task_id);
        if repeated {
            return Ok(());
        }
        stats.record_update_received();
        if self.fleet.hold_updates {
            self.finished.push(update.task_id);
            return Ok(());
        }
        if !update.rollback && !is_newer(&update.version, &self.version) {
            stats.updates_failed.fetch_add(1, Ordering::Relaxed);
            stats.error("update_not_newer");
            self.finished.push(update.task_id.clone());
            let refusal = AgentMessage::UpdateResult(UpdateResult {
                task_id: update.task_id,
                outcome: UpdateOutcome::Failed,
                version: self.version.clone(),
                error: Some(format!(
                    "{} is not newer than the running {}",
                    update.version, self.version
                )),
                failure_class: Some(FailureClass::Transient),
                transfer: None,
            });
            return send(socket, &refusal).await;
        }
        send(
            socket,
            &progress(&update.task_id, UpdateStage::Downloading, 0, update.size),
        )
        .await?;
        let fetch = Fetch {
            client: self.fleet.http_client(self.index),
            url: update.url,
            size: update.size,
            sha256: update.sha256,
            compressed: update
                .compressed
                .filter(|c| c.encoding == protocol::ENCODING_ZSTD),
            copy_failed: Default::default(),
            // Only while the agent runs the build it started on, which alone it has.
            delta: update
                .delta
                .filter(|d| d.encoding == protocol::ENCODING_ZSTD_PATCH)
                .and_then(|d| {
                    let build = self.fleet.running_build.as_ref()?;
                    (self.version == build.version
                        && d.base_sha256.eq_ignore_ascii_case(&build.sha256))
                    .then(|| (d, build.bytes.clone()))
                }),
            delta_failed: Default::default(),
            limit: self.fleet.downloads.clone(),
            stats: stats.clone(),
        };
        // A different task replaces the one in flight: the server keeps one per agent.
        *working = Some(Working {
            task_id: update.task_id,
            version: update.version,
            received: Instant::now(),
            size: update.size,
            fetch: Box::pin(fetch.run()),
        });
        Ok(())
    }

    /// A verified build that fails on purpose: installed, then rolled back by its
    /// probation, so the agent reports `rolled_back` and stays on its version.
    async fn fail_probation(
        &mut self,
        socket: &mut Socket,
        task: Working,
    ) -> Result<(), &'static str> {
        for stage in [UpdateStage::Verifying, UpdateStage::Installing] {
            send(
                socket,
                &progress(&task.task_id, stage, task.size, task.size),
            )
            .await?;
        }
        let stats = &self.fleet.stats;
        stats.updates_failed.fetch_add(1, Ordering::Relaxed);
        stats.record_build_failure(&task.version);
        self.finished.push(task.task_id.clone());
        let result = AgentMessage::UpdateResult(UpdateResult {
            task_id: task.task_id,
            outcome: UpdateOutcome::RolledBack,
            version: self.version.clone(),
            error: Some(format!("simulated probation failure of {}", task.version)),
            failure_class: Some(FailureClass::Build),
            transfer: None,
        });
        send(socket, &result).await
    }

    /// One heartbeat interval with `± jitter` of itself added.
    fn jittered(&self, interval: Duration) -> Duration {
        let jitter = self.fleet.heartbeat_jitter;
        if jitter <= 0.0 {
            return interval;
        }
        interval.mul_f64(rand::rng().random_range(1.0 - jitter..=1.0 + jitter))
    }
}

/// Pongs come back in order, so everything before `seq` was lost with no answer.
fn take_ping(pings: &mut VecDeque<(u64, Instant)>, seq: u64) -> Option<Instant> {
    while let Some((sent, at)) = pings.pop_front() {
        if sent == seq {
            return Some(at);
        }
        if sent > seq {
            pings.push_front((sent, at));
            return None;
        }
    }
    None
}

fn progress(task_id: &str, stage: UpdateStage, done: u64, total: u64) -> AgentMessage {
    AgentMessage::UpdateProgress(UpdateProgress {
        task_id: task_id.to_owned(),
        stage,
        bytes_done: done,
        bytes_total: total,
        transfer: None,
    })
}

async fn send(socket: &mut Socket, message: &AgentMessage) -> Result<(), &'static str> {
    socket
        .send(Message::Binary(message.encode().into()))
        .await
        .map_err(|_| "send")
}

/// Full-jitter exponential backoff, as PROTOCOL.md recommends.
fn backoff(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let ceiling = BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP);
    Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
}

fn is_newer(offered: &str, running: &str) -> bool {
    match (
        semver::Version::parse(offered),
        semver::Version::parse(running),
    ) {
        (Ok(offered), Ok(running)) => offered > running,
        _ => false,
    }
}

fn reject_name(code: RejectCode) -> &'static str {
    match code {
        RejectCode::BadCredentials => "bad_credentials",
        RejectCode::BadEnrollToken => "bad_enroll_token",
        RejectCode::ExpectedHello => "expected_hello",
        RejectCode::UnsupportedProtocol => "unsupported_protocol",
        RejectCode::MalformedFrame => "malformed_frame",
        RejectCode::FrameTooLarge => "frame_too_large",
        RejectCode::Replaced => "replaced",
        RejectCode::Timeout => "timeout",
        RejectCode::ServerError => "server_error",
        RejectCode::RateLimited => "rate_limited",
        RejectCode::FingerprintConflict => "fingerprint_conflict",
        RejectCode::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_a_doubling_ceiling_up_to_the_cap() {
        for attempt in 0..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
                .min(BACKOFF_CAP);
            for _ in 0..20 {
                assert!(backoff(attempt) <= ceiling);
            }
        }
    }

    #[test]
    fn pongs_match_their_pings_and_skip_lost_ones() {
        let now = Instant::now();
        let mut pings: VecDeque<(u64, Instant)> = (1..=4).map(|seq| (seq, now)).collect();
        assert!(take_ping(&mut pings, 2).is_some());
        assert_eq!(pings.front().map(|p| p.0), Some(3));
        assert!(
            take_ping(&mut pings, 2).is_none(),
            "an answered ping is gone"
        );
        assert!(take_ping(&mut pings, 4).is_some());
        assert!(pings.is_empty());
    }

    #[test]
    fn the_failing_share_is_spread_evenly_over_the_same_agents() {
        let plan = |rate| FailurePlan {
            versions: Vec::new(),
            rate,
        };
        let failing = |rate, n| (0..n).filter(|&i| plan(rate).fails(i, "1.1.0")).collect();
        let cases: [(f64, usize, Vec<usize>); 5] = [
            (0.0, 8, vec![]),
            (0.5, 6, vec![1, 3, 5]),
            (0.25, 8, vec![3, 7]),
            (1.0, 4, vec![0, 1, 2, 3]),
            (0.34, 4, vec![2]),
        ];
        for (rate, n, expected) in cases {
            assert_eq!(failing(rate, n), expected, "rate {rate} over {n}");
        }
        let many: Vec<usize> = failing(0.1, 1000);
        assert_eq!(many.len(), 100);
    }

    #[test]
    fn named_versions_fail_on_every_agent_and_only_those() {
        let plan = FailurePlan {
            versions: vec![semver::Version::new(1, 1, 0)],
            rate: 0.0,
        };
        let cases = [
            ("1.1.0", true),
            ("1.1.0-beta.1", false),
            ("1.2.0", false),
            ("garbage", false),
        ];
        for index in [0, 7] {
            for (version, fails) in cases {
                assert_eq!(plan.fails(index, version), fails, "{version} on {index}");
            }
        }
    }

    #[test]
    fn only_strictly_newer_versions_are_taken() {
        let cases = [
            ("1.1.0", "1.0.0", true),
            ("1.0.0", "1.0.0", false),
            ("0.9.0", "1.0.0", false),
            ("1.1.0-beta.1", "1.0.0", true),
            ("1.1.0", "1.1.0-beta.1", true),
            ("garbage", "1.0.0", false),
        ];
        for (offered, running, newer) in cases {
            assert_eq!(
                is_newer(offered, running),
                newer,
                "{offered} over {running}"
            );
        }
    }
}
