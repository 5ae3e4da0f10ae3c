//! Agent sessions: one task per WebSocket, from hello to close. Only this module encodes
//! and decodes frames. The `Registry` maps agent ids to their live session so other parts
//! of the server can push messages to a connected agent.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use protocol::{
    AgentMessage, Cancel, ChannelNotice, DecodeError, Hello, Reject, RejectCode, ServerMessage,
    Welcome,
};
use tokio::sync::Notify;

use crate::AppState;
use crate::auth::{generate_secret, hash_secret};
use crate::clock::now_ms;
use crate::dispatch::{self, LiveAgent, Trigger};
use crate::limits::{Bucket, Rate, TooManyAttempts};
use crate::store::{AgentFacts, Enrollment, HeartbeatRecord, LiveSince, StoreError};

/// How long a new socket may stay silent before its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that sends nothing for this many heartbeat intervals is closed.
const MISSED_HEARTBEATS: u32 = 3;
/// Frames a peer may send: a burst, then a steady rate. A real agent sends a heartbeat
/// and a ping per interval (1 s at the shortest) and progress about once a second, well
/// below it; a peer above it is flooding, and its session is closed.
const FRAME_RATE: Rate = Rate {
    burst: 40,
    per: Duration::from_secs(4),
};
/// Longest a frame may wait for a peer that stopped reading before its session is
/// dropped (shorter with a short heartbeat interval: three intervals).
const MAX_WRITE_STALL: Duration = Duration::from_secs(30);
/// How long a reject and its close frame may take to go out.
const REFUSE_WRITE_LIMIT: Duration = Duration::from_secs(5);

/// What other parts of the server can ask a session to do.
#[derive(Debug)]
pub enum Outbound {
    /// Send a reject with this code and message, then close.
    Close(RejectCode, String),
    /// Decide again whether an update is due (the offered builds changed).
    Check,
    /// Re-read the agent's settings and tasks from the database, then decide again (an
    /// operator changed something about this agent).
    Refresh,
    /// Decide again, re-reading the agent first only if this stamp of its rows
    /// (`dispatch::stamp`) differs from the session's: signals from other nodes may have
    /// been lost.
    Verify(u64),
}

struct SessionHandle {
    session: u64,
    mailbox: Arc<Mailbox>,
}

/// What other parts of the server asked one session to do that it has not done yet.
/// Requests fold together rather than queue: a session owes at most one refresh (which
/// decides too) and one check, and a close ends it whatever else waits. So no request is
/// lost however fast they come, and an idle session holds a few words rather than a
/// channel's buffers.
#[derive(Default)]
struct Mailbox {
    pending: Mutex<Pending>,
    posted: Notify,
}

#[derive(Default)]
struct Pending {
    close: Option<(RejectCode, String)>,
    refresh: bool,
    /// The newest stamp to verify against.
    verify: Option<u64>,
    check: bool,
}

impl Mailbox {
    fn post(&self, message: Outbound) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            match message {
                Outbound::Close(code, why) => {
                    pending.close.get_or_insert((code, why));
                }
                Outbound::Refresh => pending.refresh = true,
                Outbound::Verify(stamp) => pending.verify = Some(stamp),
                Outbound::Check => pending.check = true,
            }
        }
        self.posted.notify_one();
    }

    /// The next thing to do, once there is one: a close before anything else, and one
    /// refresh for any number of refreshes, verifications and checks (a verification
    /// decides too).
    async fn next(&self) -> Outbound {
        loop {
            if let Some(next) = self.take() {
                return next;
            }
            self.posted.notified().await;
        }
    }

    fn take(&self) -> Option<Outbound> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((code, why)) = pending.close.take() {
            return Some(Outbound::Close(code, why));
        }
        let refresh = std::mem::take(&mut pending.refresh);
        let verify = pending.verify.take();
        let check = std::mem::take(&mut pending.check);
        match verify {
            _ if refresh => Some(Outbound::Refresh),
            Some(stamp) => Some(Outbound::Verify(stamp)),
            None => check.then_some(Outbound::Check),
        }
    }
}

/// The agents connected to this server process.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_session: AtomicU64,
    /// Where requests for agents connected to other nodes go (see `nodes`).
    other_nodes: std::sync::OnceLock<Arc<crate::nodes::Outbox>>,
}

