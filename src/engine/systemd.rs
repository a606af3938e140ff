//! Talking to systemd (SPEC §9): `READY=1` once the admin port is bound and the first run
//! has been attempted, `STATUS=` after each run, `WATCHDOG=1` from the event loop at half of
//! `WatchdogSec=`, `STOPPING=1` on shutdown. Every call is a no-op without `NOTIFY_SOCKET`
//! (not under systemd, or in tests).

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// The one-line status `systemctl status` shows.
pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(text)]);
}

pub fn watchdog() {
    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
}

/// Half of systemd's watchdog interval, when the unit sets `WatchdogSec=`.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}
