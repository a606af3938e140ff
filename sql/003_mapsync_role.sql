-- mapsync 003 (optional): a least-privilege role `mapsync` for the daemon to log in as.
--
-- NOT applied by `mapsync migrate`: an admin applies it by hand, after 001 and 002.
-- Idempotent: safe to run any number of times.
--
-- The role may read and write the rows of public.model_mappings (and record its runs in
-- public.mapsync_instances, from 004) and nothing else:
--   USAGE on schema public; SELECT, INSERT, UPDATE, DELETE on public.model_mappings
--   (no TRUNCATE, no DDL, not the owner, so it can neither drop nor alter the table);
--   TEMP on this database (a sync run stages rows in a temporary table);
--   RLS policy "mapsync can mirror model_mappings" (the role does not bypass RLS).
-- Because it does not own the table, `mapsync migrate` cannot run as this role: run migrate
-- with the owner's URL (on Supabase: the `postgres` user) and the daemon with this one.
--
-- The role is created NOLOGIN and this file holds no password. Let it log in yourself:
--   ALTER ROLE mapsync LOGIN PASSWORD 'a-long-random-password';
-- (or, from psql, `ALTER ROLE mapsync LOGIN;` then `\password mapsync`, which sends only a
-- SCRAM verifier, so the password never reaches the server's logs in clear);
-- then set target.url (percent-encode special characters in the password):
--   plain PostgreSQL:         postgres://mapsync:PASSWORD@HOST:5432/DBNAME
--   Supabase, direct:         postgres://mapsync:PASSWORD@db.<project-ref>.supabase.co:5432/postgres?sslmode=verify-full
--   Supabase, session pooler: postgres://mapsync.<project-ref>:PASSWORD@<pooler host from "Connect">:5432/postgres?sslmode=verify-full
-- (with target.ssl_root_cert pointing at Supabase's CA certificate for verify-full).
-- Roles belong to the whole cluster: the name `mapsync` must not already be used for anything
-- else. To remove it: sql/rollback/003_drop_mapsync_role.sql.

BEGIN;

SET LOCAL lock_timeout = '10s';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'mapsync') THEN
        CREATE ROLE mapsync NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO mapsync;
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.model_mappings TO mapsync;

DO $$
BEGIN
    EXECUTE format('GRANT TEMP ON DATABASE %I TO mapsync', current_database());
END
$$;

DROP POLICY IF EXISTS "mapsync can mirror model_mappings" ON public.model_mappings;
CREATE POLICY "mapsync can mirror model_mappings" ON public.model_mappings
    FOR ALL TO mapsync USING (true) WITH CHECK (true);

-- The instance registry (004), when it exists: the role records its own runs there.
DO $$
BEGIN
    IF to_regclass('public.mapsync_instances') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE ON TABLE public.mapsync_instances TO mapsync;
        DROP POLICY IF EXISTS "mapsync can register" ON public.mapsync_instances;
        CREATE POLICY "mapsync can register" ON public.mapsync_instances
            FOR ALL TO mapsync USING (true) WITH CHECK (true);
    END IF;
END
$$;

COMMIT;
