//! One session with the server and the reconnect loop around it. Only this module speaks
//! the wire protocol.

use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use protocol::{
    AgentMessage, Heartbeat, Hello, MAX_FRAME_BYTES, RejectCode, ServerMessage, Welcome,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::identity::{self, Identity};
use crate::{AgentConfig, version};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server is presumed gone when nothing (not even a pong) arrives for this many
/// heartbeat intervals.
const MISSED_HEARTBEATS: u32 = 3;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended, for the reconnect loop.
enum Ended {
    Shutdown,
    /// The session was accepted and later lost; reconnect soon.
    AfterWelcome(String),
    /// The session never got going; back off further.
    BeforeWelcome(String),
}

/// Connects, and reconnects with backoff, until `shutdown` fires.
pub(crate) async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The state directory holds the agent's secret: readable by its owner only.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| {
            format!(
                "while creating the state directory {}",
                config.state_dir.display()
            )
        })?;
    let mut identity = identity::load(&config.state_dir)?;
    if identity.is_none() && config.enroll_token.is_none() {
        bail!(
            "this agent is not enrolled yet ({} is missing): pass --enroll-token",
            identity::path(&config.state_dir).display()
        );
    }
    let mut backoff = Backoff::new(config.reconnect_base, config.reconnect_max);
    loop {
        let ended = session(&config, &mut identity, &shutdown).await;
        match ended {
            Ended::Shutdown => return Ok(()),
            Ended::AfterWelcome(reason) => {
                tracing::warn!(%reason, "session lost; reconnecting");
                backoff.reset();
            }
            Ended::BeforeWelcome(reason) => tracing::warn!(%reason, "could not start a session"),
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn session(
    config: &AgentConfig,
    identity: &mut Option<Identity>,
    shutdown: &CancellationToken,
) -> Ended {
    let url = socket_url(&config.server);
    let mut socket = tokio::select! {
        connected = connect(&url) => match connected {
            Ok(socket) => socket,
            Err(err) => return Ended::BeforeWelcome(format!("{err:#}")),
        },
        () = shutdown.cancelled() => return Ended::Shutdown,
    };
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
    if let Err(err) = socket.send(Message::Binary(hello.encode().into())).await {
        return Ended::BeforeWelcome(format!("could not send hello: {err}"));
    }
    let welcome = tokio::select! {
        welcome = await_welcome(&mut socket) => welcome,
        () = shutdown.cancelled() => return Ended::Shutdown,
    };
    let welcome = match welcome {
        Ok(welcome) => welcome,
        Err(Refused::Rejected(code, message)) => {
            if code == RejectCode::BadCredentials {
                if config.enroll_token.is_some() {
                    tracing::error!(%message, "the server rejected this agent's credentials; enrolling again with the enrollment token");
                    *identity = None;
                } else {
                    tracing::error!(%message, "the server rejected this agent's credentials and no --enroll-token was given to enroll again");
                }
            }
            return Ended::BeforeWelcome(format!("rejected ({code:?}): {message}"));
        }
        Err(Refused::Other(reason)) => return Ended::BeforeWelcome(reason),
    };
    if let Some(secret) = &welcome.secret {
        let enrolled = Identity {
            agent_id: welcome.agent_id.clone(),
            secret: secret.clone(),
        };
        if let Err(err) = identity::save(&config.state_dir, &enrolled) {
            // Without a stored secret the next start would enroll again (and be re-bound
            // by fingerprint); keep going with the identity in memory meanwhile.
            tracing::error!(error = %format!("{err:#}"), "could not store the agent identity");
        }
        tracing::info!(agent = %welcome.agent_id, "enrolled");
        *identity = Some(enrolled);
    }
    tracing::info!(agent = %welcome.agent_id, version = version::current(), "connected to {}", config.server);
    let interval = Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1)));
    tokio::select! {
        reason = heartbeat(&mut socket, interval) => Ended::AfterWelcome(reason),
        () = shutdown.cancelled() => {
            let _ = socket.close(None).await;
            Ended::Shutdown
        }
    }
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

/// Heartbeats until the session ends; returns why it ended.
async fn heartbeat(socket: &mut Socket, interval: Duration) -> String {
    let mut ticker = tokio::time::interval(interval);
    let mut seq = 0u64;
    let silence_limit = interval * MISSED_HEARTBEATS;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if last_heard.elapsed() > silence_limit {
                    return format!("nothing heard from the server for {}s", silence_limit.as_secs());
                }
                seq += 1;
                let beat = AgentMessage::Heartbeat(Heartbeat { seq, version: version::current().to_owned() });
                // The ping's pong tells us the server is still there, since heartbeats
                // themselves are not answered.
                if let Err(err) = socket.send(Message::Binary(beat.encode().into())).await {
                    return format!("could not send heartbeat: {err}");
                }
                if let Err(err) = socket.send(Message::Ping(Vec::new().into())).await {
                    return format!("could not send ping: {err}");
                }
            }
            frame = socket.next() => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    Some(Ok(Message::Binary(bytes))) => match ServerMessage::decode(&bytes) {
                        Ok(ServerMessage::Reject(reject)) => {
                            return format!("server ended the session ({:?}): {}", reject.code, reject.message);
                        }
                        Ok(ServerMessage::Update(update)) => {
                            tracing::info!(task = %update.task_id, version = %update.version, "update offered; this agent does not install updates yet");
                        }
                        Ok(message) => tracing::debug!(?message, "ignoring message"),
                        Err(err) => return format!("bad frame from server: {err}"),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return format!("server closed the session: {}", frame.map(|f| f.reason.to_string()).unwrap_or_default());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return err.to_string(),
                    None => return "server closed the connection".into(),
                }
            }
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<Socket> {
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME_BYTES * 4))
        .max_frame_size(Some(MAX_FRAME_BYTES * 4));
    let (socket, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .with_context(|| format!("timed out connecting to {url}"))?
    .with_context(|| format!("could not connect to {url}"))?;
    Ok(socket)
}

/// The agent endpoint for a server URL: `http://h:p` becomes `ws://h:p/api/v1/agent/ws`;
/// a `ws://` or `wss://` URL with a path is used as given.
pub(crate) fn socket_url(server: &str) -> String {
    let server = server.trim().trim_end_matches('/');
    let (scheme, rest) = server.split_once("://").unwrap_or(("http", server));
    let scheme = match scheme {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    if server.starts_with("ws") && rest.contains('/') {
        return format!("{scheme}://{rest}");
    }
    format!("{scheme}://{rest}/api/v1/agent/ws")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_urls() {
        let cases = [
            (
                "http://127.0.0.1:8080",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
            ),
            (
                "http://127.0.0.1:8080/",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
            ),
            (
                "https://updates.example.com",
                "wss://updates.example.com/api/v1/agent/ws",
            ),
            (
                "updates.example.com:8080",
                "ws://updates.example.com:8080/api/v1/agent/ws",
            ),
            (
                "wss://lb.example.com/custom/ws",
                "wss://lb.example.com/custom/ws",
            ),
            ("ws://lb.example.com", "ws://lb.example.com/api/v1/agent/ws"),
        ];
        for (input, expected) in cases {
            assert_eq!(socket_url(input), expected, "{input}");
        }
    }
}
