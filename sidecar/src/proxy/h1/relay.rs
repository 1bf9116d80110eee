//! Moving bytes for the native engine: the read buffers (from a per-thread pool, held only
//! while a message is in flight) and a body relay that one task polls alongside the other
//! direction of the exchange. A body is relayed as it is framed (`Content-Length` bytes passed
//! through without a copy), re-chunked (chunked in, chunked out: sizes and data only), chunked
//! from a close-delimited upstream (so an HTTP/1.1 client keeps its connection), or decoded for
//! an HTTP/1.0 client (close-delimited).
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunked::{self, Decoder, Event};

/// The size of a pooled buffer: a request head (most are under 1 KiB; larger ones grow the
/// buffer up to the head limit) or one read of a body.
pub(crate) const BUF: usize = 16 * 1024;
/// Buffers kept per thread for the next message.
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A vector to build a head in, from the thread's spares (no allocation per message); it goes
/// back when dropped.
pub(crate) struct Scratch(Vec<u8>);

pub(crate) fn scratch() -> Scratch {
    Scratch(
        SCRATCH
            .with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(1024)),
    )
}

impl std::ops::Deref for Scratch {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() > 4 * BUF {
            return;
        }
        v.clear();
        SCRATCH.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(v);
            }
        });
    }
}

/// A buffer of [`BUF`] bytes (initialised: reads write into it directly).
fn take_buf() -> Box<[u8]> {
    FREE.with(|f| f.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    if buf.len() != BUF {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP {
            f.push(buf);
        }
    });
}

/// Bytes read from one side and not yet used: `buf[start..end]`. Without a buffer while idle.
/// The offsets are `u32` (a buffer never grows past [`MAX_INBUF`]) and the buffer a boxed
/// slice (its length is its capacity): 16 bytes less in every connection's future.
#[derive(Default)]
pub(crate) struct Inbuf {
    buf: Box<[u8]>,
    start: u32,
    end: u32,
}

/// The most an [`Inbuf`] grows to, whatever `max_header_bytes` says.
const MAX_INBUF: usize = u32::MAX as usize;

impl Inbuf {
    fn start(&self) -> usize {
        self.start as usize
    }

    fn end(&self) -> usize {
        self.end as usize
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start()..self.end()]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn len(&self) -> usize {
        self.end() - self.start()
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        // At most `len()`, which fits.
        self.start += n as u32;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives the buffer back to the thread's pool if nothing is in it (an idle connection
    /// holds none).
    pub(crate) fn release(&mut self) {
        if self.is_empty() && !self.buf.is_empty() {
            give_buf(std::mem::take(&mut self.buf));
        }
    }

    /// True if the buffer is full and holds one unfinished item from its start: growing it is
    /// the only way to read more.
    pub(crate) fn is_full(&self) -> bool {
        !self.buf.is_empty() && self.start == 0 && self.end() == self.buf.len()
    }

    /// Grows the buffer by half a [`BUF`], up to `max` bytes; false if it is that big already (a head
    /// just over one buffer costs half a buffer more, not a whole one).
    pub(crate) fn grow(&mut self, max: usize) -> bool {
        let max = max.min(MAX_INBUF);
        let len = self.buf.len();
        if len >= max {
            return false;
        }
        let mut grown = std::mem::take(&mut self.buf).into_vec();
        grown.resize((len + BUF / 2).min(max), 0);
        self.buf = grown.into_boxed_slice();
        true
    }

    /// Reads more from `src` (after moving what is left to the front); `Ready(Ok(0))` at the
    /// end of the stream. A full buffer (see [`Inbuf::is_full`]) reads nothing: the caller
    /// grows it or gives up.
    pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
    ) -> Poll<io::Result<usize>> {
        if self.buf.is_empty() {
            // Taken only now, and given back below if nothing came: while the peer says
            // nothing, no buffer is held.
            self.buf = take_buf();
        }
        if self.end() == self.buf.len() && self.start > 0 {
            let live = self.start()..self.end();
            self.buf.copy_within(live, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end() == self.buf.len() {
            return Poll::Ready(Err(io::Error::other("buffer full")));
        }
        let end = self.end();
        let mut rb = ReadBuf::new(&mut self.buf[end..]);
        match Pin::new(src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // The buffer is at most MAX_INBUF long: the new end fits.
                self.end += n as u32;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Nothing read: an empty buffer goes back while we wait.
                self.release();
                Poll::Pending
            }
        }
    }
}

impl Drop for Inbuf {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            give_buf(std::mem::take(&mut self.buf));
        }
    }
}

