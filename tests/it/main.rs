//! mapsync's integration tests, as one test binary (`cargo test --test it`): the harness in
//! [`harness`] is compiled once, and each module below tests one subject end to end.
//!
//! Filter by module: `cargo test --test it daemon::` runs the daemon's tests only.
//!
//! Cargo runs the tests of this binary on as many threads as the machine has cores. Tests that
//! share something process-wide take care of it in the harness: the shared PostgreSQL cluster
//! ([`harness::test_db`]) gives each test a database of its own, cluster-wide roles are
//! created under one lock ([`harness::workspace::supabase_db`]), and queries on
//! `pg_stat_activity` are limited to the test's own database.

mod harness;

mod browser;
mod config_cli;
mod daemon;
mod demo;
mod faults;
mod hardening;
mod http;
mod incremental;
mod ops;
mod page;
mod prometheus;
mod restore;
mod selftest;
mod state;
mod sync;
