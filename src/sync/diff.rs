//! What a run changes: the mappings the mirror holds as far as this process knows
//! ([`Mirrored`]), and the difference between a read of the source and it ([`Diff`]), from
//! the whole image or, after an incremental read, from its delta alone.
//!
//! Invariant: [`Mirrored::diff_delta`] of a delta gives the same diff as [`Mirrored::diff`] of
//! the whole image it came from, when the mirror equalled the previous image (a property
//! tested on random edits).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use foldhash::HashSet as FxHashSet;

use crate::appdb::Delta;
use crate::mapping::Mapping;

/// The mappings the mirror holds, by id (as far as this process knows: rows added by hand
/// are only seen by full runs).
pub struct Mirrored(FxHashSet<ById>);

/// What a source image changes relative to the mirror.
#[derive(Debug)]
pub struct Diff {
    /// New or different mappings.
    pub changed: Vec<Arc<Mapping>>,
    /// Mirrored mappings whose id is no longer in the source.
    pub removed: Vec<Arc<Mapping>>,
}

impl Mirrored {
    pub fn of(mappings: &[Arc<Mapping>]) -> Mirrored {
        Mirrored(mappings.iter().cloned().map(ById).collect())
    }

    pub fn diff(&self, local: &[Arc<Mapping>]) -> Diff {
        let mut changed = Vec::new();
        let mut present = 0;
        for m in local {
            match self.0.get(m.id()) {
                Some(ById(held)) => {
                    present += 1;
                    // Unchanged rows share the same Arc (the incremental read reuses them).
                    if !Arc::ptr_eq(held, m) && held != m {
                        changed.push(m.clone());
                    }
                }
                None => changed.push(m.clone()),
            }
        }
        // Only when some mirrored id was not met is it worth indexing the source.
        let removed = if present == self.0.len() {
            Vec::new()
        } else {
            let ids: FxHashSet<&str> = local.iter().map(|m| m.id()).collect();
            self.0
                .iter()
                .filter(|ById(m)| !ids.contains(m.id()))
                .map(|ById(m)| m.clone())
                .collect()
        };
        Diff { changed, removed }
    }

    /// The same as [`Mirrored::diff`] for a source that changed by `delta` since it last
    /// equalled the mirror: only the changed rows are looked at.
    pub fn diff_delta(&self, delta: &Delta) -> Diff {
        let changed: Vec<Arc<Mapping>> = delta
            .fresh
            .iter()
            .filter(|m| self.0.get(m.id()).is_none_or(|ById(held)| held != *m))
            .cloned()
            .collect();
        let fresh: FxHashSet<&str> = delta.fresh.iter().map(|m| m.id()).collect();
        let removed = delta
            .gone
            .iter()
            .filter(|m| !fresh.contains(m.id()) && self.0.contains(m.id()))
            .cloned()
            .collect();
        Diff { changed, removed }
    }

    pub fn apply(&mut self, diff: Diff, deleted: bool) {
        for m in diff.changed {
            self.0.replace(ById(m));
        }
        if deleted {
            for m in diff.removed {
                self.0.remove(m.id());
            }
        }
    }
}

/// A mapping hashed and compared by its id alone.
struct ById(Arc<Mapping>);

