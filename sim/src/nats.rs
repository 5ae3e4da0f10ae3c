//! `drover-sim nats`: the same number of connections held on a NATS server instead,
//! each publishing a Drover heartbeat frame at the same rate, so a benchmark can set
//! the server's cost per connection beside drover-server's.
//!
//! The client speaks the few lines of the NATS text protocol it needs (INFO, CONNECT,
//! PUB, PING/PONG) over a plain TCP socket bound to a chosen source address, which the
//! usual client libraries do not offer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use protocol::{AgentMessage, Heartbeat};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, watch};

use crate::net;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Longer than any protocol line the server sends us (INFO is the longest, ~1 KiB with
/// cluster URLs); a longer one means we are not talking to a NATS server.
const MAX_LINE: usize = 64 * 1024;
/// Most connections only ever read a PING; the buffer grows for the INFO if needed.
const READ_BUFFER: usize = 256;

/// Hold N client connections on a NATS server, each publishing a heartbeat.
#[derive(Debug, clap::Args)]
pub(crate) struct NatsArgs {
    /// NATS server URL, e.g. nats://127.0.0.1:4222
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Number of client connections
    #[arg(long)]
    clients: usize,
    /// Seconds between one client's heartbeats (drover-server's
    /// --heartbeat-interval, for the same offered rate)
    #[arg(long, default_value_t = 30.0)]
    heartbeat_every: f64,
    /// Each heartbeat interval varies by up to this fraction of itself (0 to 1)
    #[arg(long, default_value_t = 0.1)]
    heartbeat_jitter: f64,
    /// Source addresses to spread connections over, round-robin:
    /// `127.0.0.2-127.0.0.9` or a comma-separated list
    #[arg(long)]
    source_ips: Option<String>,
    /// At most this many handshakes in flight at once
    #[arg(long, default_value_t = 1000)]
    connect_concurrency: usize,
    /// Stop after this many seconds (default: run until SIGINT or SIGTERM)
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between progress lines on stderr (0: none)
    #[arg(long, default_value_t = 5.0)]
    report_every: f64,
    /// Print the final report as one JSON object on stdout
    #[arg(long)]
    json: bool,
}

impl NatsArgs {
    pub(crate) fn clients(&self) -> usize {
        self.clients
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.heartbeat_jitter) {
            bail!("--heartbeat-jitter must be between 0 and 1");
        }
        if !(self.heartbeat_every > 0.0 && self.heartbeat_every.is_finite()) {
            bail!("--heartbeat-every must be a positive number of seconds");
        }
        Ok(())
    }
}

/// What every client shares.
struct Swarm {
    server: SocketAddr,
    sources: Vec<IpAddr>,
    heartbeat_every: Duration,
    heartbeat_jitter: f64,
    handshakes: Semaphore,
    stats: Stats,
}

impl Swarm {
    fn source(&self, index: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()])
    }

    fn jittered(&self) -> Duration {
        let jitter = self.heartbeat_jitter;
        if jitter <= 0.0 {
            return self.heartbeat_every;
        }
        self.heartbeat_every
            .mul_f64(rand::rng().random_range(1.0 - jitter..=1.0 + jitter))
    }
}

