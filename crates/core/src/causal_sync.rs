//! Causal replication between members, as a sans-io state machine: what a node pushes, what
//! it answers a peer that says what it has applied, when it sends a whole snapshot instead,
//! how it puts a received snapshot together, and when its log may be trimmed.
//!
//! The delivery order itself is [`crate::causal::Delivery`]'s, in the causal store. This
//! module decides what crosses the network; the node runtime (`agentstore-cluster`) and the
//! causal simulator (`agentstore-sim`) execute its [`Effect`]s: messages, log reads, the
//! store's deliveries, snapshots and trims. The node's applied vector and the time are
//! arguments of [`Replicator::step`].

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::causal::{self, CausalWrite};
use crate::key::Key;
use crate::node::NodeId;
use crate::record::Record;
use crate::replication::Message;
use crate::version::VersionVector;

/// The replicator's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most writes sent in one answer to a peer's `CausalHave` (a lagging peer asks again).
    pub max_catch_up: usize,
    /// Most writes in one `CausalWrites` message, and records in one snapshot chunk.
    pub max_per_message: usize,
    /// How long a peer that needed a snapshot waits before it is sent another.
    pub snapshot_again_ms: u64,
    /// Most records of a snapshot being received (bounds the memory it takes).
    pub max_snapshot_records: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_catch_up: 2048,
            max_per_message: 256,
            snapshot_again_ms: 5_000,
            max_snapshot_records: 4_000_000,
        }
    }
}

/// What happens to the replicator.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// This node committed writes of its own: push them to every member.
    Committed {
        /// The writes, in sequence order.
        own: Vec<CausalWrite>,
    },
    /// A peer's causal message.
    Received {
        /// The sender.
        from: NodeId,
        /// The message.
        message: Message,
    },
    /// [`Effect::ReadLog`] is done.
    LogRead {
        /// The peer that asked.
        peer: NodeId,
        /// What the log holds of what it lacks.
        read: LogRead,
    },
    /// [`Effect::LoadSnapshot`] is done.
    SnapshotLoaded {
        /// The peer it is for.
        peer: NodeId,
        /// What the state has applied.
        applied: VersionVector,
        /// Every record, keys increasing.
        records: Vec<(Key, Record)>,
    },
    /// Time to tell every member what this node has applied, and to trim the log.
    Sync {
        /// The members besides this node, as they are now (commits are pushed to them until
        /// the next sync).
        members: Vec<NodeId>,
    },
}

/// What the log held of the writes a peer lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRead {
    /// The writes, each origin's in sequence order.
    Writes(Vec<CausalWrite>),
    /// Some of them were trimmed already: the peer needs a snapshot.
    Trimmed,
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a message.
    Send {
        /// The recipient.
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// Send a snapshot's chunks to `to`, paced so its queue takes them all.
    SendSnapshot {
        /// The recipient.
        to: NodeId,
        /// The `CausalSnapshot` chunks.
        chunks: Vec<Message>,
    },
    /// Read the writes `(origin, first, last)` from the log, at most `limit` of each origin,
    /// or find that some were trimmed; then feed [`Input::LogRead`].
    ReadLog {
        /// The peer that lacks them.
        peer: NodeId,
        /// The ranges.
        wanted: Vec<(NodeId, u64, u64)>,
        /// Most writes to read.
        limit: usize,
    },
    /// Load this node's whole causal state, then feed [`Input::SnapshotLoaded`].
    LoadSnapshot {
        /// The peer it is for.
        peer: NodeId,
    },
    /// Hand a peer's writes to the store, which applies each once its dependencies are.
    Deliver {
        /// The writes.
        writes: Vec<CausalWrite>,
    },
    /// Apply a complete snapshot a peer sent.
    ApplySnapshot {
        /// Its records.
        entries: Vec<(Key, Record)>,
        /// What it has applied.
        applied: VersionVector,
    },
    /// Every member has applied everything up to `floor`: the log may forget it.
    Trim {
        /// What every member has applied.
        floor: VersionVector,
    },
    /// Something to measure.
    Observe(Observation),
}

/// What the runtime measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Writes some member has applied and this node has not (replication lag, in writes).
    Behind(u64),
    /// The log was trimmed up to this many writes in all.
    Trimmed(u64),
    /// A snapshot went to a peer.
    SnapshotSent {
        /// The peer.
        peer: NodeId,
        /// Its records.
        records: usize,
    },
    /// A peer's snapshot was too large to receive, and was ignored.
    SnapshotTooLarge {
        /// The peer.
        from: NodeId,
    },
}

