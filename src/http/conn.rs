//! One connection, before hyper sees it: the request head is read here, under limits, and only
//! a complete, well-formed head is handed to hyper (with the bytes already read put back in
//! front of the stream by [`Prefixed`]).
//!
//! Why not let hyper read it: hyper answers a head it cannot take (400, 414, 431) with an
//! empty body and no hook to change that, and its header timeout cannot tell the probes apart
//! from a flood of slow clients. Here:
//! - a head must arrive whole within [`HEAD_TIMEOUT`] of the connection's accept;
//! - at most [`PENDING_MAX`] connections may be waiting for their head; when one more arrives,
//!   the one that has waited longest is closed ([`Pending`]). A probe sends its head in one
//!   packet and leaves this state at once, so slow clients — even hundreds of them from one
//!   address — only ever push each other out;
//! - the memory a waiting head holds grows with the bytes received, up to [`HEAD_MAX`];
//! - a head hyper would refuse (bad syntax, a request target over [`TARGET_MAX`], a head over
//!   [`HEAD_MAX`] or with more than [`HEADERS_MAX`] fields, a malformed or ambiguous
//!   `Content-Length`/`Transfer-Encoding`) is refused here, with the application's envelope.

use std::collections::BTreeMap;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::StatusCode;
use hyper::header::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::reply::STALL_MAX;

/// A request head must arrive whole within this time of the accept.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections waiting for their request head.
pub const PENDING_MAX: usize = 128;
/// The largest request head.
pub const HEAD_MAX: usize = 16 * 1024;
/// The longest request target (path and query).
pub const TARGET_MAX: usize = 8 * 1024;
/// The most header fields in one request.
pub const HEADERS_MAX: usize = 64;

/// What reading a head gave.
pub enum Head {
    /// A complete head that hyper will accept; every byte read so far (the head and maybe
    /// the start of a body).
    Ready(Bytes),
    /// A head that is refused: the answer's status and message, and what is known of the
    /// request for the log.
    Refused(Refused),
    /// The client closed the connection, or sent nothing that could be answered.
    Gone,
}

pub struct Refused {
    pub status: StatusCode,
    pub msg: String,
    pub method: String,
    pub path: String,
    pub request_id: Option<String>,
}

/// Reads from `stream` until a request head is complete or refused.
pub async fn read_head(stream: &mut TcpStream) -> Head {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match judge(&buf) {
            Some(Ok(())) => return Head::Ready(Bytes::from(buf)),
            Some(Err(refused)) => return Head::Refused(refused),
            None => {}
        }
    }
}

/// `None` while the head is incomplete (and within limits).
fn judge(buf: &[u8]) -> Option<Result<(), Refused>> {
    let mut fields = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut fields);
    let parsed = req.parse(buf);
    let method = req.method.unwrap_or("").to_string();
    let path = req.path.unwrap_or("").to_string();
    let refuse = |status: StatusCode, msg: String| {
        Some(Err(Refused {
            status,
            msg,
            method: method.clone(),
            path: path.clone(),
            request_id: scan_request_id(buf),
        }))
    };
    match parsed {
        Ok(httparse::Status::Partial) => {
            let line_end = buf.iter().position(|&b| b == b'\n');
            if line_end.unwrap_or(buf.len()) > TARGET_MAX + 32 {
                return refuse(
                    StatusCode::URI_TOO_LONG,
                    format!(
                        "the request target is longer than {} KiB",
                        TARGET_MAX / 1024
                    ),
                );
            }
            if buf.len() > HEAD_MAX {
                return refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("the request head is larger than {} KiB", HEAD_MAX / 1024),
                );
            }
            None
        }
        Err(httparse::Error::TooManyHeaders) => refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("more than {HEADERS_MAX} header fields"),
        ),
        Err(e) => refuse(
            StatusCode::BAD_REQUEST,
            format!("malformed request head: {e}"),
        ),
        Ok(httparse::Status::Complete(head_len)) => {
            if head_len > HEAD_MAX {
                return refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("the request head is larger than {} KiB", HEAD_MAX / 1024),
                );
            }
            if path.len() > TARGET_MAX {
                return refuse(
                    StatusCode::URI_TOO_LONG,
                    format!(
                        "the request target is longer than {} KiB",
                        TARGET_MAX / 1024
                    ),
                );
            }
            match check_fields(&req) {
                Ok(()) => Some(Ok(())),
                Err(msg) => refuse(StatusCode::BAD_REQUEST, msg.into()),
            }
        }
    }
}

/// The `X-Request-Id` of a head that did not parse, looked for line by line.
fn scan_request_id(buf: &[u8]) -> Option<String> {
    buf.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"x-request-id")
            .then(|| String::from_utf8_lossy(value[1..].trim_ascii()).into_owned())
    })
}

