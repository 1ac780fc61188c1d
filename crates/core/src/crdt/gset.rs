use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Crdt;

/// A grow-only set: elements are added, never removed.
///
/// Laws (merge = union): commutative, associative, idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GSet<T: Ord>(BTreeSet<T>);

impl<T: Ord> Default for GSet<T> {
    fn default() -> Self {
        Self(BTreeSet::new())
    }
}

impl<T: Ord + Clone> GSet<T> {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `element`; returns whether it was new.
    pub fn insert(&mut self, element: T) -> bool {
        self.0.insert(element)
    }

    /// Whether `element` is in the set.
    pub fn contains(&self, element: &T) -> bool {
        self.0.contains(element)
    }

    /// The elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Ord + Clone> FromIterator<T> for GSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<T: Ord + Clone> Crdt for GSet<T> {
    fn merge(&mut self, other: &Self) {
        self.0.extend(other.0.iter().cloned());
    }
}
