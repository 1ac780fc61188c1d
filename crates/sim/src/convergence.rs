//! How a cluster heals: the nodes' own anti-entropy rounds (the real [`NodeState`]s of
//! [`crate`]'s simulator, on a reliable network) after some keys diverged, counted in rounds
//! and in bytes of anti-entropy messages.
//!
//! Every key starts on all its replicas alike; then `diverged` keys get a newer value on one
//! replica only (as if the write's messages and hints were all lost). The run ends when every
//! key's replicas agree again.
//!
//! [`NodeState`]: agentstore_core::node_state::NodeState

use agentstore_core::placement::Ring;
use agentstore_core::record::{self, Mutation};
use agentstore_core::{HybridClock, Key, NodeId};

use crate::{Settings, Sim};

/// What healing took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convergence {
    /// Anti-entropy rounds (intervals: in each, every node compares with one peer) until every
    /// key's replicas agreed; `None` if they did not within the rounds allowed.
    pub rounds: Option<u64>,
    /// Bytes of the fixed part of every comparison: the bucket sums it starts with, and the
    /// answer that nothing differs.
    pub sums_bytes: u64,
    /// Bytes of the rest of the anti-entropy messages (sub-leaves, bucket lists, repaired
    /// records): what the divergence costs.
    pub repair_bytes: u64,
}

/// Heals a cluster of `nodes` (N = 3) holding `keys` keys of which `diverged` differ on one
/// replica, allowing at most `max_rounds` rounds.
pub fn converge(
    seed: u64,
    nodes: usize,
    keys: usize,
    diverged: usize,
    max_rounds: u64,
) -> Convergence {
    let settings = Settings {
        nodes,
        replication: 3,
        w: 1,
        r: 1,
        operations: 0,
        loss: 0,
        duplication: 0,
        max_skew_ms: 0,
        joins: 0,
        leaves: 0,
    };
    // Hints are delivered at the runtime's pace: there are none here, and looking them up for
    // every peer every 50 ms would cost most of the run.
    let mut sim = Sim::tuned(seed, settings, |node| node.hint_interval_ms = 500);
    sim.faults_on = false;
    let ids: Vec<NodeId> = sim.nodes.iter().map(|n| n.id.clone()).collect();
    let ring = Ring::new(ids.clone(), 32);
    let index = |id: &NodeId| ids.iter().position(|n| n == id).expect("a member");
    let mut writer = HybridClock::new(NodeId::new("writer").expect("valid id"), 500);
    let keys: Vec<Key> = (0..keys)
        .map(|i| format!("k:{i}").parse().expect("key"))
        .collect();
    let value = |i: usize| Mutation::Put(format!("value {i:>80}").into_bytes());
    for (i, key) in keys.iter().enumerate() {
        let first = record::apply(None, &value(i), &mut writer, sim.now_ms).expect("a put");
        for replica in ring.replicas(key.as_bytes(), 3) {
            sim.nodes[index(&replica)]
                .store
                .insert(key.clone(), first.clone());
        }
    }
    for i in 0..diverged.min(keys.len()) {
        let key = &keys[(i * 7919) % keys.len()];
        let replicas = ring.replicas(key.as_bytes(), 3);
        let holder = index(&replicas[sim.rng.below(replicas.len() as u64) as usize]);
        let store = &mut sim.nodes[holder].store;
        let newer = record::apply(
            store.get(key),
            &value(i + keys.len()),
            &mut writer,
            sim.now_ms,
        )
        .expect("a put");
        store.insert(key.clone(), newer);
    }
    let interval = sim.nodes[0].state.settings().anti_entropy_interval_ms;
    let agreed = |sim: &Sim| {
        keys.iter().all(|key| {
            let mut copies = ring
                .replicas(key.as_bytes(), 3)
                .into_iter()
                .map(|r| sim.nodes[index(&r)].store.get(key));
            let first = copies.next().flatten();
            copies.all(|c| c == first)
        })
    };
    let mut rounds = None;
    for round in 1..=max_rounds {
        for _ in 0..interval {
            sim.tick();
        }
        if agreed(&sim) {
            rounds = Some(round);
            break;
        }
    }
    Convergence {
        rounds,
        sums_bytes: sim.anti_entropy_bytes[0],
        repair_bytes: sim.anti_entropy_bytes[1],
    }
}
