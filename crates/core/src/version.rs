//! Version vectors and dots: how replicas tell "happened before" from "concurrent".

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crdt::Crdt;
use crate::node::NodeId;

/// One event: the `counter`-th event that `node` issued.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The node that issued the event.
    pub node: NodeId,
    /// Its sequence number at that node, from 1.
    pub counter: u64,
}

/// How two versions relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Same events.
    Equal,
    /// The left side saw a strict subset of the right side's events.
    Before,
    /// The left side saw a strict superset of the right side's events.
    After,
    /// Each side saw an event the other did not: a conflict.
    Concurrent,
}

/// A version vector: for each node, how many of its events have been seen.
///
/// It is also a causal context: it contains dot `(n, c)` when `c <= self[n]`. That is exact
/// as long as every node issues its dots in order and every context is built from whole
/// states, which is how the CRDTs here use it.
///
/// Invariant: no entry is zero (absent and zero mean the same, and keeping one form makes
/// equality and the encoding canonical).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

impl VersionVector {
    /// The empty vector: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many of `node`'s events were seen.
    pub fn get(&self, node: &NodeId) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records the next event of `node` and returns its dot.
    pub fn next_dot(&mut self, node: &NodeId) -> Dot {
        let counter = self.0.entry(node.clone()).or_insert(0);
        *counter += 1;
        Dot {
            node: node.clone(),
            counter: *counter,
        }
    }

    /// Whether the event `dot` has been seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(&dot.node)
    }

    /// Raises `node`'s entry to at least `counter`.
    pub fn witness(&mut self, node: &NodeId, counter: u64) {
        match self.0.get_mut(node) {
            Some(entry) => *entry = (*entry).max(counter),
            None if counter > 0 => {
                self.0.insert(node.clone(), counter);
            }
            None => {}
        }
    }

    /// A vector from entries already known to be positive (decoding checked them).
    pub(crate) fn from_entries(entries: BTreeMap<NodeId, u64>) -> Self {
        debug_assert!(
            entries.values().all(|&c| c > 0),
            "version vector entries are positive"
        );
        Self(entries)
    }

    /// Whether every event seen by `other` was seen by `self`.
    pub fn dominates(&self, other: &Self) -> bool {
        other
            .0
            .iter()
            .all(|(node, &counter)| self.get(node) >= counter)
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &Self) -> Causality {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::After,
            (false, true) => Causality::Before,
            (false, false) => Causality::Concurrent,
        }
    }

    /// The entries, in node order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&NodeId, u64)> {
        self.0.iter().map(|(node, &counter)| (node, counter))
    }

    /// Number of nodes with a non-zero entry.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialOrd for VersionVector {
    /// The causal (partial) order: `None` when concurrent.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match self.compare(other) {
            Causality::Equal => Some(Ordering::Equal),
            Causality::Before => Some(Ordering::Less),
            Causality::After => Some(Ordering::Greater),
            Causality::Concurrent => None,
        }
    }
}

/// The text form of a version vector, as clients see it: `node-a:3,node-b:1` (empty: `-`).
impl std::fmt::Display for VersionVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, (node, counter)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{node}:{counter}")?;
        }
        Ok(())
    }
}

/// A version token that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version `{0}`: expected `node:counter[,node:counter...]` or `-`")]
pub struct InvalidVersion(pub String);

impl std::str::FromStr for VersionVector {
    type Err = InvalidVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut vv = VersionVector::new();
        if s == "-" {
            return Ok(vv);
        }
        let invalid = || InvalidVersion(s.to_owned());
        for entry in s.split(',') {
            let (node, counter) = entry.rsplit_once(':').ok_or_else(invalid)?;
            let node = NodeId::new(node).map_err(|_| invalid())?;
            let counter: u64 = counter.parse().map_err(|_| invalid())?;
            if counter == 0 || vv.get(&node) != 0 {
                return Err(invalid());
            }
            vv.witness(&node, counter);
        }
        Ok(vv)
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut vv = Self::new();
        for (node, counter) in iter {
            vv.witness(&node, counter);
        }
        vv
    }
}

impl Crdt for VersionVector {
    /// Pointwise maximum. Laws: commutative, associative, idempotent (a max per entry).
    fn merge(&mut self, other: &Self) {
        for (node, counter) in other.iter() {
            self.witness(node, counter);
        }
    }
}
