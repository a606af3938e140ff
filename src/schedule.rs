//! Cron schedules (`schedule.reconcile`, `schedule.snapshot`): six fields, seconds first, UTC.
//!
//! Expressions are parsed exactly as tokio-cron-scheduler parses them, so an expression that
//! passes [`validate`] at start-up cannot fail later when the job is added.

use chrono::{DateTime, Utc};
use tokio_cron_scheduler::Job;

fn job(expr: &str) -> Option<Job> {
    Job::new_async(expr, |_, _| Box::pin(async {})).ok()
}

/// When `expr` fires next, as the scheduler computes it; `None` when it is not a valid
/// expression or no date ever matches it (`0 0 0 30 2 *`).
pub fn next_run(expr: &str) -> Option<DateTime<Utc>> {
    job(expr)?.job_data().ok()?.next_tick_utc()
}

/// Checks a cron expression; the error says what a valid one looks like.
pub fn validate(expr: &str) -> Result<(), String> {
    job(expr)
        .map(|_| ())
        .ok_or_else(|| {
            format!(
                "`{expr}` is not a cron expression with seconds (six fields, e.g. \"0 */5 * * * *\" for every 5 minutes)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_field_expressions_with_seconds() {
        assert!(validate("0 */5 * * * *").is_ok());
        assert!(validate("0 0 * * * *").is_ok());
        assert!(
            validate("*/5 * * * *").is_err(),
            "five fields lack the seconds"
        );
        assert!(validate("every hour").is_err());
    }

    #[test]
    fn the_next_run_is_the_schedulers() {
        let now = Utc::now();
        let next = next_run("0 */5 * * * *").unwrap();
        assert!(
            next > now && next - now <= chrono::Duration::minutes(5),
            "{next}"
        );
        assert_eq!(next.timestamp() % 300, 0, "{next}");
        assert!(
            validate("0 0 0 30 2 *").is_ok(),
            "valid, but February has no 30th"
        );
        assert_eq!(next_run("0 0 0 30 2 *"), None);
        assert_eq!(next_run("*/5 * * * *"), None);
    }
}
