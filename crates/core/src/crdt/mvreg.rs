use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Crdt, surviving};
use crate::node::NodeId;
use crate::version::{Dot, VersionVector};

/// A multi-value register: keeps every concurrent write (the siblings) until a writer that
/// has seen them replaces them.
///
/// This is the spec's `MVRegister::merge` ("keep all values not dominated, prune the
/// dominated") in its dotted form: each value carries the dot of the write that made it, and
/// the register keeps a causal context of every write it has seen. A value is dominated when
/// the other side's context has its dot but the other side no longer holds it (a later write
/// that saw it replaced it). Dots avoid the false dominance of one vector per value, where two
/// clients writing through the same node without a context would silently overwrite each other.
///
/// Writing with the context returned by a read replaces exactly the values that were read, so
/// a client that always writes back its context never adds siblings.
///
/// Laws: commutative, associative, idempotent (the same dot logic as [`super::OrSet`]).
///
/// Invariant: every value's dot is in the context.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MvRegister<T> {
    values: BTreeMap<Dot, T>,
    context: VersionVector,
}

impl<T> Default for MvRegister<T> {
    fn default() -> Self {
        Self {
            values: BTreeMap::new(),
            context: VersionVector::new(),
        }
    }
}

impl<T: Clone> MvRegister<T> {
    /// An empty register.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` on behalf of `node`, replacing the values whose writes are in `seen`
    /// (the context the writer read). `None` deletes what was seen without adding a value.
    /// Returns the dot of the write.
    pub fn write(&mut self, node: &NodeId, value: Option<T>, seen: &VersionVector) -> Dot {
        self.values.retain(|dot, _| !seen.contains(dot));
        // The writer's context joins ours, so a value written elsewhere and already replaced
        // by the writer does not come back at the next merge.
        self.context.merge(seen);
        let dot = self.context.next_dot(node);
        if let Some(value) = value {
            self.values.insert(dot.clone(), value);
        }
        dot
    }

    /// The current values (one, or several concurrent siblings, or none after a delete).
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.values.values()
    }

    /// Each value with the dot of its write (for encoding).
    pub fn entries(&self) -> impl Iterator<Item = (&Dot, &T)> {
        self.values.iter()
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The causal context: pass it back to [`MvRegister::write`] to replace what was read.
    pub fn context(&self) -> &VersionVector {
        &self.context
    }

    /// Rebuilds a register from its parts, checking the invariant. Used by decoding.
    pub fn from_parts(
        values: BTreeMap<Dot, T>,
        context: VersionVector,
    ) -> Result<Self, &'static str> {
        if values.keys().all(|dot| context.contains(dot)) {
            Ok(Self { values, context })
        } else {
            Err("a value's dot is outside the causal context")
        }
    }
}

impl<T: Clone> Crdt for MvRegister<T> {
    fn merge(&mut self, other: &Self) {
        let keep: BTreeSet<Dot> = surviving(
            self.values.keys(),
            other.values.keys(),
            |dot| self.values.contains_key(dot) && other.values.contains_key(dot),
            |dot| other.context.contains(dot),
            |dot| self.context.contains(dot),
        );
        let mut values = BTreeMap::new();
        for dot in keep {
            // A dot names one write, so both sides hold the same value for it.
            if let Some(value) = self.values.get(&dot).or_else(|| other.values.get(&dot)) {
                values.insert(dot, value.clone());
            }
        }
        self.values = values;
        self.context.merge(&other.context);
    }
}
