//! Where log lines go: stderr, and, when stderr is the systemd journal, with each line's
//! syslog priority in front.
//!
//! systemd sets `JOURNAL_STREAM=<device>:<inode>` for a service whose stdout or stderr is
//! connected to the journal. When that pair is stderr's own (checked with fstat, so a child
//! that inherited the variable but writes its stderr elsewhere is not fooled), every line
//! starts with `<N>` (sd-daemon(3)): `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//! trace. journald strips the prefix (`SyslogLevelPrefix=yes`, its default) and stores N as
//! the entry's PRIORITY, so `journalctl -u mapsync -p err` shows exactly the errors.
//! Everywhere else (a terminal, a pipe, a file) the output is unchanged.
//!
//! The prefix goes in front of every line of an event, so a message that spans lines keeps
//! its priority on each.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// True when stderr is the journal stream named by `JOURNAL_STREAM` (decided once).
pub fn stderr_is_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = parse_journal_stream(&value.to_string_lossy()) else {
            return false;
        };
        let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
            return false;
        };
        std::fs::File::from(fd)
            .metadata()
            .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
    })
}

/// `"<device>:<inode>"`, both decimal, as systemd writes them.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `"<3>"` when stderr is the journal, else `""`: for the one-line errors `main` prints
/// itself (`error: …`), outside tracing.
pub fn error_prefix() -> &'static str {
    if stderr_is_journal() { "<3>" } else { "" }
}

/// The log writer for tracing-subscriber: stderr, with priority prefixes when it is the
/// journal.
#[derive(Debug, Clone, Copy)]
pub struct Stderr {
    prefixed: bool,
}

impl Stderr {
    /// Prefixes lines when stderr is the journal.
    pub fn detect() -> Stderr {
        Stderr {
            prefixed: stderr_is_journal(),
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = LineWriter<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter::new(std::io::stderr(), self.prefixed.then_some(6))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter::new(
            std::io::stderr(),
            self.prefixed.then(|| priority(meta.level())),
        )
    }
}

/// Writes one event to `inner`, with `<priority>` at the start of each line when set.
pub struct LineWriter<W: Write> {
    inner: W,
    prefix: Option<[u8; 3]>,
    at_line_start: bool,
}

impl<W: Write> LineWriter<W> {
    pub fn new(inner: W, priority: Option<u8>) -> LineWriter<W> {
        LineWriter {
            inner,
            prefix: priority.map(|p| [b'<', b'0' + p.min(7), b'>']),
            at_line_start: true,
        }
    }
}

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(prefix) = self.prefix else {
            return self.inner.write(buf);
        };
        // The whole chunk in one write_all, so lines from other threads never land inside.
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in buf {
            if self.at_line_start {
                out.extend_from_slice(&prefix);
            }
            out.push(b);
            self.at_line_start = b == b'\n';
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(priority: Option<u8>, chunks: &[&str]) -> String {
        let mut w = LineWriter::new(Vec::new(), priority);
        for c in chunks {
            w.write_all(c.as_bytes()).unwrap();
        }
        String::from_utf8(w.inner).unwrap()
    }

    #[test]
    fn every_line_of_an_event_gets_the_prefix() {
        assert_eq!(written(Some(3), &["boom\n"]), "<3>boom\n");
        assert_eq!(
            written(Some(4), &["first\nsecond\n"]),
            "<4>first\n<4>second\n"
        );
        // Split writes: the prefix only where a line starts.
        assert_eq!(
            written(Some(6), &["he", "llo\nwor", "ld\n"]),
            "<6>hello\n<6>world\n"
        );
        assert_eq!(written(None, &["plain\ntext\n"]), "plain\ntext\n");
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(
            parse_journal_stream("64768:1234567"),
            Some((64768, 1234567))
        );
        assert_eq!(parse_journal_stream("8:1\n"), Some((8, 1)));
        assert_eq!(parse_journal_stream("8-1"), None);
        assert_eq!(parse_journal_stream(":1"), None);
        assert_eq!(parse_journal_stream("a:b"), None);
    }
}