pub(crate) async fn run(args: NatsArgs) -> anyhow::Result<()> {
    let sources = match &args.source_ips {
        Some(spec) => net::parse_source_ips(spec)?,
        None => Vec::new(),
    };
    let target = host_port(&args.url)?;
    let server = tokio::net::lookup_host(&target)
        .await
        .with_context(|| format!("while resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let swarm = Arc::new(Swarm {
        server,
        sources,
        heartbeat_every: Duration::from_secs_f64(args.heartbeat_every),
        heartbeat_jitter: args.heartbeat_jitter,
        handshakes: Semaphore::new(args.connect_concurrency.max(1)),
        stats: Stats::new(args.clients),
    });

    let (stop, stopped) = watch::channel(false);
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..args.clients {
        clients.spawn(client(index, swarm.clone(), stopped.clone()));
    }
    let progress = {
        let swarm = swarm.clone();
        crate::report_progress(args.report_every, move || {
            eprintln!("{}", swarm.stats.report().progress_line());
        })
    };

    crate::wait_for_end(args.duration).await?;
    let report = swarm.stats.report();
    crate::stop_all(&stop, progress, &mut clients).await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

/// One client: connect, heartbeat until stopped, and come back with full-jitter
/// backoff after any failure.
async fn client(index: usize, swarm: Arc<Swarm>, mut stopped: watch::Receiver<bool>) {
    let stats = &swarm.stats;
    let mut attempt = 0u32;
    let first_attempt = Instant::now();
    let mut ever_connected = false;
    loop {
        let connected = tokio::select! {
            connected = connect(index, &swarm) => connected,
            _ = until_stopped(&mut stopped) => return,
        };
        let (reader, writer) = match connected {
            Ok(halves) => halves,
            Err(kind) => {
                stats.error(kind);
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = until_stopped(&mut stopped) => return,
                }
            }
        };
        if ever_connected {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            ever_connected = true;
            stats.record_connect(first_attempt.elapsed());
        }
        attempt = 0;
        let ended = {
            let _open = stats.open();
            hold(index, &swarm, reader, writer, &mut stopped).await
        };
        match ended {
            Ok(()) => return,
            Err(kind) => {
                stats.error(kind);
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = until_stopped(&mut stopped) => return,
                }
            }
        }
    }
}

type Reader = BufReader<OwnedReadHalf>;

/// TCP connect from the client's source address, the server's INFO, our CONNECT, and
/// a PING whose PONG proves the server accepted the connection.
async fn connect(index: usize, swarm: &Swarm) -> Result<(Reader, OwnedWriteHalf), &'static str> {
    let _permit = swarm.handshakes.acquire().await.map_err(|_| "shutdown")?;
    let socket = if swarm.server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|_| "socket")?;
    // Reconnects leave TIME_WAIT sockets on each source address.
    socket.set_reuseaddr(true).map_err(|_| "socket")?;
    if let Some(ip) = swarm.source(index) {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|_| "bind")?;
    }
    let handshake = async {
        let stream = socket
            .connect(swarm.server)
            .await
            .map_err(|_| "tcp_connect")?;
        stream.set_nodelay(true).map_err(|_| "tcp_connect")?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER, read);
        let mut line = Vec::new();
        read_line(&mut reader, &mut line).await?;
        let info = line.strip_prefix(b"INFO ").ok_or("no_info")?;
        swarm.stats.note_server(info);
        let connect = format!(
            "CONNECT {}\r\nPING\r\n",
            serde_json::json!({
                "verbose": false,
                "pedantic": false,
                "name": format!("drover-sim-{index}"),
                "lang": "rust",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1,
            })
        );
        write
            .write_all(connect.as_bytes())
            .await
            .map_err(|_| "write")?;
        loop {
            line.clear();
            read_line(&mut reader, &mut line).await?;
            match Line::parse(&line) {
                Line::Pong => return Ok((reader, write)),
                Line::Ping => write.write_all(b"PONG\r\n").await.map_err(|_| "write")?,
                Line::Err => return Err("server_err"),
                Line::Other => {}
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| "handshake_timeout")?
}

