//! Placement: which nodes hold a key's replicas (consistent hashing with virtual nodes).
//!
//! Each node owns `vnodes` points on a 64-bit ring (`stable_hash` of `node#i`). A key's replicas
//! are the first `n` distinct nodes met walking clockwise from the key's hash. Adding a node
//! only moves the keys whose walk now meets the new node first: about `1/(nodes + 1)` of them,
//! all to the new node.

use std::collections::BTreeSet;

use crate::hash::stable_hash;
use crate::node::NodeId;

/// Seed of key hashes (points use seed 1), so a node id and a key with the same bytes do not
/// land on the same point.
const KEY_SEED: u64 = 0;
const POINT_SEED: u64 = 1;

/// Virtual nodes per node by default: enough for an even spread with a few nodes.
pub const DEFAULT_VNODES: u16 = 128;

/// The ring of a set of nodes.
///
/// Invariant: `points` is sorted by position, and holds exactly `vnodes` points per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    points: Vec<(u64, NodeId)>,
    /// The nodes the points belong to.
    members: BTreeSet<NodeId>,
    vnodes: u16,
}

impl Ring {
    /// A ring of `nodes` with `vnodes` points each (at least 1).
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, vnodes: u16) -> Self {
        let mut ring = Self {
            points: Vec::new(),
            members: BTreeSet::new(),
            vnodes: vnodes.max(1),
        };
        for node in nodes {
            if !ring.members.contains(&node) {
                let positions: Vec<u64> = ring.positions(&node).collect();
                ring.points
                    .extend(positions.into_iter().map(|p| (p, node.clone())));
                ring.members.insert(node);
            }
        }
        ring.points.sort();
        ring
    }

    fn positions(&self, node: &NodeId) -> impl Iterator<Item = u64> + '_ {
        let name = node.as_str().to_owned();
        (0..self.vnodes).map(move |i| stable_hash(POINT_SEED, format!("{name}#{i}").as_bytes()))
    }

    /// Adds a node (no effect if it is already on the ring).
    pub fn add(&mut self, node: &NodeId) {
        if self.contains(node) {
            return;
        }
        let positions: Vec<u64> = self.positions(node).collect();
        self.points
            .extend(positions.into_iter().map(|p| (p, node.clone())));
        self.members.insert(node.clone());
        // Ties (two points at one position) break by node id, so every node orders them alike.
        self.points.sort();
    }

    /// Removes a node.
    pub fn remove(&mut self, node: &NodeId) {
        self.points.retain(|(_, n)| n != node);
        self.members.remove(node);
    }

    /// Whether `node` is on the ring.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.members.contains(node)
    }

    /// The nodes on the ring, in id order.
    pub fn nodes(&self) -> &BTreeSet<NodeId> {
        &self.members
    }

    /// The first `n` distinct nodes clockwise from `key` (fewer if the ring has fewer nodes).
    /// The first is the key's primary.
    pub fn replicas(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::with_capacity(n);
        if self.points.is_empty() || n == 0 {
            return out;
        }
        let position = stable_hash(KEY_SEED, key);
        let start = self.points.partition_point(|(p, _)| *p < position);
        for i in 0..self.points.len() {
            let (_, node) = &self.points[(start + i) % self.points.len()];
            if !out.contains(node) {
                out.push(node.clone());
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nodes(count: usize) -> Vec<NodeId> {
        (0..count)
            .map(|i| NodeId::new(format!("node-{i}")).unwrap())
            .collect()
    }

    fn keys(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("agent:key:{i}").into_bytes())
            .collect()
    }

    #[test]
    fn adding_a_node_moves_about_one_share_of_keys_and_only_to_it() {
        for before in [2usize, 3, 5, 8] {
            let mut ring = Ring::new(nodes(before), DEFAULT_VNODES);
            let primaries: Vec<NodeId> = keys(20_000)
                .iter()
                .map(|k| ring.replicas(k, 1)[0].clone())
                .collect();
            let newcomer = NodeId::new("newcomer").unwrap();
            ring.add(&newcomer);
            let mut moved = 0;
            for (key, old) in keys(20_000).iter().zip(&primaries) {
                let new = &ring.replicas(key, 1)[0];
                if new != old {
                    assert_eq!(new, &newcomer, "a moved key moves to the new node only");
                    moved += 1;
                }
            }
            let fraction = f64::from(moved) / 20_000.0;
            let ideal = 1.0 / (before as f64 + 1.0);
            println!(
                "{before} -> {} nodes: {fraction:.3} of keys moved (ideal {ideal:.3})",
                before + 1
            );
            assert!(
                (fraction - ideal).abs() < ideal * 0.35,
                "{before} -> {} nodes: moved {fraction:.3} of keys, ideal {ideal:.3}",
                before + 1
            );
        }
    }

    #[test]
    fn load_is_spread_evenly() {
        let ring = Ring::new(nodes(4), DEFAULT_VNODES);
        let mut counts = std::collections::BTreeMap::<NodeId, u32>::new();
        for key in keys(40_000) {
            *counts.entry(ring.replicas(&key, 1)[0].clone()).or_default() += 1;
        }
        for (node, count) in counts {
            assert!(
                (7_000..=13_000).contains(&count),
                "{node} is primary for {count} of 40000 keys"
            );
        }
    }

    proptest! {
        /// Replicas are distinct, as many as asked (or as there are nodes), and the same for
        /// every ring built from the same nodes in any order.
        #[test]
        fn replicas_are_distinct_and_independent_of_insertion_order(
            count in 1usize..8,
            n in 1usize..5,
            key in prop::collection::vec(any::<u8>(), 0..32),
            seed in any::<u64>(),
        ) {
            let mut shuffled = nodes(count);
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            let a = Ring::new(nodes(count), 16);
            let b = Ring::new(shuffled, 16);
            let replicas = a.replicas(&key, n);
            prop_assert_eq!(replicas.len(), n.min(count));
            prop_assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), replicas.len());
            prop_assert_eq!(&replicas, &b.replicas(&key, n));
        }

        /// Removing a node that was just added restores the old placement exactly.
        #[test]
        fn add_then_remove_is_the_identity(count in 1usize..6, key in prop::collection::vec(any::<u8>(), 0..16)) {
            let before = Ring::new(nodes(count), 16);
            let mut ring = before.clone();
            let extra = NodeId::new("extra").unwrap();
            ring.add(&extra);
            ring.remove(&extra);
            prop_assert_eq!(&ring, &before);
            prop_assert_eq!(ring.replicas(&key, 3), before.replicas(&key, 3));
        }
    }
}
