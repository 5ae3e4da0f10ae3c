//! Where the simulated agents connect from and to: the server's address, the source
//! addresses connections are spread over, and the WebSocket handshake on top.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Parses `127.0.0.2-127.0.0.9`, `10.0.0.1,10.0.0.2` or a single address.
pub(crate) fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((from, to)) = part.split_once('-') {
            let from: Ipv4Addr = from
                .trim()
                .parse()
                .with_context(|| format!("bad address {from:?}"))?;
            let to: Ipv4Addr = to
                .trim()
                .parse()
                .with_context(|| format!("bad address {to:?}"))?;
            let (from, to) = (u32::from(from), u32::from(to));
            if from > to {
                bail!("address range {part:?} runs backwards");
            }
            if to - from >= 65_536 {
                bail!("address range {part:?} is larger than any fleet needs");
            }
            ips.extend((from..=to).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
        } else {
            ips.push(
                part.parse()
                    .with_context(|| format!("bad address {part:?}"))?,
            );
        }
    }
    if ips.is_empty() {
        bail!("no source addresses in {spec:?}");
    }
    Ok(ips)
}

/// `host:port` of a server URL, with the scheme's default port.
fn host_port(server: &str) -> String {
    let server = server.trim();
    let (scheme, rest) = server.split_once("://").unwrap_or(("http", server));
    let default_port = if matches!(scheme, "https" | "wss") {
        443
    } else {
        80
    };
    with_port(rest.split('/').next().unwrap_or(rest), default_port)
}

/// `host` as `host:port`, adding `default_port` when it names none (IPv6 in brackets
/// included).
pub(crate) fn with_port(host: &str, default_port: u16) -> String {
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        && !host.ends_with(']');
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// How to reach the server, resolved once so tens of thousands of connections do not
/// each ask the resolver.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) ws_url: String,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
    config: WebSocketConfig,
}

impl Endpoint {
    pub(crate) async fn resolve(server: &str, sources: Vec<IpAddr>) -> anyhow::Result<Endpoint> {
        let target = host_port(server);
        let addr = tokio::net::lookup_host(&target)
            .await
            .with_context(|| format!("while resolving {target}"))?
            .next()
            .with_context(|| format!("{target} resolves to no address"))?;
        // Small buffers, as on the server: most sessions are idle, and the library
        // defaults (128 KiB each way) would make the simulator the bottleneck.
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(protocol::MAX_FRAME_BYTES * 4))
            .max_frame_size(Some(protocol::MAX_FRAME_BYTES * 4));
        Ok(Endpoint {
            addr,
            ws_url: protocol::agent_socket_url(server),
            sources,
            next_source: AtomicUsize::new(0),
            config,
        })
    }

    /// The next source address, round-robin; `None` lets the kernel choose.
    pub(crate) fn next_source(&self) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        let n = self.next_source.fetch_add(1, Ordering::Relaxed);
        Some(self.sources[n % self.sources.len()])
    }

    /// TCP connect from `source`, then the WebSocket upgrade.
    pub(crate) async fn connect(&self, source: Option<IpAddr>) -> Result<Socket, ConnectError> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ConnectError::Tcp)?;
        // Reconnect storms leave many TIME_WAIT sockets on each source address.
        socket.set_reuseaddr(true).map_err(ConnectError::Tcp)?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(ConnectError::Bind)?;
        }
        let stream = socket.connect(self.addr).await.map_err(ConnectError::Tcp)?;
        // A heartbeat and the ping after it are written back to back; Nagle would hold
        // the ping until the heartbeat is acknowledged and distort the round trip.
        stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
        let (socket, _) = tokio_tungstenite::client_async_tls_with_config(
            self.ws_url.as_str(),
            stream,
            Some(self.config),
            None,
        )
        .await
        .map_err(|err| match err {
            tokio_tungstenite::tungstenite::Error::Http(response) => ConnectError::Status {
                status: response.status().as_u16(),
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            },
            other => ConnectError::Handshake(other.to_string()),
        })?;
        Ok(socket)
    }
}

#[derive(Debug)]
pub(crate) enum ConnectError {
    Bind(std::io::Error),
    Tcp(std::io::Error),
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    Handshake(String),
}

impl ConnectError {
    /// The error kind in the report.
    pub(crate) fn kind(&self) -> String {
        match self {
            ConnectError::Bind(_) => "bind".into(),
            ConnectError::Tcp(_) => "tcp_connect".into(),
            ConnectError::Status { status, .. } => format!("upgrade_http_{status}"),
            ConnectError::Handshake(_) => "ws_handshake".into(),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Bind(err) => write!(f, "could not bind the source address: {err}"),
            ConnectError::Tcp(err) => write!(f, "tcp connect failed: {err}"),
            ConnectError::Status { status, .. } => write!(f, "upgrade answered {status}"),
            ConnectError::Handshake(err) => write!(f, "websocket handshake failed: {err}"),
        }
    }
}

/// `Retry-After` in seconds. The HTTP-date form is not used by drover-server; a
/// caller falls back to its own delay for it.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_expand_inclusively() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4").unwrap();
        let text: Vec<String> = ips.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
        assert_eq!(parse_source_ips("127.0.0.9, 127.0.0.7").unwrap().len(), 2);
        for bad in ["", "127.0.0.9-127.0.0.2", "nope", "10.0.0.0-10.255.0.0"] {
            assert!(parse_source_ips(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn server_urls_map_to_the_agent_endpoint() {
        let cases = [
            (
                "http://127.0.0.1:8080",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
                "127.0.0.1:8080",
            ),
            (
                "http://127.0.0.1:8080/",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
                "127.0.0.1:8080",
            ),
            (
                "https://drover.example.com",
                "wss://drover.example.com/api/v1/agent/ws",
                "drover.example.com:443",
            ),
            (
                "http://[::1]:9000",
                "ws://[::1]:9000/api/v1/agent/ws",
                "[::1]:9000",
            ),
            ("http://[::1]", "ws://[::1]/api/v1/agent/ws", "[::1]:80"),
        ];
        for (server, ws, target) in cases {
            assert_eq!(protocol::agent_socket_url(server), ws, "{server}");
            assert_eq!(host_port(server), target, "{server}");
        }
    }

    #[test]
    fn retry_after_takes_seconds() {
        assert_eq!(parse_retry_after(" 10 "), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
