//! What an operator gets from the real binary beside syncing: `--version` naming the build,
//! the same revision in `mapsync_build_info`, shell completions that complete in bash, zsh and
//! fish, and man pages that `man` renders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::daemon::Daemon;
use crate::harness::http;
use crate::harness::sys::which;
use crate::harness::workspace::{Workspace, command};

const DEADLINE: Duration = Duration::from_secs(60);

/// `name` on PATH, or a failure naming the Debian package that provides it.
fn require(name: &str, package: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!("`{name}` not found: install it with `apt-get install -y {package}`")
    })
}

/// Runs `cmd` to completion within [`DEADLINE`] (killed and failed after it).
fn run(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            crate::harness::sys::signal(pid, "KILL");
            panic!("{what} did not finish within {DEADLINE:?}");
        }
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mapsync ARGS…` (no configuration needed).
fn mapsync(args: &[&str]) -> String {
    let mut cmd = command();
    cmd.args(args);
    stdout(&run(cmd))
}

/// What the build should have recorded: git's short hash of this checkout's HEAD, `-dirty`
/// when tracked files differ from it; `unknown` when this is not a git checkout.
fn expected_revision() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let top = git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    if top.and_then(|t| t.canonicalize().ok()) != dir.canonicalize().ok() {
        return "unknown".into();
    }
    let hash = git(&["rev-parse", "--short", "HEAD"]).expect("git rev-parse HEAD");
    let status = git(&[
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    ])
    .expect("git status");
    if status.is_empty() {
        hash
    } else {
        format!("{hash}-dirty")
    }
}

#[test]
fn version_names_the_release_and_the_git_revision_it_was_built_from() {
    let revision = expected_revision();
    let want = format!("mapsync {} ({revision})\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(mapsync(&["--version"]), want);
    assert_eq!(mapsync(&["-V"]), want);
}

#[test]
fn build_info_on_the_metrics_port_carries_the_same_revision() {
    let version = mapsync(&["--version"]);
    let revision = version
        .trim()
        .rsplit_once(" (")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no revision in {version:?}"));
    let ws = Workspace::new(None, "");
    let d = Daemon::start(&ws, None, "");
    let text = http::get(d.addr, "/metrics", None).text();
    let line = text
        .lines()
        .find(|l| l.starts_with("mapsync_build_info{"))
        .unwrap_or_else(|| panic!("no mapsync_build_info in:\n{text}"));
    assert_eq!(
        line,
        format!(
            "mapsync_build_info{{version=\"{}\",revision=\"{revision}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// A scratch directory holding `mapsync completions SHELL` as `file`.
fn completion_script(shell: &str, file: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(file), mapsync(&["completions", shell])).expect("write");
    dir
}

#[test]
fn bash_completion_completes_subcommands_and_their_options() {
    let bash = require("bash", "bash");
    let dir = completion_script("bash", "mapsync");
    // What bash-completion does on TAB: call the function registered for `mapsync`.
    let complete = |line: &str| -> Vec<String> {
        let words: Vec<&str> = line.split(' ').collect();
        let script = format!(
            "source {file}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\n\
             COMP_POINT={point}\n$(complete -p mapsync | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p') \
             mapsync '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            file = dir.path().join("mapsync").display(),
            words = words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            cword = words.len() - 1,
            point = line.len(),
            cur = words[words.len() - 1],
            prev = words[words.len().saturating_sub(2)],
        );
        let mut cmd = Command::new(&bash);
        cmd.args(["--norc", "--noprofile", "-c", &script]);
        stdout(&run(cmd)).lines().map(str::to_string).collect()
    };
    assert_eq!(complete("mapsync sy"), ["sync"]);
    let options = complete("mapsync sync --d");
    assert!(
        options.contains(&"--delete-missing".to_string())
            && options.contains(&"--dry-run".to_string()),
        "{options:?}"
    );
    let shells = complete("mapsync completions ");
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.contains(&shell.to_string()), "{shells:?}");
    }
}

#[test]
fn zsh_completion_completes_on_tab_in_an_interactive_shell() {
    let zsh = require("zsh", "zsh");
    let dir = completion_script("zsh", "_mapsync");
    // An interactive zsh on a pseudo-terminal (zsh/zpty): type `mapsync sy<TAB> --dry<TAB>`
    // and Enter; a `mapsync` function prints the words the completion produced.
    let driver = format!(
        r#"zmodload zsh/zpty
zpty z {zsh} -f -i
zpty -w z "PS1='> '; fpath=({fpath} \$fpath); autoload -U compinit; compinit -u -D; mapsync() {{ print -r -- \"GOT\"\"=[\$*]\" }}"
zpty -n -w z $'mapsync sy\t'
zpty -n -w z $'--dry\t\n'
zpty -r z out '*GOT=\[*\]*'
print -r -- "GOT=[${{${{out##*GOT=\[}}%%\]*}}]"
zpty -d z
"#,
        zsh = zsh.display(),
        fpath = dir.path().display(),
    );
    let mut cmd = Command::new(&zsh);
    cmd.args(["-f", "-c", &driver]);
    assert_eq!(stdout(&run(cmd)).trim(), "GOT=[sync --dry-run]");
}

#[test]
fn fish_completion_lists_subcommands_and_options_with_their_help() {
    let fish = require("fish", "fish");
    let dir = completion_script("fish", "mapsync.fish");
    let script = format!(
        "source {}; complete -C'mapsync sy'; complete -C'mapsync export -'",
        dir.path().join("mapsync.fish").display()
    );
    let mut cmd = Command::new(&fish);
    cmd.args(["--no-config", "-c", &script]);
    let out = stdout(&run(cmd));
    assert!(
        out.lines()
            .any(|l| l == "sync\tRun one sync and print its result as JSON"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("--output\t")), "{out}");
}

#[test]
fn man_pages_render_with_man_and_document_every_subcommand() {
    require("man", "man-db");
    let dir = tempfile::tempdir().expect("temp dir");
    mapsync(&["man", dir.path().to_str().unwrap()]);
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for page in [
        "mapsync.1",
        "mapsync-run.1",
        "mapsync-sync.1",
        "mapsync-export.1",
        "mapsync-check.1",
        "mapsync-migrate.1",
        "mapsync-restore.1",
        "mapsync-demo.1",
        "mapsync-completions.1",
    ] {
        assert!(pages.contains(&page.to_string()), "no {page} in {pages:?}");
    }
    assert!(
        !pages.iter().any(|p| p == "mapsync-man.1"),
        "the hidden man subcommand has no page: {pages:?}"
    );
    let render = |page: &str| -> String {
        let mut cmd = Command::new("man");
        cmd.arg("-l")
            .arg(dir.path().join(page))
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .env("MANWIDTH", "120")
            .env("LC_ALL", "C.UTF-8");
        stdout(&run(cmd))
    };
    let main = render("mapsync.1");
    for text in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "--config",
        "MAPSYNC_CONFIG",
    ] {
        assert!(
            main.contains(text),
            "{text} missing from mapsync(1):\n{main}"
        );
    }
    let version = mapsync(&["--version"]);
    assert!(
        main.contains(version.trim()),
        "mapsync(1) does not name the build {version:?}:\n{main}"
    );
    let sync = render("mapsync-sync.1");
    for text in [
        "--delete-missing",
        "--force",
        "--dry-run",
        "mass-delete guard",
    ] {
        assert!(
            sync.contains(text),
            "{text} missing from mapsync-sync(1):\n{sync}"
        );
    }
    // Without a directory the main page goes to stdout.
    assert!(mapsync(&["man"]).starts_with(".ie"), "roff on stdout");
}

/// Runs `mapsync --config CONFIG ARGS…` in `ws` with stderr written to a file; with
/// `journal` = "stderr", `JOURNAL_STREAM` names that file's device and inode, as systemd does
/// for a service whose stderr is the journal (other values are passed as they are). Returns
/// stderr.
fn stderr_of(ws: &Workspace, config: &Path, args: &[&str], journal: Option<&str>) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = ws
        .path()
        .join(format!("stderr-{}.log", crate::harness::sys::random_hex(4)));
    let file = std::fs::File::create(&path).expect("stderr file");
    let meta = file.metadata().expect("stat stderr file");
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .current_dir(ws.path())
        .stdout(Stdio::null())
        .stderr(file);
    match journal {
        Some("stderr") => cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())),
        Some(other) => cmd.env("JOURNAL_STREAM", other),
        None => cmd.env_remove("JOURNAL_STREAM"),
    };
    let what = format!("{cmd:?}");
    let mut child = cmd.stdin(Stdio::null()).spawn().expect("mapsync starts");
    let mut status = None;
    let done = crate::harness::sys::poll_until(DEADLINE, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {DEADLINE:?}");
    }
    std::fs::read_to_string(&path).expect("read stderr file")
}

#[test]
fn log_lines_carry_their_syslog_priority_when_stderr_is_the_journal() {
    let ws = Workspace::new(None, "");
    // A row whose candidates are not JSON: read as [] with a warning (SPEC §1).
    let mut broken = crate::harness::Row::mapping("broken", "gpt-4o");
    broken.candidates_json = Some("not json".into());
    ws.app.upsert(&broken);
    let out = ws.path().join("export.json");
    let export = ["export", "-o", out.to_str().unwrap()];

    let journal = stderr_of(&ws, &ws.config, &export, Some("stderr"));
    let lines: Vec<&str> = journal.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("WARN") && l.contains("candidates_json")),
        "no <4> warning:\n{journal}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("INFO") && l.contains("export written")),
        "no <6> info line:\n{journal}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.len() > 3 && l.starts_with('<') && l.as_bytes()[2] == b'>'),
        "every line has a priority:\n{journal}"
    );
    // Failures that main reports itself, outside tracing, are errors too: a bad
    // configuration, and a command line clap refuses.
    let missing = ws.path().join("missing.toml");
    let failed = stderr_of(&ws, &missing, &export, Some("stderr"));
    assert!(
        failed.starts_with("<3>error: ") && failed.contains("missing.toml"),
        "{failed}"
    );
    let usage = stderr_of(
        &ws,
        &ws.config,
        &["export", "--no-such-flag"],
        Some("stderr"),
    );
    assert!(usage.contains("--no-such-flag"), "{usage}");
    assert!(
        usage.lines().all(|l| l.starts_with("<3>")),
        "every line of a usage error is an error:\n{usage}"
    );

    // Not the journal: a terminal, a pipe, a file, or a child that inherited JOURNAL_STREAM
    // but whose stderr goes elsewhere. No prefixes there.
    for journal in [None, Some("1:1"), Some("garbage")] {
        let plain = stderr_of(&ws, &ws.config, &export, journal);
        assert!(
            plain.contains("WARN") && plain.contains("export written"),
            "{plain}"
        );
        assert!(
            plain.lines().all(|l| !l.starts_with('<')),
            "JOURNAL_STREAM={journal:?}:\n{plain}"
        );
    }
}

#[test]
fn check_warns_when_a_remote_connection_is_not_certificate_verified() {
    let ws = Workspace::new(None, "");
    let url = "postgresql://postgres.abcdef:s3cret-pw@db.example.invalid:5432/postgres";
    let check = |query: &str, extra: &str| {
        ws.write_config(
            None,
            &format!("[target]\nurl = \"{url}{query}\"\nconnect_timeout_ms = 2000\n{extra}"),
        );
        let run = ws.mapsync(&["check"]);
        assert!(
            !run.all_output().contains("s3cret-pw"),
            "the password leaked: {run:#?}"
        );
        run
    };
    let warn_line = |run: &crate::harness::workspace::Run| {
        run.stdout
            .lines()
            .find(|l| l.starts_with("warn tls: "))
            .map(str::to_string)
    };

    // The default sslmode (prefer) to a remote host: a warning that says how to fix it.
    let run = check("", "");
    let warn = warn_line(&run).unwrap_or_else(|| panic!("no warn line: {run:#?}"));
    for text in [
        "db.example.invalid",
        "sslmode=prefer",
        "?sslmode=verify-full",
        "target.ssl_root_cert",
        "Dashboard → Database settings → SSL",
    ] {
        assert!(warn.contains(text), "{text} missing from {warn}");
    }
    // The host is unreachable, so the postgres line fails; the warning comes before it.
    let order: Vec<&str> = run
        .stdout
        .lines()
        .map(|l| &l[5..l.find(':').unwrap()])
        .collect();
    assert_eq!(order, ["config", "sqlite", "tls", "postgres"], "{run:#?}");
    run.expect_code(1);

    let require = check("?sslmode=require", "");
    let warn = warn_line(&require).unwrap_or_else(|| panic!("no warn line: {require:#?}"));
    assert!(warn.contains("without target.ssl_root_cert"), "{warn}");

    // Verified: no warning.
    let ca = crate::harness::TestCa::new();
    let root = format!("ssl_root_cert = {:?}\n", ca.ca_cert);
    for (query, extra) in [
        ("?sslmode=verify-full", root.as_str()),
        ("?sslmode=verify-ca", root.as_str()),
        ("?sslmode=require", root.as_str()),
        ("?sslmode=verify-full", ""),
    ] {
        let run = check(query, extra);
        assert_eq!(warn_line(&run), None, "{query} {extra}: {run:#?}");
    }

    // A local server with the default sslmode: no warning, and check passes.
    let db = crate::harness::workspace::supabase_db();
    ws.write_config(Some(&db.url), "");
    ws.mapsync(&["migrate"]).expect_code(0);
    let local = ws.mapsync(&["check"]);
    local.expect_code(0);
    assert!(!local.stdout.contains("warn"), "{local:#?}");
}

#[test]
fn a_failed_migration_names_its_script_and_the_server_once() {
    // A view where the table should be: 001's CREATE TABLE IF NOT EXISTS passes it by, and
    // the index on it fails.
    let db = crate::harness::test_db();
    db.psql("CREATE VIEW public.model_mappings AS SELECT 'x'::text AS id");
    let ws = Workspace::new(Some(&db.url), "");
    let run = ws.mapsync(&["migrate"]);
    run.expect_code(1);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("failed"))
        .unwrap_or_else(|| panic!("no error line: {run:#?}"));
    assert!(
        line.contains("sql/001_model_mappings.sql failed: Postgres at "),
        "{line}"
    );
    assert_eq!(line.matches("Postgres at").count(), 1, "{line}");
    assert_eq!(line.matches("failed").count(), 2, "{line}");
}
