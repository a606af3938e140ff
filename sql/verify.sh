#!/usr/bin/env bash
# Checks sql/ against a real PostgreSQL (13 or later): fresh install, upgrade of the table as
# deployed on Supabase (tests/fixtures/deployed_supabase_schema.sql), idempotency, the synced_at
# trigger, RLS and grants, the optional mapsync role, the rollbacks, atomicity.
#
#   sql/verify.sh postgres://postgres@127.0.0.1:55432/postgres
#
# Give it a SUPERUSER URL on a THROWAWAY cluster. It creates and drops databases named
# mapsync_sqlcheck_*, and cluster-wide roles: mapsync (refuses to start if that role already
# exists) and, when missing, anon/authenticated/service_role (dropped again at the end).
# For the mapsync login to really check a password, pg_hba.conf should ask for one on TCP,
# e.g. `host all mapsync 127.0.0.1/32 scram-sha-256` above the trust lines.
# Uses only psql. Prints one `ok: ...` line per check; stops at the first failure (exit 1).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 SUPERUSER_URL   (e.g. postgres://postgres@127.0.0.1:55432/postgres)" >&2
    exit 2
fi
URL=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SQL_DIR=$HERE
FIXTURES=$HERE/../tests/fixtures
F001=$SQL_DIR/001_model_mappings.sql
F002=$SQL_DIR/002_security.sql
F003=$SQL_DIR/003_mapsync_role.sql
F004=$SQL_DIR/004_mapsync_instances.sql
R001=$SQL_DIR/rollback/001_rollback.sql
R003=$SQL_DIR/rollback/003_drop_mapsync_role.sql
SHIM=$FIXTURES/supabase_roles_shim.sql
DEPLOYED=$FIXTURES/deployed_supabase_schema.sql
MAPSYNC_PW=mapsync-sqlcheck-pw
PREFIX=mapsync_sqlcheck

