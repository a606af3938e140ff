#!/usr/bin/env bash
# Offline checks of the systemd unit, the deploy scripts, the Prometheus files and the
# nginx site.
# Prints one "ok: ..." line per check ("FAIL: ..." / "skip: ..." otherwise) and
# exits 1 if any check failed. Needs no mapsync binary and no running systemd
# (systemd, prometheus and nginx packages installed; run as root, e.g. from .ci/run).
# Everything it creates lives in one temp directory, removed on exit; nothing
# is written to /usr/local/bin, /etc or the repository.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
UNIT="$REPO_DIR/systemd/mapsync.service"
INSTALL="$SCRIPT_DIR/install.sh"
PROM="$SCRIPT_DIR/prometheus"
MAX_EXPOSURE=4.9            # systemd-analyze security: "OK" band or better

FAILED=0
ok()   { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; FAILED=$((FAILED + 1)); }
skip() { printf 'skip: %s\n' "$*"; }
show() { sed 's/^/    | /' "$1" | head -n 40; }   # indented excerpt of a log

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LOG="$TMP/log"
had_bin=0; [[ -e /usr/local/bin/mapsync ]] && had_bin=1

have() { command -v "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------- systemd unit ---
# A copy of the unit whose ExecStart points at a stub, so that verify does not
# need /usr/bin/mapsync (the package's path; install.sh rewrites it to
# /usr/local/bin/mapsync).
STUB="$TMP/mapsync-stub"
printf '#!/bin/sh\nexit 0\n' >"$STUB"; chmod 0755 "$STUB"
mkdir -p "$TMP/unit"
sed "s|^ExecStart=/usr/bin/mapsync |ExecStart=$STUB |" "$UNIT" >"$TMP/unit/mapsync.service"

if ! grep -q "^ExecStart=$STUB run --config /etc/mapsync/mapsync.toml\$" "$TMP/unit/mapsync.service"; then
    fail "unit: ExecStart is not '/usr/bin/mapsync run --config /etc/mapsync/mapsync.toml'"
fi

missing=()
for kv in Type=notify NotifyAccess=main WatchdogSec=30 Restart=on-failure RestartSec=5 \
          RestartPreventExitStatus=78 TimeoutStopSec=15 KillSignal=SIGTERM User=mapsync Group=mapsync \
          LoadCredential=target-url:/etc/mapsync/credentials/target-url \
          LoadCredential=admin-token:/etc/mapsync/credentials/admin-token \
          ProtectSystem=strict StateDirectory=mapsync NoNewPrivileges=yes CapabilityBoundingSet= \
          MemoryMax=256M UMask=0027 SyslogLevelPrefix=yes; do
    grep -q "^${kv}\( \|\$\)" "$UNIT" || missing+=("$kv")
done
if (( ${#missing[@]} )); then fail "unit lacks: ${missing[*]}"; else ok "unit has the SPEC §9 settings"; fi

if ! have systemd-analyze; then
    fail "systemd-analyze not found (apt-get install systemd)"
else
    if systemd-analyze verify "$TMP/unit/mapsync.service" >"$LOG" 2>&1 && [[ ! -s $LOG ]]; then
        ok "systemd-analyze verify systemd/mapsync.service (stub ExecStart, no warnings)"
    else
        fail "systemd-analyze verify systemd/mapsync.service"; show "$LOG"
    fi

    systemd-analyze security --offline=true "$TMP/unit/mapsync.service" >"$LOG" 2>&1 || true
    line=$(grep -a 'Overall exposure level' "$LOG" | tail -n 1 || true)
    if [[ $line =~ :\ ([0-9]+\.[0-9]+)\ ([A-Z]+) ]]; then
        score=${BASH_REMATCH[1]} verdict=${BASH_REMATCH[2]}
        if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
            ok "systemd-analyze security --offline=true: exposure $score $verdict (limit $MAX_EXPOSURE)"
        else
            fail "systemd-analyze security: exposure $score $verdict is above $MAX_EXPOSURE"
            grep -a '✗' "$LOG" | sed 's/^/    | /'
        fi
    else
        fail "systemd-analyze security --offline=true: no exposure line"; show "$LOG"
    fi
fi

# --------------------------------------------------------------- install.sh ---
if bash -n "$INSTALL" 2>"$LOG"; then ok "bash -n deploy/install.sh"; else fail "bash -n deploy/install.sh"; show "$LOG"; fi
if bash -n "$SCRIPT_DIR/check.sh" 2>"$LOG"; then ok "bash -n deploy/check.sh"; else fail "bash -n deploy/check.sh"; show "$LOG"; fi
if have shellcheck; then
    if shellcheck "$INSTALL" "$SCRIPT_DIR/check.sh" "$SCRIPT_DIR/deb.sh" "$SCRIPT_DIR/deb-check.sh" \
            "$SCRIPT_DIR/debian/postinst" "$SCRIPT_DIR/debian/postrm" >"$LOG" 2>&1; then
        ok "shellcheck deploy/install.sh deploy/check.sh deploy/deb.sh deploy/deb-check.sh deploy/debian/postinst deploy/debian/postrm"
    else
        fail "shellcheck"; show "$LOG"
    fi
else
    skip "shellcheck not installed (apt-get install shellcheck)"
fi

# A full install into a temp root, with stub inputs.
IN="$TMP/in"; ROOT="$TMP/root"
mkdir -p "$IN"
# Stub binaries: they print their version, and generate completions and man pages
# the way mapsync does (`completions SHELL`, `man DIR`).
for v in v1 v2; do
    cat >"$IN/mapsync-$v" <<EOF
#!/bin/sh
case "\$1" in
    completions) echo "# \$2 completion $v" ;;
    man) mkdir -p "\$2" && echo ".TH mapsync 1 $v" >"\$2/mapsync.1" && echo ".TH mapsync-sync 1 $v" >"\$2/mapsync-sync.1" ;;
    *) echo stub-$v ;;
esac
EOF
    chmod 0755 "$IN/mapsync-$v"
done
# The unit as install.sh installs it: the package's, with /usr/local/bin/mapsync.
sed 's|^ExecStart=/usr/bin/mapsync |ExecStart=/usr/local/bin/mapsync |' "$UNIT" >"$IN/mapsync.service.local"
if [[ -f $REPO_DIR/config/mapsync.toml ]]; then
    CONFIG_SRC="$REPO_DIR/config/mapsync.toml"
else
    CONFIG_SRC="$IN/mapsync.toml"
    printf '# stand-in: config/mapsync.toml is not in the repository yet\n' >"$CONFIG_SRC"
fi
printf 'postgres://mapsync:secret@db.example.invalid:5432/postgres\n' >"$IN/target-url"
printf 'not-a-real-token\n' >"$IN/admin-token"

# mode_is PATH MODE: PATH exists with that octal mode
mode_is() { [[ -e $1 && $(stat -c %a "$1") == "$2" ]]; }

# expect PATH MODE...: record every mismatch
expect_modes() {
    local wrong=() path mode
    while (( $# )); do
        path=$1 mode=$2; shift 2
        if ! mode_is "$ROOT$path" "$mode"; then
            wrong+=("$path (want $mode, got $(stat -c %a "$ROOT$path" 2>/dev/null || echo missing))")
        fi
    done
    printf '%s\n' "${wrong[@]}"
}

if "$INSTALL" --prefix "$ROOT" --binary "$IN/mapsync-v1" --config-src "$CONFIG_SRC" \
        --target-url-file "$IN/target-url" --admin-token-file "$IN/admin-token" \
        --app-group app --sqlite-path /srv/app/data/db.sqlite3 >"$LOG" 2>&1; then
    bad_modes=$(expect_modes \
        /usr/local/bin/mapsync 755 \
        /etc/mapsync 750 \
        /etc/mapsync/mapsync.toml 640 \
        /etc/mapsync/credentials 700 \
        /etc/mapsync/credentials/target-url 600 \
        /etc/mapsync/credentials/admin-token 600 \
        /etc/mapsync/rollback 700 \
        /etc/systemd/system/mapsync.service 644 \
        /etc/systemd/system/mapsync.service.d/10-app-group.conf 644 \
        /etc/systemd/system/mapsync.service.d/20-app-data.conf 644 \
        /etc/sysusers.d/mapsync.conf 644 \
        /usr/local/share/bash-completion/completions/mapsync 644 \
        /usr/local/share/zsh/site-functions/_mapsync 644 \
        /usr/local/share/fish/vendor_completions.d/mapsync.fish 644 \
        /usr/local/share/man/man1/mapsync.1 644 \
        /usr/local/share/man/man1/mapsync-sync.1 644)
    if [[ -n $bad_modes ]]; then
        fail "install.sh --prefix: wrong or missing files:"; printf '    | %s\n' "$bad_modes"
    elif ! cmp -s "$IN/mapsync.service.local" "$ROOT/etc/systemd/system/mapsync.service" \
        || ! grep -q '^ExecStart=/usr/local/bin/mapsync run ' "$ROOT/etc/systemd/system/mapsync.service" \
        || ! cmp -s "$REPO_DIR/systemd/mapsync.sysusers" "$ROOT/etc/sysusers.d/mapsync.conf" \
        || [[ $(cat "$ROOT/usr/local/share/bash-completion/completions/mapsync") != "# bash completion v1" ]] \
        || [[ $(cat "$ROOT/usr/local/share/zsh/site-functions/_mapsync") != "# zsh completion v1" ]] \
        || [[ $(cat "$ROOT/usr/local/share/fish/vendor_completions.d/mapsync.fish") != "# fish completion v1" ]] \
        || ! cmp -s "$IN/target-url" "$ROOT/etc/mapsync/credentials/target-url" \
        || ! cmp -s "$CONFIG_SRC" "$ROOT/etc/mapsync/mapsync.toml" \
        || [[ $("$ROOT/usr/local/bin/mapsync") != stub-v1 ]]; then
        fail "install.sh --prefix: installed content differs from its source"
    elif ! grep -q '^SupplementaryGroups=app$' "$ROOT/etc/systemd/system/mapsync.service.d/10-app-group.conf" \
        || ! grep -q '^ReadWritePaths=/srv/app/data$' "$ROOT/etc/systemd/system/mapsync.service.d/20-app-data.conf"; then
        fail "install.sh --prefix: drop-ins lack SupplementaryGroups=app / ReadWritePaths=/srv/app/data"
    elif ! grep -q 'skipping useradd' "$LOG" || ! grep -q 'skipping systemctl' "$LOG"; then
        fail "install.sh --prefix: does not say it skips useradd/systemctl"; show "$LOG"
    else
        ok "install.sh --prefix: files, modes (0755 bin, 0750 /etc/mapsync, 0700 credentials, 0600 secrets, 0640 config, 0644 unit, sysusers, completions, man pages from the binary), ExecStart=/usr/local/bin/mapsync and drop-ins"
    fi
else
    fail "install.sh --prefix (first install)"; show "$LOG"
fi

# Idempotent: the same install again changes nothing and makes no backup.
if "$INSTALL" --prefix "$ROOT" --binary "$IN/mapsync-v1" --config-src "$CONFIG_SRC" >"$LOG" 2>&1 \
        && ! grep -qE '^mapsync-install: (install|backup): ' "$LOG" && [[ ! -e $ROOT/usr/local/bin/mapsync.prev ]]; then
    ok "install.sh --prefix: a second identical run changes nothing"
else
    fail "install.sh --prefix: second identical run was not a no-op"; show "$LOG"
fi

# Upgrade: keeps the old binary and unit as .prev, never overwrites the config.
if [[ -f $ROOT/etc/mapsync/mapsync.toml ]]; then printf '# operator edit\n' >>"$ROOT/etc/mapsync/mapsync.toml"; fi
if "$INSTALL" --prefix "$ROOT" --binary "$IN/mapsync-v2" --config-src "$CONFIG_SRC" >"$LOG" 2>&1 \
        && [[ $("$ROOT/usr/local/bin/mapsync") == stub-v2 && $("$ROOT/usr/local/bin/mapsync.prev") == stub-v1 ]] \
        && [[ $(cat "$ROOT/usr/local/share/bash-completion/completions/mapsync") == "# bash completion v2" ]] \
        && grep -q '^.TH mapsync 1 v2$' "$ROOT/usr/local/share/man/man1/mapsync.1" \
        && mode_is "$ROOT/usr/local/bin/mapsync.prev" 755 \
        && [[ -f $ROOT/etc/mapsync/rollback/mapsync.service.prev ]] \
        && grep -q '^# operator edit$' "$ROOT/etc/mapsync/mapsync.toml"; then
    ok "install.sh --prefix: upgrade keeps mapsync.prev + mapsync.service.prev, config untouched, completions and man pages follow the binary"
else
    fail "install.sh --prefix: upgrade/backup"; show "$LOG"
fi

# Rollback swaps with .prev; a second rollback rolls forward.
if "$INSTALL" --prefix "$ROOT" --rollback >"$LOG" 2>&1 \
        && [[ $("$ROOT/usr/local/bin/mapsync") == stub-v1 && $("$ROOT/usr/local/bin/mapsync.prev") == stub-v2 ]] \
        && "$INSTALL" --prefix "$ROOT" --rollback >>"$LOG" 2>&1 \
        && [[ $("$ROOT/usr/local/bin/mapsync") == stub-v2 ]]; then
    ok "install.sh --rollback: one step back, and forward again"
else
    fail "install.sh --rollback"; show "$LOG"
fi

# --dry-run changes nothing.
DRY="$TMP/dry"; mkdir -p "$DRY"
if "$INSTALL" --dry-run --prefix "$DRY" --binary "$IN/mapsync-v1" --config-src "$CONFIG_SRC" \
        --target-url-file "$IN/target-url" --app-group app >"$LOG" 2>&1 \
        && [[ -z $(find "$DRY" -mindepth 1 -print -quit) ]] && grep -q 'would run: ' "$LOG"; then
    ok "install.sh --dry-run: prints the plan, creates nothing"
else
    fail "install.sh --dry-run"; show "$LOG"
fi

# Bad input is refused before anything is written.
if ! "$INSTALL" --prefix "$TMP/bad" --binary "$IN/nonexistent" >"$LOG" 2>&1 && [[ ! -e $TMP/bad ]]; then
    ok "install.sh: refuses a missing binary and writes nothing"
else
    fail "install.sh: a missing binary was not refused"; show "$LOG"
fi

# ---------------------------------------------------------------- Prometheus ---
if ! have promtool; then
    fail "promtool not found (apt-get install prometheus)"
else
    if promtool check rules "$PROM/alerts.yml" >"$LOG" 2>&1; then
        ok "promtool check rules deploy/prometheus/alerts.yml ($(grep -o '[0-9]* rules found' "$LOG"))"
    else
        fail "promtool check rules"; show "$LOG"
    fi
    for f in scrape.yml prometheus.example.yml; do
        if promtool check config "$PROM/$f" >"$LOG" 2>&1; then
            ok "promtool check config deploy/prometheus/$f"
        else
            fail "promtool check config $f"; show "$LOG"
        fi
    done
    if promtool test rules "$PROM/alerts_test.yml" >"$LOG" 2>&1; then
        ok "promtool test rules deploy/prometheus/alerts_test.yml (each alert fires on a bad series, silent on a good one)"
    else
        fail "promtool test rules"; show "$LOG"
    fi
    # every alert named in alerts.yml has a test
    untested=()
    while read -r a; do
        grep -q "alertname: $a\$" "$PROM/alerts_test.yml" || untested+=("$a")
    done < <(sed -n 's/^ *- alert: *//p' "$PROM/alerts.yml")
    if (( ${#untested[@]} )); then fail "alerts without a test: ${untested[*]}"; else ok "every alert in alerts.yml has a test"; fi
fi
# The job in prometheus.example.yml is the one in scrape.yml.
job_of() { sed -n '/^ *- job_name: mapsync/,$p' "$1" | sed '/^ *#/d;/^ *$/d'; }
if diff <(job_of "$PROM/scrape.yml") <(job_of "$PROM/prometheus.example.yml") >"$LOG" 2>&1; then
    ok "prometheus.example.yml carries the scrape.yml job unchanged"
else
    fail "prometheus.example.yml and scrape.yml disagree on the mapsync job"; show "$LOG"
fi

# -------------------------------------------------------------------- nginx ---
NGINX=$(command -v nginx || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true)
if [[ -z $NGINX ]]; then
    fail "nginx not found (apt-get install nginx)"
else
    mkdir -p "$TMP/nginx"
    cat >"$TMP/nginx/nginx.conf" <<CONF
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events { worker_connections 16; }
http { include $SCRIPT_DIR/nginx/mapsync.conf; }
CONF
    if "$NGINX" -t -q -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$LOG" 2>&1; then
        ok "nginx -t accepts deploy/nginx/mapsync.conf"
    else
        fail "nginx -t deploy/nginx/mapsync.conf"; show "$LOG"
    fi
fi

# ------------------------------------------------------------------ cleanup ---
if (( ! had_bin )) && [[ -e /usr/local/bin/mapsync ]]; then
    fail "/usr/local/bin/mapsync appeared during the checks"
fi

if (( FAILED )); then
    printf '%d check(s) failed\n' "$FAILED"
    exit 1
fi
printf 'all deploy checks passed\n'
