//! The `mapsync` command line: parses arguments, loads the settings, sets up logging, calls
//! into the library, and maps failures to exit codes (78 for configuration, 1 otherwise).
//! Logs go to stderr; stdout carries only a command's result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use mapsync::config::{Effective, LogFormat, Settings};
use mapsync::sync::SyncOptions;
use mapsync::{Error, commands};

/// EX_CONFIG, as for a configuration that does not load ([`Error::exit_code`]).
const EX_CONFIG: u8 = 78;

/// `mapsync --version`: the version and the git revision it was built from (build.rs).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MAPSYNC_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "mapsync",
    version = LONG_VERSION,
    about = "Mirror the application's SQLite model mappings to Postgres, with JSON snapshots and an admin port"
)]
struct Cli {
    /// Configuration file (TOML). Default: config/mapsync.toml when it exists.
    #[arg(long, global = true, env = "MAPSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: watch the SQLite file, mirror it, snapshot it, serve the admin port.
    Run,
    /// Create ./demo/db.sqlite3 with sample mappings (once) and run the daemon on it,
    /// mirroring into a throwaway PostgreSQL of its own when PostgreSQL's server is installed.
    Demo {
        /// Snapshots only: do not start the demo's own PostgreSQL.
        #[arg(long)]
        no_postgres: bool,
    },
    /// Run one sync and print its result as JSON.
    Sync {
        /// Delete remote rows whose id is no longer in the source (guarded against mass deletes).
        #[arg(long)]
        delete_missing: bool,
        /// Allow a delete that the mass-delete guard would refuse.
        #[arg(long)]
        force: bool,
        /// Compute what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Read every row and compare every remote row, whatever the last run's state says
        /// (the state beside the snapshots lets a run skip both when nothing changed).
        #[arg(long)]
        full: bool,
    },
    /// Write the current mappings in the snapshot format.
    Export {
        /// Output file (written atomically); stdout when absent.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check the config, the SQLite file, Postgres and the target table.
    Check,
    /// Check the configuration offline, or print the effective settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Apply the embedded sql/ scripts to the target (idempotent).
    Migrate,
    /// Upsert a snapshot (or the Postgres mirror) back into the SQLite file, the way the
    /// application's import does, or into a new database.
    Restore {
        /// A snapshot or an application export.
        #[arg(
            required_unless_present = "from_target",
            conflicts_with = "from_target"
        )]
        file: Option<PathBuf>,
        /// Restore from the Postgres mirror instead of a file (it holds no secrets).
        #[arg(long)]
        from_target: bool,
        /// Report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also delete the rows the file lacks (guarded against mass deletes).
        #[arg(long)]
        exact: bool,
        /// Allow an --exact delete that the mass-delete guard would refuse.
        #[arg(long, requires = "exact")]
        force: bool,
        /// Write a new database with the application's schema instead of the live file.
        #[arg(short, long, value_name = "NEW.db")]
        output: Option<PathBuf>,
    },
    /// Print a shell completion script (bash: save it as
    /// /usr/share/bash-completion/completions/mapsync; zsh: as _mapsync in $fpath;
    /// fish: as ~/.config/fish/completions/mapsync.fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (mapsync.1 and one per subcommand) into DIR, or print mapsync.1.
    #[command(hide = true)]
    Man {
        /// Directory to write every page into; without it, mapsync.1 goes to stdout.
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration offline: no SQLite, no Postgres, no network.
    ///
    /// Loads it as the daemon does (a configuration the daemon would refuse: its error, exit
    /// 78), then checks the files, directories, CA certificate and cron expressions it names:
    /// one line per section or problem, marked ok, warn or FAIL; exit 78 if one fails.
    /// Warnings (what depends on the user the service runs as) do not fail.
    Check,
    /// Print every setting's effective value and its origin, secrets masked.
    ///
    /// Every key, in the order config/mapsync.toml documents them, with where its value came
    /// from (default, file, environment). Passwords and tokens show as ***; the *_file keys
    /// show their paths, never what the files hold.
    Show {
        /// Aligned text for people, or JSON for scripts.
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ShowFormat {
    /// Aligned columns: key, origin, value.
    Text,
    /// One JSON document, for scripts.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    // Generated from the definitions above; they need no configuration.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "mapsync",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => return man_pages(dir.as_deref()),
        Command::Config(action) => return config(action, cli.config.as_deref()),
        _ => {}
    }
    let daemon = matches!(cli.command, Command::Run | Command::Demo { .. });
    tune_malloc(daemon);
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(&Error::from(e)),
    };
    init_logging(&settings);
    // The daemon serves its admin port beside its runs: two workers. A one-shot command runs
    // on this thread alone (its reads on the blocking pool): its connection and its work wake
    // each other without crossing threads (a cold load of 10,003 mappings: 1,075 context
    // switches → 46, and ~3 ms of CPU less).
    let mut builder = if daemon {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&Error::Other(format!(
                "cannot start the async runtime: {e}"
            )));
        }
    };
    // A one-shot sync has nothing left to finish once it has answered (its state is written
    // before): the memory of its run is not freed piece by piece, and a read it started
    // before knowing it would need it is not waited for (SIGKILL-safe by design anyway).
    let one_shot = matches!(cli.command, Command::Sync { .. });
    let outcome = runtime.block_on(dispatch(cli.command, settings));
    if one_shot {
        runtime.shutdown_background();
    }
    match outcome {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

async fn dispatch(command: Command, settings: Settings) -> Result<ExitCode, Error> {
    match command {
        Command::Run => {
            mapsync::daemon::run_until_signalled(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { no_postgres } => {
            mapsync::demo::run(settings, no_postgres).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync {
            delete_missing,
            force,
            dry_run,
            full,
        } => {
            let opts = SyncOptions {
                delete_missing: delete_missing || settings.target.delete_missing,
                force,
                dry_run,
            };
            let report = commands::sync(&settings, opts, full).await?;
            print_json(&report);
            if report.status.is_refused() {
                eprintln!(
                    "{}error: sync refused: {}",
                    mapsync::logging::error_prefix(),
                    report.detail.as_deref().unwrap_or("mass delete")
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { output } => {
            let n =
                commands::export(&settings, output.as_deref(), std::io::stdout().lock()).await?;
            if let Some(path) = output {
                tracing::info!(mappings = n, file = %path.display(), "export written");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let lines = commands::check(&settings).await;
            let mut out = std::io::stdout().lock();
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
            Ok(if commands::check_passed(&lines) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Restore {
            file,
            from_target,
            dry_run,
            exact,
            force,
            output,
        } => {
            let from = match file {
                Some(file) if !from_target => commands::RestoreFrom::File(file),
                _ => commands::RestoreFrom::Target,
            };
            let opts = mapsync::appdb::restore::RestoreOptions {
                dry_run,
                exact,
                force,
                output,
            };
            let report = commands::restore(&settings, from, opts).await?;
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            print_json(&report);
            Ok(if report.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        // In main.
        Command::Completions { .. } | Command::Man { .. } | Command::Config(_) => {
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            for name in commands::migrate(&settings).await? {
                println!("applied {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `mapsync config check|show`: the configuration alone; no runtime, no logging.
fn config(action: &ConfigCommand, path: Option<&Path>) -> ExitCode {
    let effective = match Effective::load(path) {
        Ok(e) => e,
        Err(e) => return fail(&Error::from(e)),
    };
    let mut out = std::io::stdout().lock();
    match action {
        ConfigCommand::Check => {
            let lines = commands::config::check(&effective);
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
            if commands::check_passed(&lines) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_CONFIG)
            }
        }
        ConfigCommand::Show {
            format: ShowFormat::Text,
        } => {
            let _ = out.write_all(commands::config::show_text(&effective).as_bytes());
            ExitCode::SUCCESS
        }
        ConfigCommand::Show {
            format: ShowFormat::Json,
        } => {
            drop(out);
            print_json(&commands::config::show_json(&effective));
            ExitCode::SUCCESS
        }
    }
}

/// clap's answer to a command line it refuses (or to --help / --version): as clap prints it,
/// but with each line marked as an error when stderr is the journal.
fn usage_error(e: &clap::Error) -> ExitCode {
    let prefix = mapsync::logging::error_prefix();
    if e.use_stderr() && !prefix.is_empty() {
        let text = e.render().to_string();
        let mut err = std::io::stderr().lock();
        for line in text.lines() {
            let _ = writeln!(err, "{prefix}{line}");
        }
    } else {
        let _ = e.print();
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// `mapsync man [DIR]`: the roff pages clap_mangen renders from the clap definitions.
fn man_pages(dir: Option<&std::path::Path>) -> ExitCode {
    let result = match dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
            .map_err(|e| format!("cannot write the man pages into {}: {e}", dir.display())),
        None => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout().lock())
            .map_err(|e| format!("cannot write the man page to stdout: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&Error::Other(e)),
    }
}

fn print_json(value: &impl serde::Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value);
    let _ = writeln!(out);
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("{}error: {e}", mapsync::logging::error_prefix());
    ExitCode::from(e.exit_code() as u8)
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        // With a `<N>` syslog priority on each line when stderr is the journal.
        .with_writer(mapsync::logging::Stderr::detect());
    match settings.log.format {
        LogFormat::Json => builder.json().init(),
        // journald stamps every entry itself.
        LogFormat::Text if mapsync::logging::stderr_is_journal() => builder.without_time().init(),
        LogFormat::Text => builder.init(),
    }
}

/// glibc's allocator, tuned for a process that builds and drops 100,000 mappings at a time.
///
/// - Arenas: glibc gives every thread that allocates its own, and memory freed in one is not
///   reused by another. With the runtime's workers and the blocking pool each building or
///   dropping 100,000 mappings in turn, the daemon's RSS grows by a fifth over its real use.
///   Two arenas keep it near what is held.
/// - Fast bins, in the daemon only: freeing 100,000 mappings leaves as many small chunks in
///   an arena's fast bins, and the next large allocation in that arena merges them all while
///   holding the arena's lock. When that allocation was the admin port's (hyper's read
///   buffer for a new connection), that request waited 5–9 ms. Without fast bins a chunk is
///   merged as it is freed, and no request pays for a sync's frees (docs/PERFORMANCE.md).
/// - A fixed mmap threshold, in the daemon only: glibc raises it to the size of any mapped
///   block freed, up to 32 MiB, so after the first read the image's and the memo's vectors
///   (0.8 and 2.4 MB at 100,000 mappings) come from the heap, and each read's new ones leave
///   holes between the mappings that no trim returns. Kept at 128 KiB, every block that large
///   is mapped and unmapped whole: the daemon's RSS at rest, after 200 changes, fell from
///   30.1 and 29.7 MiB to 28.9 and 28.8 (100,003 mappings).
fn tune_malloc(daemon: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        if daemon {
            libc::mallopt(libc::M_MXFAST, 0);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = daemon;
}
