//! One session with the server and the reconnect loop around it. Only this module speaks
//! the wire protocol.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::{
    AgentMessage, FailureClass, Heartbeat, Hello, MAX_FRAME_BYTES, RejectCode, ServerMessage,
    Update, UpdateOutcome, UpdateResult, Welcome,
};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::identity::{self, Identity};
use crate::journal::{self, Journal, Step};
use crate::updater::{Event, Updater};
use crate::{AgentConfig, status, version};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server is presumed gone when nothing (not even a pong) arrives for this many
/// heartbeat intervals.
const MISSED_HEARTBEATS: u32 = 3;
/// The longest heartbeat interval a server can ask for: a value from the network never
/// decides how long the agent stays silent (or overflows a deadline).
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended, for the reconnect loop.
enum Ended {
    Shutdown,
    /// A new version is installed: the worker exits so the supervisor starts it.
    Restart,
    /// The session was accepted and later lost; reconnect soon.
    AfterWelcome(String),
    /// The session never got going; back off further (at least this long, when a full
    /// node asked for it).
    BeforeWelcome(String, Option<Duration>),
}

/// How the worker ended.
pub(crate) enum Exit {
    Shutdown,
    /// Start the newly installed version.
    Restart,
}

/// What lives across sessions: the identity, and the update being applied (its task
/// keeps downloading while the session reconnects).
struct Worker {
    config: AgentConfig,
    identity: Option<Identity>,
    updater: Arc<Updater>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    applying: Option<(String, tokio::task::JoinHandle<()>)>,
    /// Which of the configured servers the next connection tries.
    next_server: usize,
}

/// Connects, and reconnects with backoff, until `shutdown` fires or a new version is
/// installed.
pub(crate) async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    // The state directory holds the agent's secret: readable by its owner only.
    crate::platform::permissions::create_private_dir(&config.state_dir).with_context(|| {
        format!(
            "while creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    if config.servers.is_empty() {
        bail!("no server URL: pass --server (or set DROVER_SERVER)");
    }
    let identity = identity::load(&config.state_dir)?;
    if identity.is_none() && config.enroll_token.is_none() {
        bail!(
            "this agent is not enrolled yet ({} is missing): pass --enroll-token",
            identity::path(&config.state_dir).display()
        );
    }
    let (events_tx, events) = mpsc::channel(64);
    let updater = Arc::new(Updater {
        state_dir: config.state_dir.clone(),
        exe: config.exe.clone(),
        public_key: config.public_key,
        http: crate::download::Client::new(config.pinned_tls.clone()),
        running: version::current().to_owned(),
    });
    let mut worker = Worker {
        config,
        identity,
        updater,
        events_tx,
        events,
        applying: None,
        next_server: 0,
    };
    if worker.identity.is_some() {
        worker.forget_enroll_token();
    }
    worker.resume_interrupted_download();
    let mut backoff = Backoff::new(worker.config.reconnect_base, worker.config.reconnect_max);
    loop {
        // At least this long before the next attempt.
        let floor = match worker.session(&shutdown).await {
            Ended::Shutdown => {
                status::disconnected(&worker.config.state_dir, "the agent stopped");
                return Ok(Exit::Shutdown);
            }
            Ended::Restart => return Ok(Exit::Restart),
            Ended::AfterWelcome(reason) => {
                tracing::warn!(%reason, "session lost; reconnecting");
                status::disconnected(&worker.config.state_dir, &reason);
                backoff.reset();
                None
            }
            Ended::BeforeWelcome(reason, busy) => {
                tracing::warn!(%reason, "could not start a session");
                status::disconnected(&worker.config.state_dir, &reason);
                // With several servers the next one is tried after the usual backoff;
                // the only one is left alone as long as it asked.
                busy.filter(|_| worker.config.servers.len() == 1)
            }
        };
        let delay = backoff
            .next_delay(&mut rand::rng())
            .max(floor.unwrap_or_default());
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(Exit::Shutdown),
        }
    }
}