impl Registry {
    /// Registers a session for `agent_id`, telling any older session of the same agent
    /// that it has been replaced. Returns the session number for `unregister`.
    fn register(&self, agent_id: &str, mailbox: Arc<Mailbox>) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .lock()
            .insert(agent_id.to_owned(), SessionHandle { session, mailbox });
        if let Some(previous) = previous {
            previous.mailbox.post(Outbound::Close(
                RejectCode::Replaced,
                "a newer session of this agent connected".into(),
            ));
        }
        session
    }

    /// Removes the session unless a newer one of the same agent replaced it; true when
    /// the agent has no session here any more.
    fn unregister(&self, agent_id: &str, session: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(agent_id).is_some_and(|h| h.session == session) {
            sessions.remove(agent_id);
            return true;
        }
        false
    }

    pub fn is_online(&self, agent_id: &str) -> bool {
        self.lock().contains_key(agent_id)
    }

    pub fn online_count(&self) -> usize {
        self.lock().len()
    }

    /// The agents connected to this node.
    pub(crate) fn agents_here(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Posts a request to a connected agent; false when it is not connected here (a
    /// `Refresh` then goes to the other nodes, in case it is connected to one of them).
    pub fn send(&self, agent_id: &str, message: Outbound) -> bool {
        if matches!(message, Outbound::Refresh) && !self.is_online(agent_id) {
            self.signal_other_nodes(crate::nodes::Signal::Refresh(vec![agent_id.to_owned()]));
        }
        self.send_here(agent_id, message)
    }

    /// Posts a request to an agent connected to this node; false when it is not
    /// connected here.
    pub(crate) fn send_here(&self, agent_id: &str, message: Outbound) -> bool {
        let mailbox = self.lock().get(agent_id).map(|h| h.mailbox.clone());
        mailbox.map(|mailbox| mailbox.post(message)).is_some()
    }

    /// Posts a request to every connected agent, on every node (a `Check` elsewhere
    /// also makes the other nodes re-read what changed).
    pub fn broadcast(&self, message: impl Fn() -> Outbound) {
        if matches!(message(), Outbound::Check) {
            self.signal_other_nodes(crate::nodes::Signal::CheckAll);
        }
        self.broadcast_here(message);
    }

    /// Posts a request to every agent connected to this node.
    pub(crate) fn broadcast_here(&self, message: impl Fn() -> Outbound) {
        if matches!(message(), Outbound::Check) {
            crate::metrics::Counters::bump(&crate::metrics::COUNTERS.fleet_checks);
        }
        for handle in self.lock().values() {
            handle.mailbox.post(message());
        }
    }

    /// Connects the registry to the other nodes.
    pub(crate) fn reach_other_nodes(&self, outbox: Arc<crate::nodes::Outbox>) {
        let _ = self.other_nodes.set(outbox);
    }

    /// Sends a signal to the other nodes only.
    pub(crate) fn signal_other_nodes(&self, signal: crate::nodes::Signal) {
        if let Some(outbox) = self.other_nodes.get() {
            outbox.post(signal);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a session ended early; becomes a reject message and a close frame.
struct Refusal {
    code: RejectCode,
    message: String,
    close: u16,
}

impl Refusal {
    fn new(code: RejectCode, message: impl Into<String>) -> Refusal {
        let close = match code {
            RejectCode::MalformedFrame => close_code::INVALID,
            RejectCode::FrameTooLarge => close_code::SIZE,
            RejectCode::Replaced | RejectCode::Timeout => close_code::NORMAL,
            _ => close_code::POLICY,
        };
        Refusal {
            code,
            message: message.into(),
            close,
        }
    }

    /// A peer sending frames faster than `FRAME_RATE`, closed as a policy violation.
    fn flood() -> Refusal {
        Refusal {
            close: close_code::POLICY,
            ..Refusal::new(
                RejectCode::RateLimited,
                format!(
                    "too many frames: at most {} in a burst, then {} per second",
                    FRAME_RATE.burst,
                    FRAME_RATE.per_second()
                ),
            )
        }
    }
}

impl From<DecodeError> for Refusal {
    fn from(err: DecodeError) -> Refusal {
        Refusal::new(err.reject_code(), err.to_string())
    }
}

/// A session past its handshake: the agent is admitted, registered and welcomed.
struct Opened {
    live: LiveAgent,
    mailbox: Arc<Mailbox>,
    session: u64,
    /// When this node claimed the session, to release exactly that claim.
    claimed_at: i64,
    /// False when the peer was gone before its welcome.
    welcomed: bool,
    /// The hash of the secret the welcome carried (an enrollment), until the agent shows
    /// it has it by heartbeating.
    unshown_secret: Option<String>,
}

pub async fn run(mut socket: WebSocket, state: AppState, peer: SocketAddr) {
    // Every idle session keeps this future for its whole life, so what runs once (the
    // handshake and its store queries) is boxed and freed after it, and so are the
    // handlers of single messages inside `serve`.
    let mut opened = match Box::pin(open(&mut socket, &state, peer)).await {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(refusal) => return Box::pin(refuse(socket, peer, refusal)).await,
    };
    let ended = if opened.welcomed {
        serve(
            &mut socket,
            &state,
            &mut opened.live,
            &opened.mailbox,
            opened.unshown_secret.take(),
        )
        .await
    } else {
        Ok(())
    };
    crate::dispatch::session_ended(&state, &mut opened.live);
    let agent_id = opened.live.id;
    if state.registry.unregister(&agent_id, opened.session) {
        Box::pin(state.claims.release(&agent_id, opened.claimed_at)).await;
    }
    match ended {
        Ok(()) => tracing::info!(agent = %agent_id, "agent disconnected"),
        Err(refusal) => {
            tracing::warn!(agent = %agent_id, code = ?refusal.code, reason = %refusal.message, "closing agent session");
            Box::pin(refuse(socket, peer, refusal)).await;
        }
    }
}

/// Reads the hello, admits the agent, registers its session and welcomes it.
/// `Ok(None)` when the peer left before that.
async fn open(
    socket: &mut WebSocket,
    state: &AppState,
    peer: SocketAddr,
) -> Result<Option<Opened>, Refusal> {
    let Some(hello) = read_hello(socket).await? else {
        return Ok(None);
    };
    // Agent text reaches logs, terminals and pages: bounded and without control
    // characters, or refused before anything is stored.
    hello
        .check()
        .map_err(|why| Refusal::new(RejectCode::MalformedFrame, format!("hello: {why}")))?;
    let (agent_id, secret) = admit(state, &hello, peer.ip()).await?;
    let live = LiveAgent::load(state, &agent_id, &hello.version)
        .await
        .map_err(internal)?;
    let mailbox = Arc::new(Mailbox::default());
    let session = state.registry.register(&agent_id, mailbox.clone());
    let claimed_at = state.claims.claim(&agent_id).await;
    tracing::info!(agent = %agent_id, hostname = %hello.hostname, version = %hello.version, %peer, "agent connected");
    let unshown_secret = secret.as_deref().map(hash_secret);
    let welcome = ServerMessage::Welcome(Welcome {
        agent_id,
        secret,
        heartbeat_interval_secs: u32::try_from(state.settings.heartbeat_interval.as_secs())
            .unwrap_or(u32::MAX),
        server_version: env!("CARGO_PKG_VERSION").into(),
        channel: Some(live.position.channel.to_string()),
    });
    let welcomed = send_within(socket, encoded(welcome), HELLO_TIMEOUT)
        .await
        .is_ok();
    Ok(Some(Opened {
        claimed_at,
        live,
        mailbox,
        session,
        welcomed,
        unshown_secret,
    }))
}

/// Waits for the first frame, which must be a hello. `Ok(None)` when the peer left.
async fn read_hello(socket: &mut WebSocket) -> Result<Option<Hello>, Refusal> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut budget = Bucket::full(FRAME_RATE, Instant::now());
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.recv())
            .await
            .map_err(|_| Refusal::new(RejectCode::Timeout, "no hello within 10 seconds"))?;
        match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(_)) if !budget.take(FRAME_RATE, Instant::now()) => {
                return Err(Refusal::flood());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(Refusal::new(
                    RejectCode::MalformedFrame,
                    "text frames are not part of the protocol; send MessagePack binary frames",
                ));
            }
            Some(Ok(Message::Binary(bytes))) => {
                return match AgentMessage::decode(&bytes)? {
                    AgentMessage::Hello(hello) => Ok(Some(hello)),
                    other => Err(Refusal::new(
                        RejectCode::ExpectedHello,
                        format!("the first frame must be a hello, not {}", kind(&other)),
                    )),
                };
            }
        }
    }
}

