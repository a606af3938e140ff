//! A whole read of mappings: de-duplication by normalised id, the export order, and a digest
//! of the set that tells whether anything changed since the newest snapshot.

use std::cmp::Ordering;
use std::sync::Arc;

use foldhash::{HashMap as FxHashMap, HashSet as FxHashSet};

use super::{Mapping, Origin};

/// A mapping together with the id it was stored under, before de-duplication.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `None` when the row was stored under its normalised id (the common case).
    pub stored_id: Option<Box<str>>,
    pub mapping: Arc<Mapping>,
}

impl Candidate {
    pub fn new(stored_id: &str, mapping: Mapping) -> Candidate {
        Candidate {
            stored_id: (stored_id != mapping.id()).then(|| stored_id.into()),
            mapping: Arc::new(mapping),
        }
    }

    fn stored_id(&self) -> &str {
        self.stored_id.as_deref().unwrap_or(self.mapping.id())
    }
}

/// De-duplicates by normalised id: the later `updated_at` wins; on a tie the row stored under
/// the normalised id, then the smaller stored id, so the outcome never depends on read order.
/// The order of the result is unspecified; see [`sort_for_export`]. Also says whether any id
/// was shared (contested).
///
/// Only a candidate stored under another id (a legacy `tenant:x`, a scope with stray spaces)
/// or a prompt's can share its id with another: the others' ids are their rows' distinct
/// primary keys. So only ids of those few are indexed, which keeps this cheap on every read.
pub fn finalize(candidates: Vec<Candidate>) -> (Vec<Arc<Mapping>>, bool) {
    let special: FxHashSet<&str> = candidates
        .iter()
        .filter(|c| c.stored_id.is_some() || c.mapping.source() == Origin::Prompt)
        .map(|c| c.mapping.id())
        .collect();
    let mut winner: FxHashMap<&str, usize> = FxHashMap::default();
    let mut contested = false;
    for (i, c) in candidates.iter().enumerate() {
        let id = c.mapping.id();
        if !special.contains(id) {
            continue;
        }
        winner
            .entry(id)
            .and_modify(|w| {
                contested = true;
                if preference(c, &candidates[*w]) == Ordering::Greater {
                    *w = i;
                }
            })
            .or_insert(i);
    }
    if !contested {
        return (candidates.into_iter().map(|c| c.mapping).collect(), false);
    }
    let winners: FxHashSet<usize> = winner.into_values().collect();
    let losers: Vec<bool> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| special.contains(c.mapping.id()) && !winners.contains(&i))
        .collect();
    drop(special);
    let kept = candidates
        .into_iter()
        .zip(losers)
        .filter(|(_, lost)| !lost)
        .map(|(c, _)| c.mapping)
        .collect();
    (kept, true)
}

/// `Greater` when `a` should win over `b` for the same normalised id.
fn preference(a: &Candidate, b: &Candidate) -> Ordering {
    // A missing timestamp orders first, so it loses to any timestamp.
    a.mapping
        .updated_at
        .cmp(&b.mapping.updated_at)
        .then_with(|| a.stored_id.is_none().cmp(&b.stored_id.is_none()))
        .then_with(|| b.stored_id().cmp(a.stored_id()))
}

/// Export order: prompt mappings first, then by `updated_at` descending (missing last), then id.
pub fn sort_for_export(mappings: &mut [Arc<Mapping>]) {
    mappings.sort_by(|a, b| {
        let prompt_first = (a.source() != Origin::Prompt).cmp(&(b.source() != Origin::Prompt));
        // Descending: a missing timestamp orders first, so it goes last.
        prompt_first
            .then_with(|| b.updated_at.cmp(&a.updated_at))
            .then_with(|| a.id().cmp(b.id()))
    });
}

/// A digest of a whole set of mappings, independent of their order: tells whether anything
/// changed since the newest snapshot without comparing 100,000 mappings.
pub fn digest<'a>(mappings: impl IntoIterator<Item = &'a Mapping>) -> u64 {
    let mut set = SetDigest::default();
    mappings.into_iter().for_each(|m| set.add(m));
    set.finish()
}

/// [`digest`] one mapping at a time, for a set that is never held whole (a snapshot file
/// read entry by entry).
#[derive(Debug, Default)]
pub struct SetDigest(u64);

impl SetDigest {
    pub fn add(&mut self, m: &Mapping) {
        self.0 = self.0.wrapping_add(mix(m.digest()));
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// SplitMix64's finaliser: spreads each digest over all 64 bits before they are summed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{mapping, named};
    use super::*;

    #[test]
    fn later_updated_at_wins_among_duplicate_ids() {
        let older = Candidate::new(
            "mapping:x",
            mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
        );
        let newer = Candidate::new(
            "tenant:x",
            named(
                mapping("mapping:x", Some("2026-02-01T00:00:00Z"), Origin::Sqlite),
                "from tenant",
            ),
        );
        for order in [
            vec![older.clone(), newer.clone()],
            vec![newer.clone(), older.clone()],
        ] {
            let (out, contested) = finalize(order);
            assert!(contested);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].name(), Some("from tenant"));
        }
    }

    #[test]
    fn on_a_tie_the_row_stored_under_the_normalised_id_wins() {
        let exact = Candidate::new(
            "mapping:x",
            named(
                mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
                "exact",
            ),
        );
        let alias = Candidate::new(
            "tenant:x",
            mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
        );
        for order in [
            vec![exact.clone(), alias.clone()],
            vec![alias.clone(), exact.clone()],
        ] {
            assert_eq!(finalize(order).0[0].name(), Some("exact"));
        }
    }

    #[test]
    fn export_order_is_prompts_then_newest_then_id() {
        let (mut out, contested) = finalize(
            [
                mapping("mapping:b", Some("2026-01-02T00:00:00Z"), Origin::Sqlite),
                mapping("mapping:a", Some("2026-01-02T00:00:00Z"), Origin::Sqlite),
                mapping("user:old", Some("2025-01-01T00:00:00Z"), Origin::Sqlite),
                mapping("user:none", None, Origin::Sqlite),
                mapping("prompt:7", Some("2020-01-01T00:00:00Z"), Origin::Prompt),
                mapping(
                    "global:global",
                    Some("2026-03-01T00:00:00Z"),
                    Origin::Sqlite,
                ),
            ]
            .into_iter()
            .map(|m| Candidate {
                stored_id: None,
                mapping: Arc::new(m),
            })
            .collect(),
        );
        assert!(!contested);
        sort_for_export(&mut out);
        let ids: Vec<&str> = out.iter().map(|m| m.id()).collect();
        assert_eq!(
            ids,
            [
                "prompt:7",
                "global:global",
                "mapping:a",
                "mapping:b",
                "user:old",
                "user:none"
            ]
        );
    }

    #[test]
    fn digests_change_with_content_only() {
        let x = mapping("mapping:x", None, Origin::Sqlite);
        let y = mapping("mapping:y", None, Origin::Sqlite);
        assert_eq!(digest([&x, &y]), digest([&y, &x]), "order does not matter");
        assert_eq!(x.digest(), x.clone().digest());
        let renamed = named(x.clone(), "x");
        assert_ne!(digest([&x, &y]), digest([&renamed, &y]));
        assert_ne!(digest([&x, &y]), digest([&x]));
        assert_ne!(digest([&x, &y]), digest([&x, &y, &y]), "a duplicate counts");
    }
}
