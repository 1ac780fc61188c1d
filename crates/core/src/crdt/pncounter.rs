use serde::{Deserialize, Serialize};

use super::{Crdt, GCounter};
use crate::node::NodeId;

/// A counter that goes up and down: two grow-only counters, increments and decrements.
///
/// Laws: those of [`GCounter`], component-wise, so commutative, associative, idempotent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PnCounter {
    /// Every increment, per node.
    pub up: GCounter,
    /// Every decrement, per node (as positive amounts).
    pub down: GCounter,
}

impl PnCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` (negative to decrement) on behalf of `node`.
    pub fn add(&mut self, node: &NodeId, delta: i64) {
        if delta >= 0 {
            self.up.increment(node, delta.unsigned_abs());
        } else {
            self.down.increment(node, delta.unsigned_abs());
        }
    }

    /// Increments minus decrements, clamped to the range of `i64`.
    pub fn value(&self) -> i64 {
        let value = i128::from(self.up.value()) - i128::from(self.down.value());
        value.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        self.up.merge(&other.up);
        self.down.merge(&other.down);
    }
}
