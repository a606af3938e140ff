//! Build script: records the git revision the binary is built from as `MAPSYNC_REVISION`,
//! which `mapsync --version` and `mapsync_build_info{revision}` show.
//!
//! The revision is git's short hash of HEAD, with `-dirty` when tracked files differ from it,
//! or `unknown` when the crate is not built from its own git checkout (a crate tarball, a
//! copy without `.git`, no `git` program). A checkout nested in another repository never
//! borrows that repository's revision: git's top level must be this crate's directory.
//!
//! It reruns when HEAD moves (a commit, a checkout: `HEAD` and the ref it points to, also in
//! `packed-refs`), when the index changes, and when the sources change (which may make the
//! tree dirty). Nothing here fails the build: any git trouble gives `unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    for path in ["build.rs", "Cargo.toml", "Cargo.lock", "src"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let revision = match Git::find(&manifest_dir) {
        Some(git) => {
            for path in git.watched() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
            git.revision().unwrap_or_else(|| "unknown".into())
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=MAPSYNC_REVISION={revision}");
}

/// This crate's git checkout (a plain clone or a `git worktree`).
struct Git {
    dir: PathBuf,
    /// `.git`, or `.git/worktrees/<name>` for a worktree: holds HEAD and the index.
    git_dir: PathBuf,
    /// Where refs live: the same as `git_dir` except in a worktree.
    common_dir: PathBuf,
}

impl Git {
    fn find(dir: &Path) -> Option<Git> {
        let out = git(
            dir,
            &[
                "rev-parse",
                "--show-toplevel",
                "--absolute-git-dir",
                "--git-common-dir",
            ],
        )?;
        let mut lines = out.lines();
        let top = PathBuf::from(lines.next()?);
        let git_dir = PathBuf::from(lines.next()?);
        let common = PathBuf::from(lines.next()?);
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same(&top, dir) {
            return None; // a crate copied into some other repository
        }
        let common_dir = if common.is_absolute() {
            common
        } else {
            dir.join(common)
        };
        Some(Git {
            dir: dir.to_path_buf(),
            git_dir,
            common_dir,
        })
    }

    /// The files whose change means HEAD or the index moved.
    fn watched(&self) -> Vec<PathBuf> {
        let head = self.git_dir.join("HEAD");
        let mut paths = vec![
            head.clone(),
            self.git_dir.join("index"),
            self.common_dir.join("packed-refs"),
        ];
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(target) = text.trim().strip_prefix("ref: ") {
                paths.push(self.common_dir.join(target));
            }
        }
        paths.into_iter().filter(|p| p.exists()).collect()
    }

    /// `abc1234` or `abc1234-dirty`; `None` when git cannot tell (e.g. no commit yet).
    fn revision(&self) -> Option<String> {
        let hash = git(&self.dir, &["rev-parse", "--short", "HEAD"])?;
        let hash = hash.trim();
        if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        // --no-optional-locks: never rewrite the index from a build.
        let status = git(
            &self.dir,
            &[
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
        )?;
        Some(if status.trim().is_empty() {
            hash.to_string()
        } else {
            format!("{hash}-dirty")
        })
    }
}

/// `git -C dir args…`'s stdout, or `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()
}