/// Authenticates or enrolls the agent. Returns its id, and its new secret when enrolled.
/// Enrollment attempts count against `source`'s limits (see `limits`).
async fn admit(
    state: &AppState,
    hello: &Hello,
    source: IpAddr,
) -> Result<(String, Option<String>), Refusal> {
    let facts = AgentFacts {
        fingerprint: hello.fingerprint.clone(),
        hostname: hello.hostname.clone(),
        version: hello.version.clone(),
        os: hello.os.clone(),
        arch: hello.arch.clone(),
        auto_update: hello.auto_update,
    };
    let now = now_ms();
    match (&hello.agent_id, &hello.secret, &hello.enroll_token) {
        (Some(agent_id), Some(secret), _) => {
            match state
                .store
                .authenticate(agent_id, &hash_secret(secret), &facts, now)
                .await
            {
                Ok(()) => Ok((agent_id.clone(), None)),
                Err(StoreError::NotFound) => Err(Refusal::new(
                    RejectCode::BadCredentials,
                    "unknown agent or wrong secret",
                )),
                Err(err) => Err(internal(err)),
            }
        }
        (_, _, Some(token)) => {
            // Refused before the database is asked: the agent backs off and retries.
            state.enrollments.attempt(source, Instant::now()).map_err(
                |TooManyAttempts(message)| Refusal::new(RejectCode::RateLimited, message),
            )?;
            if hello.fingerprint.trim().is_empty() {
                state.enrollments.failed(source, Instant::now());
                return Err(Refusal::new(
                    RejectCode::ExpectedHello,
                    "enrollment needs a machine fingerprint",
                ));
            }
            let secret = generate_secret("drv_agent_");
            let live = LiveSince {
                node_beat_ms: crate::nodes::live_since(now),
                seen_ms: now.saturating_sub(
                    i64::try_from(state.settings.rebind_after.as_millis()).unwrap_or(i64::MAX),
                ),
            };
            match state
                .store
                .enroll(
                    &hash_secret(token),
                    &facts,
                    &hash_secret(&secret),
                    now,
                    live,
                )
                .await
            {
                Ok(Enrollment::Conflict { agent_id, count }) => {
                    Err(fingerprint_conflict(state, &agent_id, count, hello, source).await)
                }
                Ok(Enrollment::Enrolled(enrolled)) => {
                    tracing::info!(agent = %enrolled.agent_id, rebound = enrolled.rebound, hostname = %hello.hostname, "agent enrolled");
                    if enrolled.rebound {
                        state
                            .audit(
                                &format!("agent {}", enrolled.agent_id),
                                "agent.reenroll",
                                &enrolled.agent_id,
                                Some(format!(
                                    "{} enrolled again from the same machine",
                                    hello.hostname
                                )),
                                "re-bound to its existing record",
                            )
                            .await;
                    }
                    Ok((enrolled.agent_id, Some(secret)))
                }
                Err(StoreError::NotFound) => {
                    state.enrollments.failed(source, Instant::now());
                    Err(Refusal::new(
                        RejectCode::BadEnrollToken,
                        "unknown, revoked, expired or used-up enrollment token",
                    ))
                }
                Err(err) => Err(internal(err)),
            }
        }
        _ => Err(Refusal::new(
            RejectCode::ExpectedHello,
            "hello needs agent_id and secret, or enroll_token",
        )),
    }
}

