//! Per-connection accounting: the opened/closed/active counters, the byte counters, and the count
//! of open connections per direction that the drain waits on.
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::{ConnMetrics, Dir, ProxyMetrics};

/// How many downstream connections of one direction a proxy has open, and a wake-up when that
/// reaches zero (the drain waits for it). Per proxy, unlike the metrics, which are per registry.
/// It also holds where the direction's connection metrics are, so that a [`ConnGuard`] (held by
/// every connection for its whole life) is one pointer.
pub struct ActiveConns {
    count: AtomicUsize,
    idle: Notify,
    metrics: Arc<ProxyMetrics>,
    dir: Dir,
}

impl ActiveConns {
    pub fn new(metrics: &Arc<ProxyMetrics>, dir: Dir) -> ActiveConns {
        ActiveConns {
            count: AtomicUsize::new(0),
            idle: Notify::new(),
            metrics: Arc::clone(metrics),
            dir,
        }
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once no connection is open (at once if none is).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between check and await is not missed.
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One accepted downstream connection, from accept to close (dropping it closes the books).
pub struct ConnGuard {
    active: Arc<ActiveConns>,
}

impl ConnGuard {
    pub fn open(active: &Arc<ActiveConns>) -> ConnGuard {
        let m = active.metrics.conns(active.dir);
        m.opened.inc();
        m.active.inc();
        active.count.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            active: Arc::clone(active),
        }
    }

    fn books(&self) -> &ConnMetrics {
        self.active.metrics.conns(self.active.dir)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let m = self.books();
        m.closed.inc();
        m.active.dec();
        if self.active.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.active.idle.notify_waiters();
        }
    }
}

/// The downstream socket, counting bytes as they pass, and holding the connection's [`ConnGuard`]
/// so that the connection counts as open for as long as its socket lives (an upgraded HTTP
/// connection moves the socket into a tunnel that outlives the HTTP task).
pub struct CountedIo<T> {
    io: T,
    conn: ConnGuard,
}

impl<T> CountedIo<T> {
    pub fn new(io: T, conn: ConnGuard) -> Self {
        CountedIo { io, conn }
    }

    /// The socket and the connection's books, apart (a parked connection keeps both).
    pub fn into_parts(self) -> (T, ConnGuard) {
        (self.io, self.conn)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.conn.books().received.inc_by(n as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.conn.books().sent.inc_by(n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.conn.books().sent.inc_by(n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_and_connections_are_counted() {
        let metrics = ProxyMetrics::unregistered();
        let active = Arc::new(ActiveConns::new(&metrics, Dir::Outbound));
        let (a, mut b) = tokio::io::duplex(64);
        let guard = ConnGuard::open(&active);
        assert_eq!(active.get(), 1);
        let mut io = CountedIo::new(a, guard);
        io.write_all(b"hello").await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        let m = metrics.conns(Dir::Outbound);
        assert_eq!((m.sent.get(), m.received.get()), (5, 2));
        assert_eq!((m.opened.get(), m.active.get()), (1, 1));
        let waiter = {
            let active = Arc::clone(&active);
            tokio::spawn(async move { active.wait_idle().await })
        };
        drop(io);
        waiter.await.unwrap();
        assert_eq!((m.closed.get(), m.active.get(), active.get()), (1, 0, 0));
    }
}
