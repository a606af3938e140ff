//! Cron schedules (`schedule.reconcile`, `schedule.snapshot`): six fields, seconds first, UTC.
//!
//! An expression is parsed once, when the configuration is loaded, into a [`Schedule`]; the
//! engine then sleeps until each next occurrence ([`Schedule::next_after`]) and nothing
//! parses it again. Parsing is croner's, with seconds required.

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// A parsed cron expression.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: Cron,
}

/// Why an expression cannot be a schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "`{0}` is not a cron expression with seconds (six fields, e.g. \"0 */5 * * * *\" for every 5 minutes)"
    )]
    Syntax(String),
    #[error(
        "`{0}` never fires (no date from now on matches it): fix the expression, e.g. \"0 */5 * * * *\" for every 5 minutes"
    )]
    NeverFires(String),
}

impl Schedule {
    /// Parses `expr`, which must also fire at least once from now on: a schedule that never
    /// fires would silently turn its job off.
    pub fn parse(expr: &str) -> Result<Schedule, CronError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(expr)
            .map_err(|_| CronError::Syntax(expr.to_string()))?;
        let schedule = Schedule {
            text: expr.to_string(),
            cron,
        };
        match schedule.next_after(Utc::now()) {
            Some(_) => Ok(schedule),
            None => Err(CronError::NeverFires(expr.to_string())),
        }
    }

    /// The first occurrence strictly after `t`; `None` if there is none.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&t, false).ok()
    }

    /// The expression as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_field_expressions_with_seconds() {
        assert!(Schedule::parse("0 */5 * * * *").is_ok());
        assert!(Schedule::parse("0 0 * * * *").is_ok());
        let e = Schedule::parse("*/5 * * * *").unwrap_err();
        assert!(
            e.to_string().contains("six fields"),
            "five fields lack the seconds: {e}"
        );
        assert!(Schedule::parse("every hour").is_err());
    }

    #[test]
    fn an_expression_no_date_matches_is_refused() {
        let e = Schedule::parse("0 0 0 30 2 *").unwrap_err();
        assert_eq!(e, CronError::NeverFires("0 0 0 30 2 *".into()));
        assert!(e.to_string().contains("never fires"), "{e}");
    }

    #[test]
    fn the_next_occurrence_is_strictly_later() {
        let every_5_min = Schedule::parse("0 */5 * * * *").unwrap();
        let t: DateTime<Utc> = "2026-11-30T10:05:00Z".parse().unwrap();
        assert_eq!(
            every_5_min.next_after(t),
            Some("2026-11-30T10:10:00Z".parse().unwrap())
        );
        let t: DateTime<Utc> = "2026-11-30T10:07:31Z".parse().unwrap();
        assert_eq!(
            every_5_min.next_after(t),
            Some("2026-11-30T10:10:00Z".parse().unwrap())
        );
    }
}
