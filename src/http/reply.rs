//! Building responses: the application's `{"code","msg","data"}` envelope, plain JSON,
//! streamed bodies, and [`quote`] for any input a message repeats.
//!
//! Invariant: an envelope's `msg` is one line — [`envelope`] escapes any control character
//! that reaches it — and input quoted in it is cut to [`QUOTE_MAX`] characters.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, Incomplete>;

/// A streamed body whose writer stopped before the end (the client stopped reading, or the
/// write failed). hyper then aborts the connection instead of ending the body, so a client
/// never takes a cut-off download for a whole one.
#[derive(Debug, thiserror::Error)]
#[error("the answer stopped before its end")]
pub struct Incomplete;

pub const JSON: &str = "application/json; charset=utf-8";

/// A response with `body` and `content_type`, not cacheable (every answer here is live).
pub fn bytes(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, header(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `value` as JSON.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => bytes(status, JSON, body),
        Err(e) => envelope_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}"),
        ),
    }
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    code: u16,
    msg: &'a str,
    data: Option<T>,
}

/// `{"code": 200, "msg": "ok", "data": …}` with HTTP 200.
pub fn ok(data: &impl Serialize) -> Response<Body> {
    json(
        StatusCode::OK,
        &Envelope {
            code: 200,
            msg: "ok",
            data: Some(data),
        },
    )
}

/// `{"code": <status>, "msg": "<msg>", "data": null}` with that HTTP status.
pub fn envelope_error(status: StatusCode, msg: &str) -> Response<Body> {
    envelope(status, msg, None::<&()>)
}

/// `{"code": <status>, "msg": "<msg>", "data": <data>}` with that HTTP status.
pub fn envelope(status: StatusCode, msg: &str, data: Option<&impl Serialize>) -> Response<Body> {
    bytes(status, JSON, envelope_bytes(status, msg, data))
}

/// The envelope's JSON text (also written by hand for requests hyper never sees).
pub fn envelope_bytes(status: StatusCode, msg: &str, data: Option<&impl Serialize>) -> Vec<u8> {
    let msg = escape_controls(msg);
    serde_json::to_vec(&Envelope {
        code: status.as_u16(),
        msg: &msg,
        data,
    })
    .unwrap_or_else(|_| {
        format!(
            "{{\"code\":{},\"msg\":\"cannot encode the answer\",\"data\":null}}",
            status.as_u16()
        )
        .into_bytes()
    })
}

/// The most characters of client input a message repeats.
pub const QUOTE_MAX: usize = 100;

/// Client input for a message: at most [`QUOTE_MAX`] characters (`…` marks a cut), control
/// characters escaped, in backquotes.
pub fn quote(input: &str) -> String {
    let mut out = String::from("`");
    for (i, c) in input.chars().enumerate() {
        if i == QUOTE_MAX {
            out.push('…');
            break;
        }
        push_escaped(&mut out, c);
    }
    out.push('`');
    out
}

fn escape_controls(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.chars().any(char::is_control) {
        return msg.into();
    }
    let mut out = String::with_capacity(msg.len() + 8);
    msg.chars().for_each(|c| push_escaped(&mut out, c));
    out.into()
}

fn push_escaped(out: &mut String, c: char) {
    if c.is_control() {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

pub fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// A JSON answer (200, not cacheable) written by `write` on the blocking pool as the client
/// takes it; the body ends only when `write` has written it all (see [`channel`]).
pub fn streamed_json(
    write: impl FnOnce(&mut ChannelWriter) -> std::io::Result<()> + Send + 'static,
) -> Response<Body> {
    let (mut out, body) = channel();
    tokio::task::spawn_blocking(move || {
        // A client that goes away ends the write, and the body with an error.
        if write(&mut out).is_ok() {
            let _ = out.finish();
        }
    });
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// A streamed answer: the [`ChannelWriter`] that writes it on the blocking pool and the body
/// hyper sends, chunk by chunk (the export of 100,000 mappings never sits in memory whole).
/// Nothing but [`ChannelWriter::finish`] ends the body; a writer dropped before it makes the
/// body fail with [`Incomplete`].
fn channel() -> (ChannelWriter, Body) {
    let (tx, rx) = mpsc::channel(4);
    let finished = Arc::new(AtomicBool::new(false));
    let writer = ChannelWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
        runtime: tokio::runtime::Handle::current(),
        finished: finished.clone(),
    };
    (writer, ChannelBody { rx, finished }.boxed())
}

struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    finished: Arc<AtomicBool>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Incomplete;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Incomplete>>> {
        self.rx.poll_recv(cx).map(|chunk| match chunk {
            Some(bytes) => Some(Ok(Frame::data(bytes))),
            // The writer is gone: the end only if it said so.
            None if self.finished.load(Ordering::Acquire) => None,
            None => Some(Err(Incomplete)),
        })
    }
}

/// An `io::Write` that sends what is written, in chunks, to its body (see [`channel`]). For
/// use on the blocking pool only: it blocks while the client is slower than the writer, and
/// gives up when the client has taken nothing for [`STALL_MAX`] (a client that stops reading
/// must not hold a blocking thread for ever).
pub struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    runtime: tokio::runtime::Handle,
    finished: Arc<AtomicBool>,
}

const CHUNK: usize = 64 * 1024;
/// The longest a download may wait for its client to take the next chunk; also the longest
/// a connection may wait for its client to take any byte (`conn::Prefixed`).
pub const STALL_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl ChannelWriter {
    /// Sends what is left and ends the body: the client gets a complete answer.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.send()?;
        self.finished.store(true, Ordering::Release);
        Ok(())
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.runtime
            .block_on(self.tx.send_timeout(chunk, STALL_MAX))
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the client went away or stopped reading",
                )
            })
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_input_is_cut_and_escaped() {
        assert_eq!(quote("a\nb"), "`a\\nb`");
        let long = "x".repeat(60_000);
        assert_eq!(quote(&long).chars().count(), QUOTE_MAX + 3);
        let body = envelope_bytes(StatusCode::BAD_REQUEST, "line\r\nnext", None::<&()>);
        let text = String::from_utf8(body).unwrap();
        assert!(
            !text.contains('\n') && text.contains("line\\\\r\\\\nnext"),
            "{text}"
        );
    }

    /// Every frame of `body`, and how it ended.
    async fn drain(mut body: Body) -> (Vec<u8>, Result<(), Incomplete>) {
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => return (got, Err(e)),
            }
        }
        (got, Ok(()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_answer_ends_only_when_its_writer_finishes() {
        use std::io::Write as _;
        let (mut w, body) = channel();
        let writer = tokio::task::spawn_blocking(move || {
            w.write_all(&[b'x'; 200_000])?;
            w.finish()
        });
        let (got, end) = drain(body).await;
        assert!(writer.await.unwrap().is_ok());
        assert_eq!((got.len(), end.is_ok()), (200_000, true));

        // A writer that stops half-way (its client stalled, or the write failed): the body
        // fails, so hyper aborts the connection rather than ending a cut-off download well.
        let (mut w, body) = channel();
        let writer = tokio::task::spawn_blocking(move || w.write_all(&[b'x'; 200_000]));
        let (got, end) = drain(body).await;
        assert!(writer.await.unwrap().is_ok());
        assert!(end.is_err(), "{} bytes, then a clean end", got.len());
    }
}