/// An enrollment refused because the machine's record is live: logged, audited when
/// the conflict begins (a clone retries for as long as it runs), published (the record
/// shows the conflict), and answered with a reject that leaves the live agent alone.
async fn fingerprint_conflict(
    state: &AppState,
    agent_id: &str,
    count: i64,
    hello: &Hello,
    source: IpAddr,
) -> Refusal {
    tracing::warn!(agent = %agent_id, hostname = %hello.hostname, %source, attempts = count, "enrollment refused: the machine's record is live (fingerprint conflict)");
    if count == 1 {
        state
            .audit(
                &format!("enrollment from {source}"),
                "agent.fingerprint_conflict",
                agent_id,
                Some(format!(
                    "{} enrolled with the fingerprint of this live agent",
                    hello.hostname
                )),
                "refused",
            )
            .await;
    }
    state.events.agent(agent_id);
    Refusal::new(
        RejectCode::FingerprintConflict,
        format!(
            "another machine with this fingerprint is live as agent {agent_id}; this one is \
             not enrolled (a cloned machine needs its own machine id), and may re-enroll once \
             that agent has been offline for {}",
            humantime::format_duration(state.settings.rebind_after)
        ),
    )
}

fn internal(err: StoreError) -> Refusal {
    tracing::error!(%err, "database error while admitting an agent");
    // The agent retries with backoff; nothing about its identity is wrong.
    Refusal::new(RejectCode::ServerError, "server error; retry later")
}

