-- mapsync rollback of 003_mapsync_role.sql: removes the optional role `mapsync`, its policy
-- and its privileges in this database.
--
-- NOT applied by `mapsync migrate`: an admin runs it by hand (Supabase SQL editor, or
--   psql -v ON_ERROR_STOP=1 -f sql/rollback/003_drop_mapsync_role.sql "$URL").
-- Idempotent: safe to run any number of times (a no-op once the role is gone).
-- One transaction; no psql meta-commands. Stop the daemon first if it logs in as mapsync.
-- Roles belong to the whole cluster: if 003 was applied in several databases, run this file
-- in each of them; DROP ROLE fails (and nothing is changed) while privileges elsewhere remain.

BEGIN;

SET LOCAL lock_timeout = '10s';

DROP POLICY IF EXISTS "mapsync can mirror model_mappings" ON public.model_mappings;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'mapsync') THEN
        IF to_regclass('public.model_mappings') IS NOT NULL THEN
            REVOKE ALL ON TABLE public.model_mappings FROM mapsync;
        END IF;
        IF to_regclass('public.mapsync_instances') IS NOT NULL THEN
            DROP POLICY IF EXISTS "mapsync can register" ON public.mapsync_instances;
            REVOKE ALL ON TABLE public.mapsync_instances FROM mapsync;
        END IF;
        REVOKE ALL ON SCHEMA public FROM mapsync;
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM mapsync', current_database());
        DROP ROLE mapsync;
    END IF;
END
$$;

COMMIT;
