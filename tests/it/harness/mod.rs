//! Integration-test harness for mapsync: the daemon in-process ([`app`]) or as the real binary
//! ([`daemon`]), both driven through [`Admin`]; a workspace and one-shot commands of the binary
//! ([`workspace`]); throwaway PostgreSQL clusters and databases ([`pg`]), a transaction-mode
//! PgBouncer ([`pgbouncer`]), nginx, Prometheus and headless Chromium; a test CA ([`tls`]); the
//! application's side of the SQLite file ([`appdb`]), a fixture generator ([`fixture`]) and
//! small helpers ([`sys`]: [`free_port`], [`wait_until`]).
//!
//! Test modules use it as `use crate::harness::*;`. Every server the harness
//! starts is stopped and its directory removed on Drop; leftovers of crashed runs
//! (`temp_dir()/mapsync-test-pg*-<dead pid>-<n>`) are pruned on first use.

pub mod admin;
pub mod app;
pub mod appdb;
pub mod browser;
pub mod daemon;
pub mod fixture;
pub mod flood;
pub mod http;
pub mod jwt;
pub mod nginx;
pub mod pg;
pub mod pgbouncer;
pub mod prometheus;
pub mod sys;
pub mod tls;
pub mod workspace;

pub use admin::Admin;
pub use app::TestApp;
pub use appdb::{AppDb, Row};
pub use fixture::generate;
pub use pg::{PgCluster, PgOptions, TestDb, run_psql, test_db};
pub use pgbouncer::PgBouncer;
pub use sys::{free_port, wait_until};
pub use tls::TestCa;