/// Heartbeat every interval (the first at a random point of it, so clients started
/// together do not publish in lockstep) and answer the server's PINGs, until stopped
/// (`Ok`) or the connection fails (`Err` with the kind).
async fn hold(
    index: usize,
    swarm: &Swarm,
    mut reader: Reader,
    mut writer: OwnedWriteHalf,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), &'static str> {
    let stats = &swarm.stats;
    let subject = format!("drover.hb.{index}");
    let first_beat = swarm
        .heartbeat_every
        .mul_f64(rand::rng().random_range(0.0..1.0));
    let mut next_beat = tokio::time::Instant::now() + first_beat;
    let mut seq = 0u64;
    // Kept across iterations: `read_until` leaves a partly read line here when another
    // branch wins, and the next call continues it.
    let mut line = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_beat) => {
                seq += 1;
                let frame = heartbeat_frame(seq);
                let mut publish = format!("PUB {subject} {}\r\n", frame.len()).into_bytes();
                publish.extend_from_slice(&frame);
                publish.extend_from_slice(b"\r\n");
                writer.write_all(&publish).await.map_err(|_| "write")?;
                stats.publishes.fetch_add(1, Ordering::Relaxed);
                next_beat += swarm.jittered();
            }
            read = reader.read_until(b'\n', &mut line) => {
                match read {
                    Ok(0) | Err(_) => return Err("lost"),
                    Ok(_) if !line.ends_with(b"\n") => {
                        if line.len() > MAX_LINE {
                            return Err("line_too_long");
                        }
                        continue;
                    }
                    Ok(_) => {}
                }
                match Line::parse(&line) {
                    Line::Ping => {
                        writer.write_all(b"PONG\r\n").await.map_err(|_| "write")?;
                        stats.pings_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Line::Err => return Err("server_err"),
                    Line::Pong | Line::Other => {}
                }
                line.clear();
            }
            _ = until_stopped(stopped) => {
                let _ = writer.shutdown().await;
                return Ok(());
            }
        }
    }
}

/// Returns once the stop signal is set (holding no borrow of it, so the future stays
/// `Send` inside `select!`).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The bytes a simulated Drover agent sends as its heartbeat, so both servers carry
/// the same payload.
fn heartbeat_frame(seq: u64) -> Vec<u8> {
    AgentMessage::Heartbeat(Heartbeat {
        seq,
        version: "1.0.0".to_owned(),
    })
    .encode()
}

/// One whole line (up to `\n`), or the error kind.
async fn read_line(reader: &mut Reader, line: &mut Vec<u8>) -> Result<(), &'static str> {
    loop {
        match reader.read_until(b'\n', line).await {
            Ok(0) | Err(_) => return Err("lost"),
            Ok(_) if line.ends_with(b"\n") => return Ok(()),
            Ok(_) if line.len() > MAX_LINE => return Err("line_too_long"),
            Ok(_) => {}
        }
    }
}

/// The protocol lines a publishing client can receive. We subscribe to nothing, so
/// no MSG (with a payload after its line) ever arrives.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Ping,
    Pong,
    Err,
    /// `+OK`, a later `INFO` (cluster changes), anything else we need not act on.
    Other,
}

impl Line {
    fn parse(line: &[u8]) -> Line {
        let word = line
            .split(|b| b.is_ascii_whitespace())
            .next()
            .unwrap_or_default();
        if word.eq_ignore_ascii_case(b"PING") {
            Line::Ping
        } else if word.eq_ignore_ascii_case(b"PONG") {
            Line::Pong
        } else if word.eq_ignore_ascii_case(b"-ERR") {
            Line::Err
        } else {
            Line::Other
        }
    }
}

/// `host:port` of a NATS URL (`nats://h:p`, `h:p` or `h`), port 4222 by default.
fn host_port(url: &str) -> anyhow::Result<String> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    if scheme != "nats" {
        bail!("only nats:// URLs are supported (no TLS, no WebSocket), not {url:?}");
    }
    let host = rest.split('/').next().unwrap_or(rest);
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    if host.is_empty() {
        bail!("no host in {url:?}");
    }
    Ok(crate::net::with_port(host, 4222))
}

/// Full-jitter exponential backoff, as the simulated agents use.
fn backoff(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let ceiling = BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP);
    Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
}

struct Stats {
    started: Instant,
    clients: usize,
    connected: AtomicUsize,
    all_connected_at: OnceLock<Duration>,
    publishes: AtomicU64,
    pings_answered: AtomicU64,
    reconnects: AtomicU64,
    server: OnceLock<ServerInfo>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    connect: Mutex<Histogram<u64>>,
}