/// What hyper would refuse in a complete head, refused here first.
fn check_fields(req: &httparse::Request<'_, '_>) -> Result<(), &'static str> {
    let version = req.version.unwrap_or(1);
    if hyper::Method::from_bytes(req.method.unwrap_or("").as_bytes()).is_err() {
        return Err("malformed request head: invalid method");
    }
    if req.path.unwrap_or("").parse::<hyper::Uri>().is_err() {
        return Err("malformed request target");
    }
    let mut length: Option<&[u8]> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if HeaderName::from_bytes(h.name.as_bytes()).is_err()
            || HeaderValue::from_bytes(h.value).is_err()
        {
            return Err("malformed header field");
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) || value.len() > 18 {
                return Err("Content-Length is not a number");
            }
            if length.is_some_and(|l| l != value) {
                return Err("two different Content-Length values");
            }
            length = Some(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            if version == 0 || !last.trim_ascii().eq_ignore_ascii_case(b"chunked") || chunked {
                return Err("unsupported Transfer-Encoding (only chunked, on HTTP/1.1)");
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    Ok(())
}

/// The connections waiting on their client — for their request head, or for the body the
/// one body-taking route reads — oldest first. Entering when full closes the oldest one (its
/// task sees its receiver end).
#[derive(Default)]
pub struct Pending {
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

/// A place among the waiting connections; leaving it (drop) frees it.
pub struct PendingGuard {
    pending: Arc<Pending>,
    seq: u64,
}

impl Pending {
    /// Takes a place, pushing out the oldest waiter when all are taken. The receiver
    /// resolves when this connection is pushed out in turn.
    pub fn enter(self: &Arc<Self>) -> (PendingGuard, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while inner.waiting.len() >= PENDING_MAX {
            // Dropping its sender wakes the oldest waiter, which closes its connection.
            inner.waiting.pop_first();
        }
        let seq = inner.next;
        inner.next += 1;
        inner.waiting.insert(seq, tx);
        (
            PendingGuard {
                pending: self.clone(),
                seq,
            },
            rx,
        )
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut inner = self.pending.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.waiting.remove(&self.seq);
    }
}

/// Writes a whole answer to a connection hyper never saw, then closes it the way HTTP
/// servers do ("lingering close"): stop sending, read and drop what the client still sends
/// for a moment, so that the client reads the answer instead of a reset.
pub async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
    let write = async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(2), write).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while total < 256 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// The connection's stream with the bytes already read in front of it, and a guard on the
/// writes: a client that takes no byte of its answer for [`STALL_MAX`] is cut off (the write
/// fails, hyper drops the connection), so clients that stop reading cannot hold the port's
/// connection slots.
pub struct Prefixed<S = TcpStream> {
    prefix: Bytes,
    stream: S,
    /// Running while a write waits for the client; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, stream: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            stream,
            stalled: None,
        }
    }

    /// `polled` as it is, unless the client has taken nothing for [`STALL_MAX`].
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stall = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(STALL_MAX)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of its answer for 30 s",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(raw: &[u8]) -> Option<StatusCode> {
        match judge(raw) {
            None => None,
            Some(Ok(())) => Some(StatusCode::OK),
            Some(Err(r)) => Some(r.status),
        }
    }

    #[test]
    fn heads_are_judged_like_hyper_would() {
        assert_eq!(status(b"GET /livez HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            status(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(StatusCode::OK)
        );
        assert_eq!(
            status(b"GET /livez HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(b"G\x01T / HTTP/1.1\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(TARGET_MAX + 100));
        assert_eq!(status(long.as_bytes()), Some(StatusCode::URI_TOO_LONG));
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(b"X-A: ".iter().chain(&[b'a'; HEAD_MAX]));
        assert_eq!(
            status(&big),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // A head over the limit that completes in the read that crosses it.
        big.extend(b"\r\n\r\n");
        assert_eq!(
            status(&big),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let many: String = (0..HEADERS_MAX + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            status(many.as_bytes()),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn a_full_waiting_list_pushes_out_the_oldest() {
        let pending = Arc::new(Pending::default());
        let (first, mut first_rx) = pending.enter();
        let mut rest: Vec<_> = (1..PENDING_MAX).map(|_| pending.enter()).collect();
        assert!(
            first_rx
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        let newest = pending.enter();
        assert_eq!(
            first_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest was pushed out"
        );
        assert!(
            rest[0]
                .1
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        drop(first);
        drop(newest);
        rest.clear();
        assert!(pending.inner.lock().unwrap().waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_for_stall_max_is_cut_off() {
        let (server, mut client) = tokio::io::duplex(1024);
        let mut conn = Prefixed::new(Bytes::new(), server);
        // The client reads a little, then nothing: the writes fill the pipe and wait.
        conn.write_all(&[b'x'; 1024]).await.unwrap();
        let mut some = [0u8; 512];
        client.read_exact(&mut some).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = tokio::time::timeout(STALL_MAX * 4, conn.write_all(&[b'y'; 4096]))
            .await
            .expect("the write gives up by itself")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Counted from the last byte the client took, not from the first write.
        assert_eq!(started.elapsed(), STALL_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_not_cut_off() {
        let (server, mut client) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut chunk = [0u8; 256];
            loop {
                tokio::time::sleep(STALL_MAX / 2).await;
                match client.read(&mut chunk).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let mut conn = Prefixed::new(Bytes::new(), server);
        conn.write_all(&[b'x'; 4096]).await.unwrap();
        conn.shutdown().await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), 4096);
    }
}