impl Worker {
    /// Once enrolled the enrollment token is of no more use to this agent, and a copy
    /// left on the machine could enroll impostors: it is dropped from memory and from
    /// the config file. A lost identity then needs a new token from an operator.
    fn forget_enroll_token(&mut self) {
        if self.config.enroll_token.take().is_none() {
            return;
        }
        let removed = match &self.config.config_file {
            Some(file) => match crate::config_file::forget_enroll_token(file) {
                Ok(removed) => {
                    if removed {
                        tracing::info!(file = %file.display(), "enrolled: removed the enrollment token from the config file");
                    }
                    removed
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "enrolled, but could not remove the enrollment token from the config file; remove it by hand");
                    return;
                }
            },
            None => false,
        };
        if !removed {
            tracing::warn!(
                "enrolled: the enrollment token given on the command line or in DROVER_ENROLL_TOKEN is not used any more; remove it from there"
            );
        }
    }

    /// A download cut short by a restart carries on from its journal.
    fn resume_interrupted_download(&mut self) {
        if let Ok(Some(journal)) = journal::load(&self.config.state_dir)
            && matches!(journal.step, Step::Downloading | Step::Verified)
        {
            tracing::info!(task = %journal.task_id, version = %journal.version, "resuming an interrupted update");
            self.start_applying(journal);
        }
    }

    fn start_applying(&mut self, journal: Journal) {
        let task_id = journal.task_id.clone();
        let handle = tokio::spawn(self.updater.clone().apply(journal, self.events_tx.clone()));
        self.applying = Some((task_id, handle));
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Ended {
        let server = self.config.servers[self.next_server % self.config.servers.len()].clone();
        let url = protocol::agent_socket_url(&server);
        let mut socket = tokio::select! {
            connected = connect(&url, self.config.pinned_tls.clone()) => match connected {
                Ok(socket) => socket,
                Err(err) => {
                    // The next attempt goes to the next server, if there are several.
                    self.next_server += 1;
                    return Ended::BeforeWelcome(format!("{err:#}"), full_node_wait(&err));
                }
            },
            () = shutdown.cancelled() => return Ended::Shutdown,
        };
        let config = &self.config;
        let identity = &self.identity;
        let hello = AgentMessage::Hello(Hello {
            agent_id: identity.as_ref().map(|i| i.agent_id.clone()),
            secret: identity.as_ref().map(|i| i.secret.clone()),
            enroll_token: match identity {
                Some(_) => None,
                None => config.enroll_token.clone(),
            },
            fingerprint: config.fingerprint.clone(),
            hostname: config.hostname.clone(),
            version: version::current().to_owned(),
            os: crate::machine::os().to_owned(),
            arch: crate::machine::arch().to_owned(),
            auto_update: config.auto_update,
        });
        if let Err(err) = send(&mut socket, hello).await {
            return Ended::BeforeWelcome(err, None);
        }
        let welcome = tokio::select! {
            welcome = await_welcome(&mut socket) => welcome,
            () = shutdown.cancelled() => return Ended::Shutdown,
        };
        let welcome = match welcome {
            Ok(welcome) => welcome,
            Err(Refused::Rejected(code, message)) => {
                match code {
                    RejectCode::BadCredentials => {
                        tracing::error!(%message, "the server rejected this agent's credentials; to enroll it again, remove {} and start it with a new enrollment token", identity::path(&config.state_dir).display())
                    }
                    RejectCode::FingerprintConflict => {
                        tracing::error!(%message, "enrollment refused: another machine with this fingerprint is live on the server")
                    }
                    _ => {}
                }
                return Ended::BeforeWelcome(format!("rejected ({code:?}): {message}"), None);
            }
            Err(Refused::Other(reason)) => return Ended::BeforeWelcome(reason, None),
        };
        if let Some(secret) = &welcome.secret {
            let enrolled = Identity {
                agent_id: welcome.agent_id.clone(),
                secret: secret.clone(),
            };
            let stored = identity::save(&config.state_dir, &enrolled);
            tracing::info!(agent = %welcome.agent_id, "enrolled");
            self.identity = Some(enrolled);
            match stored {
                Ok(()) => self.forget_enroll_token(),
                // Without a stored secret the next start enrolls again (re-bound by
                // fingerprint once this record has been quiet long enough for the
                // server), so the token is kept for it.
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "could not store the agent identity")
                }
            }
        }
        tracing::info!(agent = %welcome.agent_id, version = version::current(), "connected to {server}");
        status::connected(&self.config.state_dir, &server);
        crate::supervisor::release_start_up_pages("worker");
        if let Some(channel) = &welcome.channel {
            status::channel(&self.config.state_dir, channel);
        }
        let interval = heartbeat_interval(welcome.heartbeat_interval_secs);
        tokio::select! {
            ended = self.converse(&mut socket, interval) => ended,
            () = shutdown.cancelled() => {
                let _ = socket.close(None).await;
                Ended::Shutdown
            }
        }
    }

    /// The accepted session: outcomes owed from before, heartbeats, updates, and the
    /// probation of a freshly installed version.
    async fn converse(&mut self, socket: &mut Socket, interval: Duration) -> Ended {
        let state_dir = self.config.state_dir.clone();
        let mut on_probation = None;
        match journal::load(&state_dir) {
            Ok(Some(journal)) => match owed_report(&journal) {
                Some(result) => {
                    status::result(&state_dir, &result);
                    if let Err(err) = send(socket, AgentMessage::UpdateResult(result)).await {
                        return Ended::AfterWelcome(err);
                    }
                    let _ = journal::clear(&state_dir);
                }
                None if journal.step == Step::Probation
                    && journal.version == version::current() =>
                {
                    on_probation = Some(journal);
                }
                None => {}
            },
            Ok(None) => {}
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "could not read the update journal")
            }
        }

        let mut ticker = tokio::time::interval(interval);
        let mut seq = 0u64;
        let silence_limit = interval * MISSED_HEARTBEATS;
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                // Frames first: one already received counts as heard, so a process that was
                // not scheduled for a while does not take its own delay for a silent server.
                biased;
                frame = socket.next() => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        Some(Ok(Message::Pong(_))) => {
                            if let Some(mut journal) = on_probation.take()
                                && let Err(err) = self.commit(&mut journal).await
                            {
                                return Ended::AfterWelcome(err);
                            }
                        }
                        Some(Ok(Message::Binary(bytes))) => match ServerMessage::decode(&bytes) {
                            Ok(ServerMessage::Reject(reject)) => {
                                return Ended::AfterWelcome(format!("server ended the session ({:?}): {}", reject.code, reject.message));
                            }
                            Ok(ServerMessage::Update(update)) => {
                                if let Some(refusal) = self.take_update(*update) {
                                    status::result(&state_dir, &refusal);
                                    if let Err(err) = send(socket, AgentMessage::UpdateResult(refusal)).await {
                                        return Ended::AfterWelcome(err);
                                    }
                                }
                            }
                            Ok(ServerMessage::Cancel(cancel)) => self.cancel(&cancel.task_id, &cancel.reason),
                            Ok(ServerMessage::Channel(notice)) => status::channel(&state_dir, &notice.channel),
                            Ok(message) => tracing::debug!(?message, "ignoring message"),
                            Err(err) => return Ended::AfterWelcome(format!("bad frame from server: {err}")),
                        },
                        Some(Ok(Message::Close(frame))) => {
                            return Ended::AfterWelcome(format!("server closed the session: {}", frame.map(|f| f.reason.to_string()).unwrap_or_default()));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(err)) => return Ended::AfterWelcome(err.to_string()),
                        None => return Ended::AfterWelcome("server closed the connection".into()),
                    }
                }
                Some(event) = self.events.recv() => match event {
                    Event::Progress(report) => {
                        if let Err(err) = send(socket, AgentMessage::UpdateProgress(report)).await {
                            return Ended::AfterWelcome(err);
                        }
                    }
                    Event::Finished(result) => {
                        self.applying = None;
                        status::result(&state_dir, &result);
                        if let Err(err) = send(socket, AgentMessage::UpdateResult(result)).await {
                            // The journal still holds the outcome; it is reported on reconnect.
                            return Ended::AfterWelcome(err);
                        }
                        let _ = journal::clear(&state_dir);
                    }
                    Event::Restart => {
                        let _ = socket.close(None).await;
                        return Ended::Restart;
                    }
                },
                _ = ticker.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        return Ended::AfterWelcome(format!("nothing heard from the server for {}s", silence_limit.as_secs()));
                    }
                    seq += 1;
                    let beat = AgentMessage::Heartbeat(Heartbeat { seq, version: version::current().to_owned() });
                    if let Err(err) = send(socket, beat).await {
                        return Ended::AfterWelcome(err);
                    }
                    // The pong tells us the server read the heartbeat: frames are handled
                    // in order, and heartbeats themselves are not answered.
                    if let Err(err) = socket.send(Message::Ping(Vec::new().into())).await {
                        return Ended::AfterWelcome(format!("could not send ping: {err}"));
                    }
                }
            }
        }
    }

    /// Probation passed: the new version connected and the server read its heartbeat.
    /// The supervisor sees the step and hands over to the new executable's supervisor;
    /// the success is reported, and the journal cleared, once that one has taken over
    /// and promoted itself (`Step::Promoted`).
    async fn commit(&mut self, journal: &mut Journal) -> Result<(), String> {
        journal
            .advance(&self.config.state_dir, Step::Committed)
            .map_err(|e| format!("could not journal the commit: {e:#}"))?;
        tracing::info!(version = %journal.version, "update committed; the supervisor takes over");
        Ok(())
    }

    /// Starts on an update unless it is refused; a refusal is returned for reporting.
    fn take_update(&mut self, update: Update) -> Option<UpdateResult> {
        let refuse = |reason: String, class: FailureClass| {
            tracing::warn!(task = %update.task_id, version = %update.version, %reason, class = class.as_str(), "update refused");
            Some(UpdateResult {
                task_id: update.task_id.clone(),
                outcome: UpdateOutcome::Failed,
                version: version::current().to_owned(),
                error: Some(reason),
                failure_class: Some(class),
                transfer: None,
            })
        };
        if !self.config.auto_update {
            // The operator's choice on this machine says nothing about the build.
            return refuse(
                "auto-update is off on this agent (--no-auto-update)".into(),
                FailureClass::Transient,
            );
        }
        if journal::is_rejected(&self.config.state_dir, &update.sha256) {
            return refuse(
                format!(
                    "build {} of {} was reverted here: its supervisor did not take over",
                    update.sha256, update.version
                ),
                FailureClass::Build,
            );
        }
        match journal::load(&self.config.state_dir) {
            // Sent twice (a re-dispatch): installed once.
            Ok(Some(journal)) if journal.task_id == update.task_id => return None,
            Ok(Some(journal)) if !matches!(journal.step, Step::Downloading | Step::Verified) => {
                tracing::info!(busy_with = %journal.task_id, "an update is being finished; the new one waits for a re-dispatch");
                return None;
            }
            Ok(Some(journal)) => self.cancel(&journal.task_id, "superseded by a newer update"),
            Ok(None) | Err(_) => {}
        }
        match self.updater.accept(&update) {
            Ok(journal) => {
                tracing::info!(task = %update.task_id, version = %update.version, rollback = update.rollback, "applying update");
                self.start_applying(journal);
                None
            }
            Err(err) => refuse(err.to_string(), err.class()),
        }
    }

    /// Abandons a task that has not reached the install step.
    fn cancel(&mut self, task_id: &str, reason: &str) {
        let Some((current, handle)) = self.applying.take_if(|(id, _)| id == task_id) else {
            return;
        };
        handle.abort();
        if let Ok(Some(journal)) = journal::load(&self.config.state_dir)
            && journal.task_id == current
            && matches!(journal.step, Step::Downloading | Step::Verified)
        {
            let _ = journal::clear(&self.config.state_dir);
        }
        tracing::info!(task = %current, %reason, "update cancelled");
    }
}

