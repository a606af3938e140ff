-- mapsync rollback of 001_model_mappings.sql, 002_security.sql and 004_mapsync_instances.sql:
-- returns public.model_mappings to the state it was deployed in on Supabase before mapsync,
-- keeping every row, and drops the instance registry public.mapsync_instances.
--
-- NOT applied by `mapsync migrate`: an admin runs it by hand (Supabase SQL editor, or
--   psql -v ON_ERROR_STOP=1 -f sql/rollback/001_rollback.sql "$URL"), as the table's owner.
-- Idempotent: safe to run any number of times. One transaction; no psql meta-commands.
-- Stop mapsync first (or point it elsewhere): the mirror loses its synced_at column.
--
-- What it does:
--   * drops trigger model_mappings_stamp_synced_at and function public.model_mappings_stamp_synced_at();
--   * restores the deployed trigger update_model_mappings_updated_at (BEFORE UPDATE, sets
--     updated_at = now()), creating public.update_updated_at_column() only if it is missing
--     (an existing one is left untouched: other tables may use it);
--   * drops column synced_at (the other columns, the rows and the two deployed indexes stay);
--   * keeps RLS enabled and recreates the deployed policies and grants (authenticated: SELECT,
--     service_role: ALL, USAGE on schema public for anon, authenticated and service_role).
-- What it deliberately does not undo: 002 revoked every table privilege from anon and PUBLIC
-- (and anything beyond SELECT from authenticated). The deployed SQL never granted those;
-- on Supabase they came from default privileges and included TRUNCATE, which RLS does not
-- stop. Re-grant by hand if you really want them back.
-- The optional role from 003 is untouched: see 003_drop_mapsync_role.sql.

BEGIN;

SET LOCAL lock_timeout = '10s';
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtextextended('mapsync:migrate', 0)); END $$;

-- Undo 004 (the registry holds nothing the application needs).
DROP TABLE IF EXISTS public.mapsync_instances;

-- Undo 001.
DROP TRIGGER IF EXISTS model_mappings_stamp_synced_at ON public.model_mappings;
DROP FUNCTION IF EXISTS public.model_mappings_stamp_synced_at();

DO $do$
BEGIN
    IF to_regprocedure('public.update_updated_at_column()') IS NULL THEN
        -- The deployed definition, verbatim.
        EXECUTE $sql$CREATE OR REPLACE FUNCTION public.update_updated_at_column()
RETURNS TRIGGER AS $$ BEGIN NEW.updated_at = NOW(); RETURN NEW; END; $$ LANGUAGE plpgsql$sql$;
    END IF;
END
$do$;

DROP TRIGGER IF EXISTS update_model_mappings_updated_at ON public.model_mappings;
CREATE TRIGGER update_model_mappings_updated_at
    BEFORE UPDATE ON public.model_mappings FOR EACH ROW
    EXECUTE FUNCTION public.update_updated_at_column();

ALTER TABLE public.model_mappings DROP COLUMN IF EXISTS synced_at;

-- Undo 002: back to the deployed policies and grants.
ALTER TABLE public.model_mappings ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS "Authenticated users can view model_mappings" ON public.model_mappings;
DROP POLICY IF EXISTS "Service role can manage model_mappings" ON public.model_mappings;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        GRANT USAGE ON SCHEMA public TO anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        GRANT USAGE ON SCHEMA public TO authenticated;
        GRANT SELECT ON TABLE public.model_mappings TO authenticated;
        CREATE POLICY "Authenticated users can view model_mappings" ON public.model_mappings
            FOR SELECT TO authenticated USING (true);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT USAGE ON SCHEMA public TO service_role;
        GRANT ALL ON TABLE public.model_mappings TO service_role;
        CREATE POLICY "Service role can manage model_mappings" ON public.model_mappings
            FOR ALL TO service_role USING (true) WITH CHECK (true);
    END IF;
END
$$;

COMMIT;
