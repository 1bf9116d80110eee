//! The body of a server-streaming answer: one JSON document per line
//! (`application/x-ndjson`), written as the app's messages arrive.
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::grpc::{Deframer, StatusBody};
use super::{Route, Transcoder};

/// The body of a server-streaming answer: each message the app sends becomes one JSON line as
/// it arrives; a failing status after the first message becomes a last line
/// `{"error":{"code":..,"message":..,"details":[..]}}`. An upstream that breaks off is an error
/// of this body (the HTTP/1 answer is cut short: no final chunk).
pub struct Streamed {
    upstream: Incoming,
    deframer: Deframer,
    transcoder: Arc<Transcoder>,
    route: usize,
    pending: VecDeque<Bytes>,
    done: bool,
    /// The gRPC status the stream ended with, once it has (for the metrics).
    on_end: Option<Box<dyn FnOnce(u32) + Send + Sync>>,
}

impl Streamed {
    /// `first` are the lines already read (at least the first message).
    pub fn new(
        upstream: Incoming,
        deframer: Deframer,
        transcoder: Arc<Transcoder>,
        route: usize,
        first: Vec<Bytes>,
        on_end: Box<dyn FnOnce(u32) + Send + Sync>,
    ) -> Streamed {
        Streamed {
            upstream,
            deframer,
            transcoder,
            route,
            pending: first.into(),
            done: false,
            on_end: Some(on_end),
        }
    }

    fn route(&self) -> &Route {
        &self.transcoder.routes()[self.route]
    }

    fn end(&mut self, status: StatusBody) {
        if status.code != 0 {
            let mut line = b"{\"error\":".to_vec();
            line.extend_from_slice(&self.transcoder.status_body(&status));
            line.extend_from_slice(b"}\n");
            self.pending.push_back(Bytes::from(line));
        }
        self.done = true;
        if let Some(f) = self.on_end.take() {
            f(status.code);
        }
    }

    /// Turns the messages now complete into lines.
    fn drain(&mut self) {
        loop {
            match self.deframer.next_message() {
                Ok(Some(msg)) => match line(&self.transcoder, self.route(), &msg) {
                    Ok(json) => self.pending.push_back(json),
                    Err(e) => return self.end(StatusBody::new(13, e)),
                },
                Ok(None) => return,
                Err(e) => return self.end(StatusBody::new(13, e)),
            }
        }
    }
}

/// One JSON line per message: `message` (a whole gRPC message) as the route says.
pub fn line(transcoder: &Transcoder, route: &Route, message: &[u8]) -> Result<Bytes, String> {
    let mut json = transcoder.response_json(route, message)?;
    json.push(b'\n');
    Ok(Bytes::from(json))
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(line) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(line))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.deframer.push(&data);
                        this.drain();
                    }
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(StatusBody::from_headers)
                            .unwrap_or_else(|| {
                                StatusBody::new(13, "the app's trailers carry no grpc-status")
                            });
                        this.end(status);
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    if let Some(f) = this.on_end.take() {
                        f(14);
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let why = if this.deframer.is_empty() {
                        "the app ended the stream without a status"
                    } else {
                        "the app ended the stream inside a message"
                    };
                    this.end(StatusBody::new(13, why));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
