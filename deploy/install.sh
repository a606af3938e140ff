#!/usr/bin/env bash
# Install (or upgrade, or roll back) mapsync as a systemd service, on hosts
# without dpkg (elsewhere, prefer the Debian package: deploy/deb.sh builds it).
# It installs the same service files as the package: the binary (as
# /usr/local/bin/mapsync), the unit (with ExecStart= naming it), the default
# config, the sysusers.d entry, and the shell completions and man pages that
# the binary generates. Not the SQL scripts, alert rules or docs: use them from
# the repository.
#
# Run as root from the repository (or anywhere: paths default to the repository
# that holds this script). Idempotent: running it again with the same inputs
# changes nothing and does not restart the service.
#
#   deploy/install.sh [options]
#
#   --binary PATH            mapsync binary to install (default: <repo>/target/release/mapsync)
#   --config-src PATH        config installed to /etc/mapsync/mapsync.toml if that file is
#                            absent (default: <repo>/config/mapsync.toml); an existing
#                            config is never overwritten
#   --unit PATH              unit file (default: <repo>/systemd/mapsync.service)
#   --sysusers PATH          sysusers.d entry (default: <repo>/systemd/mapsync.sysusers)
#   --app-group GROUP        the application's group: mapsync joins it (needed for the
#                            SQLite -shm read marks); writes drop-in 10-app-group.conf
#   --sqlite-path PATH       the application's SQLite file: its directory becomes the only
#                            writable path besides /var/lib/mapsync (for -shm); writes
#                            drop-in 20-app-data.conf (also sets source.sqlite_path)
#   --target-url-file FILE   Postgres URL (with password) -> credential target-url (0600)
#   --admin-token-file FILE  admin token -> credential admin-token (0600)
#   --no-start               install files only: no enable/start/restart
#   --dry-run                print what would be done, change nothing
#   --prefix DIR             install under DIR instead of / (tests): no useradd, no
#                            chown, no systemctl
#   --rollback               swap the binary and unit with their .prev copies and restart
#   -h, --help               this text
#
# Backups for a one-step rollback (see deploy/ROLLBACK.md):
#   /usr/local/bin/mapsync.prev, /etc/mapsync/rollback/mapsync.service.prev and
#   /etc/mapsync/rollback/<drop-in>.prev — written only when the file changes, so
#   re-running the same install never destroys the previous version.
set -euo pipefail

PROG=mapsync-install
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

BINARY_SRC="$REPO_DIR/target/release/mapsync"
CONFIG_SRC="$REPO_DIR/config/mapsync.toml"
UNIT_SRC="$REPO_DIR/systemd/mapsync.service"
SYSUSERS_SRC="$REPO_DIR/systemd/mapsync.sysusers"
APP_GROUP=""
SQLITE_PATH=""
TARGET_URL_FILE=""
ADMIN_TOKEN_FILE=""
PREFIX="/"
DRY_RUN=0
NO_START=0
ROLLBACK=0

SVC_USER=mapsync
SVC_GROUP=mapsync
UNIT_NAME=mapsync.service

say()  { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --binary)           need_arg "$@"; BINARY_SRC=$2; shift 2 ;;
        --config-src)       need_arg "$@"; CONFIG_SRC=$2; shift 2 ;;
        --unit)             need_arg "$@"; UNIT_SRC=$2; shift 2 ;;
        --sysusers)         need_arg "$@"; SYSUSERS_SRC=$2; shift 2 ;;
        --app-group)        need_arg "$@"; APP_GROUP=$2; shift 2 ;;
        --sqlite-path)      need_arg "$@"; SQLITE_PATH=$2; shift 2 ;;
        --target-url-file)  need_arg "$@"; TARGET_URL_FILE=$2; shift 2 ;;
        --admin-token-file) need_arg "$@"; ADMIN_TOKEN_FILE=$2; shift 2 ;;
        --prefix)           need_arg "$@"; PREFIX=$2; shift 2 ;;
        --no-start)         NO_START=1; shift ;;
        --dry-run)          DRY_RUN=1; shift ;;
        --rollback)         ROLLBACK=1; shift ;;
        -h|--help)          usage; exit 0 ;;
        *)                  die "unknown option: $1 (see --help)" ;;
    esac