/// The final outcome a journal still owes the server, if it is in a final step, with
/// the failure class journaled with it.
fn owed_report(journal: &Journal) -> Option<UpdateResult> {
    let (outcome, failure_class) = match journal.step {
        Step::Promoted => (UpdateOutcome::Succeeded, None),
        // A journal from before classes: not knowing the cause, hold nothing against
        // the build.
        Step::Failed => (
            UpdateOutcome::Failed,
            Some(journal.failure_class.unwrap_or(FailureClass::Transient)),
        ),
        // Installed and did not prove itself: the build failed its probation.
        Step::Reverted => (
            UpdateOutcome::RolledBack,
            Some(journal.failure_class.unwrap_or(FailureClass::Build)),
        ),
        _ => return None,
    };
    Some(UpdateResult {
        task_id: journal.task_id.clone(),
        outcome,
        version: version::current().to_owned(),
        error: journal.reason.clone(),
        failure_class,
        transfer: journal.transfer.clone(),
    })
}

async fn send(socket: &mut Socket, message: AgentMessage) -> Result<(), String> {
    socket
        .send(Message::Binary(message.encode().into()))
        .await
        .map_err(|e| format!("could not send to the server: {e}"))
}

enum Refused {
    Rejected(RejectCode, String),
    Other(String),
}

