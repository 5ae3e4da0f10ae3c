//! The accept loop: how many connections are held at once (in all and per source
//! address, and how many of them agent sessions may take), how long a peer may take to
//! send a request's headers or sit idle between requests, and how long it may refuse
//! the bytes it is sent. hyper serves each connection; nothing else in the server sees
//! a raw socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::limits::{PerSource, SourceSlot};
use crate::metrics::{COUNTERS, Counters};
use crate::tls;

/// Connection limits and timeouts, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections held at once (handshakes, requests, WebSocket sessions); beyond it a
    /// new connection is closed at once.
    pub max_connections: usize,
    /// Connections one source address (IPv6: its /64) may hold at once.
    pub max_per_address: usize,
    /// A request's headers must arrive within this; an idle keep-alive connection is
    /// closed after it too.
    pub header_timeout: Duration,
    /// A connection whose peer accepts no bytes for this long is dropped.
    pub write_timeout: Duration,
}

/// Connections agent sessions leave to everything else: the dashboard, the API, health
/// checks, and downloads (twice the default download slots).
const KEPT_FROM_SESSIONS: usize = 128;

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits::for_open_files(10_240, None, None)
    }
}

impl ConnectionLimits {
    /// Limits for a process allowed `open_files` descriptors: the connections leave room
    /// (128 and a 128th) for the database, the builds being served and the logs, and one
    /// address may hold half of them (a site behind NAT shares one address). The room is
    /// small on purpose: a server holds one descriptor per agent, and benchmarks hold
    /// 19,000 sessions under a limit of 20,000.
    pub fn for_open_files(
        open_files: u64,
        max_connections: Option<usize>,
        max_per_address: Option<usize>,
    ) -> ConnectionLimits {
        let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
        let reserve = 128 + open_files / 128;
        let max_connections =
            max_connections.unwrap_or_else(|| open_files.saturating_sub(reserve).max(16));
        ConnectionLimits {
            max_connections,
            max_per_address: max_per_address.unwrap_or_else(|| max_connections.div_ceil(2)),
            header_timeout: Duration::from_secs(15),
            write_timeout: Duration::from_secs(30),
        }
    }

    /// How many agent sessions a node holds at once: `max_connections` less
    /// `KEPT_FROM_SESSIONS`, but at least half of it. A node full of sessions still
    /// answers its health checks, its operators and its agents' downloads; the agents it
    /// turns away try another node.
    pub fn max_sessions(&self) -> usize {
        self.max_connections
            .saturating_sub(KEPT_FROM_SESSIONS)
            .max(self.max_connections.div_ceil(2))
    }
}