/// How a body arrives.
#[derive(Debug)]
pub(crate) enum Source {
    /// This many bytes are left.
    Length(u64),
    Chunked(Decoder),
    /// Until the sender closes (responses only).
    UntilClose,
    /// A tunnel after `101 Switching Protocols`: until the sender closes, then our write side
    /// is shut down.
    Tunnel,
}

/// How a body leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sink {
    /// As it arrived (length or close delimited, or raw tunnel bytes).
    Same,
    /// Chunked (from chunked or close-delimited input).
    Chunked,
    /// Decoded data, close-delimited (a chunked body to an HTTP/1.0 client).
    Plain,
}

/// Why a relay stopped short.
#[derive(Debug)]
pub(crate) enum Fault {
    /// Reading the sender failed, or it closed before the end of the body.
    Read(io::Error),
    /// The sender's chunked framing is broken.
    Framing(&'static str),
    /// Writing to the receiver failed.
    Write(io::Error),
}

impl Fault {
    fn eof() -> Fault {
        Fault::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the end of the body",
        ))
    }
}

/// One body on its way from a sender to a receiver.
#[derive(Debug)]
pub(crate) struct Body {
    source: Source,
    sink: Sink,
    /// Re-framed bytes waiting to be written: `staged[at..]`.
    staged: Vec<u8>,
    at: usize,
    /// Decoded chunk data of one read, before it is framed.
    scratch: Vec<u8>,
    /// Bytes at the front of the sender's buffer to be written as they are.
    pass: usize,
    /// The whole body has been read (the bytes may still be on their way out).
    read_all: bool,
    /// Our write side of a tunnel has been shut down.
    shut: bool,
    /// Body bytes (decoded) relayed so far.
    pub(crate) moved: u64,
}

impl Body {
    /// A chunked body some of which was read already: `decoded` goes out first (as one chunk),
    /// then the rest as `decoder` finds it.
    pub(crate) fn resumed(decoder: Decoder, decoded: &[u8]) -> Body {
        let mut body = Body::new(Source::Chunked(decoder), Sink::Chunked);
        if !decoded.is_empty() {
            chunked::size_line(&mut body.staged, decoded.len() as u64);
            body.staged.extend_from_slice(decoded);
            body.staged.extend_from_slice(b"\r\n");
        }
        body
    }

    pub(crate) fn new(source: Source, sink: Sink) -> Body {
        Body {
            source,
            sink,
            staged: Vec::new(),
            at: 0,
            scratch: Vec::new(),
            pass: 0,
            read_all: false,
            shut: false,
            moved: 0,
        }
    }

