//! A minimal WebSocket client (RFC 6455), enough to speak the Chrome DevTools Protocol:
//! `ws://` only, text messages, client frames masked, fragmented messages reassembled,
//! 7/16/64-bit payload lengths both ways, pings answered, close reported as an error.
//!
//! The handshake uses the RFC's sample key, whose `Sec-WebSocket-Accept` is known, so no SHA-1
//! is needed; a fixed key is fine for a test client (it only guards against caches).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

/// The RFC 6455 §1.3 sample key and the accept value a server must answer for it.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The receiving side (owns the buffered reader); [`WebSocket::sender`] hands out the sending
/// side, so one thread can block in [`WebSocket::recv_text`] while others send.
pub struct WebSocket {
    reader: BufReader<TcpStream>,
    sender: WsSender,
}

/// The sending side: cheap to clone, frames from several threads never interleave.
#[derive(Clone)]
pub struct WsSender(Arc<Mutex<SendState>>);

struct SendState {
    stream: TcpStream,
    /// State of the masking-key generator (xorshift; masks need not be secret here).
    mask_state: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl WebSocket {
    /// Connects to `ws://host:port/path` and completes the opening handshake.
    pub fn connect(url: &str) -> io::Result<WebSocket> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| invalid(format!("not a ws:// URL: {url}")))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        write!(
            writer,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        // The response head, line by line: the buffered reader keeps any frame bytes that
        // follow it for `recv_text`.
        let mut status = String::new();
        reader.read_line(&mut status)?;
        if status.split_whitespace().nth(1) != Some("101") {
            return Err(invalid(format!("handshake refused: {}", status.trim())));
        }
        let mut accept = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(invalid("connection closed during the handshake"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("sec-websocket-accept") {
                    accept = Some(v.trim().to_string());
                }
            }
        }
        if accept.as_deref() != Some(ACCEPT) {
            return Err(invalid(format!("bad Sec-WebSocket-Accept: {accept:?}")));
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(WebSocket {
            reader,
            sender: WsSender(Arc::new(Mutex::new(SendState {
                stream: writer,
                mask_state: seed | 1,
            }))),
        })
    }

    /// A handle for sending from any thread.
    pub fn sender(&self) -> WsSender {
        self.sender.clone()
    }
}

impl WsSender {
    /// Sends one unfragmented, masked frame.
    fn send_frame(&self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode); // FIN
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mask = state.next_mask();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        state.stream.write_all(&frame)
    }

    pub fn send_text(&self, text: &str) -> io::Result<()> {
        self.send_frame(OP_TEXT, text.as_bytes())
    }

    /// Shuts the socket down both ways: a thread blocked in `recv_text` returns an error.
    pub fn shutdown(&self) {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = state.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl SendState {
    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_state = x;
        (x as u32).to_be_bytes()
    }
}

impl WebSocket {
    /// Reads one frame: (fin, opcode, payload), unmasked.
    fn read_frame(&mut self) -> io::Result<(bool, u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.reader.read_exact(&mut head)?;
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0F;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                self.reader.read_exact(&mut b)?;
                u16::from_be_bytes(b) as u64
            }
            127 => {
                let mut b = [0u8; 8];
                self.reader.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => n as u64,
        };
        let mask = if masked {
            let mut m = [0u8; 4];
            self.reader.read_exact(&mut m)?;
            Some(m)
        } else {
            None
        };
        let len = usize::try_from(len).map_err(|_| invalid("frame too large"))?;
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload)?;
        if let Some(m) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= m[i % 4]);
        }
        Ok((fin, opcode, payload))
    }

    /// The next complete text (or binary, decoded as UTF-8) message. Pings are answered on
    /// the way; a close frame is answered and returned as `ConnectionAborted`.
    pub fn recv_text(&mut self) -> io::Result<String> {
        let mut message: Vec<u8> = Vec::new();
        let mut in_message = false;
        loop {
            let (fin, opcode, payload) = self.read_frame()?;
            match opcode {
                OP_TEXT | OP_BINARY => {
                    if in_message {
                        return Err(invalid("a new message started inside a fragmented one"));
                    }
                    in_message = true;
                    message = payload;
                }
                OP_CONTINUATION => {
                    if !in_message {
                        return Err(invalid("continuation frame without a message"));
                    }
                    message.extend_from_slice(&payload);
                }
                OP_PING => {
                    self.sender.send_frame(OP_PONG, &payload)?;
                    continue;
                }
                OP_PONG => continue,
                OP_CLOSE => {
                    let _ = self.sender.send_frame(OP_CLOSE, &payload);
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server closed the WebSocket",
                    ));
                }
                other => return Err(invalid(format!("unknown opcode {other:#x}"))),
            }
            if fin {
                return String::from_utf8(message).map_err(|_| invalid("message is not UTF-8"));
            }
        }
    }
}