# --- URL handling: same server, another database or another user ---------------------------
url_base=${URL%%\?*}
url_query=""
case $URL in *\?*) url_query=${URL#*\?} ;; esac
url_scheme=${url_base%%://*}
url_rest=${url_base#*://}
url_authority=${url_rest%%/*}
url_hostport=${url_authority##*@}
db_url() { echo "$url_scheme://$url_authority/$1${url_query:+?$url_query}"; }
mapsync_url() { echo "$url_scheme://mapsync:$MAPSYNC_PW@$url_hostport/$1${url_query:+?$url_query}"; }

# --- helpers ----------------------------------------------------------------------------------
export PGAPPNAME=mapsync-sqlcheck PGTZ=UTC
unset PGPASSWORD PGUSER PGDATABASE PGOPTIONS 2>/dev/null || true
LOG=$(mktemp)
ok() { echo "ok: $*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
# q DB [psql args...]: run psql as the superuser on database DB, unaligned, tuples only.
q() {
    local db=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -At "$(db_url "$db")" "$@"
}
# qm DB [psql args...]: the same, logged in as mapsync.
qm() {
    local db=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -At "$(mapsync_url "$db")" "$@"
}
# apply DB FILE: statement by statement, the way `psql -f` runs it.
apply() {
    q "$1" -f "$2" >"$LOG" 2>&1 || fail "psql -f $(basename "$2") on $1: $(cat "$LOG")"
}
# apply_batch DB FILE: the whole file as ONE simple-query message, the way tokio-postgres
# batch_execute and the Supabase SQL editor send it.
apply_batch() {
    q "$1" -c "$(cat "$2")" >"$LOG" 2>&1 || fail "batch $(basename "$2") on $1: $(cat "$LOG")"
}
# expect DESCRIPTION EXPECTED ACTUAL
expect() {
    if [ "$2" = "$3" ]; then ok "$1"; else fail "$1"$'\n'"  expected: $2"$'\n'"  got:      $3"; fi
}
# must_fail DESCRIPTION REGEX COMMAND...: the command must fail with an error matching REGEX.
must_fail() {
    local desc=$1 re=$2 out
    shift 2
    if out=$("$@" 2>&1); then fail "$desc: succeeded, expected an error matching /$re/"; fi
    grep -qE "$re" <<<"$out" || fail "$desc: failed with an unexpected error: $out"
    ok "$desc"
}
role_exists() { [ "$(q postgres -c "SELECT count(*) FROM pg_roles WHERE rolname = '$1'")" = 1 ]; }
newdb() {
    q postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" 2>/dev/null
    q postgres -c "CREATE DATABASE $1"
}

# Everything about the table that 001/002/rollback touch, in a comparable text form.
FINGERPRINT_SQL=$(
    cat <<'SQL'
SELECT concat_ws(E'\n',
  (SELECT string_agg(format('col %s %s default=%s not_null=%s', a.attname,
                            format_type(a.atttypid, a.atttypmod),
                            pg_get_expr(d.adbin, d.adrelid), a.attnotnull), E'\n' ORDER BY a.attnum)
     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = 'public.model_mappings'::regclass AND a.attnum > 0 AND NOT a.attisdropped),
  (SELECT string_agg('index ' || pg_get_indexdef(indexrelid), E'\n' ORDER BY indexrelid::regclass::text)
     FROM pg_index WHERE indrelid = 'public.model_mappings'::regclass),
  (SELECT string_agg('trigger ' || pg_get_triggerdef(oid), E'\n' ORDER BY tgname)
     FROM pg_trigger WHERE tgrelid = 'public.model_mappings'::regclass AND NOT tgisinternal),
  (SELECT string_agg(format('policy %s %s %s %s %s', policyname, cmd, roles, qual, with_check), E'\n' ORDER BY policyname)
     FROM pg_policies WHERE schemaname = 'public' AND tablename = 'model_mappings'),
  (SELECT format('rls=%s force=%s owner=%s', relrowsecurity, relforcerowsecurity, relowner::regrole)
     FROM pg_class WHERE oid = 'public.model_mappings'::regclass),
  (SELECT 'table acl ' || string_agg(a::text, ',' ORDER BY a::text)
     FROM pg_class, unnest(relacl) a WHERE pg_class.oid = 'public.model_mappings'::regclass),
  (SELECT 'schema public acl ' || string_agg(a::text, ',' ORDER BY a::text)
     FROM pg_namespace, unnest(nspacl) a WHERE nspname = 'public'),
  'function update_updated_at_column ' ||
     coalesce(md5(pg_get_functiondef(to_regprocedure('public.update_updated_at_column()'))), 'absent'),
  'function model_mappings_stamp_synced_at ' ||
     coalesce(to_regprocedure('public.model_mappings_stamp_synced_at()')::text, 'absent'))
SQL
)
fingerprint() { q "$1" -c "$FINGERPRINT_SQL"; }
# The rows, every deployed column (not synced_at), as one checksum.
ROWS_SQL="SELECT count(*) || ' rows, md5 ' || coalesce(md5(string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s',
  id, scope_type, scope_key, name, default_model, candidates, is_active, updated_at, source, metadata, created_at),
  E'\n' ORDER BY id)), '-') FROM public.model_mappings"
rows() { q "$1" -c "$ROWS_SQL"; }
xmins() { q "$1" -c "SELECT string_agg(id || '@' || xmin, ',' ORDER BY id) FROM public.model_mappings"; }

EXPECTED_COLUMNS="id:text:NO
scope_type:text:NO
scope_key:text:NO
name:text:YES
default_model:text:YES
candidates:jsonb:NO
is_active:boolean:YES
updated_at:timestamp with time zone:YES
source:text:YES
metadata:jsonb:NO
created_at:timestamp with time zone:YES
synced_at:timestamp with time zone:YES"
columns() {
    q "$1" -c "SELECT string_agg(column_name || ':' || data_type || ':' || is_nullable, E'\n' ORDER BY ordinal_position)
                 FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'model_mappings'"
}
triggers() {
    q "$1" -c "SELECT string_agg(pg_get_triggerdef(oid), E'\n' ORDER BY tgname) FROM pg_trigger
                WHERE tgrelid = 'public.model_mappings'::regclass AND NOT tgisinternal"
}
NEW_TRIGGER="CREATE TRIGGER model_mappings_stamp_synced_at BEFORE INSERT OR UPDATE ON public.model_mappings FOR EACH ROW EXECUTE FUNCTION model_mappings_stamp_synced_at()"
OLD_TRIGGER="CREATE TRIGGER update_model_mappings_updated_at BEFORE UPDATE ON public.model_mappings FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()"

# The 10 pushed columns, and mapsync's no-op-skipping upsert.
COLS="id, scope_type, scope_key, name, default_model, candidates, is_active, updated_at, source, metadata"
upsert_sql() { # VALUES-list -> statement
    cat <<SQL
INSERT INTO public.model_mappings AS t ($COLS) VALUES $1
ON CONFLICT (id) DO UPDATE SET
  scope_type = EXCLUDED.scope_type, scope_key = EXCLUDED.scope_key, name = EXCLUDED.name,
  default_model = EXCLUDED.default_model, candidates = EXCLUDED.candidates,
  is_active = EXCLUDED.is_active, updated_at = EXCLUDED.updated_at, source = EXCLUDED.source,
  metadata = EXCLUDED.metadata
WHERE (t.scope_type, t.scope_key, t.name, t.default_model, t.candidates, t.is_active, t.updated_at, t.source, t.metadata)
      IS DISTINCT FROM
      (EXCLUDED.scope_type, EXCLUDED.scope_key, EXCLUDED.name, EXCLUDED.default_model, EXCLUDED.candidates,
       EXCLUDED.is_active, EXCLUDED.updated_at, EXCLUDED.source, EXCLUDED.metadata)
SQL
}

SEED_ROWS="INSERT INTO public.model_mappings ($COLS, created_at) VALUES
 ('mapping:xai', 'mapping', 'xai', 'xAI', 'grok-4', '[\"grok-4\", \"grok-3\"]', true, '2025-11-02T08:00:00Z', 'sqlite', '{\"preferred_endpoint_id\": \"ep-1\"}', '2025-01-01T00:00:00Z'),
 ('global:global', 'global', 'global', NULL, 'gpt-4o', '[\"gpt-4o\"]', true, '2025-10-01T12:30:00Z', 'sqlite', '{}', '2025-01-01T00:00:00Z'),
 ('user:42', 'user', '42', 'Ünïcødé 名前', NULL, '[]', false, '2024-06-30T23:59:59Z', 'sqlite', '{\"required_tier\": \"pro\", \"temperature\": 0.2}', '2024-01-01T00:00:00Z'),
 ('module:chat', 'module', 'chat', 'Chat', 'claude-sonnet', '[\"claude-sonnet\", \"claude-haiku\"]', true, '2025-03-15T09:00:00Z', 'sqlite', '{\"env\": \"prod\"}', '2025-01-01T00:00:00Z'),
 ('prompt:7', 'prompt', '7', 'Summariser', 'gpt-4o-mini', '[\"gpt-4o-mini\"]', true, '2025-09-09T09:09:09Z', 'prompt', '{\"version\": \"3\", \"category\": \"tools\"}', '2025-01-01T00:00:00Z')"

# --- set-up and clean-up ------------------------------------------------------------------------
DBS=(plain empty supabase deployed reference atomic)
created_shim_roles=false
created_mapsync_role=false
cleanup() {
    local rc=$?
    for d in "${DBS[@]}"; do
        q postgres -c "DROP DATABASE IF EXISTS ${PREFIX}_$d WITH (FORCE)" >/dev/null 2>&1 || true
    done
    if $created_mapsync_role; then q postgres -c "DROP ROLE IF EXISTS mapsync" >/dev/null 2>&1 || true; fi
    if $created_shim_roles; then
        q postgres -c "DROP ROLE IF EXISTS anon; DROP ROLE IF EXISTS authenticated; DROP ROLE IF EXISTS service_role" \
            >/dev/null 2>&1 || echo "warning: could not drop roles anon/authenticated/service_role" >&2
    fi
    rm -f "$LOG"
    exit $rc
}
trap cleanup EXIT

[ "$(q postgres -c "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")" = t ] ||
    fail "$URL does not log in as a superuser"
echo "server: $(q postgres -c 'SHOW server_version')"
for f in "$F001" "$F002" "$F003" "$F004" "$R001" "$R003" "$SHIM" "$DEPLOYED"; do [ -r "$f" ] || fail "missing $f"; done
if role_exists mapsync; then
    fail "role mapsync already exists on this cluster; run this against a throwaway cluster (or DROP ROLE mapsync there first)"
fi
created_mapsync_role=true # from here on any mapsync role is ours
for d in "${DBS[@]}"; do q postgres -c "DROP DATABASE IF EXISTS ${PREFIX}_$d WITH (FORCE)" >/dev/null 2>&1; done

# --- 0. the files themselves ----------------------------------------------------------------------
meta=$(grep -nE '^[[:space:]]*[\\]' "$F001" "$F002" "$F003" "$F004" "$R001" "$R003" || true)
expect "no psql meta-commands in sql/*.sql and sql/rollback/*.sql" "" "$meta"
for f in "$F001" "$F002" "$F003" "$F004" "$R001" "$R003"; do
    first=$(grep -vE '^[[:space:]]*(--.*)?$' "$f" | head -n 1)
    last=$(grep -vE '^[[:space:]]*(--.*)?$' "$f" | tail -n 1)
    if [ "$first" != "BEGIN;" ] || [ "$last" != "COMMIT;" ]; then
        fail "$(basename "$f") is not one BEGIN; ... COMMIT; transaction"
    fi
done
ok "every script is one BEGIN; ... COMMIT; transaction"

# --- 1. plain PostgreSQL without the Supabase roles -------------------------------------------------
if role_exists anon || role_exists authenticated || role_exists service_role; then
    echo "skip: plain PostgreSQL checks (roles anon/authenticated/service_role already exist on this cluster)"
else
    db=${PREFIX}_plain
    newdb $db
    apply $db "$F001"
    apply $db "$F002"
    ok "plain PostgreSQL (no Supabase roles): 001 + 002 apply"
    apply $db "$F001"
    apply $db "$F002"
    apply_batch $db "$F001"
    apply_batch $db "$F002"
    ok "plain PostgreSQL: 001 + 002 apply again (psql -f and as one batch), no error"
    expect "plain PostgreSQL: columns as expected" "$EXPECTED_COLUMNS" "$(columns $db)"
    expect "plain PostgreSQL: RLS on, no policy, the owner still reads and writes" "t|0|1" \
        "$(q $db -c "INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('global:global', 'global', 'global')" \
            -c "SELECT relrowsecurity, (SELECT count(*) FROM pg_policies WHERE tablename = 'model_mappings'),
                       (SELECT count(*) FROM public.model_mappings) FROM pg_class WHERE oid = 'public.model_mappings'::regclass")"
    apply $db "$R001"
    apply $db "$R001"
    expect "plain PostgreSQL: rollback applies twice, back to the deployed trigger" "$OLD_TRIGGER" "$(triggers $db)"
    apply $db "$F001"
    apply $db "$F002"
    ok "plain PostgreSQL: 001 + 002 apply again after the rollback"
fi

# From here on the cluster has the Supabase roles.
role_exists anon || created_shim_roles=true

# --- 2. the deployed state, for reference -----------------------------------------------------------
ref=${PREFIX}_reference
newdb $ref
apply $ref "$SHIM"
apply $ref "$DEPLOYED"
REF_FP=$(fingerprint $ref)

# --- 3. empty database with the Supabase roles -----------------------------------------------------
db=${PREFIX}_empty
newdb $db
apply $db "$SHIM"
apply $db "$F001"
apply $db "$F002"
ok "empty database + shim: 001 + 002 apply"
apply $db "$F001"
apply $db "$F002"
apply_batch $db "$F001"
apply_batch $db "$F002"
ok "empty database + shim: 001 + 002 apply again (psql -f and as one batch), no error"
expect "empty database: columns as expected (deployed ones + synced_at)" "$EXPECTED_COLUMNS" "$(columns $db)"
expect "empty database: one trigger, BEFORE INSERT OR UPDATE, stamping synced_at" "$NEW_TRIGGER" "$(triggers $db)"
expect "empty database: indexes named as deployed" \
    "idx_model_mappings_scope|idx_model_mappings_updated_at|model_mappings_pkey" \
    "$(q $db -c "SELECT string_agg(indexrelid::regclass::text, '|' ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indrelid = 'public.model_mappings'::regclass")"
# The instance registry (004): RLS on, the service role only.
apply $db "$F004"
apply $db "$F004"
apply_batch $db "$F004"
ok "empty database + shim: 004 applies three times (psql -f and as one batch), no error"
expect "004: RLS on; anon and authenticated have no privilege, service_role all; one policy" \
    "t anon:f authenticated:f service_role:t 1" \
    "$(q $db -c "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.mapsync_instances'::regclass" \
                -c "SELECT string_agg(format('%s:%s', r, has_table_privilege(r, 'public.mapsync_instances',
                        'SELECT,INSERT,UPDATE,DELETE')), ' ') FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) r" \
                -c "SELECT count(*) FROM pg_policies WHERE tablename = 'mapsync_instances'" | paste -sd' ')"
apply $db "$R001"
apply_batch $db "$R001"
expect "empty database: the rollback drops the instance registry" "f" \
    "$(q $db -c "SELECT to_regclass('public.mapsync_instances') IS NOT NULL")"
expect "empty database: 001 + 002 then the rollback (twice) = exactly the deployed fixture's schema" "$REF_FP" "$(fingerprint $db)"
apply $db "$F001"
apply $db "$F002"
ok "empty database: 001 + 002 apply again after the rollback"

# --- 4. Supabase's default privileges (anon and authenticated get ALL on new tables) --------------
db=${PREFIX}_supabase
newdb $db
apply $db "$SHIM"
q $db -c "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role"
apply_batch $db "$F001"
expect "supabase defaults: before 002, anon may TRUNCATE the new table (what 002 must undo)" t \
    "$(q $db -c "SELECT has_table_privilege('anon', 'public.model_mappings', 'TRUNCATE')")"
apply_batch $db "$F002"
expect "supabase defaults: after 002 anon has no privilege, authenticated only SELECT, service_role all" \
    "anon:f:f authenticated:t:f service_role:t:t PUBLIC:0" \
    "$(q $db -c "SELECT string_agg(format('%s:%s:%s', r, has_table_privilege(r, 'public.model_mappings', 'SELECT'),
                    has_table_privilege(r, 'public.model_mappings', 'INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')), ' ')
                  FROM unnest(ARRAY['anon', 'authenticated', 'service_role']) r" \
                  -c "SELECT 'PUBLIC:' || (count(*) > 0)::int FROM pg_class, aclexplode(relacl) a
                       WHERE pg_class.oid = 'public.model_mappings'::regclass AND a.grantee = 0" | paste -sd' ')"
must_fail "supabase defaults: anon cannot TRUNCATE" "permission denied" \
    q $db -c "SET ROLE anon; TRUNCATE public.model_mappings"
must_fail "supabase defaults: authenticated cannot TRUNCATE" "permission denied" \
    q $db -c "SET ROLE authenticated; TRUNCATE public.model_mappings"

# --- 5. upgrade of the deployed table holding rows ---------------------------------------------------
db=${PREFIX}_deployed
newdb $db
apply $db "$SHIM"
apply $db "$DEPLOYED"
q $db -c "$SEED_ROWS"
expect "deployed database: fixture + 5 rows match the reference schema" "$REF_FP" "$(fingerprint $db)"
ROWS_BEFORE=$(rows $db)
XMIN_BEFORE=$(xmins $db)
apply $db "$F001"
apply $db "$F002"
expect "deployed database: 001 + 002 keep every row, unchanged" "$ROWS_BEFORE" "$(rows $db)"
expect "deployed database: the upgrade rewrites no row (same xmin)" "$XMIN_BEFORE" "$(xmins $db)"
expect "deployed database: columns = deployed + synced_at (NULL on the old rows)" "$EXPECTED_COLUMNS
5" "$(columns $db)
$(q $db -c "SELECT count(*) FROM public.model_mappings WHERE synced_at IS NULL")"
expect "deployed database: the deployed trigger is replaced by the synced_at one" "$NEW_TRIGGER" "$(triggers $db)"
expect "deployed database: public.update_updated_at_column() is kept for other tables" t \
    "$(q $db -c "SELECT to_regprocedure('public.update_updated_at_column()') IS NOT NULL")"
apply $db "$F001"
apply $db "$F002"
apply_batch $db "$F001"
apply_batch $db "$F002"
expect "deployed database: 001 + 002 again: no error, rows unchanged, no row rewritten" "$ROWS_BEFORE $XMIN_BEFORE" \
    "$(rows $db) $(xmins $db)"

expect "UPDATE keeps the pushed updated_at (2020-01-01) and sets synced_at = now()" "2020-01-01 00:00:00+00|t|x" \
    "$(q $db -c "UPDATE public.model_mappings SET updated_at = '2020-01-01T00:00:00Z', name = 'x'
                 WHERE id = 'mapping:xai' RETURNING updated_at, synced_at = now(), name")"
expect "INSERT keeps the pushed updated_at and sets synced_at = now()" "2021-02-03 04:05:06+00|t" \
    "$(q $db -c "INSERT INTO public.model_mappings ($COLS) VALUES ('user:7', 'user', '7', 'Seven', 'm1', '[\"m1\"]',
                 true, '2021-02-03T04:05:06Z', 'sqlite', '{}') RETURNING updated_at, synced_at = now()")"
expect "INSERT without updated_at still gets the default now(), created_at too" "t|t|t" \
    "$(q $db -c "INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('user:8', 'user', '8')
                 RETURNING updated_at = now(), created_at = now(), synced_at = now()")"

SAME_VALUES="('mapping:xai', 'mapping', 'xai', 'x', 'grok-4', '[\"grok-4\", \"grok-3\"]', true, '2020-01-01T00:00:00Z', 'sqlite', '{\"preferred_endpoint_id\": \"ep-1\"}'),
             ('user:42', 'user', '42', 'Ünïcødé 名前', NULL, '[]', false, '2024-06-30T23:59:59Z', 'sqlite', '{\"temperature\": 0.2, \"required_tier\": \"pro\"}')"
before=$(q $db -c "SELECT string_agg(id || '@' || xmin || '@' || coalesce(synced_at::text, '-'), ',' ORDER BY id) FROM public.model_mappings WHERE id IN ('mapping:xai', 'user:42')")
q $db -c "$(upsert_sql "$SAME_VALUES")"
after=$(q $db -c "SELECT string_agg(id || '@' || xmin || '@' || coalesce(synced_at::text, '-'), ',' ORDER BY id) FROM public.model_mappings WHERE id IN ('mapping:xai', 'user:42')")
expect "upsert ON CONFLICT ... WHERE IS DISTINCT FROM with identical values: xmin and synced_at unchanged" "$before" "$after"
xmin_before=$(q $db -c "SELECT xmin FROM public.model_mappings WHERE id = 'mapping:xai'")
returned=$(q $db -c "$(upsert_sql "('mapping:xai', 'mapping', 'xai', 'x', 'grok-5', '[\"grok-5\"]', true, '2019-05-05T05:05:05Z', 'sqlite', '{}')")
                     RETURNING updated_at, default_model, synced_at = now()")
xmin_after=$(q $db -c "SELECT xmin FROM public.model_mappings WHERE id = 'mapping:xai'")
expect "upsert with changed values: new row version, pushed (older) updated_at kept, synced_at = now()" \
    "new version|2019-05-05 05:05:05+00|grok-5|t" \
    "$([ "$xmin_before" != "$xmin_after" ] && echo "new version" || echo "same version")|$returned"

# --- 6. RLS and grants, by role -------------------------------------------------------------------------
N=$(q $db -c "SELECT count(*) FROM public.model_mappings")
expect "authenticated can SELECT every row" "$N" "$(q $db -c "SET ROLE authenticated; SELECT count(*) FROM public.model_mappings")"
must_fail "authenticated cannot INSERT" "permission denied" \
    q $db -c "SET ROLE authenticated; INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('a:b', 'a', 'b')"
must_fail "authenticated cannot UPDATE" "permission denied" \
    q $db -c "SET ROLE authenticated; UPDATE public.model_mappings SET name = 'y'"
must_fail "authenticated cannot DELETE" "permission denied" \
    q $db -c "SET ROLE authenticated; DELETE FROM public.model_mappings"
must_fail "anon cannot SELECT (permission denied)" "permission denied for table model_mappings" \
    q $db -c "SET ROLE anon; SELECT count(*) FROM public.model_mappings"
must_fail "anon cannot INSERT" "permission denied" \
    q $db -c "SET ROLE anon; INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('a:b', 'a', 'b')"
expect "service_role can SELECT, INSERT, UPDATE, DELETE (and TRUNCATE), in a rolled-back transaction" "$N|t|1|1|$N|0" \
    "$(q $db -c "BEGIN; SET LOCAL ROLE service_role;
                 SELECT count(*) FROM public.model_mappings;
                 WITH i AS (INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('sr:1', 'sr', '1') RETURNING synced_at = now() AS stamped) SELECT stamped FROM i;
                 WITH u AS (UPDATE public.model_mappings SET name = 'sr' WHERE id = 'sr:1' RETURNING 1) SELECT count(*) FROM u;
                 WITH d AS (DELETE FROM public.model_mappings WHERE id = 'sr:1' RETURNING 1) SELECT count(*) FROM d;
                 SELECT count(*) FROM public.model_mappings;
                 TRUNCATE public.model_mappings;
                 SELECT count(*) FROM public.model_mappings;
                 ROLLBACK;" | paste -sd'|')"
expect "rows intact after the role checks" "$N" "$(q $db -c "SELECT count(*) FROM public.model_mappings")"

# --- 7. the optional mapsync role -----------------------------------------------------------------------
apply $db "$F003"
apply_batch $db "$F003"
ok "003 applies twice (psql -f, then as one batch)"
expect "mapsync is created NOLOGIN, no superuser, no BYPASSRLS, no password" "f|f|f|f" \
    "$(q $db -c "SELECT rolcanlogin, rolsuper, rolbypassrls, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'mapsync'")"
must_fail "mapsync cannot log in before ALTER ROLE ... LOGIN" "not permitted to log in|password authentication failed" \
    qm $db -c "SELECT 1"
q $db -c "ALTER ROLE mapsync LOGIN PASSWORD '$MAPSYNC_PW'"
expect "mapsync logs in (ALTER ROLE mapsync LOGIN PASSWORD ...) and sees every row through its policy" "mapsync|$N" \
    "$(qm $db -c "SELECT current_user, (SELECT count(*) FROM public.model_mappings)")"
how=$(qm $db -c "SELECT CASE WHEN inet_client_addr() IS NULL THEN 'a Unix socket' ELSE 'TCP from ' || host(inet_client_addr()) END")
if out=$(psql -X -At "$(mapsync_url $db | sed "s/:$MAPSYNC_PW@/:wrong-password@/")" -c "SELECT 1" 2>&1); then
    echo "note: mapsync logged in over $how with a wrong password too: pg_hba.conf trusts it, so no password was checked"
else
    grep -q "password authentication failed" <<<"$out" || fail "wrong password: unexpected error: $out"
    ok "mapsync logs in over $how with its password; a wrong password is refused"
fi
qm $db >"$LOG" 2>&1 <<SQL || fail "mapsync sync transaction: $(cat "$LOG")"
BEGIN;
SELECT pg_advisory_xact_lock(1);
CREATE TEMP TABLE s (LIKE public.model_mappings) ON COMMIT DROP;
INSERT INTO s ($COLS) VALUES
  ('mapping:xai', 'mapping', 'xai', 'xAI', 'grok-4', '["grok-4"]', true, '2025-12-01T00:00:00Z', 'sqlite', '{}'),
  ('mapping:new', 'mapping', 'new', 'New', 'm2', '["m2"]', true, '2025-12-02T00:00:00Z', 'sqlite', '{}');
$(upsert_sql "(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)" | sed "s/VALUES (NULL.*)\$/SELECT $COLS FROM s/");
UPDATE public.model_mappings SET is_active = false WHERE id = 'user:8';
DELETE FROM public.model_mappings WHERE id = 'user:7';
COMMIT;
SQL
expect "mapsync: advisory lock, TEMP table LIKE the mirror, upsert, UPDATE, DELETE in one transaction" \
    "mapping:new|2025-12-02 00:00:00+00|true mapping:xai|2025-12-01 00:00:00+00|true user:7 gone user:8 inactive" \
    "$(q $db -c "SELECT string_agg(id || '|' || updated_at || '|' || (synced_at IS NOT NULL), ' ' ORDER BY id) FROM public.model_mappings WHERE id LIKE 'mapping:%'") user:7 $(q $db -c "SELECT CASE WHEN count(*) = 0 THEN 'gone' ELSE 'present' END FROM public.model_mappings WHERE id = 'user:7'") user:8 $(q $db -c "SELECT CASE WHEN is_active THEN 'active' ELSE 'inactive' END FROM public.model_mappings WHERE id = 'user:8'")"
must_fail "mapsync cannot TRUNCATE" "permission denied for table model_mappings" \
    qm $db -c "TRUNCATE public.model_mappings"
must_fail "mapsync cannot DROP TABLE" "must be owner of table model_mappings" \
    qm $db -c "DROP TABLE public.model_mappings"
must_fail "mapsync cannot ALTER TABLE" "must be owner of table model_mappings" \
    qm $db -c "ALTER TABLE public.model_mappings ADD COLUMN x int"
must_fail "mapsync cannot run 001 (mapsync migrate needs the table's owner)" "must be owner of table model_mappings|permission denied for schema public" \
    qm $db -f "$F001"
q $db -c "CREATE TABLE public.other_table (x int); INSERT INTO public.other_table VALUES (1)"
must_fail "mapsync cannot read other tables" "permission denied for table other_table" \
    qm $db -c "SELECT * FROM public.other_table"
if [ "$(q $db -c "SELECT has_schema_privilege('mapsync', 'public', 'CREATE')")" = f ]; then
    ok "mapsync cannot CREATE in schema public"
else
    echo "note: mapsync may CREATE in schema public because PUBLIC may (PostgreSQL < 15 default); REVOKE CREATE ON SCHEMA public FROM PUBLIC to stop it"
fi
apply $db "$F001"
apply $db "$F002"
expect "001 + 002 again after 003: mapsync keeps its grants and policy" "t|t|1" \
    "$(q $db -c "SELECT has_table_privilege('mapsync', 'public.model_mappings', 'SELECT,INSERT,UPDATE,DELETE'),
                        NOT has_table_privilege('mapsync', 'public.model_mappings', 'TRUNCATE'),
                        (SELECT count(*) FROM pg_policies WHERE policyname = 'mapsync can mirror model_mappings')")"
apply $db "$R003"
apply_batch $db "$R003"
expect "rollback/003 applies twice: role and policy gone" "0|0" \
    "$(q $db -c "SELECT (SELECT count(*) FROM pg_roles WHERE rolname = 'mapsync'),
                        (SELECT count(*) FROM pg_policies WHERE policyname = 'mapsync can mirror model_mappings')")"

# --- 8. rollback of 001 + 002 -------------------------------------------------------------------------------
ROWS_BEFORE=$(rows $db)
apply $db "$R001"
expect "rollback: back to exactly the deployed schema, triggers, policies and grants" "$REF_FP" "$(fingerprint $db)"
expect "rollback: every row kept" "$ROWS_BEFORE" "$(rows $db)"
apply $db "$R001"
apply_batch $db "$R001"
expect "rollback applies again (twice more), still the deployed state and rows" "$REF_FP
$ROWS_BEFORE" "$(fingerprint $db)
$(rows $db)"
expect "rollback: the deployed trigger is back (an UPDATE overwrites updated_at with now())" "t" \
    "$(q $db -c "UPDATE public.model_mappings SET updated_at = '2020-01-01T00:00:00Z' WHERE id = 'global:global' RETURNING updated_at = now()")"
ROWS_BEFORE=$(rows $db)
apply $db "$F001"
apply $db "$F002"
expect "001 + 002 apply again after the rollback, rows kept" "$ROWS_BEFORE" "$(rows $db)"
expect "... and the synced_at trigger works again" "2020-01-01 00:00:00+00|t" \
    "$(q $db -c "UPDATE public.model_mappings SET updated_at = '2020-01-01T00:00:00Z' WHERE id = 'global:global' RETURNING updated_at, synced_at = now()")"

# --- 9. atomicity: a failure before COMMIT leaves nothing half-applied ---------------------------------------
db=${PREFIX}_atomic
newdb $db
apply $db "$SHIM"
apply $db "$DEPLOYED"
q $db -c "$SEED_ROWS"
ROWS_BEFORE=$(rows $db)
for f in "$F001" "$F002" "$R001"; do
    broken=$(sed 's/^COMMIT;$/SELECT 1 \/ 0;\nCOMMIT;/' "$f")
    if q $db -c "$broken" >/dev/null 2>&1; then fail "$(basename "$f") with an injected error succeeded as a batch"; fi
    if q $db -f <(echo "$broken") >/dev/null 2>&1; then fail "$(basename "$f") with an injected error succeeded under psql -f"; fi
done
expect "an error before COMMIT (as one batch and under psql -f) leaves the deployed table untouched" "$REF_FP
$ROWS_BEFORE" "$(fingerprint $db)
$(rows $db)"

echo "all checks passed"
