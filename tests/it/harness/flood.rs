//! Hostile clients for the admin port, from loopback, bounded in count and time: slow
//! clients that send a request head byte by byte and reconnect when cut off
//! ([`slow_heads`]), clients that declare a body and trickle it ([`trickle`]), a `/livez`
//! probe that measures each answer ([`probe`]), and the daemon's resident memory
//! ([`rss_kib`]). Shared by `tests/hardening.rs` and the benchmark.
//!
//! Every client set runs on one thread of its own with non-blocking sockets, round-robin;
//! it stops when its [`Flood`] is stopped or dropped, or at its deadline, whichever comes
//! first.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running set of hostile clients.
pub struct Flood {
    stop: Arc<AtomicBool>,
    /// Connections opened so far (the first ones and every reconnect).
    connects: Arc<AtomicU64>,
    /// Bytes written so far.
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// What a set of floods did: connections opened and bytes sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub connects: u64,
    pub bytes: u64,
}

/// Stops every flood and adds up what they did.
pub fn stop_all(floods: impl IntoIterator<Item = Flood>) -> Totals {
    let mut t = Totals::default();
    for mut f in floods {
        f.halt();
        t.connects += f.connects.load(Ordering::Relaxed);
        t.bytes += f.bytes.load(Ordering::Relaxed);
    }
    t
}

impl Flood {
    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `n` clients that each send `first` whole on connecting, then `then` (cycled) one byte
/// every `every`, and start again on a new connection whenever the server answers or closes
/// theirs; for at most `limit`.
fn run(
    addr: SocketAddr,
    n: usize,
    first: Vec<u8>,
    then: Vec<u8>,
    every: Duration,
    limit: Duration,
) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let (s, c, b) = (stop.clone(), connects.clone(), bytes.clone());
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        let connect = || {
            let mut st = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            st.write_all(&first).ok()?;
            st.set_nonblocking(true).ok()?;
            st.set_nodelay(true).ok()?;
            c.fetch_add(1, Ordering::Relaxed);
            Some((st, 0usize))
        };
        let mut clients: Vec<Option<(TcpStream, usize)>> = (0..n).map(|_| connect()).collect();
        let mut sink = [0u8; 4096];
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            let tick = Instant::now();
            for slot in clients.iter_mut() {
                let alive = match slot {
                    Some((stream, sent)) => {
                        // Anything to read is an answer or the close: start again.
                        let answered = !matches!(
                            stream.read(&mut sink),
                            Err(ref e) if e.kind() == ErrorKind::WouldBlock
                        );
                        let wrote = match stream.write(&[then[*sent % then.len()]]) {
                            Ok(1) => {
                                *sent += 1;
                                b.fetch_add(1, Ordering::Relaxed);
                                true
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                            _ => false,
                        };
                        !answered && wrote
                    }
                    None => false,
                };
                if !alive {
                    *slot = connect();
                }
            }
            if let Some(rest) = every.checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    });
    Flood {
        stop,
        connects,
        bytes,
        thread: Some(thread),
    }
}

/// `n` clients sending a request head that never ends, one byte per client every `every`,
/// reconnecting whenever cut off.
pub fn slow_heads(addr: SocketAddr, n: usize, every: Duration, limit: Duration) -> Flood {
    let mut head = format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\n").into_bytes();
    // Header lines that go on and on: the head never completes.
    for i in 0..2000 {
        head.extend_from_slice(format!("X-Slow-{i}: {}\r\n", "s".repeat(20)).as_bytes());
    }
    run(addr, n, Vec::new(), head, every, limit)
}

/// `n` clients that each send a whole head for `method path` declaring `Content-Length:
/// 60000`, then trickle the body one byte per client every `every`, reconnecting whenever
/// cut off or answered.
pub fn trickle(
    addr: SocketAddr,
    n: usize,
    method: &str,
    path: &str,
    every: Duration,
    limit: Duration,
) -> Flood {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    );
    run(addr, n, head.into_bytes(), vec![b' '], every, limit)
}

/// One `GET /livez` on a new connection: its status and how long the whole exchange took,
/// or `None` when no answer came within `timeout`.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Option<(u16, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(
        format!("GET /livez HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if started.elapsed() > timeout {
            return None;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let took = started.elapsed();
    let status = std::str::from_utf8(raw.get(..12)?)
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, took))
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