    /// Relays until the body is through (`Ready(Ok)`), or it cannot go on (`Ready(Err)`).
    /// `inbuf` holds what was read from `src` and not used yet: the body starts at its front,
    /// and whatever follows the body stays in it.
    pub(crate) fn poll_relay<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        inbuf: &mut Inbuf,
        src: &mut S,
        dst: &mut D,
    ) -> Poll<Result<(), Fault>>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            while self.at < self.staged.len() {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.staged[self.at..]))
                    .map_err(Fault::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into())));
                }
                self.at += n;
            }
            self.staged.clear();
            self.at = 0;
            while self.pass > 0 {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &inbuf.data()[..self.pass]))
                    .map_err(Fault::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into())));
                }
                inbuf.consume(n);
                self.pass -= n;
            }
            if self.read_all {
                ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(Fault::Write)?;
                if matches!(self.source, Source::Tunnel) && !self.shut {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(Fault::Write)?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            if !inbuf.is_empty() {
                self.take(inbuf)?;
                continue;
            }
            // Everything read so far is out: push it before waiting for more.
            if Pin::new(&mut *dst)
                .poll_flush(cx)
                .map_err(Fault::Write)?
                .is_pending()
            {
                return Poll::Pending;
            }
            match ready!(inbuf.poll_fill(cx, src)) {
                Ok(0) => match self.source {
                    Source::UntilClose | Source::Tunnel => {
                        self.read_all = true;
                        if self.sink == Sink::Chunked {
                            self.staged.extend_from_slice(chunked::LAST_CHUNK);
                        }
                    }
                    _ => return Poll::Ready(Err(Fault::eof())),
                },
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Fault::Read(e))),
            }
        }
    }

    /// Uses what is buffered: marks bytes to pass through, or stages re-framed ones.
    fn take(&mut self, inbuf: &mut Inbuf) -> Result<(), Fault> {
        let data = inbuf.data();
        match &mut self.source {
            Source::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                self.pass = n as usize;
                self.moved += n;
                self.read_all = *left == 0;
            }
            Source::UntilClose | Source::Tunnel => {
                let n = data.len();
                self.moved += n as u64;
                if self.sink == Sink::Chunked {
                    chunked::size_line(&mut self.staged, n as u64);
                    self.staged.extend_from_slice(data);
                    self.staged.extend_from_slice(b"\r\n");
                    inbuf.consume(n);
                } else {
                    self.pass = n;
                }
            }
            Source::Chunked(decoder) => {
                // What one read decodes leaves as one chunk, whatever the sender's chunk sizes
                // (only the data is forwarded; a decoder picked up mid-chunk is fine).
                let mut decoded = std::mem::take(&mut self.scratch);
                decoded.clear();
                let used = decoder
                    .decode(data, |event| {
                        if let Event::Data(s, e) = event {
                            decoded.extend_from_slice(&data[s..e]);
                        }
                    })
                    .map_err(Fault::Framing)?;
                self.moved += decoded.len() as u64;
                match self.sink {
                    Sink::Chunked => {
                        if !decoded.is_empty() {
                            chunked::size_line(&mut self.staged, decoded.len() as u64);
                            self.staged.extend_from_slice(&decoded);
                            self.staged.extend_from_slice(b"\r\n");
                        }
                        if decoder.is_done() {
                            self.staged.extend_from_slice(chunked::LAST_CHUNK);
                        }
                    }
                    _ => self.staged.extend_from_slice(&decoded),
                }
                self.scratch = decoded;
                self.read_all = decoder.is_done();
                inbuf.consume(used);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays `input` (given to the relay in pieces of `step` bytes) and returns what came out
    /// and what was left in the buffer.
    async fn relay(source: Source, sink: Sink, input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut tx, mut rx) = tokio::io::duplex(step);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(step) {
                tx.write_all(piece).await.unwrap();
            }
            tx
        });
        let mut out = Vec::new();
        let mut inbuf = Inbuf::default();
        let mut body = Body::new(source, sink);
        let result =
            std::future::poll_fn(|cx| body.poll_relay(cx, &mut inbuf, &mut rx, &mut out)).await;
        if result.is_err() {
            return (b"ERR".to_vec(), Vec::new());
        }
        drop(writer);
        (out, inbuf.data().to_vec())
    }

    #[tokio::test]
    async fn bodies_are_reframed_and_end_exactly() {
        let chunked = b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nt: 1\r\n\r\nNEXT";
        for step in [1, 2, 5, 64] {
            let (out, rest) = relay(
                Source::Chunked(Decoder::default()),
                Sink::Chunked,
                chunked,
                step,
            )
            .await;
            // Re-chunked as it was read: the same data, strictly framed, ending exactly.
            let mut again = Vec::new();
            let mut d = Decoder::default();
            let used = d
                .decode(&out, |e| {
                    if let Event::Data(s, e) = e {
                        again.extend_from_slice(&out[s..e]);
                    }
                })
                .unwrap();
            assert!(d.is_done() && used == out.len(), "step {step}: {out:?}");
            assert_eq!(again, b"abcde", "step {step}");
            assert!(
                !out.windows(2).any(|w| w == b";x"),
                "no extensions: {out:?}"
            );
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
            let (out, _) = relay(
                Source::Chunked(Decoder::default()),
                Sink::Plain,
                chunked,
                step,
            )
            .await;
            assert_eq!(out, b"abcde", "step {step}");
            let (out, rest) = relay(Source::Length(5), Sink::Same, b"helloNEXT", step).await;
            assert_eq!(out, b"hello", "step {step}");
            assert!(b"NEXT".starts_with(&rest));
        }
        let (out, _) = relay(
            Source::Chunked(Decoder::default()),
            Sink::Chunked,
            b"3\nabc\r\n0\r\n\r\n",
            4,
        )
        .await;
        assert_eq!(out, b"ERR");
    }
}
