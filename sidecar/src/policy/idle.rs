//! The idle timeout of byte relays (opaque TCP, upgraded connections): `copy_bidirectional`
//! that gives up when no byte moved either way for the idle time.
//!
//! Activity is a timestamp updated on every successful read, on either side; a timer sleeps until
//! "last activity + idle" and re-arms if something moved meanwhile. So an active relay pays one
//! clock read per read call and one timer wake-up per idle period, nothing per byte.
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a relay ended.
#[derive(Debug)]
pub enum Relayed {
    /// Both sides finished (or one failed): bytes a -> b and b -> a, or the error.
    Done(io::Result<(u64, u64)>),
    /// Nothing moved for the idle time; both sides are dropped by the caller.
    Idle,
}

struct Activity<'a, S> {
    inner: &'a mut S,
    origin: Instant,
    last: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let nanos = u64::try_from(this.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            this.last.store(nanos, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Relays between `a` and `b` like `tokio::io::copy_bidirectional` (half-closes included), until
/// both sides are done or nothing moved for `idle`.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let origin = Instant::now();
    let last = AtomicU64::new(0);
    let mut a = Activity {
        inner: a,
        origin,
        last: &last,
    };
    let mut b = Activity {
        inner: b,
        origin,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let seen = last.load(Ordering::Relaxed);
        let deadline = origin + Duration::from_nanos(seen) + idle;
        tokio::select! {
            done = &mut copy => return Relayed::Done(done),
            _ = tokio::time::sleep_until(deadline) => {
                if last.load(Ordering::Relaxed) == seen {
                    return Relayed::Idle;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends_after_the_idle_time_and_not_before() {
        let (mut a_far, mut a) = duplex(64);
        let (mut b, mut b_far) = duplex(64);
        let idle = Duration::from_secs(10);
        let start = Instant::now();
        let relay = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, idle).await });

        // Traffic at 6 s and 12 s keeps it alive past the first 10 s.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            a_far.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            b_far.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
        }
        let ended = relay.await.unwrap();
        assert!(matches!(ended, Relayed::Idle), "{ended:?}");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(22),
            "10 s after the last byte"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn finished_relay_reports_its_bytes() {
        let (mut a_far, mut a) = duplex(64);
        let (mut b, mut b_far) = duplex(64);
        let relay = tokio::spawn(async move {
            copy_bidirectional(&mut a, &mut b, Duration::from_secs(60)).await
        });
        a_far.write_all(b"hello").await.unwrap();
        a_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        b_far.shutdown().await.unwrap();
        match relay.await.unwrap() {
            Relayed::Done(Ok((5, 0))) => {}
            other => panic!("{other:?}"),
        }
    }
}