/// What the server said about itself in its first INFO.
#[derive(Debug, Clone, Default, Serialize)]
struct ServerInfo {
    version: Option<String>,
    jetstream: bool,
    max_payload: Option<u64>,
}

impl Stats {
    fn new(clients: usize) -> Stats {
        Stats {
            started: Instant::now(),
            clients,
            connected: AtomicUsize::new(0),
            all_connected_at: OnceLock::new(),
            publishes: AtomicU64::new(0),
            pings_answered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            server: OnceLock::new(),
            errors: Mutex::new(BTreeMap::new()),
            connect: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
        }
    }

    fn error(&self, kind: &'static str) {
        *lock(&self.errors).entry(kind).or_default() += 1;
    }

    fn record_connect(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = lock(&self.connect).record(micros.clamp(1, 3_600_000_000));
    }

    fn note_server(&self, info: &[u8]) {
        if self.server.get().is_some() {
            return;
        }
        let info: serde_json::Value = serde_json::from_slice(info).unwrap_or_default();
        let _ = self.server.set(ServerInfo {
            version: info["version"].as_str().map(str::to_owned),
            jetstream: info["jetstream"].as_bool().unwrap_or(false),
            max_payload: info["max_payload"].as_u64(),
        });
    }

    /// Counts a connection as open until the guard is dropped. The first time all are
    /// open, says so on stderr: scripts wait for that line.
    fn open(&self) -> OpenGuard<'_> {
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        if now == self.clients {
            let at = self.started.elapsed();
            if self.all_connected_at.set(at).is_ok() {
                eprintln!(
                    "drover-sim nats: all {} clients connected after {:.3} s",
                    self.clients,
                    at.as_secs_f64()
                );
            }
        }
        OpenGuard(self)
    }

    fn report(&self) -> Report {
        let errors = lock(&self.errors).clone();
        let connect = {
            let h = lock(&self.connect);
            let ms = |micros: u64| round3(micros as f64 / 1000.0);
            ConnectTimes {
                count: h.len(),
                p50: ms(h.value_at_quantile(0.5)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
            }
        };
        Report {
            mode: "nats",
            clients: self.clients,
            connected: self.connected.load(Ordering::Relaxed),
            all_connected_secs: self
                .all_connected_at
                .get()
                .map(|at| round3(at.as_secs_f64())),
            elapsed_secs: round3(self.started.elapsed().as_secs_f64()),
            connect_ms: connect,
            publishes: self.publishes.load(Ordering::Relaxed),
            payload_bytes: heartbeat_frame(1).len(),
            pings_answered: self.pings_answered.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            errors_total: errors.values().sum(),
            errors,
            server: self.server.get().cloned().unwrap_or_default(),
        }
    }
}

struct OpenGuard<'a>(&'a Stats);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Serialize)]
struct ConnectTimes {
    count: u64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// The final report: one JSON object with `--json`, text otherwise.
#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    clients: usize,
    connected: usize,
    all_connected_secs: Option<f64>,
    elapsed_secs: f64,
    /// First connect attempt (the wait for a handshake slot included) to the PONG.
    connect_ms: ConnectTimes,
    publishes: u64,
    payload_bytes: usize,
    pings_answered: u64,
    reconnects: u64,
    errors_total: u64,
    errors: BTreeMap<&'static str, u64>,
    server: ServerInfo,
}

