#!/usr/bin/env bash
# The Debian package end to end, on this machine: builds it (deploy/deb.sh), checks what it
# holds, installs it with dpkg -i, checks that the installed files work (mapsync --version,
# systemd-analyze verify on the installed unit, the service user, man, completions, the
# config as a conffile), reinstalls it over an edited config, removes and purges it, and
# checks that no path it installed is left: `dpkg -L` is recorded before the purge and every
# path is looked for after it.
#
# Run as root (dpkg) on a machine where the mapsync package is not installed; .ci/run does.
# It starts no service (there is none to start: the package enables and starts nothing).
# The mapsync user and group that the package creates are kept by a purge, as Debian does
# for every system user; this check deletes them afterwards if it created them. Whatever
# happens, the package is purged on exit.
#
# Prints one "ok: ..." or "FAIL: ..." line per check and exits 1 if any failed.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
PKG=mapsync

FAILED=0
ok()   { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILED=$((FAILED + 1)); }
show() { sed 's/^/    | /' "$1" | head -n 60; }
die()  { printf 'deb-check: error: %s\n' "$*" >&2; exit 1; }

(( EUID == 0 )) || die "run as root: dpkg -i and dpkg --purge need it"
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install -y $2"; }
need dpkg dpkg
need dpkg-deb dpkg
need systemd-analyze systemd
need man man-db
status=$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || true)
if [[ -n $status && $status != not-installed ]]; then
    die "the $PKG package is on this machine (status: $status); this check installs and purges it: dpkg --purge $PKG first"
fi
[[ ! -e /usr/bin/mapsync ]] || die "/usr/bin/mapsync exists but no package owns it: move it away first"

