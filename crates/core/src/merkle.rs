//! A Merkle tree over the key space, for anti-entropy between replicas.
//!
//! The tree has a fixed shape: `2^depth` leaves, one per bucket of the key-hash space (a key's
//! bucket is the top `depth` bits of its stable hash). A leaf is the wrapping sum of the
//! digests of the entries in its bucket, so it is independent of insertion order and updates in
//! O(1) when a record changes (subtract the old digest, add the new one). Inner nodes hash
//! their two children. Two replicas compare roots, then descend only into subtrees that
//! differ, and exchange just the keys of the buckets found different.
//!
//! Digests are 64-bit and not cryptographic: a divergence is missed only if two different
//! bucket contents sum to the same value, which for accidental differences is negligible.

use crate::hash::stable_hash;

const BUCKET_SEED: u64 = 0x6d65_726b_6c65; // "merkle"
const ENTRY_SEED: u64 = 0x0065_6e74_7279; // "entry"
const NODE_SEED: u64 = 0x6e6f_6465; // "node"

/// The deepest tree allowed (65,536 leaves).
pub const MAX_DEPTH: u8 = 16;

/// A Merkle tree of `2^depth` buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    depth: u8,
    leaves: Vec<u64>,
}

/// The digest of one entry: its key and its stored (encoded) record.
pub fn entry_digest(key: &[u8], record: &[u8]) -> u64 {
    // The key's length keeps (key, record) boundaries unambiguous.
    let mut bytes = Vec::with_capacity(8 + key.len() + record.len());
    bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(record);
    stable_hash(ENTRY_SEED, &bytes)
}

fn combine(left: u64, right: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&left.to_le_bytes());
    bytes[8..].copy_from_slice(&right.to_le_bytes());
    stable_hash(NODE_SEED, &bytes)
}

impl MerkleTree {
    /// An empty tree with `2^depth` buckets (`depth` is capped at [`MAX_DEPTH`]).
    pub fn new(depth: u8) -> Self {
        let depth = depth.min(MAX_DEPTH);
        Self {
            depth,
            leaves: vec![0; 1 << depth],
        }
    }

    /// A tree with the given leaves (as another node sent them); `None` if their number is not
    /// `2^depth` for a depth of at most [`MAX_DEPTH`].
    pub fn from_leaves(depth: u8, leaves: Vec<u64>) -> Option<Self> {
        (depth <= MAX_DEPTH && leaves.len() == 1 << depth).then_some(Self { depth, leaves })
    }

    /// The leaves: one sum per bucket.
    pub fn leaves(&self) -> &[u64] {
        &self.leaves
    }

    /// The same entries in a tree of `depth` levels (at most this tree's): each of its buckets
    /// sums the buckets of this one it covers, since a key's bucket is the top bits of one
    /// hash at every depth.
    pub fn coarsen(&self, depth: u8) -> Self {
        let depth = depth.min(self.depth);
        let width = 1usize << (self.depth - depth);
        let leaves = self
            .leaves
            .chunks(width)
            .map(|chunk| chunk.iter().fold(0u64, |sum, leaf| sum.wrapping_add(*leaf)))
            .collect();
        Self { depth, leaves }
    }

    /// The tree's depth.
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The bucket of `key`.
    pub fn bucket(&self, key: &[u8]) -> usize {
        if self.depth == 0 {
            return 0;
        }
        (stable_hash(BUCKET_SEED, key) >> (64 - u32::from(self.depth))) as usize
    }

    /// Adds an entry's digest to its bucket.
    pub fn insert(&mut self, key: &[u8], digest: u64) {
        let bucket = self.bucket(key);
        self.leaves[bucket] = self.leaves[bucket].wrapping_add(digest);
    }

    /// Removes an entry's digest from its bucket (the inverse of `insert`).
    pub fn remove(&mut self, key: &[u8], digest: u64) {
        let bucket = self.bucket(key);
        self.leaves[bucket] = self.leaves[bucket].wrapping_sub(digest);
    }

    /// The hashes of one level: level 0 is the root, level `depth` the leaves.
    pub fn level(&self, level: u8) -> Vec<u64> {
        self.levels().swap_remove(level.min(self.depth) as usize)
    }

    /// The hashes of every level, root first, each computed once from the one below.
    fn levels(&self) -> Vec<Vec<u64>> {
        let mut levels = vec![
            self.leaves
                .iter()
                .map(|&sum| combine(sum, 0))
                .collect::<Vec<u64>>(),
        ];
        while levels.last().is_some_and(|level| level.len() > 1) {
            let below = levels.last().expect("a level");
            let above = below
                .chunks(2)
                .map(|pair| combine(pair[0], pair[1]))
                .collect();
            levels.push(above);
        }
        levels.reverse();
        levels
    }

