//! The accept loop: how many connections are held at once (in all and per source
//! address), how long a peer may take to send a request's headers or sit idle between
//! requests, and how long it may refuse the bytes it is sent. hyper serves each
//! connection; nothing else in the server sees a raw socket.

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_io_timeout::TimeoutStream;
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
                    let io = Counted::new(with_write_timeout(tcp, limits.write_timeout), held);
                    serve_connection(io, peer, router, limits, shutdown).await;
                }
                Some(tls) => {
                    let wrap =
                        |tcp| Counted::new(with_write_timeout(tcp, limits.write_timeout), held);
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

fn with_write_timeout(tcp: TcpStream, timeout: Duration) -> Pin<Box<TimeoutStream<TcpStream>>> {
    let mut stream = TimeoutStream::new(tcp);
    stream.set_write_timeout(Some(timeout));
    Box::pin(stream)
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

/// A connection's IO together with its places under the caps, given back when the
/// connection is dropped (after an upgrade, when the WebSocket session ends).
struct Counted<I> {
    io: I,
    _held: Held,
}

impl<I> Counted<I> {
    fn new(io: I, held: Held) -> Counted<I> {
        Counted { io, _held: held }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