done

abspath() { # absolute path without requiring the file to exist
    case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac
}

BINARY_SRC=$(abspath "$BINARY_SRC")
CONFIG_SRC=$(abspath "$CONFIG_SRC")
UNIT_SRC=$(abspath "$UNIT_SRC")
SYSUSERS_SRC=$(abspath "$SYSUSERS_SRC")
[[ -z $TARGET_URL_FILE ]] || TARGET_URL_FILE=$(abspath "$TARGET_URL_FILE")
[[ -z $ADMIN_TOKEN_FILE ]] || ADMIN_TOKEN_FILE=$(abspath "$ADMIN_TOKEN_FILE")
[[ $PREFIX == /* ]] || PREFIX=$(abspath "$PREFIX")
ROOT=${PREFIX%/}            # "" for a real install
LIVE=0; [[ -z $ROOT ]] && LIVE=1

# Paths on the target system.
BIN_DEST="$ROOT/usr/local/bin/mapsync"
BIN_PREV="$BIN_DEST.prev"
ETC_DIR="$ROOT/etc/mapsync"
CRED_DIR="$ETC_DIR/credentials"
CONFIG_DEST="$ETC_DIR/mapsync.toml"
BACKUP_DIR="$ETC_DIR/rollback"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT_DEST="$UNIT_DIR/$UNIT_NAME"
UNIT_PREV="$BACKUP_DIR/$UNIT_NAME.prev"
DROPIN_DIR="$UNIT_DIR/$UNIT_NAME.d"
SYSUSERS_DEST="$ROOT/etc/sysusers.d/mapsync.conf"
SHARE_DIR="$ROOT/usr/local/share"

CHANGED=0                   # anything the running service would see changed?

sd_booted() { [[ -d /run/systemd/system ]]; }

# run CMD...: execute, or print it under --dry-run.
run() {
    if (( DRY_RUN )); then
        printf '%s: would run:' "$PROG"; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# owner_args USER GROUP: "-o USER -g GROUP" for a real install; nothing under
# --prefix (the test root belongs to whoever runs the test).
owner_args() {
    if (( LIVE )); then printf -- '-o\n%s\n-g\n%s\n' "$1" "$2"; fi
}

# fix_perms PATH MODE USER GROUP: set mode (and owner on a real install) if they differ.
fix_perms() {
    local path=$1 mode=$2 user=$3 group=$4
    if [[ -e $path && $(stat -c %a "$path") != "${mode#0}" ]]; then
        run chmod "$mode" "$path"
    fi
    if (( LIVE )) && [[ -e $path && $(stat -c %U:%G "$path") != "$user:$group" ]]; then
        run chown "$user:$group" "$path"
    fi
    return 0
}

# make_dir DIR MODE USER GROUP
make_dir() {
    local dir=$1 mode=$2 own
    mapfile -t own < <(owner_args "$3" "$4")
    if [[ -d $dir ]]; then
        fix_perms "$dir" "$mode" "$3" "$4"
    else
        run install -d -m "$mode" "${own[@]}" "$dir"
    fi
    return 0
}

# backup FILE COPY: keep the current FILE as COPY (for --rollback).
backup() {
    say "backup: ${1#"$ROOT"} -> ${2#"$ROOT"}"
    run cp -p "$1" "$2"
}

# put_file SRC DEST MODE USER GROUP [BACKUP]: atomically install SRC as DEST
# unless DEST already has the same content (then only mode/owner are fixed).
# With BACKUP, a DEST that is about to change is first copied to BACKUP.
put_file() {
    local src=$1 dest=$2 mode=$3 user=$4 group=$5 backup_to=${6:-} own tmp
    mapfile -t own < <(owner_args "$user" "$group")
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        say "unchanged: ${dest#"$ROOT"}"
        fix_perms "$dest" "$mode" "$user" "$group"
        return 0
    fi
    if [[ -n $backup_to && -f $dest ]]; then
        backup "$dest" "$backup_to"
    fi
    say "install: ${dest#"$ROOT"} (mode $mode)"
    if (( DRY_RUN )) && [[ $src == "$TMP_DIR"/*.conf ]]; then
        sed 's/^/    | /' "$src"   # generated drop-in: show it
    fi
    tmp="$dest.new.$$"
    run install -m "$mode" "${own[@]}" "$src" "$tmp"
    run mv -f "$tmp" "$dest"
    CHANGED=1
    return 0
}

TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR"' EXIT

# ---------------------------------------------------------------- rollback ---
swap_with_prev() { # CURRENT PREV
    local cur=$1 prev=$2
    if [[ ! -f $prev ]]; then
        say "no ${prev#"$ROOT"}: ${cur#"$ROOT"} left as is"
        return 1
    fi
    say "rollback: ${prev#"$ROOT"} <-> ${cur#"$ROOT"}"
    if [[ -f $cur ]]; then
        run mv -f "$cur" "$cur.swap.$$"
        run mv -f "$prev" "$cur"
        run mv -f "$cur.swap.$$" "$prev"
    else
        run mv -f "$prev" "$cur"
    fi
}

restart_service() {
    if (( ! LIVE )); then
        say "--prefix $PREFIX: not touching systemd"
    elif ! sd_booted; then
        say "systemd is not running as PID 1 here: skipping systemctl (run 'systemctl daemon-reload && systemctl restart mapsync' on the target)"
    else
        run systemctl daemon-reload
        run systemctl restart "$UNIT_NAME"
        (( DRY_RUN )) || systemctl is-active --quiet "$UNIT_NAME" \
            || die "mapsync is not active after restart: journalctl -u mapsync -n 50"
        say "mapsync restarted"
    fi
}

if (( ROLLBACK )); then
    (( LIVE && ! DRY_RUN && EUID != 0 )) && die "run as root (or use --dry-run / --prefix)"
    swapped=0
    swap_with_prev "$BIN_DEST" "$BIN_PREV" && swapped=1
    swap_with_prev "$UNIT_DEST" "$UNIT_PREV" && swapped=1
    (( swapped )) || die "nothing to roll back (no .prev files)"
    say "drop-ins in ${DROPIN_DIR#"$ROOT"} and the config are not rolled back (their .prev copies are in ${BACKUP_DIR#"$ROOT"})"
    restart_service
    say "rollback done; running --rollback again rolls forward"
    exit 0
fi

# ----------------------------------------------------------------- checks ---
(( LIVE && ! DRY_RUN && EUID != 0 )) && die "run as root (or use --dry-run / --prefix DIR)"
[[ -f $UNIT_SRC ]] || die "unit file not found: $UNIT_SRC"
[[ -f $SYSUSERS_SRC ]] || die "sysusers.d entry not found: $SYSUSERS_SRC"
# The unit names the package's /usr/bin/mapsync; this script installs the binary
# as /usr/local/bin/mapsync, and that is the one line it changes.
UNIT_RENDERED="$TMP_DIR/$UNIT_NAME"
sed 's|^ExecStart=/usr/bin/mapsync |ExecStart=/usr/local/bin/mapsync |' "$UNIT_SRC" >"$UNIT_RENDERED"
grep -q '^ExecStart=/usr/local/bin/mapsync ' "$UNIT_RENDERED" \
    || die "unexpected ExecStart= in $UNIT_SRC (want /usr/bin/mapsync or /usr/local/bin/mapsync)"
if [[ ! -x $BINARY_SRC ]]; then
    if (( DRY_RUN )); then
        warn "binary not found or not executable: $BINARY_SRC (cargo build --release?)"
    else
        die "binary not found or not executable: $BINARY_SRC (cargo build --release, or --binary PATH)"
    fi
fi
for f in "$TARGET_URL_FILE" "$ADMIN_TOKEN_FILE"; do
    [[ -z $f ]] && continue
    [[ -r $f ]] || die "cannot read $f"
    [[ -s $f ]] || die "$f is empty"
done
if [[ -n $APP_GROUP ]]; then
    [[ $APP_GROUP =~ ^[a-z_][a-z0-9_-]*[$]?$ ]] || die "bad group name: $APP_GROUP"
    if (( LIVE )) && ! getent group "$APP_GROUP" >/dev/null; then
        msg="group $APP_GROUP does not exist (it must be the group that owns the application's SQLite file)"
        if (( DRY_RUN )); then warn "$msg"; else die "$msg"; fi
    fi
fi
SQLITE_DIR=""
if [[ -n $SQLITE_PATH ]]; then
    [[ $SQLITE_PATH == /* ]] || die "--sqlite-path must be absolute"
    [[ $SQLITE_PATH =~ ^[A-Za-z0-9/._+-]+$ ]] || die "--sqlite-path: only [A-Za-z0-9/._+-] please (it goes into a unit file)"
    SQLITE_DIR=$(dirname "$SQLITE_PATH")
    [[ $SQLITE_DIR != / ]] || die "--sqlite-path must not be in /"
    case $SQLITE_DIR/ in
        /tmp/*|/var/tmp/*) warn "$SQLITE_DIR is hidden from mapsync by PrivateTmp=yes: move the database" ;;
    esac
fi

if (( DRY_RUN )); then say "dry run: nothing will be changed"; fi
if (( ! LIVE )); then say "installing under prefix $PREFIX: skipping useradd/usermod, chown and systemctl"; fi

# ---------------------------------------------------- drop-ins (generated) ---
# Separate files so that re-running with only one of the options keeps the other.
DROPIN_GROUP_SRC=""
if [[ -n $APP_GROUP ]]; then
    DROPIN_GROUP_SRC="$TMP_DIR/10-app-group.conf"
    cat >"$DROPIN_GROUP_SRC" <<EOF
# Written by deploy/install.sh --app-group. The application's group: grants
# read access to its SQLite file and write access to the "-shm" read marks.
[Service]
SupplementaryGroups=$APP_GROUP
EOF
fi
DROPIN_DATA_SRC=""
if [[ -n $SQLITE_PATH ]]; then
    DROPIN_DATA_SRC="$TMP_DIR/20-app-data.conf"
    {
        printf '%s\n' \
            "# Written by deploy/install.sh --sqlite-path. The application's data directory" \
            "# is writable only so that SQLite can write its WAL read marks in \"-shm\"" \
            "# (mapsync's connection is read-only). This also sets source.sqlite_path," \
            "# overriding mapsync.toml, so that the sandbox and the config always agree." \
            "[Service]" \
            "ReadWritePaths=" \
            "ReadWritePaths=$SQLITE_DIR" \
            "Environment=MAPSYNC_SOURCE__SQLITE_PATH=$SQLITE_PATH"
        case $SQLITE_DIR/ in
            /home/*|/root/*|/run/user/*)
                printf '%s\n' "# The data directory is under a home directory: ProtectHome=yes would hide it." \
                    "ProtectHome=read-only" ;;
        esac
    } >"$DROPIN_DATA_SRC"
fi

# ------------------------------------------------------- verify (staged) ---
# Verify the unit and its drop-ins before anything is installed, on a copy
# whose ExecStart points at the binary being installed.
verify_staged() {
    if ! command -v systemd-analyze >/dev/null; then
        warn "systemd-analyze not found: unit not verified"
        return 0
    fi
    if [[ ! -x $BINARY_SRC ]]; then
        say "would verify the unit (skipped: no binary yet)"
        return 0
    fi
    local stage="$TMP_DIR/stage" out f
    mkdir -p "$stage/$UNIT_NAME.d"
    sed "s|^ExecStart=/usr/local/bin/mapsync |ExecStart=$BINARY_SRC |" "$UNIT_RENDERED" >"$stage/$UNIT_NAME"
    grep -q "^ExecStart=$BINARY_SRC " "$stage/$UNIT_NAME" || die "unexpected ExecStart= in $UNIT_SRC"
    # the drop-ins already installed, overridden by the ones about to be written
    if [[ -d $DROPIN_DIR ]]; then
        for f in "$DROPIN_DIR"/*.conf; do [[ -f $f ]] && cp "$f" "$stage/$UNIT_NAME.d/"; done
    fi
    [[ -n $DROPIN_GROUP_SRC ]] && cp "$DROPIN_GROUP_SRC" "$stage/$UNIT_NAME.d/"
    [[ -n $DROPIN_DATA_SRC ]] && cp "$DROPIN_DATA_SRC" "$stage/$UNIT_NAME.d/"
    if ! out=$(systemd-analyze verify "$stage/$UNIT_NAME" 2>&1) || [[ -n $out ]]; then
        printf '%s\n' "$out" >&2
        die "systemd-analyze verify failed for $UNIT_SRC (nothing installed)"
    fi
    say "ok: systemd-analyze verify (unit + drop-ins)"
}
verify_staged

# ------------------------------------------------------------ user, group ---
# The package's sysusers.d entry, in the administrator's /etc/sysusers.d.
# (Neither this nor the completions and man pages below need a restart.)
changed_before=$CHANGED
make_dir "$(dirname "$SYSUSERS_DEST")" 0755 root root
put_file "$SYSUSERS_SRC" "$SYSUSERS_DEST" 0644 root root
CHANGED=$changed_before
if (( LIVE )); then
    if getent passwd "$SVC_USER" >/dev/null && getent group "$SVC_GROUP" >/dev/null; then
        say "user $SVC_USER exists"
    elif command -v systemd-sysusers >/dev/null; then
        say "creating system user and group $SVC_USER (systemd-sysusers ${SYSUSERS_DEST#"$ROOT"})"
        run systemd-sysusers "$SYSUSERS_DEST"
    else
        # The same user by hand: no login shell, no home.
        if ! getent group "$SVC_GROUP" >/dev/null; then
            say "creating system group $SVC_GROUP"
            run groupadd --system "$SVC_GROUP"
        fi
        say "creating system user $SVC_USER (no login shell, no home)"
        run useradd --system --gid "$SVC_GROUP" --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "mapsync daemon" "$SVC_USER"
    fi
    if [[ -n $APP_GROUP ]]; then
        if id -nG "$SVC_USER" 2>/dev/null | tr ' ' '\n' | grep -qx -- "$APP_GROUP"; then
            say "user $SVC_USER is already in group $APP_GROUP"
        else
            say "adding user $SVC_USER to group $APP_GROUP"
            run usermod -a -G "$APP_GROUP" "$SVC_USER"
            CHANGED=1
        fi
    fi
else
    say "prefix install: not creating user/group $SVC_USER"
fi

# ------------------------------------------------------------ directories ---
make_dir "$ETC_DIR" 0750 root "$SVC_GROUP"
make_dir "$CRED_DIR" 0700 root root
make_dir "$BACKUP_DIR" 0700 root root
make_dir "$UNIT_DIR" 0755 root root
(( DRY_RUN )) || [[ -d $ROOT/usr/local/bin ]] || install -d -m 0755 "$ROOT/usr/local/bin"

# ---------------------------------------------------- backups (release) ---
# The binary and the unit form one release: when either changes, keep BOTH
# current files as .prev, so that --rollback never pairs an old binary with an
# even older unit (or the reverse). A re-run that changes nothing keeps the
# existing .prev files.
bin_diff=0; unit_diff=0
if [[ -x $BINARY_SRC && -f $BIN_DEST ]] && ! cmp -s "$BINARY_SRC" "$BIN_DEST"; then bin_diff=1; fi
if [[ -f $UNIT_DEST ]] && ! cmp -s "$UNIT_RENDERED" "$UNIT_DEST"; then unit_diff=1; fi
if (( bin_diff || unit_diff )); then
    if [[ -f $BIN_DEST ]]; then backup "$BIN_DEST" "$BIN_PREV"; fi
    if [[ -f $UNIT_DEST ]]; then backup "$UNIT_DEST" "$UNIT_PREV"; fi
fi

# ----------------------------------------------------------------- binary ---
if [[ -x $BINARY_SRC ]]; then
    put_file "$BINARY_SRC" "$BIN_DEST" 0755 root root
else
    say "would install $BINARY_SRC -> ${BIN_DEST#"$ROOT"} (keeping the old one as mapsync.prev)"
fi

# ----------------------------------------------------------------- config ---
if [[ -f $CONFIG_DEST ]]; then
    say "kept existing config ${CONFIG_DEST#"$ROOT"} (never overwritten; compare with $CONFIG_SRC)"
    fix_perms "$CONFIG_DEST" 0640 root "$SVC_GROUP"
elif [[ -f $CONFIG_SRC ]]; then
    put_file "$CONFIG_SRC" "$CONFIG_DEST" 0640 root "$SVC_GROUP"
elif (( DRY_RUN )); then
    warn "config source not found: $CONFIG_SRC"
else
    die "config source not found: $CONFIG_SRC (use --config-src PATH)"
fi

# ------------------------------------------ completions and man pages ---
# Generated by the binary being installed, as the package build does.
install_generated() {
    local gen="$TMP_DIR/generated" page
    if [[ ! -x $BINARY_SRC ]]; then
        say "would install the shell completions and man pages that $BINARY_SRC generates"
        return 0
    fi
    mkdir -p "$gen/man"
    if ! { "$BINARY_SRC" completions bash >"$gen/bash" && "$BINARY_SRC" completions zsh >"$gen/zsh" \
            && "$BINARY_SRC" completions fish >"$gen/fish" && "$BINARY_SRC" man "$gen/man"; } 2>/dev/null; then
        warn "$BINARY_SRC cannot generate completions and man pages (too old?): none installed"
        return 0
    fi
    make_dir "$SHARE_DIR/bash-completion/completions" 0755 root root
    make_dir "$SHARE_DIR/zsh/site-functions" 0755 root root
    make_dir "$SHARE_DIR/fish/vendor_completions.d" 0755 root root
    make_dir "$SHARE_DIR/man/man1" 0755 root root
    put_file "$gen/bash" "$SHARE_DIR/bash-completion/completions/mapsync" 0644 root root
    put_file "$gen/zsh" "$SHARE_DIR/zsh/site-functions/_mapsync" 0644 root root
    put_file "$gen/fish" "$SHARE_DIR/fish/vendor_completions.d/mapsync.fish" 0644 root root
    for page in "$gen"/man/*.1; do
        [[ -f $page ]] && put_file "$page" "$SHARE_DIR/man/man1/${page##*/}" 0644 root root
    done
    return 0
}
changed_before=$CHANGED
install_generated
CHANGED=$changed_before