/// The established session: heartbeats and reports in, updates out. `unshown_secret`:
/// the hash of the secret an enrollment's welcome carried, recorded as shown with the
/// agent's first heartbeat.
async fn serve(
    socket: &mut WebSocket,
    state: &AppState,
    live: &mut LiveAgent,
    mailbox: &Mailbox,
    mut unshown_secret: Option<String>,
) -> Result<(), Refusal> {
    let silence_limit = state.settings.heartbeat_interval * MISSED_HEARTBEATS;
    let write_limit = silence_limit.min(MAX_WRITE_STALL);
    let mut budget = Bucket::full(FRAME_RATE, Instant::now());
    // Frames to send, in order. Messages are encoded as soon as they are decided: every
    // idle session keeps this future's state for its whole life, so it holds no message
    // across a wait.
    let mut outgoing: Vec<Message> = Vec::new();
    // An agent that starts outdated learns it at once, not at its first heartbeat.
    outgoing.extend(
        Box::pin(decide(state, live, Trigger::Connect))
            .await
            .map(encoded),
    );
    // The channel the agent was last told (in the welcome); an operator's change that
    // moves it is told at once, before whatever the change means for its update.
    let mut told_channel = live.position.channel;
    loop {
        for frame in outgoing.drain(..) {
            match send_within(socket, frame, write_limit).await {
                Ok(()) => {}
                Err(Unsent::Gone) => return Ok(()),
                Err(Unsent::Stalled) => {
                    // No reject: it could not be sent either. Dropping the socket frees
                    // what is queued for the peer.
                    tracing::warn!(agent = %live.id, "agent stopped reading: a frame waited {}s to be sent; dropping its session", write_limit.as_secs());
                    return Ok(());
                }
            }
        }
        // An update that went out before its task was written: the agent's answers to it
        // are read once the task exists.
        if live.writing.is_some() {
            if let Some(cancel) = Box::pin(dispatch::written(state, live)).await {
                outgoing.push(encoded(cancel));
            }
            continue;
        }
        tokio::select! {
            frame = tokio::time::timeout(silence_limit, socket.recv()) => {
                let frame = frame.map_err(|_| Refusal::new(
                    RejectCode::Timeout,
                    format!("no frame for {}s", silence_limit.as_secs()),
                ))?;
                match frame {
                    None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Err(err)) => return Err(socket_error(err)),
                    Some(Ok(_)) if !budget.take(FRAME_RATE, Instant::now()) => {
                        return Err(Refusal::flood());
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Text(_))) => {
                        return Err(Refusal::new(RejectCode::MalformedFrame, "text frames are not part of the protocol"));
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        let message = AgentMessage::decode(&bytes)?;
                        outgoing.extend(
                            Box::pin(handle(state, live, message, &mut unshown_secret))
                                .await
                                .map(encoded),
                        );
                    }
                }
            }
            outbound = mailbox.next() => match verified(live, outbound) {
                Outbound::Close(code, message) => return Err(Refusal::new(code, message)),
                // `verified` made a verification a check or a refresh.
                Outbound::Check | Outbound::Verify(_) => {
                    outgoing.extend(Box::pin(decide(state, live, Trigger::Nudge)).await.map(encoded));
                }
                Outbound::Refresh => {
                    let reply = Box::pin(refresh(state, live)).await;
                    if live.position.channel != told_channel {
                        told_channel = live.position.channel;
                        outgoing.push(encoded(ServerMessage::Channel(ChannelNotice {
                            channel: told_channel.to_string(),
                        })));
                    }
                    outgoing.extend(reply.map(encoded));
                }
            },
            () = state.shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame {
                    code: close_code::AWAY,
                    reason: "server shutting down".into(),
                }));
                // A peer that stopped reading must not hold up the shutdown.
                let _ = send_within(socket, close, REFUSE_WRITE_LIMIT).await;
                return Ok(());
            }
        }
    }
}

/// A message as the frame that carries it.
fn encoded(message: ServerMessage) -> Message {
    Message::Binary(message.encode().into())
}