user_existed=0; getent passwd "$PKG" >/dev/null && user_existed=1
group_existed=0; getent group "$PKG" >/dev/null && group_existed=1
TMP=$(mktemp -d)
LOG="$TMP/log"
INSTALLED=0
cleanup() {
    if (( INSTALLED )); then dpkg --purge "$PKG" >/dev/null 2>&1 || true; fi
    if (( ! user_existed )) && getent passwd "$PKG" >/dev/null; then userdel "$PKG" >/dev/null 2>&1 || true; fi
    if (( ! group_existed )) && getent group "$PKG" >/dev/null; then groupdel "$PKG" >/dev/null 2>&1 || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# ------------------------------------------------------------------ build ---
if ! "$SCRIPT_DIR/deb.sh" >"$TMP/deb-path" 2>"$TMP/build.log"; then
    show "$TMP/build.log"
    die "deploy/deb.sh failed"
fi
DEB=$(tail -n 1 "$TMP/deb-path")
VERSION=$(dpkg-deb -f "$DEB" Version)
CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_DIR/Cargo.toml" | head -n 1)
ARCH=$(dpkg --print-architecture)
if [[ $(basename "$DEB") == "${PKG}_${CARGO_VERSION}_${ARCH}.deb" && $VERSION == "$CARGO_VERSION" ]]; then
    ok "built $(basename "$DEB") ($(du -h "$DEB" | cut -f1))"
else
    fail "package $DEB: version $VERSION, expected ${PKG}_${CARGO_VERSION}_${ARCH}.deb"
fi

# --------------------------------------------------------------- contents ---
# Paths in the archive, as absolute paths ("./usr/bin/" -> "/usr/bin").
dpkg-deb --fsys-tarfile "$DEB" | tar -t | sed 's|^\./|/|; s|/$||; /^$/d' | sort >"$TMP/contents"
expected=(
    /usr/bin/mapsync
    /etc/mapsync/mapsync.toml
    /usr/lib/systemd/system/mapsync.service
    /usr/lib/sysusers.d/mapsync.conf
    /usr/share/man/man1/mapsync.1.gz
    /usr/share/man/man1/mapsync-sync.1.gz
    /usr/share/man/man1/mapsync-completions.1.gz
    /usr/share/bash-completion/completions/mapsync
    /usr/share/zsh/vendor-completions/_mapsync
    /usr/share/fish/vendor_completions.d/mapsync.fish
    /usr/share/doc/mapsync/copyright
    /usr/share/doc/mapsync/CHANGELOG.md
)
for f in "$REPO_DIR"/sql/*.sql; do expected+=("/usr/share/mapsync/sql/${f##*/}"); done
for f in "$REPO_DIR"/sql/rollback/*.sql; do expected+=("/usr/share/mapsync/sql/rollback/${f##*/}"); done
missing=()
for p in "${expected[@]}"; do grep -qxF "$p" "$TMP/contents" || missing+=("$p"); done
if (( ${#missing[@]} )); then
    fail "the package lacks: ${missing[*]}"; show "$TMP/contents"
else
    ok "the package holds the binary, the unit, the conffile, the sysusers entry, man pages, bash/zsh/fish completions and the SQL files (${#expected[@]} paths checked, $(grep -c . "$TMP/contents") in all)"
fi
mkdir "$TMP/control"
dpkg-deb -e "$DEB" "$TMP/control"
if [[ $(cat "$TMP/control/conffiles") == /etc/mapsync/mapsync.toml ]]; then
    ok "conffiles: /etc/mapsync/mapsync.toml"
else
    fail "conffiles is not just /etc/mapsync/mapsync.toml:"; show "$TMP/control/conffiles"
fi
# (debhelper's enable snippet says "new installations run enable"; its start snippets
# run "deb-systemd-invoke start" or set "_dh_action=start".)
if grep -qE 'new installations run enable|deb-systemd-invoke start|_dh_action=start' "$TMP/control/postinst"; then
    fail "postinst enables or starts the service"; show "$TMP/control/postinst"
elif ! grep -q 'systemd-sysusers .*mapsync.conf' "$TMP/control/postinst"; then
    fail "postinst does not create the user with systemd-sysusers"; show "$TMP/control/postinst"
elif [[ $(grep -c '#DEBHELPER#\|Automatically added by cargo-deb' "$TMP/control/postinst") -ne 3 ]]; then
    fail "postinst: the debhelper snippets are not in once each"; show "$TMP/control/postinst"
else
    ok "postinst: creates the user (systemd-sysusers), neither enables nor starts the service, restarts only a running one on upgrade"
fi

# ---------------------------------------------------------------- install ---
# Which of the package's paths (the directories, mostly) were here before it.
while read -r p; do
    if [[ -e $p || -L $p ]]; then printf '%s\n' "$p"; fi
done <"$TMP/contents" >"$TMP/before"
INSTALLED=1
if dpkg -i "$DEB" </dev/null >"$LOG" 2>&1; then
    ok "dpkg -i $(basename "$DEB")"
else
    show "$LOG"; die "dpkg -i failed"
fi

want_version=$("$(dirname "$DEB")/../release/mapsync" --version 2>/dev/null || true)
got_version=$(/usr/bin/mapsync --version 2>&1 || true)
if [[ $got_version =~ ^mapsync\ ${CARGO_VERSION//./\\.}\ \(([0-9a-f]{7,}(-dirty)?|unknown)\)$ \
        && $got_version == "$want_version" ]]; then
    ok "installed /usr/bin/mapsync --version: $got_version"
else
    fail "/usr/bin/mapsync --version printed '$got_version' (the build says '$want_version')"
fi
rev=${got_version##* (}; rev=${rev%)}
if git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    head_rev=$(git -C "$REPO_DIR" rev-parse HEAD)
    if [[ $head_rev == "${rev%-dirty}"* ]]; then
        ok "the revision $rev is this checkout's HEAD"
    else
        fail "the revision $rev is not HEAD ($head_rev)"
    fi
fi

UNIT=/usr/lib/systemd/system/mapsync.service
if systemd-analyze verify "$UNIT" >"$LOG" 2>&1 && [[ ! -s $LOG ]]; then
    ok "systemd-analyze verify $UNIT (no warnings)"
else
    fail "systemd-analyze verify $UNIT"; show "$LOG"
fi
if grep -qx 'ExecStart=/usr/bin/mapsync run --config /etc/mapsync/mapsync.toml' "$UNIT"; then
    ok "the installed unit runs /usr/bin/mapsync with /etc/mapsync/mapsync.toml"
else
    fail "the installed unit's ExecStart= is not /usr/bin/mapsync run --config /etc/mapsync/mapsync.toml"
fi
enabled=$(find /etc/systemd/system -name mapsync.service -path '*.wants/*' 2>/dev/null)
if [[ -z $enabled ]]; then ok "the service is not enabled"; else fail "the service is enabled: $enabled"; fi

if [[ $(getent passwd "$PKG" | cut -d: -f6,7) == /nonexistent:/usr/sbin/nologin ]] \
        && [[ $(id -gn "$PKG" 2>/dev/null) == "$PKG" ]]; then
    ok "user $PKG (group $PKG, no home, no login shell) created from the sysusers.d entry"
else
    fail "user $PKG: $(getent passwd "$PKG" || echo missing)"
fi
if [[ $(stat -c '%a %U:%G' /etc/mapsync/credentials 2>/dev/null) == "700 root:root" ]]; then
    ok "/etc/mapsync/credentials is 0700 root:root"
else
    fail "/etc/mapsync/credentials: $(stat -c '%a %U:%G' /etc/mapsync/credentials 2>&1)"
fi
# The service user can read the packaged config (mapsync check's first line).
if (cd /tmp && runuser -u "$PKG" -- /usr/bin/mapsync --config /etc/mapsync/mapsync.toml check 2>&1 || true) \
        | head -n 1 | grep -q '^ok   config: valid'; then
    ok "the packaged config loads as user $PKG (mapsync check: ok config)"
else
    fail "user $PKG cannot load /etc/mapsync/mapsync.toml"
fi
if MANPAGER=cat MANWIDTH=100 man mapsync-sync 2>"$LOG" | grep -q -- '--delete-missing' \
        && [[ $(man -w mapsync 2>/dev/null) == /usr/share/man/man1/mapsync.1.gz ]]; then
    ok "man mapsync, man mapsync-sync"
else
    fail "man pages not found by man"; show "$LOG"
fi
if bash --norc --noprofile -c 'source /usr/share/bash-completion/completions/mapsync && complete -p mapsync' \
        2>"$LOG" | grep -q ' mapsync$'; then
    ok "bash completion registers for mapsync"
else
    fail "bash completion"; show "$LOG"
fi
if diff -r <(cd "$REPO_DIR/sql" && cat ./*.sql rollback/*.sql) \
        <(cd /usr/share/mapsync/sql && cat ./*.sql rollback/*.sql) >"$LOG" 2>&1; then
    ok "/usr/share/mapsync/sql holds sql/ as it is"
else
    fail "/usr/share/mapsync/sql differs from sql/"; show "$LOG"
fi

# An operator's edit of the conffile survives a reinstall.
printf '\n# operator edit\n' >>/etc/mapsync/mapsync.toml
if dpkg -i "$DEB" </dev/null >"$LOG" 2>&1 && grep -qx '# operator edit' /etc/mapsync/mapsync.toml; then
    ok "dpkg -i again: the edited /etc/mapsync/mapsync.toml is kept"
else
    fail "reinstall lost the edit of /etc/mapsync/mapsync.toml"; show "$LOG"
fi

# ----------------------------------------------------- remove, then purge ---
dpkg -L "$PKG" | sed '/^$/d' | sort -u >"$TMP/listed"
printf 'dpkg -L %s before the purge (%s paths):\n' "$PKG" "$(grep -c . "$TMP/listed")"
sed 's/^/    /' "$TMP/listed"
if dpkg -r "$PKG" </dev/null >"$LOG" 2>&1 && [[ ! -e /usr/bin/mapsync ]] \
        && grep -qx '# operator edit' /etc/mapsync/mapsync.toml; then
    ok "dpkg -r: the binary is gone, the edited config stays until a purge"
else
    fail "dpkg -r"; show "$LOG"
fi
if dpkg --purge "$PKG" </dev/null >"$LOG" 2>&1; then
    INSTALLED=0
    ok "dpkg --purge $PKG"
else
    fail "dpkg --purge"; show "$LOG"
fi
left=()
created=0
while read -r p; do
    grep -qxF "$p" "$TMP/before" && continue   # a directory that was already here
    created=$((created + 1))
    if ls -d "$p" >/dev/null 2>&1; then left+=("$p"); fi
done <"$TMP/listed"
# Besides dpkg's list: the credentials directory, a mask or an enablement left by
# deb-systemd-helper, its state files.
for p in /etc/mapsync /etc/systemd/system/mapsync.service \
         /var/lib/systemd/deb-systemd-helper-enabled/mapsync.service.dsh-also \
         /var/lib/systemd/deb-systemd-helper-masked/mapsync.service; do
    grep -qxF "$p" "$TMP/listed" && continue   # looked for above
    if ls -d "$p" >/dev/null 2>&1; then left+=("$p"); fi
done
status=$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || true)
if (( ${#left[@]} )); then
    fail "the purge left: ${left[*]}"
elif [[ -n $status && $status != not-installed ]]; then
    fail "dpkg still knows $PKG as $status"
else
    ok "purged: ls finds none of the $created paths the package created (dpkg -L above; the directories that existed before stay), nor /etc/mapsync or a unit mask"
fi
if getent passwd "$PKG" >/dev/null; then
    ok "user $PKG kept by the purge (Debian keeps system users)$( (( user_existed )) || printf '; this check deletes it')"
fi

if (( FAILED )); then
    printf '%d package check(s) failed\n' "$FAILED"
    exit 1
fi
printf 'all package checks passed\n'
