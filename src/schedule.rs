//! Cron schedules (`schedule.reconcile`, `schedule.snapshot`): six fields, seconds first, UTC.
//!
//! Expressions are parsed exactly as tokio-cron-scheduler parses them, so an expression that
//! passes [`validate`] at start-up cannot fail later when the job is added.

use tokio_cron_scheduler::Job;

/// Checks a cron expression; the error says what a valid one looks like.
pub fn validate(expr: &str) -> Result<(), String> {
    Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|_| {
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
}