# ------------------------------------------------------------ credentials ---
# Only written when given. Without them the unit falls back to empty
# credentials (SetCredential=): snapshots-only mode and no admin token.
if [[ -n $TARGET_URL_FILE ]]; then
    put_file "$TARGET_URL_FILE" "$CRED_DIR/target-url" 0600 root root
elif [[ ! -f $CRED_DIR/target-url ]]; then
    say "no target-url credential: mapsync runs in snapshots-only mode until ${CRED_DIR#"$ROOT"}/target-url exists (then restart)"
fi
if [[ -n $ADMIN_TOKEN_FILE ]]; then
    put_file "$ADMIN_TOKEN_FILE" "$CRED_DIR/admin-token" 0600 root root
elif [[ ! -f $CRED_DIR/admin-token ]]; then
    say "no admin-token credential: the admin routes need no token (fine only on 127.0.0.1)"
fi

# ----------------------------------------------------- unit and drop-ins ---
put_file "$UNIT_RENDERED" "$UNIT_DEST" 0644 root root
if [[ -n $DROPIN_GROUP_SRC || -n $DROPIN_DATA_SRC ]]; then
    make_dir "$DROPIN_DIR" 0755 root root
    if [[ -n $DROPIN_GROUP_SRC ]]; then
        put_file "$DROPIN_GROUP_SRC" "$DROPIN_DIR/10-app-group.conf" 0644 root root "$BACKUP_DIR/10-app-group.conf.prev"
    fi
    if [[ -n $DROPIN_DATA_SRC ]]; then
        put_file "$DROPIN_DATA_SRC" "$DROPIN_DIR/20-app-data.conf" 0644 root root "$BACKUP_DIR/20-app-data.conf.prev"
    fi
