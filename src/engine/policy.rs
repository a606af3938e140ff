//! When to run: a pure function of the pending triggers and of how the last runs went, kept
//! apart from the event loop so that it can be tested like the debouncer (a table of cases,
//! on synthetic instants). No I/O, no clock, no channel: the loop feeds it events and asks it
//! what to do next.
//!
//! Rules (SPEC §2):
//! - a `POST /sync` caller gets a full run that starts after its request arrived; callers
//!   with the same options share one run; a full run serves every other pending trigger;
//! - order of urgency: requests, start-up, retry, schedule, file changes;
//! - file changes give incremental runs, gated on "did anything commit?", once a run has
//!   succeeded; a watcher rescan, or no success yet, gives a full run;
//! - an incremental run reads only the rows stamped since the last read (a watermark read);
//!   after one, a walk of every row (which catches a row changed without a new `updated_at`)
//!   follows once the file has been quiet for [`WALK_AFTER_QUIET`], and within
//!   [`WALK_WITHIN`] however busy it is; a full run walks too;
//! - after a failed push, runs that would reach Postgres wait for a capped exponential
//!   backoff with jitter (reading and snapshotting go on); an unreachable Postgres is also
//!   probed every [`PROBE_EVERY`], and its first answer ends the wait at once;
//! - a failure of the source (the file missing, locked or damaged) holds nothing back: the
//!   next file event pushes at once.

use std::time::Duration;

use tokio::time::Instant;

use crate::appdb::watch::Change;
use crate::metrics::FailureReason;
use crate::sync::{SyncOptions, Trigger};

/// First retry delay after a failure; doubles up to `target.retry_max`.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How often an unreachable Postgres is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long the file must have been quiet before the walk that checks a watermark read.
pub const WALK_AFTER_QUIET: Duration = Duration::from_secs(1);
/// The longest a watermark read goes unchecked by a walk, however busy the file.
pub const WALK_WITHIN: Duration = Duration::from_secs(30);

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub trigger: Trigger,
    /// Read every row afresh and compare the whole mirror.
    pub full: bool,
    /// Skip everything unless the files say something committed.
    pub gate: bool,
    /// Walk every row of the source (a full run always does), not only those stamped since
    /// the last read.
    pub walk: bool,
    /// Push to the target (false while backing off: read and snapshot only).
    pub push: bool,
    pub opts: SyncOptions,
}

/// What the last failed run failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The SQLite file.
    Source,
    /// Postgres, and why (`None`: not one of the reasons the metrics name).
    Target(Option<FailureReason>),
}

/// The triggers not served yet, the callers waiting (`W`), and the backoff.
#[derive(Debug)]
pub struct Policy<W> {
    startup: bool,
    schedule: bool,
    watch: Option<Change>,
    retry: bool,
    waiters: Vec<(SyncOptions, W)>,
    default_opts: SyncOptions,
    retry_max: Duration,
    failures: u32,
    failure: Option<Failure>,
    retry_at: Option<Instant>,
    retry_trigger: Trigger,
    probe_at: Option<Instant>,
    /// A walk is due (its timer fired).
    walk: bool,
    /// When the walk that checks the last watermark read is due, and the latest it may come.
    walk_at: Option<Instant>,
    walk_by: Option<Instant>,
}

impl<W> Policy<W> {
    /// A start-up run is pending; runs delete as `default_opts` say unless asked otherwise.
    pub fn new(default_opts: SyncOptions, retry_max: Duration) -> Self {
        Policy {
            startup: true,
            schedule: false,
            watch: None,
            retry: false,
            waiters: Vec::new(),
            default_opts,
            retry_max,
            failures: 0,
            failure: None,
            retry_at: None,
            retry_trigger: Trigger::Startup,
            probe_at: None,
            walk: false,
            walk_at: None,
            walk_by: None,
        }
    }

    /// A burst of file events ended at `now`: a pending walk waits for quiet again.
    pub fn watch(&mut self, change: Change, now: Instant) {
        crate::appdb::watch::merge_into(&mut self.watch, change);
        if let (Some(at), Some(by)) = (self.walk_at.as_mut(), self.walk_by) {
            *at = (now + WALK_AFTER_QUIET).min(by);
        }
    }

    /// After a run: whether the source needs a walk (its last read was a watermark read, and
    /// no walk came since). Sets the walk's timer, or clears it.
    pub fn source_read(&mut self, needs_walk: bool, now: Instant) {
        if !needs_walk {
            self.walk = false;
            self.walk_at = None;
            self.walk_by = None;
        } else if self.walk_at.is_none() && !self.walk {
            let by = *self.walk_by.get_or_insert(now + WALK_WITHIN);
            self.walk_at = Some((now + WALK_AFTER_QUIET).min(by));
        }
    }

