//! Hybrid logical clocks (Kulkarni et al., 2014).
//!
//! A timestamp is `(wall_ms, logical, node)`. `wall_ms` follows the physical clock when it
//! moves forward and never goes back when it does not; `logical` orders events inside one
//! millisecond and after a backward jump; `node` makes every timestamp unique, which is the
//! spec's LWW tiebreak. The physical time is always an argument: this module reads no clock.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::node::NodeId;

/// A hybrid logical timestamp. The derived order (wall, then logical, then node) is the total
/// order that last-writer-wins uses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    /// Milliseconds since the Unix epoch, as the clock believes it.
    pub wall_ms: u64,
    /// Events within the same `wall_ms`.
    pub logical: u32,
    /// The node that issued the timestamp.
    pub node: NodeId,
}

impl Timestamp {
    /// The smallest timestamp a node can issue.
    pub fn zero(node: NodeId) -> Self {
        Self {
            wall_ms: 0,
            logical: 0,
            node,
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.node)
    }
}

/// A remote timestamp the clock refused to follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "timestamp from node `{from}` is {ahead_ms} ms ahead of the local clock; \
     the configured maximum offset is {max_offset_ms} ms"
)]
pub struct ClockError {
    /// The node whose timestamp was refused.
    pub from: NodeId,
    /// How far ahead of local physical time it was.
    pub ahead_ms: u64,
    /// The configured maximum offset.
    pub max_offset_ms: u64,
}

/// The clock state of one node.
///
/// Invariant: every timestamp it returns is strictly greater than every timestamp it returned
/// or observed before.
#[derive(Debug, Clone)]
pub struct HybridClock {
    node: NodeId,
    wall_ms: u64,
    logical: u32,
    max_offset_ms: u64,
}

impl HybridClock {
    /// A clock for `node` that refuses remote timestamps more than `max_offset_ms` ahead.
    pub fn new(node: NodeId, max_offset_ms: u64) -> Self {
        Self {
            node,
            wall_ms: 0,
            logical: 0,
            max_offset_ms,
        }
    }

    /// The node this clock stamps for.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The most recent timestamp issued or observed, as issued by this node.
    pub fn last(&self) -> Timestamp {
        self.stamp()
    }

    /// A new timestamp for a local event at physical time `physical_ms`.
    pub fn now(&mut self, physical_ms: u64) -> Timestamp {
        if physical_ms > self.wall_ms {
            self.wall_ms = physical_ms;
            self.logical = 0;
        } else {
            self.tick_logical();
        }
        self.stamp()
    }

    /// A new timestamp for a local event that must order after `floor`.
    ///
    /// Used for writes over stored state (the stored record's timestamp is the floor), so a
    /// write always supersedes what it overwrites even if this node's physical clock went
    /// backwards. No offset check: the floor is durable local state, not a remote claim.
    pub fn now_after(&mut self, floor: &Timestamp, physical_ms: u64) -> Timestamp {
        self.absorb(floor.wall_ms, floor.logical, physical_ms);
        self.stamp()
    }