/// The longest prefix (at most `limit` writes) of a causal order of `writes` that a peer
/// which has applied `theirs` can apply in turn: each write's dependencies are in `theirs` or
/// earlier in the prefix. A peer sent writes in this order never buffers one whose
/// dependencies it was not sent; sent each origin's writes in turn instead, a peer far
/// behind could fill its buffer with writes waiting for another origin's, and refuse those.
/// There is always a first write when `writes` holds, for each origin it names, the first
/// write the peer lacks, from a node that has applied everything it sends.
pub fn causal_prefix(
    theirs: &VersionVector,
    writes: Vec<CausalWrite>,
    limit: usize,
) -> Vec<CausalWrite> {
    let mut queues: BTreeMap<NodeId, std::collections::VecDeque<CausalWrite>> = BTreeMap::new();
    for write in writes {
        queues
            .entry(write.origin.clone())
            .or_default()
            .push_back(write);
    }
    for queue in queues.values_mut() {
        queue.make_contiguous().sort_by_key(|w| w.seq);
    }
    let mut have = theirs.clone();
    let mut out = Vec::new();
    loop {
        let mut progress = false;
        for queue in queues.values_mut() {
            while let Some(write) = queue.front() {
                if out.len() == limit {
                    return out;
                }
                if write.seq <= have.get(&write.origin) {
                    queue.pop_front();
                    continue;
                }
                if !write.deliverable(&have) {
                    break;
                }
                have.witness(&write.origin, write.seq);
                out.extend(queue.pop_front());
                progress = true;
            }
        }
        if !progress {
            return out;
        }
    }
}

/// The chunks of one snapshot received so far.
#[derive(Debug)]
struct Receiving {
    id: u64,
    total: u32,
    applied: VersionVector,
    chunks: BTreeMap<u32, Vec<(Key, Record)>>,
    records: usize,
}

/// One node's causal replication.
#[derive(Debug)]
pub struct Replicator {
    limits: Limits,
    members: Vec<NodeId>,
    /// What each member last said it has applied.
    acks: BTreeMap<NodeId, VersionVector>,
    /// How far the log was last trimmed.
    trimmed_to: VersionVector,
    /// When each peer was last sent a snapshot.
    snapshots_sent: BTreeMap<NodeId, u64>,
    /// Snapshots being received, by sender: applied once every chunk is here.
    receiving: BTreeMap<NodeId, Receiving>,
}

