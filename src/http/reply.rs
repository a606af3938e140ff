//! Building responses: the application's `{"code","msg","data"}` envelope, plain JSON,
//! streamed bodies, and [`quote`] for any input a message repeats.
//!
//! Invariant: an envelope's `msg` is one line — [`envelope`] escapes any control character
//! that reaches it — and input quoted in it is cut to [`QUOTE_MAX`] characters.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, Infallible>;

pub const JSON: &str = "application/json; charset=utf-8";

/// A response with `body` and `content_type`, not cacheable (every answer here is live).
pub fn bytes(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
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

/// A body fed chunk by chunk through a channel, for answers written on the blocking pool
/// (the export of 100,000 mappings never sits in memory whole).
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// An `io::Write` that sends what is written, in chunks, to a [`ChannelBody`]. For use on the
/// blocking pool only: it blocks while the client is slower than the writer, and gives up
/// when the client has taken nothing for [`STALL_MAX`] (a client that stops reading must not
/// hold a blocking thread for ever).
pub struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    runtime: tokio::runtime::Handle,
}

const CHUNK: usize = 64 * 1024;
/// The longest a download may wait for its client to take the next chunk.
pub const STALL_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl ChannelWriter {
    /// Must be called within the runtime (the blocking pool is).
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            runtime: tokio::runtime::Handle::current(),
        }
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
}