/// Raises the soft limit on open files to the hard limit and answers the limit in
/// force (a server holds one descriptor per agent).
pub fn raise_open_files_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Serves `router` on `listener` until `shutdown` fires, then lets open requests finish.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tls::TlsConfig>,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_source = Arc::new(PerSource::new(limits.max_per_address));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors or a connection reset before it was accepted: wait
                // a moment rather than spin.
                tracing::warn!(%err, "accept error");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            Counters::bump(&COUNTERS.connections_refused_full);
            tracing::debug!(%peer, "connection refused: the server holds its maximum");
            continue;
        };
        let Some(slot) = per_source.try_take(peer.ip()) else {
            Counters::bump(&COUNTERS.connections_refused_address);
            tracing::debug!(%peer, "connection refused: its address holds its maximum");
            continue;
        };
        let held = Held {
            _permit: permit,
            _slot: slot,
        };
        let (router, tls, shutdown) = (router.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tls {
                None => {
                    let io = Guarded::new(tcp, held, limits.write_timeout);
                    serve_connection(io, peer, router, limits, shutdown).await;
                }
                Some(tls) => {
                    let wrap = |tcp| Guarded::new(tcp, held, limits.write_timeout);
                    if let Some(io) = tls::handshake(&tls, tcp, peer, wrap).await {
                        serve_connection(io, peer, router, limits, shutdown).await;
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One HTTP/1.1 connection, WebSocket upgrades included; the handlers see the peer's
/// address as `ConnectInfo<SocketAddr>`.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request.map(axum::body::Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, %err, "connection ended");
    }
}

/// What a connection holds while it is open, upgraded WebSocket sessions included.
struct Held {
    _permit: OwnedSemaphorePermit,
    _slot: SourceSlot,
}

/// A connection's IO with its places under the caps (given back when the connection is
/// dropped: after an upgrade, when the WebSocket session ends) and its write watchdog.
///
/// The watchdog costs next to nothing while the peer keeps up: a deadline is taken only
/// when a write has to wait, and its timer is created once and moved at most once per
/// timeout (a timer that fires before the true deadline is re-armed to it), never per
/// write. A download makes thousands of writes a second that each wait a moment for the
/// socket; a timeout that re-arms the runtime's timer on every wait pays a timer update
/// and a wakeup for each.
struct Guarded<I> {
    io: I,
    _held: Held,
    write_timeout: Duration,
    /// When the write now waiting for the peer must have gone through; `None` while no
    /// write waits.
    write_deadline: Option<Instant>,
    /// Created on the first write that waits; its deadline may lag `write_deadline`.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<I> Guarded<I> {
    fn new(io: I, held: Held, write_timeout: Duration) -> Guarded<I> {
        Guarded {
            io,
            _held: held,
            write_timeout,
            write_deadline: None,
            timer: None,
        }
    }

    /// Called when a write returned `Pending`: an error once the peer has accepted no
    /// bytes for the write timeout, otherwise arranges to be woken by then.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let timeout = self.write_timeout;
        let deadline = *self
            .write_deadline
            .get_or_insert_with(|| Instant::now() + timeout);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(()) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer accepted no bytes within the write timeout",
                    ));
                }
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
        }
    }

    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.write_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => match self.poll_stall(cx) {
                Ok(()) => Poll::Pending,
                Err(err) => Poll::Ready(Err(err)),
            },
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.written(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.written(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.written(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.written(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn sessions_leave_room_for_operators_and_downloads_but_hold_half_at_least() {
        let cases = [
            // --max-connections, sessions
            (19_716, 19_588),
            (256, 128),
            (200, 100),
            (40, 20),
            (17, 9),
        ];
        for (connections, sessions) in cases {
            let limits = ConnectionLimits::for_open_files(20_000, Some(connections), None);
            assert_eq!(limits.max_sessions(), sessions, "{connections} connections");
        }
    }

    #[test]
    fn connections_leave_room_for_files_and_one_address_gets_half() {
        let cases = [
            // open files, flags: connections, per address
            ((256, None, None), (126, 63)),
            ((1_048_576, None, None), (1_040_256, 520_128)),
            ((20_000, None, None), (19_716, 9_858)),
            ((64, None, None), (16, 8)),
            ((20_000, Some(500), None), (500, 250)),
            ((20_000, Some(500), Some(7)), (500, 7)),
        ];
        for ((files, max, per), (expect_max, expect_per)) in cases {
            let limits = ConnectionLimits::for_open_files(files, max, per);
            assert_eq!(
                (limits.max_connections, limits.max_per_address),
                (expect_max, expect_per),
                "{files} open files"
            );
        }
    }

    fn held() -> Held {
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        let slot = Arc::new(PerSource::new(1))
            .try_take(std::net::Ipv4Addr::LOCALHOST.into())
            .unwrap();
        Held {
            _permit: permit,
            _slot: slot,
        }
    }

    #[tokio::test]
    async fn a_peer_that_accepts_nothing_is_dropped_after_the_write_timeout() {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut guarded = Guarded::new(ours, held(), Duration::from_millis(500));
        let started = Instant::now();
        let err = guarded.write_all(&[7u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(500),
            "dropped after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_peer_that_keeps_reading_is_never_dropped() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let timeout = Duration::from_secs(1);
        let mut guarded = Guarded::new(ours, held(), timeout);
        // 24 KiB at 1 KiB every 100 ms: well past the timeout in all, each wait under it.
        let reader = tokio::spawn(async move {
            let mut received = 0;
            let mut buf = [0u8; 1024];
            while received < 24 * 1024 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                received += theirs.read(&mut buf).await.unwrap();
            }
            (received, theirs)
        });
        let started = Instant::now();
        guarded.write_all(&[7u8; 24 * 1024]).await.unwrap();
        guarded.flush().await.unwrap();
        let (received, _theirs) = reader.await.unwrap();
        assert_eq!(received, 24 * 1024);
        assert!(started.elapsed() > 2 * timeout);
        // Then the peer stops reading for good: dropped one timeout after its last read.
        let err = guarded.write_all(&[7u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