impl Replicator {
    /// A replicator with no members yet.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            members: Vec::new(),
            acks: BTreeMap::new(),
            trimmed_to: VersionVector::new(),
            snapshots_sent: BTreeMap::new(),
            receiving: BTreeMap::new(),
        }
    }

    /// Feeds one input; `applied` is what this node has applied now. Returns what to do.
    pub fn step(&mut self, input: Input, applied: &VersionVector, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Committed { own } => {
                for member in &self.members {
                    self.send_writes(member, &own, &mut effects);
                }
            }
            Input::Received { from, message } => {
                self.received(from, message, applied, &mut effects)
            }
            Input::LogRead {
                peer,
                read: LogRead::Writes(writes),
            } => {
                let theirs = self.acks.get(&peer).cloned().unwrap_or_default();
                let writes = causal_prefix(&theirs, writes, self.limits.max_catch_up);
                self.send_writes(&peer, &writes, &mut effects)
            }
            Input::LogRead {
                peer,
                read: LogRead::Trimmed,
            } => {
                // Every member known when they were trimmed had them: this peer is new (or
                // lost its data). It gets this node's whole state instead, now and then.
                let again = self.limits.snapshot_again_ms;
                let recently = self
                    .snapshots_sent
                    .get(&peer)
                    .is_some_and(|sent| now_ms < sent + again);
                if !recently {
                    self.snapshots_sent.insert(peer.clone(), now_ms);
                    effects.push(Effect::LoadSnapshot { peer });
                }
            }
            Input::SnapshotLoaded {
                peer,
                applied: theirs,
                records,
            } => self.send_snapshot(peer, theirs, records, now_ms, &mut effects),
            Input::Sync { members } => {
                self.members = members;
                self.sync(applied, &mut effects)
            }
        }
        effects
    }

    fn send_writes(&self, to: &NodeId, writes: &[CausalWrite], effects: &mut Vec<Effect>) {
        for chunk in writes.chunks(self.limits.max_per_message) {
            effects.push(Effect::Send {
                to: to.clone(),
                message: Message::CausalWrites {
                    writes: chunk.to_vec(),
                },
            });
        }
    }

    fn received(
        &mut self,
        from: NodeId,
        message: Message,
        applied: &VersionVector,
        effects: &mut Vec<Effect>,
    ) {
        match message {
            Message::CausalWrites { writes } => effects.push(Effect::Deliver { writes }),
            Message::CausalHave { applied: theirs } => {
                let wanted = causal::missing(applied, &theirs);
                if !wanted.is_empty() {
                    effects.push(Effect::ReadLog {
                        peer: from.clone(),
                        wanted,
                        limit: self.limits.max_catch_up,
                    });
                }
                self.acks.insert(from, theirs);
            }
            Message::CausalSnapshot {
                id,
                index,
                total,
                applied,
                entries,
            } => {
                let chunk = (id, index, total, applied, entries);
                self.snapshot_chunk(from, chunk, effects)
            }
            _ => {}
        }
    }

    /// Chunks this node's state for `peer`.
    fn send_snapshot(
        &mut self,
        peer: NodeId,
        applied: VersionVector,
        records: Vec<(Key, Record)>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let id = now_ms ^ (records.len() as u64).rotate_left(40);
        let chunks: Vec<Vec<(Key, Record)>> = if records.is_empty() {
            vec![Vec::new()]
        } else {
            records
                .chunks(self.limits.max_per_message)
                .map(<[_]>::to_vec)
                .collect()
        };
        let total = chunks.len() as u32;
        effects.push(Effect::Observe(Observation::SnapshotSent {
            peer: peer.clone(),
            records: records.len(),
        }));
        let chunks = chunks
            .into_iter()
            .enumerate()
            .map(|(index, entries)| Message::CausalSnapshot {
                id,
                index: index as u32,
                total,
                applied: applied.clone(),
                entries,
            })
            .collect();
        effects.push(Effect::SendSnapshot { to: peer, chunks });
    }

    /// Keeps a snapshot chunk; applies the snapshot once every chunk is here.
    fn snapshot_chunk(
        &mut self,
        from: NodeId,
        (id, index, total, applied, entries): (u64, u32, u32, VersionVector, Vec<(Key, Record)>),
        effects: &mut Vec<Effect>,
    ) {
        let fresh = Receiving {
            id,
            total,
            applied,
            chunks: BTreeMap::new(),
            records: 0,
        };
        let receiving = match self.receiving.entry(from.clone()) {
            Entry::Occupied(kept) if kept.get().id == id => kept.into_mut(),
            // A newer snapshot replaces one that lost chunks.
            Entry::Occupied(mut older) => {
                older.insert(fresh);
                older.into_mut()
            }
            Entry::Vacant(none) => none.insert(fresh),
        };
        receiving.records += entries.len();
        if receiving.records > self.limits.max_snapshot_records {
            self.receiving.remove(&from);
            effects.push(Effect::Observe(Observation::SnapshotTooLarge { from }));
            return;
        }
        receiving.chunks.insert(index, entries);
        if receiving.chunks.len() < receiving.total as usize {
            return;
        }
        if let Some(done) = self.receiving.remove(&from) {
            effects.push(Effect::ApplySnapshot {
                entries: done.chunks.into_values().flatten().collect(),
                applied: done.applied,
            });
        }
    }

    /// Tells every member what this node has applied; trims what every member has.
    fn sync(&mut self, mine: &VersionVector, effects: &mut Vec<Effect>) {
        for member in &self.members {
            effects.push(Effect::Send {
                to: member.clone(),
                message: Message::CausalHave {
                    applied: mine.clone(),
                },
            });
        }
        let members = &self.members;
        let behind: u64 = self
            .acks
            .iter()
            .filter(|(node, _)| members.contains(node))
            .map(|(_, theirs)| {
                causal::missing(theirs, mine)
                    .iter()
                    .map(|(_, first, last)| last + 1 - first)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        effects.push(Effect::Observe(Observation::Behind(behind)));
        // Trim what every member has: all of them must have reported.
        self.acks.retain(|node, _| members.contains(node));
        if self.acks.len() < self.members.len() {
            return;
        }
        let floor = causal::stable(self.acks.values().chain(std::iter::once(mine)));
        if floor.dominates(&self.trimmed_to) && floor != self.trimmed_to {
            self.trimmed_to = floor.clone();
            let total: u64 = floor.iter().map(|(_, n)| n).sum();
            effects.push(Effect::Trim { floor });
            effects.push(Effect::Observe(Observation::Trimmed(total)));
        }
    }

    /// Checks the invariants that hold between steps; `Err` names the first broken.
    pub fn validate(&self) -> Result<(), String> {
        for (from, receiving) in &self.receiving {
            if receiving
                .chunks
                .keys()
                .any(|index| *index >= receiving.total)
            {
                return Err(format!(
                    "a snapshot from {from} holds a chunk beyond its total"
                ));
            }
            if receiving.chunks.len() >= receiving.total as usize {
                return Err(format!("a complete snapshot from {from} was not applied"));
            }
            if receiving.records > self.limits.max_snapshot_records {
                return Err(format!("a snapshot from {from} outgrew its bound"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn vector(entries: &[(&str, u64)]) -> VersionVector {
        entries.iter().map(|(n, c)| (node(n), *c)).collect()
    }

    /// `origin`'s write `seq`, depending on `deps`.
    fn write(origin: &str, seq: u64, deps: &[(&str, u64)]) -> CausalWrite {
        CausalWrite {
            origin: node(origin),
            seq,
            deps: vector(deps),
            entries: Vec::new(),
        }
    }

    #[test]
    fn a_catch_up_interleaves_origins_in_causal_order() {
        // b's writes each depend on the a write before them: sent a's first, a peer with a
        // small buffer would hold a's writes waiting for nothing, but b's waiting for a's.
        let writes = vec![
            write("b", 1, &[("a", 1)]),
            write("b", 2, &[("a", 2), ("b", 1)]),
            write("a", 1, &[]),
            write("a", 2, &[("a", 1), ("b", 1)]),
            write("a", 3, &[("a", 2)]),
        ];
        let order: Vec<(String, u64)> = causal_prefix(&VersionVector::new(), writes.clone(), 10)
            .iter()
            .map(|w| (w.origin.to_string(), w.seq))
            .collect();
        let expected = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)];
        assert_eq!(order, expected.map(|(o, s)| (o.to_string(), s)).to_vec());
        // Each write is deliverable after those before it.
        let mut have = VersionVector::new();
        for w in causal_prefix(&VersionVector::new(), writes.clone(), 10) {
            assert!(w.deliverable(&have), "{w:?} after {have:?}");
            have.witness(&w.origin, w.seq);
        }
        assert_eq!(have, vector(&[("a", 3), ("b", 2)]), "all of them");
        // At most `limit`, what the peer has skipped.
        let two = causal_prefix(&vector(&[("a", 1)]), writes, 2);
        let sent: Vec<(String, u64)> = two.iter().map(|w| (w.origin.to_string(), w.seq)).collect();
        assert_eq!(sent.len(), 2);
        assert!(!sent.contains(&("a".to_string(), 1)), "{sent:?}");
    }

    #[test]
    fn a_complete_snapshot_is_applied_once_whatever_the_order_of_its_chunks() {
        let mut replicator = Replicator::new(Limits::default());
        let peer = node("p");
        let chunk = |index: u32| Input::Received {
            from: peer.clone(),
            message: Message::CausalSnapshot {
                id: 9,
                index,
                total: 3,
                applied: vector(&[("p", 4)]),
                entries: Vec::new(),
            },
        };
        let applied = VersionVector::new();
        for index in [2, 0] {
            assert!(replicator.step(chunk(index), &applied, 0).is_empty());
            replicator.validate().unwrap();
        }
        let effects = replicator.step(chunk(1), &applied, 0);
        assert_eq!(
            effects,
            vec![Effect::ApplySnapshot {
                entries: Vec::new(),
                applied: vector(&[("p", 4)])
            }]
        );
        assert!(
            replicator.step(chunk(1), &applied, 0).is_empty(),
            "a late duplicate starts over"
        );
    }

    #[test]
    fn the_log_is_trimmed_only_to_what_every_member_has_applied() {
        let mut replicator = Replicator::new(Limits::default());
        let mine = vector(&[("a", 5)]);
        let members = || vec![node("b"), node("c")];
        replicator.step(Input::Sync { members: members() }, &mine, 0);
        let have = |from: &str, applied| Input::Received {
            from: node(from),
            message: Message::CausalHave { applied },
        };
        replicator.step(have("b", vector(&[("a", 3)])), &mine, 0);
        let trims = |effects: Vec<Effect>| {
            effects
                .into_iter()
                .filter(|e| matches!(e, Effect::Trim { .. }))
                .collect::<Vec<_>>()
        };
        assert!(
            trims(replicator.step(Input::Sync { members: members() }, &mine, 1)).is_empty(),
            "c never said"
        );
        replicator.step(have("c", vector(&[("a", 4)])), &mine, 2);
        assert_eq!(
            trims(replicator.step(Input::Sync { members: members() }, &mine, 3)),
            vec![Effect::Trim {
                floor: vector(&[("a", 3)])
            }]
        );
    }
}
