use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Crdt, surviving};
use crate::node::NodeId;
use crate::version::{Dot, VersionVector};

/// An observed-remove set with add-wins semantics and no tombstones.
///
/// Each element carries the dots of the adds that put it there; the set also keeps a causal
/// context (a version vector) of every add it has seen. Removing an element drops its dots but
/// not the context, so a replica that still holds those dots learns from the context that
/// they were removed. An add concurrent with a remove has a dot the remover never saw, so the
/// add wins. The context is one counter per node, so removed elements leave nothing behind.
///
/// Laws (merge keeps a dot when both sides hold it or the other side never saw it, and joins
/// the contexts): commutative, associative, idempotent.
///
/// Invariant: every dot held is in the context, and no element has an empty dot set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrSet<T: Ord> {
    entries: BTreeMap<T, BTreeSet<Dot>>,
    context: VersionVector,
}

impl<T: Ord> Default for OrSet<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            context: VersionVector::new(),
        }
    }
}

impl<T: Ord + Clone> OrSet<T> {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `element` on behalf of `node`. The new dot replaces the element's observed dots.
    pub fn add(&mut self, node: &NodeId, element: T) -> Dot {
        let dot = self.context.next_dot(node);
        self.entries.insert(element, BTreeSet::from([dot.clone()]));
        dot
    }

    /// Removes `element` (the adds this replica has observed); returns whether it was present.
    pub fn remove(&mut self, element: &T) -> bool {
        self.entries.remove(element).is_some()
    }

    /// Whether `element` is in the set.
    pub fn contains(&self, element: &T) -> bool {
        self.entries.contains_key(element)
    }

    /// The elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.keys()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The causal context: every add this replica has seen.
    pub fn context(&self) -> &VersionVector {
        &self.context
    }

    /// Each element with its dots (for encoding).
    pub fn entries(&self) -> impl Iterator<Item = (&T, &BTreeSet<Dot>)> {
        self.entries.iter()
    }

    /// Rebuilds a set from its parts, checking the invariant. Used by decoding.
    pub fn from_parts(
        entries: BTreeMap<T, BTreeSet<Dot>>,
        context: VersionVector,
    ) -> Result<Self, &'static str> {
        let set = Self { entries, context };
        set.validate()?;
        Ok(set)
    }

    /// Checks the invariant: every dot held is in the context, no element has no dot.
    pub fn validate(&self) -> Result<(), &'static str> {
        for dots in self.entries.values() {
            if dots.is_empty() {
                return Err("an element has no dot");
            }
            if !dots.iter().all(|dot| self.context.contains(dot)) {
                return Err("a dot is outside the causal context");
            }
        }
        Ok(())
    }
}

impl<T: Ord + Clone> Crdt for OrSet<T> {
    fn merge(&mut self, other: &Self) {
        let elements: BTreeSet<T> = self
            .entries
            .keys()
            .chain(other.entries.keys())
            .cloned()
            .collect();
        let empty = BTreeSet::new();
        for element in elements {
            let ours = self.entries.get(&element).unwrap_or(&empty);
            let theirs = other.entries.get(&element).unwrap_or(&empty);
            let keep = surviving(
                ours.iter(),
                theirs.iter(),
                |dot| ours.contains(dot) && theirs.contains(dot),
                |dot| other.context.contains(dot),
                |dot| self.context.contains(dot),
            );
            if keep.is_empty() {
                self.entries.remove(&element);
            } else {
                self.entries.insert(element, keep);
            }
        }
        self.context.merge(&other.context);
    }
}