    /// Merges a timestamp received from another node and returns a timestamp for the receive
    /// event. A timestamp more than the maximum offset ahead of `physical_ms` is refused and
    /// leaves the clock unchanged, so one node with a runaway clock cannot drag the others.
    pub fn observe(
        &mut self,
        remote: &Timestamp,
        physical_ms: u64,
    ) -> Result<Timestamp, ClockError> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > self.max_offset_ms {
            return Err(ClockError {
                from: remote.node.clone(),
                ahead_ms,
                max_offset_ms: self.max_offset_ms,
            });
        }
        self.absorb(remote.wall_ms, remote.logical, physical_ms);
        Ok(self.stamp())
    }

    /// The HLC receive rule: `wall = max(local, remote, physical)`, and `logical` counts up
    /// from whichever of local and remote reached that wall time.
    fn absorb(&mut self, remote_wall: u64, remote_logical: u32, physical_ms: u64) {
        let wall = self.wall_ms.max(remote_wall).max(physical_ms);
        let base = match (wall == self.wall_ms, wall == remote_wall) {
            (true, true) => Some(self.logical.max(remote_logical)),
            (true, false) => Some(self.logical),
            (false, true) => Some(remote_logical),
            (false, false) => None,
        };
        self.wall_ms = wall;
        match base {
            Some(logical) => {
                self.logical = logical;
                self.tick_logical();
            }
            None => self.logical = 0,
        }
    }

    /// Advances the logical part; on the (practically unreachable) overflow of `u32`, moves
    /// the wall part one millisecond ahead instead, which keeps timestamps increasing.
    fn tick_logical(&mut self) {
        match self.logical.checked_add(1) {
            Some(next) => self.logical = next,
            None => {
                self.wall_ms += 1;
                self.logical = 0;
            }
        }
    }

    fn stamp(&self) -> Timestamp {
        Timestamp {
            wall_ms: self.wall_ms,
            logical: self.logical,
            node: self.node.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[derive(Debug, Clone)]
    enum Event {
        Local {
            physical: u64,
        },
        Receive {
            physical: u64,
            remote_wall: u64,
            remote_logical: u32,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..10_000).prop_map(|physical| Event::Local { physical }),
            (0u64..10_000, 0u64..11_000, 0u32..5).prop_map(
                |(physical, remote_wall, remote_logical)| {
                    Event::Receive {
                        physical,
                        remote_wall,
                        remote_logical,
                    }
                }
            ),
        ]
    }

    proptest! {
        /// Whatever the physical clock does (including jumping backwards), timestamps strictly
        /// increase, and a received timestamp is always exceeded by the receive event.
        #[test]
        fn timestamps_strictly_increase(events in prop::collection::vec(event(), 1..200)) {
            let mut clock = HybridClock::new(node("a"), 500);
            let mut last = clock.last();
            for event in events {
                let stamp = match event {
                    Event::Local { physical } => clock.now(physical),
                    Event::Receive { physical, remote_wall, remote_logical } => {
                        let remote = Timestamp { wall_ms: remote_wall, logical: remote_logical, node: node("b") };
                        match clock.observe(&remote, physical) {
                            Ok(stamp) => {
                                prop_assert!((stamp.wall_ms, stamp.logical) > (remote.wall_ms, remote.logical));
                                stamp
                            }
                            Err(err) => {
                                prop_assert!(remote_wall > physical + 500);
                                prop_assert_eq!(err.ahead_ms, remote_wall - physical);
                                prop_assert_eq!(clock.last(), last.clone(), "a refused timestamp changes nothing");
                                continue;
                            }
                        }
                    }
                };
                prop_assert!(stamp > last);
                prop_assert!(stamp.wall_ms >= last.wall_ms);
                last = stamp;
            }
        }

        /// `now_after` orders after its floor even when the floor is far in the future.
        #[test]
        fn now_after_exceeds_the_floor(physical in 0u64..1000, floor_wall in 0u64..1_000_000, floor_logical in 0u32..10) {
            let mut clock = HybridClock::new(node("a"), 10);
            let floor = Timestamp { wall_ms: floor_wall, logical: floor_logical, node: node("z") };
            let stamp = clock.now_after(&floor, physical);
            prop_assert!((stamp.wall_ms, stamp.logical) > (floor.wall_ms, floor.logical));
        }
    }

    #[test]
    fn wall_time_follows_the_physical_clock_when_it_advances() {
        let mut clock = HybridClock::new(node("a"), 500);
        let first = clock.now(100);
        let second = clock.now(100);
        assert_eq!((first.wall_ms, first.logical), (100, 0));
        assert_eq!((second.wall_ms, second.logical), (100, 1));
        let stamp = clock.now(250);
        assert_eq!((stamp.wall_ms, stamp.logical), (250, 0));
        // The physical clock jumps back: wall time holds, logical time counts.
        let stamp = clock.now(40);
        assert_eq!((stamp.wall_ms, stamp.logical), (250, 1));
    }

    #[test]
    fn a_timestamp_too_far_ahead_is_refused() {
        let mut clock = HybridClock::new(node("a"), 500);
        let remote = Timestamp {
            wall_ms: 10_000,
            logical: 0,
            node: node("b"),
        };
        let err = clock.observe(&remote, 9_000).unwrap_err();
        assert_eq!(
            err,
            ClockError {
                from: node("b"),
                ahead_ms: 1_000,
                max_offset_ms: 500
            }
        );
        let accepted = clock.observe(&remote, 9_600).unwrap();
        assert_eq!((accepted.wall_ms, accepted.logical), (10_000, 1));
    }

    #[test]
    fn logical_overflow_moves_wall_time_forward() {
        let mut clock = HybridClock::new(node("a"), 500);
        let floor = Timestamp {
            wall_ms: 7,
            logical: u32::MAX,
            node: node("b"),
        };
        let stamp = clock.now_after(&floor, 0);
        assert_eq!((stamp.wall_ms, stamp.logical), (8, 0));
    }
}
