//! What a run changes: the difference between what the mirror holds as far as this process
//! knows and a new read of the source ([`Diff`]). The mirror holds the image the last
//! successful run pushed; since then the source changed by the deltas of the reads in between,
//! composed into one ([`compose`]). The diff comes from that delta alone ([`Diff::of_delta`]),
//! or, when a read could not tell its delta (the first read after a failed one, ids shared by
//! two rows), from the two whole images ([`Diff::between`]).
//!
//! Invariant: [`Diff::of_delta`] of the composed deltas gives the same diff as
//! [`Diff::between`] the pushed image and the new one (a property tested on random edits,
//! through real reads). No index of every mirrored mapping is kept between runs: the pushed
//! image is the published one (shared), and an index is built only for a whole comparison.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use foldhash::{HashMap as FxHashMap, HashSet as FxHashSet};

use crate::appdb::Delta;
use crate::mapping::Mapping;

/// What a source image changes relative to the mirror.
#[derive(Debug, Default)]
pub struct Diff {
    /// New or different mappings.
    pub changed: Vec<Arc<Mapping>>,
    /// Mirrored mappings whose id is no longer in the source.
    pub removed: Vec<Arc<Mapping>>,
}

impl Diff {
    /// From `pushed` (what the mirror holds) to `local`.
    pub fn between(pushed: &[Arc<Mapping>], local: &[Arc<Mapping>]) -> Diff {
        let held: FxHashSet<ById<'_>> = pushed.iter().map(ById).collect();
        let mut changed = Vec::new();
        let mut present = 0;
        for m in local {
            match held.get(m.id()) {
                Some(ById(h)) => {
                    present += 1;
                    // Unchanged rows share the same Arc (reads reuse them).
                    if !Arc::ptr_eq(h, m) && *h != m {
                        changed.push(m.clone());
                    }
                }
                None => changed.push(m.clone()),
            }
        }
        // Only when some pushed id was not met is it worth indexing the source.
        let removed = if present == held.len() {
            Vec::new()
        } else {
            let ids: FxHashSet<&str> = local.iter().map(|m| m.id()).collect();
            pushed
                .iter()
                .filter(|m| !ids.contains(m.id()))
                .cloned()
                .collect()
        };
        Diff { changed, removed }
    }

    /// The same as [`Diff::between`] for a source that changed by `delta` since the image the
    /// mirror holds: only the changed rows are looked at.
    pub fn of_delta(delta: &Delta) -> Diff {
        let gone: FxHashMap<&str, &Arc<Mapping>> = delta.gone.iter().map(|m| (m.id(), m)).collect();
        let changed = delta
            .fresh
            .iter()
            .filter(|m| gone.get(m.id()).is_none_or(|g| *g != *m))
            .cloned()
            .collect();
        let fresh: FxHashSet<&str> = delta.fresh.iter().map(|m| m.id()).collect();
        let removed = delta
            .gone
            .iter()
            .filter(|m| !fresh.contains(m.id()))
            .cloned()
            .collect();
        Diff { changed, removed }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// `first` (image A to B) then `then` (B to C), as one delta from A to C: for each id, the
/// value it had in A (if either delta touched it and A had it) and the one it has in C.
/// Both deltas must come from images without shared ids (reads give no delta otherwise).
pub fn compose(first: Delta, then: Delta) -> Delta {
    if first.fresh.is_empty() && first.gone.is_empty() {
        return then;
    }
    let ids =
        |v: &[Arc<Mapping>]| -> FxHashSet<Box<str>> { v.iter().map(|m| m.id().into()).collect() };
    let (first_gone, first_fresh) = (ids(&first.gone), ids(&first.fresh));
    let (then_gone, then_fresh) = (ids(&then.gone), ids(&then.fresh));
    // A's value: first's gone, or then's gone for an id first did not touch.
    let mut gone = first.gone;
    gone.extend(
        then.gone
            .into_iter()
            .filter(|m| !first_gone.contains(m.id()) && !first_fresh.contains(m.id())),
    );
    // C's value: then's fresh, or first's fresh for an id then did not touch.
    let mut fresh = then.fresh;
    fresh.extend(
        first
            .fresh
            .into_iter()
            .filter(|m| !then_fresh.contains(m.id()) && !then_gone.contains(m.id())),
    );
    Delta { fresh, gone }
}

/// A mapping looked up by its id alone.
struct ById<'a>(&'a Arc<Mapping>);

impl Hash for ById<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.id().hash(h);
    }
}

