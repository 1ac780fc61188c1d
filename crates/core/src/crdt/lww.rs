use serde::{Deserialize, Serialize};

use super::Crdt;
use crate::hlc::Timestamp;

/// A last-writer-wins register: the value with the greatest hybrid timestamp.
///
/// This is the spec's `LWWValue::resolve`: compare timestamps, and on equal timestamps the
/// greater node id wins. [`Timestamp`]'s order is exactly (wall time, logical time, node id),
/// so the comparison is one `cmp`. Two different values can only share a whole timestamp if a
/// node id was given to two nodes; the greater value then wins, which keeps `merge`
/// commutative instead of depending on argument order.
///
/// Laws (merge = max by `(timestamp, value)`, a total order): commutative, associative,
/// idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwRegister<T> {
    /// The current value.
    pub value: T,
    /// When it was written.
    pub stamp: Timestamp,
}

impl<T: Ord> LwwRegister<T> {
    /// A register holding `value` written at `stamp`.
    pub fn new(value: T, stamp: Timestamp) -> Self {
        Self { value, stamp }
    }

    /// Writes `value` at `stamp`; it takes effect only if it wins against the current value.
    pub fn set(&mut self, value: T, stamp: Timestamp) {
        if (&stamp, &value) > (&self.stamp, &self.value) {
            self.value = value;
            self.stamp = stamp;
        }
    }

    /// The winner of `self` and `other`.
    pub fn resolve<'a>(&'a self, other: &'a Self) -> &'a Self {
        if (&other.stamp, &other.value) > (&self.stamp, &self.value) {
            other
        } else {
            self
        }
    }
}

impl<T: Ord + Clone> Crdt for LwwRegister<T> {
    fn merge(&mut self, other: &Self) {
        if (&other.stamp, &other.value) > (&self.stamp, &self.value) {
            *self = other.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use proptest::prelude::*;

    use super::*;
    use crate::node::NodeId;

    /// The specification's `LWWValue`, verbatim but for the timestamp type, as the oracle.
    struct SpecLww {
        timestamp: u64,
        node_id: String,
    }

    impl SpecLww {
        fn resolve<'a>(&'a self, other: &'a Self) -> &'a Self {
            match self.timestamp.cmp(&other.timestamp) {
                Ordering::Greater => self,
                Ordering::Less => other,
                Ordering::Equal => {
                    if self.node_id > other.node_id {
                        self
                    } else {
                        other
                    }
                }
            }
        }
    }

    proptest! {
        /// For timestamps the spec can express (wall time only, distinct writers), our
        /// resolution picks the same winner as the spec's.
        #[test]
        fn resolve_agrees_with_the_spec(
            (t1, n1) in (0u64..5, "[a-c]"),
            (t2, n2) in (0u64..5, "[a-c]"),
        ) {
            prop_assume!((t1, &n1) != (t2, &n2));
            let ours_a = LwwRegister::new(1u8, Timestamp { wall_ms: t1, logical: 0, node: NodeId::new(n1.clone()).unwrap() });
            let ours_b = LwwRegister::new(2u8, Timestamp { wall_ms: t2, logical: 0, node: NodeId::new(n2.clone()).unwrap() });
            let spec_a = SpecLww { timestamp: t1, node_id: n1 };
            let spec_b = SpecLww { timestamp: t2, node_id: n2 };
            let spec_picks_a = std::ptr::eq(spec_a.resolve(&spec_b), &spec_a);
            let ours_picks_a = std::ptr::eq(ours_a.resolve(&ours_b), &ours_a);
            prop_assert_eq!(spec_picks_a, ours_picks_a);
        }
    }
}