fi

# --------------------------------------------- checks on the live system ---
if (( LIVE && ! DRY_RUN )); then
    if command -v systemd-analyze >/dev/null; then
        out=$(systemd-analyze verify "$UNIT_DEST" 2>&1) || { printf '%s\n' "$out" >&2; die "systemd-analyze verify $UNIT_DEST failed"; }
        [[ -z $out ]] || warn "systemd-analyze verify $UNIT_DEST: $out"
        say "ok: systemd-analyze verify ${UNIT_DEST}"
    fi
    if [[ -n $SQLITE_DIR ]]; then
        if [[ ! -d $SQLITE_DIR ]]; then
            warn "$SQLITE_DIR does not exist yet"
        else
            dgrp=$(stat -c %G "$SQLITE_DIR"); dmode=$(stat -c %a "$SQLITE_DIR")
            [[ -z $APP_GROUP || $dgrp == "$APP_GROUP" ]] || warn "$SQLITE_DIR belongs to group $dgrp, not $APP_GROUP"
            (( 8#$dmode & 8#2000 )) || warn "$SQLITE_DIR is not setgid: a -shm that mapsync creates would belong to group $SVC_GROUP (fix: chmod g+s $SQLITE_DIR)"
            (( 8#$dmode & 8#0020 )) || warn "$SQLITE_DIR is not group-writable: mapsync cannot create -shm while the application is stopped"
            for f in "$SQLITE_PATH" "$SQLITE_PATH-wal" "$SQLITE_PATH-shm"; do
                [[ -e $f ]] || continue
                fmode=$(stat -c %a "$f")
                (( (8#$fmode & 8#0060) == 8#0060 )) || warn "$f is not group read/write (mode $fmode): chmod g+rw $f"
            done
        fi
    fi
fi

# ---------------------------------------------------------------- systemd ---
if (( ! LIVE )); then
    say "prefix install: skipping systemctl"
elif ! sd_booted; then
    say "systemd is not running as PID 1 here: skipping systemctl daemon-reload/enable/start"
elif (( NO_START )); then
    run systemctl daemon-reload
    say "--no-start: not enabling or starting $UNIT_NAME (systemctl enable --now mapsync)"
else
    run systemctl daemon-reload
    run systemctl enable "$UNIT_NAME"
    if systemctl is-active --quiet "$UNIT_NAME"; then
        if (( CHANGED )); then
            run systemctl restart "$UNIT_NAME"
        else
            say "nothing changed: mapsync keeps running"
        fi
    else
        # Type=notify: returns once mapsync sent READY=1, or fails.
        run systemctl start "$UNIT_NAME"
    fi
    if (( ! DRY_RUN )); then
        systemctl is-active --quiet "$UNIT_NAME" || die "mapsync is not active: journalctl -u mapsync -n 50"
        say "mapsync is active: systemctl status mapsync; curl -s 127.0.0.1:9187/readyz"
    fi
fi
say "done"
