//! Pure observations behind two of the node's metrics: read-your-writes violations and the
//! share of the key space with a reachable quorum.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::placement::Ring;
use crate::{Key, NodeId, VersionVector};

/// The versions of the last writes this node acknowledged, per key (at most `capacity` keys,
/// the oldest forgotten first): a later read through this node that does not include one of
/// them missed a write its client was told was done.
#[derive(Debug)]
pub struct AcknowledgedWrites {
    versions: BTreeMap<Key, VersionVector>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl AcknowledgedWrites {
    /// Remembers the writes of at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            versions: BTreeMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// A write to `key` was acknowledged at `version`.
    pub fn acknowledged(&mut self, key: &Key, version: &VersionVector) {
        match self.versions.get_mut(key) {
            Some(known) => crate::Crdt::merge(known, version),
            None => {
                if self.order.len() == self.capacity
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.versions.remove(&oldest);
                }
                self.order.push_back(key.clone());
                self.versions.insert(key.clone(), version.clone());
            }
        }
    }

    /// Whether a read of `key` that returned `read` (None: nothing) missed an acknowledged write.
    pub fn missed(&self, key: &Key, read: Option<&VersionVector>) -> bool {
        match (self.versions.get(key), read) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(acknowledged), Some(read)) => !read.dominates(acknowledged),
        }
    }
}

/// The replicas (N = `replicas`) of `samples` sample keys: what [`reachable_among`] counts.
pub fn sample_replicas(ring: &Ring, replicas: usize, samples: usize) -> Vec<Vec<NodeId>> {
    (0..samples)
        .map(|i| ring.replicas(format!("sample:{i}").as_bytes(), replicas))
        .collect()
}

/// The share of the sample keys whose replicas include at least `quorum` members in `alive`
/// (the quorum is capped at the replicas a key has).
pub fn reachable_among(samples: &[Vec<NodeId>], alive: &BTreeSet<NodeId>, quorum: usize) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let reachable = samples
        .iter()
        .filter(|set| {
            let needed = quorum.min(set.len()).max(1);
            set.iter().filter(|n| alive.contains(n)).count() >= needed
        })
        .count();
    reachable as f64 / samples.len() as f64
}

/// The share of `samples` keys whose replicas (N = `replicas`) include at least `quorum`
/// members in `alive`.
pub fn reachable_share(
    ring: &Ring,
    alive: &BTreeSet<NodeId>,
    replicas: usize,
    quorum: usize,
    samples: usize,
) -> f64 {
    reachable_among(&sample_replicas(ring, replicas, samples), alive, quorum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn version(entries: &[(&str, u64)]) -> VersionVector {
        entries.iter().map(|(n, c)| (node(n), *c)).collect()
    }

    #[test]
    fn a_read_that_misses_an_acknowledged_write_is_seen() {
        let key: Key = "doc:1".parse().unwrap();
        let mut acked = AcknowledgedWrites::new(10);
        assert!(
            !acked.missed(&key, None),
            "nothing acknowledged, nothing missed"
        );
        acked.acknowledged(&key, &version(&[("a", 2)]));
        assert!(acked.missed(&key, None));
        assert!(acked.missed(&key, Some(&version(&[("a", 1)]))));
        assert!(
            acked.missed(&key, Some(&version(&[("b", 5)]))),
            "concurrent"
        );
        assert!(!acked.missed(&key, Some(&version(&[("a", 2)]))));
        assert!(!acked.missed(&key, Some(&version(&[("a", 3), ("b", 1)]))));
    }

    #[test]
    fn acknowledged_writes_stay_bounded() {
        let mut acked = AcknowledgedWrites::new(2);
        let keys: Vec<Key> = (0..3)
            .map(|i| format!("doc:{i}").parse().unwrap())
            .collect();
        for key in &keys {
            acked.acknowledged(key, &version(&[("a", 1)]));
        }
        assert!(
            !acked.missed(&keys[0], None),
            "the oldest key was forgotten"
        );
        assert!(acked.missed(&keys[1], None) && acked.missed(&keys[2], None));
        // A second write to a known key joins its version, and takes no new slot.
        acked.acknowledged(&keys[2], &version(&[("b", 1)]));
        assert!(acked.missed(&keys[2], Some(&version(&[("a", 1)]))));
        assert!(acked.missed(&keys[1], None));
    }

    #[test]
    fn quorum_reachability_follows_the_members_that_answer() {
        let nodes = [node("a"), node("b"), node("c")];
        let ring = Ring::new(nodes.clone(), 64);
        let all: BTreeSet<NodeId> = nodes.iter().cloned().collect();
        assert_eq!(reachable_share(&ring, &all, 3, 2, 256), 1.0);
        let two: BTreeSet<NodeId> = nodes[..2].iter().cloned().collect();
        assert_eq!(
            reachable_share(&ring, &two, 3, 2, 256),
            1.0,
            "2 of 3 is a quorum"
        );
        let one: BTreeSet<NodeId> = nodes[..1].iter().cloned().collect();
        assert_eq!(reachable_share(&ring, &one, 3, 2, 256), 0.0);
        assert_eq!(reachable_share(&ring, &one, 3, 1, 256), 1.0, "W=1");
        // Five nodes, N=3, two down: only keys with two live replicas keep a quorum.
        let five: Vec<NodeId> = ["a", "b", "c", "d", "e"].map(node).to_vec();
        let ring = Ring::new(five.clone(), 64);
        let up: BTreeSet<NodeId> = five[..3].iter().cloned().collect();
        let share = reachable_share(&ring, &up, 3, 2, 1024);
        assert!(share > 0.0 && share < 1.0, "{share}");
    }
}