/// A WebSocket-level error: an over-limit message deserves a reason; anything else means
/// the connection is gone.
fn socket_error(err: axum::Error) -> Refusal {
    let text = err.to_string();
    if text.contains("too long") || text.contains("Space limit") {
        Refusal::new(RejectCode::FrameTooLarge, text)
    } else {
        Refusal::new(RejectCode::MalformedFrame, text)
    }
}

/// Runs the update decision; a database failure is logged and retried at the next
/// heartbeat rather than ending the session.
async fn decide(state: &AppState, live: &mut LiveAgent, trigger: Trigger) -> Option<ServerMessage> {
    dispatch::check(state, live, trigger)
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(agent = %live.id, %err, "could not decide on an update");
            None
        })
}

/// A verification as what it calls for: a check when the session holds what the
/// database says, else a refresh.
fn verified(live: &LiveAgent, outbound: Outbound) -> Outbound {
    let Outbound::Verify(stamp) = outbound else {
        return outbound;
    };
    let missed = live.stamp() != stamp;
    crate::metrics::COUNTERS.session_rechecked(missed);
    if missed {
        tracing::info!(agent = %live.id, "re-reading an agent whose change this node may not have heard of");
        Outbound::Refresh
    } else {
        Outbound::Check
    }
}

/// Re-reads the agent after an operator action. A task replaced meanwhile is cancelled
/// on the agent.
async fn refresh(state: &AppState, live: &mut LiveAgent) -> Option<ServerMessage> {
    let previous = live.active.as_ref().map(|t| t.id.clone());
    match LiveAgent::load(state, &live.id, &live.position.version).await {
        Ok(mut fresh) => {
            dispatch::reloaded(state, live, &mut fresh);
            *live = fresh;
        }
        Err(err) => {
            tracing::warn!(agent = %live.id, %err, "could not re-read agent");
            return None;
        }
    }
    let current = live.active.as_ref().map(|t| t.id.clone());
    match previous {
        Some(task_id) if current.as_ref() != Some(&task_id) => {
            // The cancel goes out now; the new task's update follows at the next check.
            let _ = state.registry.send(&live.id, Outbound::Check);
            let reason = live
                .ended
                .get(&task_id)
                .cloned()
                .unwrap_or_else(|| "superseded by an operator's action".into());
            Some(ServerMessage::Cancel(Cancel { task_id, reason }))
        }
        _ => decide(state, live, Trigger::Nudge).await,
    }
}

/// Handles one message. The first heartbeat of an enrolled session takes
/// `unshown_secret` to its record: the agent has the secret its welcome carried, so its
/// record is no longer one whose welcome was lost (`Queries::enroll`).
async fn handle(
    state: &AppState,
    live: &mut LiveAgent,
    message: AgentMessage,
    unshown_secret: &mut Option<String>,
) -> Option<ServerMessage> {
    let outcome = match message {
        // A version the hello would refuse is not recorded: the heartbeat is ignored.
        AgentMessage::Heartbeat(beat)
            if protocol::check_field("version", &beat.version).is_err() =>
        {
            tracing::debug!(agent = %live.id, "ignoring a heartbeat with an unusable version");
            return None;
        }
        AgentMessage::Heartbeat(beat) => {
            state
                .heartbeats
                .record(HeartbeatRecord {
                    agent_id: live.id.clone(),
                    version: beat.version.clone(),
                    at_ms: now_ms(),
                    shown_secret: unshown_secret.take(),
                })
                .await;
            live.position.version = beat.version;
            return decide(state, live, Trigger::Heartbeat).await;
        }
        AgentMessage::UpdateProgress(report) => dispatch::progress(state, live, report).await,
        AgentMessage::UpdateResult(report) => dispatch::result(state, live, report).await,
        AgentMessage::Hello(_) => {
            tracing::debug!(agent = %live.id, "ignoring a second hello");
            Ok(())
        }
        AgentMessage::Unknown => {
            tracing::debug!(agent = %live.id, "ignoring a message type from a newer protocol");
            Ok(())
        }
    };
    if let Err(err) = outcome {
        tracing::warn!(agent = %live.id, %err, "could not record an update report");
    }
    None
}

/// Sends the reject, then a close frame with the same reason, and drops the socket.
async fn refuse(mut socket: WebSocket, peer: SocketAddr, refusal: Refusal) {
    tracing::info!(%peer, code = ?refusal.code, reason = %refusal.message, "refusing agent session");
    let reject = ServerMessage::Reject(Reject {
        code: refusal.code,
        message: refusal.message.clone(),
    });
    let reject = encoded(reject);
    if send_within(&mut socket, reject, REFUSE_WRITE_LIMIT)
        .await
        .is_ok()
    {
        let close = Message::Close(Some(CloseFrame {
            code: refusal.close,
            reason: close_reason(refusal.message).into(),
        }));
        let _ = send_within(&mut socket, close, REFUSE_WRITE_LIMIT).await;
    }
}