impl Hash for ById {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.id().hash(h);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for ById {}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Fields, Origin};

    fn m(id: &str, model: &str) -> Arc<Mapping> {
        let (scope_type, scope_key) = id.split_once(':').unwrap();
        Arc::new(Mapping::new(Fields {
            scope_type,
            scope_key,
            default_model: Some(model),
            is_active: true,
            source: Origin::Sqlite,
            metadata: "{}",
            ..Default::default()
        }))
    }

    fn ids(v: &[Arc<Mapping>]) -> Vec<&str> {
        let mut ids: Vec<&str> = v.iter().map(|m| m.id()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn diff_finds_new_changed_and_removed_mappings() {
        let (a, b, c) = (
            m("mapping:a", "x"),
            m("mapping:b", "x"),
            m("mapping:c", "x"),
        );
        let mirrored = Mirrored::of(&[a.clone(), b.clone(), c.clone()]);
        // Same Arc, an equal copy, a changed one, a new one; c is gone.
        let local = [a.clone(), m("mapping:b", "x"), m("mapping:d", "y")];
        let d = mirrored.diff(&local);
        assert_eq!(ids(&d.changed), ["mapping:d"]);
        assert_eq!(ids(&d.removed), ["mapping:c"]);
        let changed = [a.clone(), m("mapping:b", "z"), c.clone()];
        let d = mirrored.diff(&changed);
        assert_eq!(ids(&d.changed), ["mapping:b"]);
        assert!(d.removed.is_empty());
    }

    #[test]
    fn a_delta_gives_the_same_diff_as_the_whole_image() {
        let (a, b, c) = (
            m("mapping:a", "x"),
            m("mapping:b", "x"),
            m("mapping:c", "x"),
        );
        let mirrored = Mirrored::of(&[a.clone(), b.clone(), c.clone()]);
        // b changed, c removed, d added, a untouched.
        let (b2, d) = (m("mapping:b", "y"), m("mapping:d", "x"));
        let local = [a.clone(), b2.clone(), d.clone()];
        let delta = Delta {
            fresh: vec![b2.clone(), d.clone()],
            gone: vec![b.clone(), c.clone()],
        };
        let (whole, part) = (mirrored.diff(&local), mirrored.diff_delta(&delta));
        assert_eq!(ids(&part.changed), ids(&whole.changed));
        assert_eq!(ids(&part.removed), ids(&whole.removed));
        assert_eq!(ids(&part.changed), ["mapping:b", "mapping:d"]);
        assert_eq!(ids(&part.removed), ["mapping:c"]);
        // A row rewritten with the same content is no change.
        let same = Delta {
            fresh: vec![m("mapping:a", "x")],
            gone: vec![a.clone()],
        };
        let d = mirrored.diff_delta(&same);
        assert!(d.changed.is_empty() && d.removed.is_empty());
    }

    #[test]
    fn applying_a_diff_tracks_the_mirror() {
        let (a, b) = (m("mapping:a", "x"), m("mapping:b", "x"));
        let mut mirrored = Mirrored::of(&[a.clone(), b.clone()]);
        let local = [m("mapping:a", "new")];
        let d = mirrored.diff(&local);
        mirrored.apply(d, false);
        // Without delete propagation the removed row stays in the mirror.
        assert!(mirrored.diff(&local).changed.is_empty());
        assert_eq!(ids(&mirrored.diff(&local).removed), ["mapping:b"]);
        let d = mirrored.diff(&local);
        mirrored.apply(d, true);
        assert!(mirrored.diff(&local).removed.is_empty());
    }

    /// One edit the application makes between two reads.
    #[derive(Debug, Clone)]
    enum Edit {
        Insert(u8, u8),
        Update(u8, u8),
        Delete(u8),
        /// The row's id and scope change (a rename: the old id goes, a new one comes).
        Rename(u8, u8),
        /// The same content written again (a new row version, no change).
        Touch(u8),
    }

    fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(k, m)| Edit::Insert(k % 40, m % 4)),
            (any::<u8>(), any::<u8>()).prop_map(|(k, m)| Edit::Update(k % 40, m % 4)),
            any::<u8>().prop_map(|k| Edit::Delete(k % 40)),
            (any::<u8>(), any::<u8>()).prop_map(|(k, n)| Edit::Rename(k % 40, n % 40 + 40)),
            any::<u8>().prop_map(|k| Edit::Touch(k % 40)),
        ]
    }

    /// Applies `e` to the application's table, the way the application writes (one
    /// statement, autocommit).
    fn apply(conn: &rusqlite::Connection, e: &Edit) {
        let model = |m: u8| ["gpt-4o", "o4-mini", "qwen-max", "kimi-k2"][m as usize];
        let upsert = |k: u8, m: u8| {
            conn.execute(
                "INSERT OR REPLACE INTO llm_model_mappings (id, scope_type, scope_key, default_model, candidates_json, is_active) \
                 VALUES (?1, 'mapping', ?2, ?3, ?4, 1)",
                rusqlite::params![format!("mapping:k{k}"), format!("k{k}"), model(m), format!("[\"{}\"]", model(m))],
            )
            .unwrap();
        };
        match *e {
            Edit::Insert(k, m) | Edit::Update(k, m) => upsert(k, m),
            Edit::Delete(k) => {
                conn.execute(
                    "DELETE FROM llm_model_mappings WHERE id = ?1",
                    [format!("mapping:k{k}")],
                )
                .unwrap();
            }
            Edit::Rename(k, n) => {
                conn.execute(
                    "UPDATE OR REPLACE llm_model_mappings SET id = ?2, scope_key = ?3 WHERE id = ?1",
                    rusqlite::params![format!("mapping:k{k}"), format!("mapping:k{n}"), format!("k{n}")],
                )
                .unwrap();
            }
            Edit::Touch(k) => {
                conn.execute(
                    "UPDATE llm_model_mappings SET name = name WHERE id = ?1",
                    [format!("mapping:k{k}")],
                )
                .unwrap();
            }
        }
    }

    fn sorted_ids(v: &[Arc<Mapping>]) -> Vec<String> {
        let mut ids: Vec<String> = v.iter().map(|m| m.id().to_string()).collect();
        ids.sort();
        ids
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]

        /// Through real incremental reads of a real SQLite file: after any edits, the diff
        /// from the read's delta equals the diff from the whole image, when the mirror held
        /// the previous read (what the engine's incremental runs rely on).
        #[test]
        fn the_diff_of_a_delta_equals_the_diff_of_the_whole_image(
            seed in proptest::collection::vec(edit(), 0..30),
            rounds in proptest::collection::vec(proptest::collection::vec(edit(), 0..12), 1..4),
        ) {
            use crate::appdb::{ReadMode, SqliteSource};
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("app.sqlite3");
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(crate::appdb::schema::APP_SCHEMA).unwrap();
            for e in &seed {
                apply(&conn, e);
            }
            let mut settings = crate::config::Settings::default();
            settings.source.sqlite_path = db.clone();
            let mut source =
                SqliteSource::new(&settings.source, crate::mapping::Redactor::default()).memoizing();
            let first = source.read(ReadMode::Full).unwrap();
            let mut mirrored = Mirrored::of(&first.mappings);
            for round in &rounds {
                for e in round {
                    apply(&conn, e);
                }
                let image = source.read(ReadMode::Incremental).unwrap();
                let whole = mirrored.diff(&image.mappings);
                let delta = image.delta.as_ref().expect("no contested ids here");
                let part = mirrored.diff_delta(delta);
                proptest::prop_assert_eq!(sorted_ids(&part.changed), sorted_ids(&whole.changed));
                proptest::prop_assert_eq!(sorted_ids(&part.removed), sorted_ids(&whole.removed));
                mirrored.apply(whole, true);
                proptest::prop_assert!(mirrored.diff(&image.mappings).changed.is_empty());
            }
        }
    }
}
