use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::node::NodeId;

/// A grow-only counter: one non-decreasing count per node; the value is their sum.
///
/// Laws (merge = pointwise max): commutative, associative, idempotent. An increment at one
/// node is never lost, however merges are ordered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GCounter(BTreeMap<NodeId, u64>);

impl GCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `amount` on behalf of `node`. Saturates at `u64::MAX` per node.
    pub fn increment(&mut self, node: &NodeId, amount: u64) {
        if amount > 0 {
            let count = self.0.entry(node.clone()).or_insert(0);
            *count = count.saturating_add(amount);
        }
    }

    /// The sum of every node's count, saturating at `u64::MAX`.
    pub fn value(&self) -> u64 {
        self.0
            .values()
            .fold(0u64, |sum, &count| sum.saturating_add(count))
    }

    /// Each node's count, in node order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&NodeId, u64)> {
        self.0.iter().map(|(node, &count)| (node, count))
    }

    /// A counter from entries already known to be positive (decoding checked them).
    pub(crate) fn from_entries(entries: BTreeMap<NodeId, u64>) -> Self {
        debug_assert!(
            entries.values().all(|&c| c > 0),
            "counter entries are positive"
        );
        Self(entries)
    }

    /// Sets `node`'s count to at least `count` (used by merging).
    pub fn witness(&mut self, node: &NodeId, count: u64) {
        match self.0.get_mut(node) {
            Some(entry) => *entry = (*entry).max(count),
            None if count > 0 => {
                self.0.insert(node.clone(), count);
            }
            None => {}
        }
    }
}

impl Crdt for GCounter {
    fn merge(&mut self, other: &Self) {
        for (node, count) in other.entries() {
            self.witness(node, count);
        }
    }
}