async fn await_welcome(socket: &mut Socket) -> Result<Welcome, Refused> {
    loop {
        let frame = tokio::time::timeout(CONNECT_TIMEOUT, socket.next())
            .await
            .map_err(|_| Refused::Other("no welcome within 10 seconds".into()))?;
        match frame {
            Some(Ok(Message::Binary(bytes))) => match ServerMessage::decode(&bytes) {
                Ok(ServerMessage::Welcome(welcome)) => return Ok(welcome),
                Ok(ServerMessage::Reject(reject)) => {
                    return Err(Refused::Rejected(reject.code, reject.message));
                }
                Ok(_) => continue,
                Err(err) => return Err(Refused::Other(format!("bad frame from server: {err}"))),
            },
            Some(Ok(Message::Close(frame))) => {
                return Err(Refused::Other(format!(
                    "server closed the session: {}",
                    frame.map(|f| f.reason.to_string()).unwrap_or_default()
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(Refused::Other(err.to_string())),
            None => return Err(Refused::Other("server closed the connection".into())),
        }
    }
}

/// Connects to `url`; over TLS, trusting only `pinned` when given.
async fn connect(url: &str, pinned: Option<Arc<ClientConfig>>) -> anyhow::Result<Socket> {
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES * 4))
        .max_frame_size(Some(MAX_FRAME_BYTES * 4));
    let (socket, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(config),
            true,
            pinned.map(Connector::Rustls),
        ),
    )
    .await
    .with_context(|| format!("timed out connecting to {url}"))?
    .with_context(|| format!("could not connect to {url}"))?;
    Ok(socket)
}

/// How long a node that refused the session because it holds its most sessions (`503`
/// with `Retry-After`) asked us to stay away.
fn full_node_wait(err: &anyhow::Error) -> Option<Duration> {
    let tokio_tungstenite::tungstenite::Error::Http(response) = err.downcast_ref()? else {
        return None;
    };
    if response.status() != 503 {
        return None;
    }
    let value = response.headers().get("retry-after")?.to_str().ok();
    Some(crate::download::busy_wait(value))
}

/// The interval a welcome asks for, within 1 second and `MAX_HEARTBEAT_INTERVAL`.
fn heartbeat_interval(secs: u32) -> Duration {
    Duration::from_secs(u64::from(secs)).clamp(Duration::from_secs(1), MAX_HEARTBEAT_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::sample;

    fn refused(status: u16, retry_after: Option<&str>) -> anyhow::Error {
        let mut response = tokio_tungstenite::tungstenite::http::Response::builder().status(status);
        if let Some(value) = retry_after {
            response = response.header("Retry-After", value);
        }
        let err =
            tokio_tungstenite::tungstenite::Error::Http(Box::new(response.body(None).unwrap()));
        anyhow::Error::from(err).context("could not connect to ws://node/api/v1/agent/ws")
    }

    #[test]
    fn a_full_node_is_left_alone_as_long_as_it_asks_within_bounds() {
        assert_eq!(
            full_node_wait(&refused(503, Some("17"))),
            Some(Duration::from_secs(17))
        );
        assert_eq!(
            full_node_wait(&refused(503, Some("99999999999"))),
            Some(Duration::from_secs(600)),
            "a value from the network is capped"
        );
        assert_eq!(
            full_node_wait(&refused(503, None)),
            None,
            "an outage, not a full node"
        );
        assert_eq!(full_node_wait(&refused(502, Some("17"))), None);
        assert_eq!(full_node_wait(&anyhow::anyhow!("connection refused")), None);
    }

    #[test]
    fn the_heartbeat_interval_stays_within_bounds() {
        for (asked, used) in [(0, 1), (1, 1), (30, 30), (3600, 3600), (u32::MAX, 3600)] {
            assert_eq!(
                heartbeat_interval(asked),
                Duration::from_secs(used),
                "{asked}"
            );
        }
    }

    #[test]
    fn an_owed_result_carries_its_journaled_class() {
        // (step, journaled class, outcome owed, class reported)
        let cases = [
            (Step::Promoted, None, Some(UpdateOutcome::Succeeded), None),
            // Passed, but the new supervisor has not taken over yet.
            (Step::Committed, None, None, None),
            (Step::HandOver, None, None, None),
            (
                Step::Failed,
                Some(FailureClass::Environment),
                Some(UpdateOutcome::Failed),
                Some(FailureClass::Environment),
            ),
            (
                Step::Failed,
                Some(FailureClass::Build),
                Some(UpdateOutcome::Failed),
                Some(FailureClass::Build),
            ),
            (
                Step::Failed,
                None,
                Some(UpdateOutcome::Failed),
                Some(FailureClass::Transient),
            ),
            (
                Step::Reverted,
                Some(FailureClass::Build),
                Some(UpdateOutcome::RolledBack),
                Some(FailureClass::Build),
            ),
            (
                Step::Reverted,
                None,
                Some(UpdateOutcome::RolledBack),
                Some(FailureClass::Build),
            ),
            (Step::Downloading, None, None, None),
            (Step::Probation, None, None, None),
        ];
        for (step, journaled, outcome, class) in cases {
            let mut journal = sample(step);
            journal.failure_class = journaled;
            let owed = owed_report(&journal);
            let label = format!("{step:?} with {journaled:?}");
            assert_eq!(owed.as_ref().map(|r| r.outcome), outcome, "{label}");
            assert_eq!(owed.and_then(|r| r.failure_class), class, "{label}");
        }
    }

    use proptest::prelude::*;
    use protocol::{Cancel, Reject, RejectCode, Update, Welcome};

    thread_local! {
        /// Whether code on this thread panicked: tasks spawned on a current-thread
        /// runtime run here, and their panics would otherwise vanish into a JoinHandle.
        static PANICKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn watch_panics() {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICKED.with(|flag| flag.set(true));
                default(info);
            }));
        });
        PANICKED.with(|flag| flag.set(false));
    }

    fn any_server_frame() -> impl Strategy<Value = Vec<u8>> {
        let text = || prop_oneof![".{0,40}", "[a-z0-9-]{1,20}", ".{300,400}"];
        let update = (
            text(),
            prop_oneof!["[0-9]\\.[0-9]\\.[0-9]", text()],
            prop_oneof![
                Just("http://127.0.0.1:1/downloads/build".to_owned()),
                text()
            ],
            prop_oneof!["[0-9a-f]{64}", text()],
            any::<u64>(),
            proptest::option::of(text()),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(
                |(task_id, version, url, sha256, size, signature, rollback, sent_at_ms)| {
                    ServerMessage::Update(Box::new(Update {
                        task_id,
                        version,
                        url,
                        sha256,
                        size,
                        signature,
                        rollback,
                        sent_at_ms,
                        mirror_url: None,
                        compressed: None,
                        delta: None,
                    }))
                },
            );
        let message = prop_oneof![
            4 => update,
            2 => (text(), text()).prop_map(|(task_id, reason)| ServerMessage::Cancel(Cancel { task_id, reason })),
            1 => (text(), any::<u32>(), proptest::option::of(text())).prop_map(|(agent_id, heartbeat_interval_secs, secret)| {
                ServerMessage::Welcome(Welcome { agent_id, secret, heartbeat_interval_secs, server_version: "9.9.9".into(), channel: None })
            }),
            1 => text().prop_map(|message| ServerMessage::Reject(Reject { code: RejectCode::Replaced, message })),
        ]
        .prop_map(|message| message.encode());
        prop_oneof![
            6 => message,
            1 => proptest::collection::vec(any::<u8>(), 0..200),
        ]
    }

    /// A server on a free port that welcomes the first session with `interval`, then
    /// sends it `frames` and reads until it closes.
    async fn fuzzing_server(interval: u32, frames: Vec<Vec<u8>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            let _hello = socket.next().await;
            let welcome = ServerMessage::Welcome(Welcome {
                agent_id: "agent-fuzzed".into(),
                secret: Some("secret".into()),
                heartbeat_interval_secs: interval,
                server_version: "9.9.9".into(),
                channel: Some("stable".into()),
            });
            if socket
                .send(Message::Binary(welcome.encode().into()))
                .await
                .is_err()
            {
                return;
            }
            for frame in frames {
                if socket.send(Message::Binary(frame.into())).await.is_err() {
                    return;
                }
            }
            while let Some(Ok(_)) = socket.next().await {}
        });
        url
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Whatever frames a server sends after its welcome (updates, cancels, rejects,
        /// welcomes with any field, any interval; noise), the real session handles them
        /// without a panic, in itself or in the update it starts.
        #[test]
        fn no_server_frame_panics_the_session(
            interval in prop_oneof![any::<u32>(), 0u32..5],
            frames in proptest::collection::vec(any_server_frame(), 0..6),
        ) {
            watch_panics();
            let dir = tempfile::tempdir().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let url = fuzzing_server(interval, frames).await;
                let config = AgentConfig {
                    servers: vec![url],
                    enroll_token: Some("token".into()),
                    state_dir: dir.path().join("state"),
                    fingerprint: "fp-fuzzed".into(),
                    hostname: "fuzzed".into(),
                    auto_update: true,
                    exe: dir.path().join("drover-agent"),
                    public_key: None,
                    pinned_tls: None,
                    reconnect_base: Duration::from_secs(1),
                    reconnect_max: Duration::from_secs(5),
                    config_file: None,
                };
                let shutdown = CancellationToken::new();
                let session = run(config, shutdown.clone());
                tokio::pin!(session);
                tokio::select! {
                    _ = &mut session => {}
                    () = tokio::time::sleep(Duration::from_secs(120)) => {
                        shutdown.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(60), session).await;
                    }
                }
            });
            drop(runtime);
            prop_assert!(!PANICKED.with(std::cell::Cell::get), "the session or its update panicked");
        }
    }
}