impl Report {
    fn progress_line(&self) -> String {
        format!(
            "[{:>7.1}s] nats connected {}/{}, published {}, pings answered {}, errors {}",
            self.elapsed_secs,
            self.connected,
            self.clients,
            self.publishes,
            self.pings_answered,
            self.errors_total
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "nats-server {} (JetStream {})",
            self.server.version.as_deref().unwrap_or("unknown version"),
            if self.server.jetstream { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "clients: {}/{} connected, all connected after {}",
            self.connected,
            self.clients,
            self.all_connected_secs
                .map_or_else(|| "never".to_owned(), |s| format!("{s} s"))
        )?;
        let c = &self.connect_ms;
        writeln!(
            f,
            "connect: p50 {} ms, p99 {} ms, max {} ms ({} connects)",
            c.p50, c.p99, c.max, c.count
        )?;
        writeln!(
            f,
            "published {} heartbeats of {} bytes, answered {} pings, {} reconnects",
            self.publishes, self.payload_bytes, self.pings_answered, self.reconnects
        )?;
        write!(f, "errors: {}", self.errors_total)?;
        for (kind, count) in &self.errors {
            write!(f, ", {kind}: {count}")?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_map_to_host_and_port() {
        let cases = [
            ("nats://127.0.0.1:4222", "127.0.0.1:4222"),
            ("nats://127.0.0.1", "127.0.0.1:4222"),
            ("127.0.0.1:5222", "127.0.0.1:5222"),
            ("nats://user:pass@nats.example.com", "nats.example.com:4222"),
            ("nats://[::1]:4222", "[::1]:4222"),
        ];
        for (url, want) in cases {
            assert_eq!(host_port(url).unwrap(), want, "{url}");
        }
        for bad in ["tls://127.0.0.1:4222", "nats://"] {
            assert!(host_port(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn server_lines_are_told_apart() {
        let cases: [(&[u8], Line); 6] = [
            (b"PING\r\n", Line::Ping),
            (b"ping\r\n", Line::Ping),
            (b"PONG\r\n", Line::Pong),
            (b"-ERR 'Authorization Violation'\r\n", Line::Err),
            (b"+OK\r\n", Line::Other),
            (b"INFO {\"version\":\"2.9.10\"}\r\n", Line::Other),
        ];
        for (line, want) in cases {
            assert_eq!(Line::parse(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn the_payload_is_a_drover_heartbeat() {
        let frame = heartbeat_frame(7);
        let decoded = AgentMessage::decode(&frame).unwrap();
        assert!(matches!(
            decoded,
            AgentMessage::Heartbeat(Heartbeat { seq: 7, .. })
        ));
    }

    /// A stand-in server that speaks just enough NATS: the handshake, one PING that
    /// must be answered, and a PUB whose payload is a heartbeat frame.
    #[tokio::test]
    async fn a_client_handshakes_answers_pings_and_publishes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let swarm = Arc::new(Swarm {
            server,
            sources: Vec::new(),
            heartbeat_every: Duration::from_millis(20),
            heartbeat_jitter: 0.0,
            handshakes: Semaphore::new(1),
            stats: Stats::new(1),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(client(3, swarm.clone(), stopped));

        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        write
            .write_all(b"INFO {\"version\":\"9.9.9\",\"jetstream\":true}\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("CONNECT {"), "{line}");
        line.clear();
        read.read_line(&mut line).await.unwrap();
        assert_eq!(line, "PING\r\n");
        write.write_all(b"PONG\r\nPING\r\n").await.unwrap();

        let mut saw_pong = false;
        let mut saw_pub = false;
        while !(saw_pong && saw_pub) {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            if line == "PONG\r\n" {
                saw_pong = true;
            } else if let Some(rest) = line.strip_prefix("PUB drover.hb.3 ") {
                let len: usize = rest.trim().parse().unwrap();
                let mut payload = vec![0; len + 2];
                tokio::io::AsyncReadExt::read_exact(&mut read, &mut payload)
                    .await
                    .unwrap();
                assert!(AgentMessage::decode(&payload[..len]).is_ok());
                saw_pub = true;
            } else {
                panic!("unexpected line {line:?}");
            }
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        let report = swarm.stats.report();
        assert!(report.all_connected_secs.is_some());
        assert_eq!(report.server.version.as_deref(), Some("9.9.9"));
        assert!(report.server.jetstream);
        assert_eq!(report.errors_total, 0);
        assert_eq!(report.pings_answered, 1);
    }
}