impl PartialEq for ById<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for ById<'_> {}

impl Borrow<str> for ById<'_> {
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
        let pushed = [a.clone(), b.clone(), c.clone()];
        // Same Arc, an equal copy, a changed one, a new one; c is gone.
        let local = [a.clone(), m("mapping:b", "x"), m("mapping:d", "y")];
        let d = Diff::between(&pushed, &local);
        assert_eq!(ids(&d.changed), ["mapping:d"]);
        assert_eq!(ids(&d.removed), ["mapping:c"]);
        let changed = [a.clone(), m("mapping:b", "z"), c.clone()];
        let d = Diff::between(&pushed, &changed);
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
        let pushed = [a.clone(), b.clone(), c.clone()];
        // b changed, c removed, d added, a untouched.
        let (b2, d) = (m("mapping:b", "y"), m("mapping:d", "x"));
        let local = [a.clone(), b2.clone(), d.clone()];
        let delta = Delta {
            fresh: vec![b2.clone(), d.clone()],
            gone: vec![b.clone(), c.clone()],
        };
        let (whole, part) = (Diff::between(&pushed, &local), Diff::of_delta(&delta));
        assert_eq!(ids(&part.changed), ids(&whole.changed));
        assert_eq!(ids(&part.removed), ids(&whole.removed));
        assert_eq!(ids(&part.changed), ["mapping:b", "mapping:d"]);
        assert_eq!(ids(&part.removed), ["mapping:c"]);
        // A row rewritten with the same content is no change.
        let same = Delta {
            fresh: vec![m("mapping:a", "x")],
            gone: vec![a.clone()],
        };
        assert!(Diff::of_delta(&same).is_empty());
    }

    #[test]
    fn composed_deltas_span_both_reads() {
        let (a, b, c) = (
            m("mapping:a", "x"),
            m("mapping:b", "x"),
            m("mapping:c", "x"),
        );
        // A → B: b changed, c removed, d added. B → C: d changed, b removed, c back.
        let (b2, d, d2, c2) = (
            m("mapping:b", "y"),
            m("mapping:d", "x"),
            m("mapping:d", "y"),
            m("mapping:c", "x"),
        );
        let first = Delta {
            fresh: vec![b2.clone(), d.clone()],
            gone: vec![b.clone(), c.clone()],
        };
        let then = Delta {
            fresh: vec![d2.clone(), c2.clone()],
            gone: vec![d.clone(), b2.clone()],
        };
        let both = Diff::of_delta(&compose(first, then));
        let whole = Diff::between(&[a.clone(), b, c], &[a, d2, c2]);
        assert_eq!(ids(&both.changed), ids(&whole.changed));
        assert_eq!(ids(&both.removed), ids(&whole.removed));
        assert_eq!(ids(&both.changed), ["mapping:d"], "c came back unchanged");
        assert_eq!(ids(&both.removed), ["mapping:b"]);
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

        /// Through real reads of a real SQLite file: after any edits, the diff from the reads'
        /// deltas (composed over the reads since the last push) equals the diff from the
        /// whole images (what the engine's incremental runs rely on).
        #[test]
        fn the_diff_of_a_delta_equals_the_diff_of_the_whole_image(
            seed in proptest::collection::vec(edit(), 0..30),
            rounds in proptest::collection::vec(proptest::collection::vec(edit(), 0..12), 1..4),
            pushes in proptest::collection::vec(proptest::bool::ANY, 4),
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
            let mut pushed = source.read(ReadMode::Full).unwrap().mappings;
            let mut behind = Delta::default();
            for (round, push) in rounds.iter().zip(pushes) {
                for e in round {
                    apply(&conn, e);
                }
                let image = source.read(ReadMode::Incremental).unwrap();
                let delta = image.delta.clone().expect("no contested ids here");
                behind = compose(behind, delta);
                let whole = Diff::between(&pushed, &image.mappings);
                let part = Diff::of_delta(&behind);
                proptest::prop_assert_eq!(sorted_ids(&part.changed), sorted_ids(&whole.changed));
                proptest::prop_assert_eq!(sorted_ids(&part.removed), sorted_ids(&whole.removed));
                if push {
                    pushed = image.mappings.clone();
                    behind = Delta::default();
                    proptest::prop_assert!(Diff::between(&pushed, &image.mappings).is_empty());
                }
            }
        }
    }
}
