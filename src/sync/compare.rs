//! A whole image against the mirror's rows as they stream in ([`Compare`]): what a full run
//! inserts, rewrites and deletes.
//!
//! Invariants: no remote row is kept, only the ids of rows the image lacks (all of them when
//! the mirror holds another instance's rows too: one `String` each); the image is indexed by
//! 4-byte positions hashed by id, so the comparison costs ~10 bytes per mapping (at 1,000,000
//! mappings a map of the remote rows by id held ~110 MiB beside the image, and a daemon's
//! restart crossed its unit's `MemoryMax`). Mappings the mirror cannot hold are not indexed:
//! a remote row with such an id counts as one the image lacks, as it always did.

use std::sync::Arc;

use hashbrown::HashTable;

use crate::mapping::Mapping;
use crate::postgres::digest;

/// The comparison under way: feed it every remote row ([`Compare::visit`]), then
/// [`Compare::finish`].
pub struct Compare<'a> {
    mappings: &'a [Arc<Mapping>],
    hasher: foldhash::fast::RandomState,
    by_id: HashTable<u32>,
    /// Whether the mirror has a row for `mappings[i]`.
    met: Vec<bool>,
    differing: Vec<&'a Mapping>,
    extra: Vec<String>,
}

/// What a comparison found.
pub struct Found<'a> {
    /// Mirrorable mappings the mirror lacks.
    pub missing: Vec<&'a Mapping>,
    /// Mappings whose row differs.
    pub differing: Vec<&'a Mapping>,
    /// Remote ids the image lacks.
    pub extra: Vec<String>,
}

impl<'a> Compare<'a> {
    pub fn new(mappings: &'a [Arc<Mapping>]) -> Compare<'a> {
        let hasher = foldhash::fast::RandomState::default();
        let mut by_id = HashTable::with_capacity(mappings.len());
        let hash = |m: &Arc<Mapping>| hash_id(&hasher, m.id());
        // Positions are u32 (4 bytes each): no image comes near 4 billion mappings, whose
        // memory no host has; positions past that are left out rather than wrapped.
        let positions = (0..=u32::MAX).zip(mappings);
        for (i, m) in positions.filter(|(_, m)| m.mirrorable()) {
            // Ids are unique in an image (de-duplicated when read).
            by_id.insert_unique(hash(m), i, |&j| hash(&mappings[j as usize]));
        }
        Compare {
            mappings,
            hasher,
            by_id,
            met: vec![false; mappings.len()],
            differing: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// One remote row: its id and digest.
    pub fn visit(&mut self, id: &str, remote: u64) {
        let mappings = self.mappings;
        let found = self.by_id.find(hash_id(&self.hasher, id), |&j| {
            mappings[j as usize].id() == id
        });
        match found {
            Some(&i) => {
                let m = &mappings[i as usize];
                self.met[i as usize] = true;
                if remote != digest(m) {
                    self.differing.push(m);
                }
            }
            None => self.extra.push(id.to_owned()),
        }
    }

    pub fn finish(self) -> Found<'a> {
        let missing = self
            .mappings
            .iter()
            .zip(&self.met)
            .filter(|(m, met)| !**met && m.mirrorable())
            .map(|(m, _)| m.as_ref())
            .collect();
        Found {
            missing,
            differing: self.differing,
            extra: self.extra,
        }
    }
}

fn hash_id(hasher: &foldhash::fast::RandomState, id: &str) -> u64 {
    use std::hash::BuildHasher;
    hasher.hash_one(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Fields, Origin};

    fn m(key: &str, model: &str) -> Arc<Mapping> {
        Arc::new(Mapping::new(Fields {
            scope_type: "mapping",
            scope_key: key,
            default_model: Some(model),
            is_active: true,
            source: Origin::Sqlite,
            metadata: "{}",
            ..Default::default()
        }))
    }

    #[test]
    fn finds_missing_differing_and_extra_rows() {
        let image = [m("a", "x"), m("b", "x"), m("c", "x")];
        let mut compare = Compare::new(&image);
        // The mirror: a as it is, b with another model, d that the image lacks; no c.
        compare.visit("mapping:a", digest(&image[0]));
        compare.visit("mapping:b", digest(&m("b", "y")));
        compare.visit("mapping:d", 7);
        let found = compare.finish();
        let ids = |v: &[&Mapping]| v.iter().map(|m| m.id().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(&found.missing), ["mapping:c"]);
        assert_eq!(ids(&found.differing), ["mapping:b"]);
        assert_eq!(found.extra, ["mapping:d"]);
    }
}