/// Why a frame was not sent.
enum Unsent {
    /// The connection is gone.
    Gone,
    /// The peer did not take it in time: it stopped reading.
    Stalled,
}

/// Sends one frame, giving up after `limit`: a peer that stops reading must not hold its
/// session, and what is queued for it, forever.
async fn send_within(
    socket: &mut WebSocket,
    message: Message,
    limit: Duration,
) -> Result<(), Unsent> {
    match tokio::time::timeout(limit, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Unsent::Gone),
        Err(_) => Err(Unsent::Stalled),
    }
}

/// A close frame's reason holds at most 123 bytes; longer messages are cut at a
/// character boundary.
fn close_reason(mut message: String) -> String {
    const MAX: usize = 123;
    if message.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message.truncate(cut);
    }
    message
}

fn kind(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello(_) => "hello",
        AgentMessage::Heartbeat(_) => "heartbeat",
        AgentMessage::UpdateProgress(_) => "update_progress",
        AgentMessage::UpdateResult(_) => "update_result",
        AgentMessage::Unknown => "an unknown message",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn kind(message: &Outbound) -> &'static str {
        match message {
            Outbound::Close(..) => "close",
            Outbound::Refresh => "refresh",
            Outbound::Check => "check",
            Outbound::Verify(_) => "verify",
        }
    }

    #[tokio::test]
    async fn a_verification_covers_checks_and_a_refresh_covers_it() {
        let mailbox = Mailbox::default();
        mailbox.post(Outbound::Check);
        mailbox.post(Outbound::Verify(1));
        mailbox.post(Outbound::Verify(2));
        match mailbox.next().await {
            Outbound::Verify(stamp) => assert_eq!(stamp, 2, "the newest stamp"),
            other => panic!("expected a verification, got {}", kind(&other)),
        }
        assert!(mailbox.take().is_none(), "the verification decides");

        mailbox.post(Outbound::Verify(3));
        mailbox.post(Outbound::Refresh);
        assert_eq!(kind(&mailbox.next().await), "refresh");
        assert!(mailbox.take().is_none(), "the refresh re-reads anyway");
    }

    #[tokio::test]
    async fn requests_fold_a_close_comes_first_and_a_refresh_covers_checks() {
        let mailbox = Mailbox::default();
        for _ in 0..100 {
            mailbox.post(Outbound::Check);
        }
        assert_eq!(kind(&mailbox.next().await), "check");
        assert!(mailbox.take().is_none(), "a hundred checks are one check");

        mailbox.post(Outbound::Check);
        mailbox.post(Outbound::Refresh);
        mailbox.post(Outbound::Check);
        assert_eq!(kind(&mailbox.next().await), "refresh");
        assert!(
            mailbox.take().is_none(),
            "the refresh decides for the checks"
        );

        mailbox.post(Outbound::Refresh);
        mailbox.post(Outbound::Close(RejectCode::Replaced, "first".into()));
        mailbox.post(Outbound::Close(RejectCode::BadCredentials, "second".into()));
        match mailbox.next().await {
            Outbound::Close(code, why) => {
                assert_eq!((code, why.as_str()), (RejectCode::Replaced, "first"))
            }
            other => panic!("expected the first close, got {}", kind(&other)),
        }
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_request_posted_later() {
        let mailbox = Arc::new(Mailbox::default());
        let waiting = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { kind(&mailbox.next().await) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing was posted yet");
        mailbox.post(Outbound::Refresh);
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(woke.expect("woken").unwrap(), "refresh");
    }

    #[tokio::test]
    async fn a_request_posted_while_the_session_was_busy_is_not_lost() {
        let mailbox = Mailbox::default();
        // The session stops waiting (another branch of its select won), then a request
        // comes before it waits again.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), mailbox.next()).await;
        assert!(gave_up.is_err());
        mailbox.post(Outbound::Check);
        let next = tokio::time::timeout(Duration::from_secs(5), mailbox.next()).await;
        assert_eq!(kind(&next.expect("the check was kept")), "check");
    }
}