    /// The root hash: equal roots mean (with overwhelming likelihood) equal contents.
    pub fn root(&self) -> u64 {
        self.level(0)[0]
    }

    /// The buckets whose contents differ from `other`'s, found top-down (only subtrees whose
    /// hashes differ are examined). Trees of different depths differ everywhere.
    pub fn diff(&self, other: &Self) -> Vec<usize> {
        if self.depth != other.depth {
            return (0..self.leaves.len().max(other.leaves.len())).collect();
        }
        if self.leaves == other.leaves {
            return Vec::new();
        }
        let (ours, theirs) = (self.levels(), other.levels());
        let mut differing = vec![0usize];
        for level in 0..=self.depth {
            let (ours, theirs) = (&ours[level as usize], &theirs[level as usize]);
            differing.retain(|&i| ours[i] != theirs[i]);
            if level < self.depth {
                differing = differing.iter().flat_map(|&i| [2 * i, 2 * i + 1]).collect();
            }
        }
        differing
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// A tree of `entries`, inserted first in the order `order` names (indices modulo the
    /// number of entries), then the rest in key order.
    fn tree_of(entries: &BTreeMap<Vec<u8>, Vec<u8>>, order: &[usize]) -> MerkleTree {
        let mut tree = MerkleTree::new(6);
        let list: Vec<_> = entries.iter().collect();
        let mut seen = BTreeSet::new();
        let order = order
            .iter()
            .map(|i| i % list.len().max(1))
            .chain(0..list.len());
        for i in order.filter(|i| *i < list.len()) {
            if seen.insert(i) {
                tree.insert(list[i].0, entry_digest(list[i].0, list[i].1));
            }
        }
        tree
    }

    fn entries() -> impl Strategy<Value = BTreeMap<Vec<u8>, Vec<u8>>> {
        prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 1..12),
            prop::collection::vec(any::<u8>(), 0..8),
            0..60,
        )
    }

    proptest! {
        /// The tree depends on the entries, not on the order they were added in.
        #[test]
        fn insertion_order_does_not_matter(entries in entries(), order in prop::collection::vec(any::<usize>(), 0..60)) {
            prop_assert_eq!(tree_of(&entries, &order), tree_of(&entries, &[]));
        }

        /// The diff names exactly the buckets of the keys whose records differ.
        #[test]
        fn diff_finds_exactly_the_differing_buckets(
            base in entries(),
            changes in prop::collection::btree_map(prop::collection::vec(any::<u8>(), 1..12), prop::option::of(prop::collection::vec(any::<u8>(), 0..8)), 0..6),
        ) {
            let mut changed = base.clone();
            for (key, value) in &changes {
                match value {
                    Some(value) => changed.insert(key.clone(), value.clone()),
                    None => changed.remove(key),
                };
            }
            let (a, b) = (tree_of(&base, &[]), tree_of(&changed, &[]));
            let expected: BTreeSet<usize> = changes
                .keys()
                .filter(|key| base.get(*key) != changed.get(*key))
                .map(|key| a.bucket(key))
                .collect();
            prop_assert_eq!(a.diff(&b).into_iter().collect::<BTreeSet<_>>(), expected.clone());
            prop_assert_eq!(a.root() == b.root(), expected.is_empty());
        }

        /// Updating a record (remove the old digest, insert the new) equals building afresh.
        #[test]
        fn incremental_updates_equal_a_rebuild(entries in entries(), key in prop::collection::vec(any::<u8>(), 1..12), value in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut tree = tree_of(&entries, &[]);
            if let Some(old) = entries.get(&key) {
                tree.remove(&key, entry_digest(&key, old));
            }
            tree.insert(&key, entry_digest(&key, &value));
            let mut updated = entries.clone();
            updated.insert(key, value);
            prop_assert_eq!(tree, tree_of(&updated, &[]));
        }
    }

    #[test]
    fn levels_halve_up_to_the_root() {
        let tree = MerkleTree::new(4);
        assert_eq!(tree.level(4).len(), 16);
        assert_eq!(tree.level(2).len(), 4);
        assert_eq!(tree.level(0).len(), 1);
        assert_eq!(MerkleTree::new(40).depth(), MAX_DEPTH);
    }
}
