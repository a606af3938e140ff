-- mapsync 001: the mirror table public.model_mappings, its indexes and its synced_at trigger.
--
-- Applied by `mapsync migrate` (embedded in the binary, run before 002_security.sql).
-- Idempotent: safe to run any number of times. Works on an empty database (creates the table)
-- and on the table as deployed on Supabase before mapsync (upgrades it in place, keeps every
-- row; adding the nullable column synced_at does not rewrite the table).
--
-- What changes against the deployed table:
--   * new column synced_at timestamptz: when mapsync (or anyone) last wrote the row here.
--     Rows written before this upgrade keep synced_at NULL until they are next written.
--   * the deployed trigger update_model_mappings_updated_at (BEFORE UPDATE, sets
--     updated_at = now()) is replaced by model_mappings_stamp_synced_at (BEFORE INSERT OR
--     UPDATE, sets synced_at = now()). updated_at now keeps the value the sync pushes,
--     i.e. the source row's own updated_at. The shared function
--     public.update_updated_at_column() is left in place: other tables may use it.
--
-- Paste it as a whole into the Supabase SQL editor, or run
--   psql -v ON_ERROR_STOP=1 -f sql/001_model_mappings.sql "$URL"
-- Run it as the table's owner (on Supabase: the `postgres` user), not as the mapsync role.
-- One transaction: on any error nothing is applied. No psql meta-commands, so it also runs
-- as a single simple-query batch. Rollback: sql/rollback/001_rollback.sql.

BEGIN;

-- Fail fast instead of queueing behind a long query (a queued ACCESS EXCLUSIVE lock would
-- block every reader of the table meanwhile); just run the script again.
SET LOCAL lock_timeout = '10s';

-- Two `mapsync migrate` at once (several instances starting together) wait for each other.
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtextextended('mapsync:migrate', 0)); END $$;

CREATE TABLE IF NOT EXISTS public.model_mappings (
    id            TEXT PRIMARY KEY,                    -- "<scope_type>:<scope_key>", e.g. mapping:xai
    scope_type    TEXT NOT NULL,
    scope_key     TEXT NOT NULL,
    name          TEXT,
    default_model TEXT,
    candidates    JSONB NOT NULL DEFAULT '[]'::jsonb,  -- JSON array of model names
    is_active     BOOLEAN DEFAULT TRUE,
    updated_at    TIMESTAMPTZ DEFAULT NOW(),           -- the source row's updated_at, as pushed
    source        TEXT,                                -- 'sqlite' or 'prompt'
    metadata      JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at    TIMESTAMPTZ DEFAULT NOW(),           -- first written here; mapsync never sets it
    synced_at     TIMESTAMPTZ                          -- last written here; set by the trigger below
);

-- Upgrade of the deployed table (no-op when the column exists).
ALTER TABLE public.model_mappings ADD COLUMN IF NOT EXISTS synced_at TIMESTAMPTZ;

COMMENT ON COLUMN public.model_mappings.synced_at IS
    'When this row was last inserted or updated here; set by trigger model_mappings_stamp_synced_at.';

CREATE INDEX IF NOT EXISTS idx_model_mappings_scope ON public.model_mappings (scope_type, scope_key);
CREATE INDEX IF NOT EXISTS idx_model_mappings_updated_at ON public.model_mappings (updated_at DESC);

-- Stamps synced_at and leaves every other column, updated_at included, as written.
-- search_path is pinned (Supabase's advisor flags functions without it); now() is in
-- pg_catalog, which is always searched.
CREATE OR REPLACE FUNCTION public.model_mappings_stamp_synced_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    NEW.synced_at := now();
    RETURN NEW;
END;
$$;

COMMENT ON FUNCTION public.model_mappings_stamp_synced_at() IS
    'mapsync: sets synced_at = now() on insert and update of public.model_mappings; keeps the pushed updated_at.';

-- The deployed trigger overwrote the pushed updated_at; it goes. Its function stays.
DROP TRIGGER IF EXISTS update_model_mappings_updated_at ON public.model_mappings;

DROP TRIGGER IF EXISTS model_mappings_stamp_synced_at ON public.model_mappings;
CREATE TRIGGER model_mappings_stamp_synced_at
    BEFORE INSERT OR UPDATE ON public.model_mappings
    FOR EACH ROW
    EXECUTE FUNCTION public.model_mappings_stamp_synced_at();

COMMIT;
