-- mapsync 002: row level security, policies and grants on public.model_mappings.
--
-- Applied by `mapsync migrate` (embedded in the binary, run after 001_model_mappings.sql).
-- Idempotent: safe to run any number of times; it always ends in the same state.
--
-- Resulting access (Supabase API roles):
--   anon           nothing (every table privilege revoked)
--   authenticated  SELECT only (policy "Authenticated users can view model_mappings")
--   service_role   everything (policy "Service role can manage model_mappings")
--   PUBLIC         nothing
--   the owner      everything (owners bypass RLS; FORCE ROW LEVEL SECURITY is not set)
-- Supabase's default privileges give anon and authenticated ALL (TRUNCATE included, which RLS
-- does not cover) on every new table in public: this file revokes them before granting.
--
-- Also runs on a plain PostgreSQL without the Supabase roles: each role-specific part is
-- skipped when its role does not exist. There, with RLS enabled and no policy for it, a role
-- other than the owner sees no rows: connect mapsync as the owner, or apply
-- 003_mapsync_role.sql (which adds a policy for the mapsync role).
--
-- Paste it as a whole into the Supabase SQL editor, or run
--   psql -v ON_ERROR_STOP=1 -f sql/002_security.sql "$URL"
-- Run it as the table's owner (on Supabase: the `postgres` user). One transaction; no psql
-- meta-commands. Rollback: sql/rollback/001_rollback.sql.

BEGIN;

SET LOCAL lock_timeout = '10s';
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtextextended('mapsync:migrate', 0)); END $$;

ALTER TABLE public.model_mappings ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON TABLE public.model_mappings FROM PUBLIC;

-- The deployed policy names, dropped and recreated so an upgrade ends in a known state.
DROP POLICY IF EXISTS "Authenticated users can view model_mappings" ON public.model_mappings;
DROP POLICY IF EXISTS "Service role can manage model_mappings" ON public.model_mappings;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE public.model_mappings FROM anon;
    ELSE
        RAISE NOTICE 'mapsync 002: no role anon here (not Supabase): skipped';
    END IF;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT USAGE ON SCHEMA public TO authenticated;
        REVOKE ALL ON TABLE public.model_mappings FROM authenticated;
        GRANT SELECT ON TABLE public.model_mappings TO authenticated;
        CREATE POLICY "Authenticated users can view model_mappings" ON public.model_mappings
            FOR SELECT TO authenticated USING (true);
    ELSE
        RAISE NOTICE 'mapsync 002: no role authenticated here (not Supabase): skipped';
    END IF;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT USAGE ON SCHEMA public TO service_role;
        GRANT ALL ON TABLE public.model_mappings TO service_role;
        CREATE POLICY "Service role can manage model_mappings" ON public.model_mappings
            FOR ALL TO service_role USING (true) WITH CHECK (true);
    ELSE
        RAISE NOTICE 'mapsync 002: no role service_role here (not Supabase): skipped';
    END IF;
END
$$;

COMMIT;