    /// When the walk that checks the last watermark read is due, if one is.
    pub fn walk_at(&self) -> Option<Instant> {
        self.walk_at
    }

    /// The walk's timer fired.
    pub fn walk_due(&mut self) {
        self.walk_at = None;
        self.walk = true;
    }

    /// The reconcile schedule fired.
    pub fn schedule(&mut self) {
        self.schedule = true;
    }

    /// A caller asks for a run with `opts`.
    pub fn request(&mut self, opts: SyncOptions, waiter: W) {
        self.waiters.push((opts, waiter));
    }

    /// When the retry timer fires, if it is set.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// When the next probe of Postgres is due, if one is.
    pub fn probe_at(&self) -> Option<Instant> {
        self.probe_at
    }

    /// The retry timer fired.
    pub fn retry_due(&mut self) {
        self.retry_at = None;
        self.retry = true;
    }

    /// A probe was started (no other until it answers).
    pub fn probing(&mut self) {
        self.probe_at = None;
    }

    /// A probe answered: Postgres is up (retry now, whatever the timer says) or not (probe
    /// again in [`PROBE_EVERY`]).
    pub fn probe_answered(&mut self, up: bool, now: Instant) {
        if up {
            self.retry_at = None;
            self.retry = true;
        } else if self.failure.is_some() {
            self.probe_at = Some(now + PROBE_EVERY);
        }
    }

    /// The next run, and the callers it answers, when nothing runs; `None` when nothing is
    /// pending. `steady`: a run has succeeded, so the mirror's content is known.
    pub fn next(&mut self, steady: bool) -> Option<(Plan, Vec<W>)> {
        // Only a failing target holds pushes back.
        let backing_off =
            self.retry_at.is_some() && matches!(self.failure, Some(Failure::Target(_)));
        if let Some((opts, _)) = self.waiters.first() {
            let opts = *opts;
            let (served, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
                .into_iter()
                .partition(|(o, _)| *o == opts);
            self.waiters = rest;
            // A full run serves every other trigger too.
            self.startup = false;
            self.schedule = false;
            self.watch = None;
            self.retry = false;
            let plan = Plan {
                trigger: Trigger::Manual,
                full: true,
                gate: false,
                walk: true,
                push: true,
                opts,
            };
            return Some((plan, served.into_iter().map(|(_, w)| w).collect()));
        }
        // (trigger, full, gate, walk)
        let (trigger, full, gate, walk) = if self.startup {
            (Trigger::Startup, true, false, true)
        } else if self.retry {
            (self.retry_trigger, !steady, false, !steady)
        } else if self.schedule {
            (Trigger::Schedule, true, false, true)
        } else if let Some(change) = self.watch {
            let full = change == Change::Rescan || !steady;
            (Trigger::Watch, full, change == Change::Commit, full)
        } else if self.walk {
            // The check after watermark reads: every row, read even if nothing committed.
            (Trigger::Watch, !steady, false, true)
        } else {
            return None;
        };
        let push = !backing_off || self.retry || self.startup;
        self.watch = None;
        self.retry = false;
        self.startup = false;
        if full {
            self.schedule = false;
        }
        if walk {
            self.walk = false;
        }
        let plan = Plan {
            trigger,
            full,
            gate,
            walk,
            push,
            opts: self.default_opts,
        };
        Some((plan, Vec::new()))
    }

    /// A read ahead of a burst's end (no push), when idle and steady; `None` otherwise.
    pub fn read_ahead(&self, steady: bool) -> Option<Plan> {
        let idle = self.retry_at.is_none() && self.waiters.is_empty() && !self.startup;
        (steady && idle).then_some(Plan {
            trigger: Trigger::Watch,
            full: false,
            gate: true,
            walk: false,
            push: false,
            opts: self.default_opts,
        })
    }

    /// A run pushed (or had nothing to push): the backoff is over.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.failure = None;
        self.retry_at = None;
        self.probe_at = None;
    }

    /// A run of `trigger` failed: retry after the backoff (`jitter` in 0.8..=1.2), and
    /// probe an unreachable Postgres meanwhile. Returns the delay.
    pub fn failed(
        &mut self,
        trigger: Trigger,
        failure: Failure,
        now: Instant,
        jitter: f64,
    ) -> Duration {
        self.failures += 1;
        let delay = backoff(self.failures, self.retry_max, jitter);
        self.retry_at = Some(now + delay);
        self.retry_trigger = trigger;
        if failure == Failure::Target(Some(FailureReason::TargetNetwork)) {
            self.probe_at = Some(now + PROBE_EVERY);
        }
        self.failure = Some(failure);
        delay
    }

