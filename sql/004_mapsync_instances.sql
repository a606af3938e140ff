-- mapsync 004: public.mapsync_instances, the registry of mapsync instances that write a table.
--
-- Applied by `mapsync migrate` (embedded in the binary, run after 002_security.sql).
-- Idempotent: safe to run any number of times. One transaction; no psql meta-commands.
-- Rollback: sql/rollback/001_rollback.sql drops it.
--
-- Each mapsync instance (instance.name, default: host name and SQLite path) records here, in
-- the same transaction as each run, which table it mirrors, from which host and SQLite file,
-- its version, when it last wrote the table and how its last run ended. A run with delete
-- propagation refuses (status refused:other_instance) while another instance has written the
-- same table within target.instance_grace_s: two instances mirroring different SQLite files
-- into one table would otherwise delete each other's rows.
--
-- Access: RLS on with no policy but the service role's: only the owner, service_role and the
-- optional mapsync role (003_mapsync_role.sql) can read or write it; anon, authenticated and
-- PUBLIC nothing (it names hosts and file paths).

BEGIN;

SET LOCAL lock_timeout = '10s';
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtextextended('mapsync:migrate', 0)); END $$;

CREATE TABLE IF NOT EXISTS public.mapsync_instances (
    name          TEXT NOT NULL,              -- instance.name
    target_table  TEXT NOT NULL,              -- the table it mirrors, e.g. public.model_mappings
    host          TEXT,                       -- the host it runs on
    sqlite_path   TEXT,                       -- the SQLite file it mirrors
    version       TEXT,                       -- mapsync's version
    last_run_at   TIMESTAMPTZ,                -- when its last run wrote the table
    last_status   TEXT,                       -- synced, refused:mass_delete, refused:other_instance
    PRIMARY KEY (name, target_table)
);

COMMENT ON TABLE public.mapsync_instances IS
    'mapsync: the instances that mirror a SQLite file into a table, so that two of them never delete each other''s rows.';

ALTER TABLE public.mapsync_instances ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE public.mapsync_instances FROM PUBLIC;

DROP POLICY IF EXISTS "Service role can manage mapsync_instances" ON public.mapsync_instances;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE public.mapsync_instances FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON TABLE public.mapsync_instances FROM authenticated;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        GRANT ALL ON TABLE public.mapsync_instances TO service_role;
        CREATE POLICY "Service role can manage mapsync_instances" ON public.mapsync_instances
            FOR ALL TO service_role USING (true) WITH CHECK (true);
    END IF;
    -- The optional least-privilege role (003), when it was created before this file ran.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'mapsync') THEN
        GRANT SELECT, INSERT, UPDATE ON TABLE public.mapsync_instances TO mapsync;
        DROP POLICY IF EXISTS "mapsync can register" ON public.mapsync_instances;
        CREATE POLICY "mapsync can register" ON public.mapsync_instances
            FOR ALL TO mapsync USING (true) WITH CHECK (true);
    END IF;
END
$$;

COMMIT;