    /// Every waiting caller (shutdown).
    pub fn take_waiters(&mut self) -> Vec<W> {
        self.waiters.drain(..).map(|(_, w)| w).collect()
    }
}

/// `FIRST_RETRY × 2^(failures-1)`, capped at `max`, times `jitter` (0.8 to 1.2) so that
/// several instances do not retry in step.
pub fn backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    let exp = FIRST_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(max).mul_f64(jitter.clamp(0.8, 1.2))
}

/// A jitter factor in 0.8..1.2 from the clock's low bits: enough to spread retries.
pub fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::FailureReason::{TargetAuth, TargetNetwork};

    const OPTS: SyncOptions = SyncOptions {
        delete_missing: false,
        force: false,
        dry_run: false,
    };

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// A policy past its start-up run.
    fn started() -> Policy<u32> {
        let mut p = Policy::new(OPTS, s(60));
        let (plan, _) = p.next(false).unwrap();
        assert_eq!(plan.trigger, Trigger::Startup);
        p.succeeded();
        p
    }

    /// (trigger, full, gate, push) of the next plan.
    fn next(p: &mut Policy<u32>, steady: bool) -> Option<(Trigger, bool, bool, bool)> {
        p.next(steady)
            .map(|(plan, _)| (plan.trigger, plan.full, plan.gate, plan.push))
    }

    #[test]
    fn the_first_run_is_a_full_startup_run_and_then_nothing() {
        let mut p: Policy<u32> = Policy::new(OPTS, s(60));
        assert_eq!(
            next(&mut p, false),
            Some((Trigger::Startup, true, false, true))
        );
        assert_eq!(next(&mut p, true), None);
    }

    #[test]
    fn file_changes_give_gated_incremental_runs_once_steady() {
        use Change::*;
        for (change, steady, want) in [
            (Commit, true, (Trigger::Watch, false, true, true)),
            (Commit, false, (Trigger::Watch, true, true, true)),
            (Rescan, true, (Trigger::Watch, true, false, true)),
        ] {
            let mut p = started();
            p.watch(change, Instant::now());
            assert_eq!(
                next(&mut p, steady),
                Some(want),
                "{change:?} steady={steady}"
            );
            assert_eq!(next(&mut p, steady), None, "served once");
        }
    }

    #[test]
    fn a_request_is_served_first_by_a_full_run_that_serves_every_trigger() {
        let mut p = started();
        p.watch(Change::Commit, Instant::now());
        p.schedule();
        p.request(OPTS, 1);
        let deleting = SyncOptions {
            delete_missing: true,
            ..OPTS
        };
        p.request(deleting, 2);
        p.request(OPTS, 3);
        let (plan, waiters) = p.next(true).unwrap();
        assert_eq!(
            (plan.trigger, plan.full, plan.opts),
            (Trigger::Manual, true, OPTS)
        );
        assert_eq!(
            waiters,
            [1, 3],
            "callers with the same options share the run"
        );
        let (plan, waiters) = p.next(true).unwrap();
        assert_eq!((plan.opts, waiters), (deleting, vec![2]));
        assert_eq!(
            next(&mut p, true),
            None,
            "the watch and schedule were served"
        );
    }

    #[test]
    fn after_a_target_failure_watch_runs_only_read_until_the_retry() {
        let t0 = Instant::now();
        let mut p = started();
        let delay = p.failed(Trigger::Watch, Failure::Target(Some(TargetAuth)), t0, 1.0);
        assert_eq!(delay, s(1));
        assert_eq!(p.retry_at(), Some(t0 + s(1)));
        assert_eq!(
            p.probe_at(),
            None,
            "a refused login is not probed every second"
        );
        p.watch(Change::Commit, Instant::now());
        assert_eq!(
            next(&mut p, true),
            Some((Trigger::Watch, false, true, false))
        );
        p.retry_due();
        assert_eq!(
            next(&mut p, true),
            Some((Trigger::Watch, false, false, true))
        );
    }

    #[test]
    fn an_unreachable_target_is_probed_and_its_first_answer_retries_at_once() {
        let t0 = Instant::now();
        let mut p = started();
        for _ in 0..5 {
            p.failed(
                Trigger::Watch,
                Failure::Target(Some(TargetNetwork)),
                t0,
                1.0,
            );
        }
        assert_eq!(p.retry_at(), Some(t0 + s(16)), "the backoff grew");
        assert_eq!(p.probe_at(), Some(t0 + PROBE_EVERY));
        p.probing();
        p.probe_answered(false, t0 + s(2));
        assert_eq!(p.probe_at(), Some(t0 + s(2) + PROBE_EVERY));
        p.probing();
        p.probe_answered(true, t0 + s(3));
        assert_eq!(p.retry_at(), None, "no waiting for the timer");
        assert_eq!(
            next(&mut p, true),
            Some((Trigger::Watch, false, false, true))
        );
    }

    #[test]
    fn a_source_failure_holds_no_push_back() {
        let t0 = Instant::now();
        let mut p = started();
        p.failed(Trigger::Watch, Failure::Source, t0, 1.0);
        assert!(p.retry_at().is_some(), "the read is retried on a timer too");
        assert_eq!(p.probe_at(), None);
        p.watch(Change::Commit, Instant::now());
        assert_eq!(
            next(&mut p, true),
            Some((Trigger::Watch, false, true, true)),
            "the file's return is pushed at once"
        );
    }

    #[test]
    fn read_ahead_only_when_idle_and_steady() {
        let t0 = Instant::now();
        let mut p: Policy<u32> = Policy::new(OPTS, s(60));
        assert_eq!(p.read_ahead(false), None, "before the start-up run");
        p.next(false);
        p.succeeded();
        assert!(
            p.read_ahead(true)
                .is_some_and(|plan| !plan.push && plan.gate)
        );
        assert_eq!(p.read_ahead(false), None, "not before a success");
        p.request(OPTS, 1);
        assert_eq!(p.read_ahead(true), None, "a caller waits");
        p.next(true);
        p.failed(Trigger::Watch, Failure::Source, t0, 1.0);
        assert_eq!(p.read_ahead(true), None, "retrying");
    }

    /// (trigger, full, gate, walk) of the next plan.
    fn next_walk(p: &mut Policy<u32>) -> Option<(Trigger, bool, bool, bool)> {
        p.next(true)
            .map(|(plan, _)| (plan.trigger, plan.full, plan.gate, plan.walk))
    }

    #[test]
    fn a_watermark_read_is_checked_by_a_walk_once_the_file_is_quiet() {
        let t0 = Instant::now();
        let mut p = started();
        p.watch(Change::Commit, t0);
        assert_eq!(
            next_walk(&mut p),
            Some((Trigger::Watch, false, true, false)),
            "a watch run reads the rows stamped since the last read"
        );
        p.source_read(true, t0);
        assert_eq!(p.walk_at(), Some(t0 + WALK_AFTER_QUIET));
        // Another burst ends: the walk waits for quiet again.
        p.watch(Change::Commit, t0 + s(1) / 2);
        assert_eq!(p.walk_at(), Some(t0 + s(1) / 2 + WALK_AFTER_QUIET));
        assert_eq!(
            next_walk(&mut p),
            Some((Trigger::Watch, false, true, false))
        );
        p.source_read(true, t0 + s(1));
        assert_eq!(
            p.walk_at(),
            Some(t0 + s(1) / 2 + WALK_AFTER_QUIET),
            "unchanged"
        );
        assert_eq!(next_walk(&mut p), None, "nothing until the timer fires");
        p.walk_due();
        assert_eq!(
            next_walk(&mut p),
            Some((Trigger::Watch, false, false, true)),
            "a walk of every row, whether or not anything committed"
        );
        p.source_read(false, t0 + s(2));
        assert_eq!((p.walk_at(), next_walk(&mut p)), (None, None));
    }

    #[test]
    fn a_busy_file_still_gets_its_walk_within_the_limit() {
        let t0 = Instant::now();
        let mut p = started();
        p.source_read(true, t0);
        let mut now = t0;
        while now < t0 + WALK_WITHIN * 2 {
            now += s(1) / 2;
            p.watch(Change::Commit, now);
            p.next(true);
            p.source_read(true, now);
            assert!(p.walk_at().unwrap() <= t0 + WALK_WITHIN);
        }
        // A full run walks: nothing left to check.
        p.schedule();
        assert_eq!(
            next_walk(&mut p),
            Some((Trigger::Schedule, true, false, true))
        );
        p.source_read(false, now);
        assert_eq!(p.walk_at(), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let max = s(60);
        for (failures, base) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (6, 32.0),
            (7, 60.0),
            (30, 60.0),
        ] {
            for jitter in [0.8, 1.0, 1.2] {
                let d = backoff(failures, max, jitter).as_secs_f64();
                assert!(
                    (d - base * jitter).abs() < 1e-6,
                    "{failures} × {jitter}: {d}"
                );
            }
        }
        let j = jitter();
        assert!((0.8..=1.2).contains(&j), "{j}");
    }
}
