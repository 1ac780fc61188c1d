//! Merkle-tree anti-entropy, in two levels. Every interval this node (A) sends the next peer
//! (B) the 64 bucket sums of a tree over the records both replicate. B answers with the
//! subtree leaves (64 each) of the buckets that differ; A finds the sub-buckets (of 4,096)
//! that differ, sends its records in them, and names them, for which B sends its own. What
//! crosses the network is one fixed-size message plus a part proportional to the divergence;
//! records are sent only from sub-buckets that differ. A repair does the same with every
//! member in turn, now, and reports each.
//!
//! Each round starts from one load of the local records ([`RecordsJob`]), which also serves
//! handoff and tombstone collection ([`super::upkeep`]).

use std::collections::{BTreeSet, VecDeque};

use super::upkeep::Placed;
use super::{Answer, Caller, Effect, NodeState, Observation, RepairEvent};
use crate::codec;
use crate::key::Key;
use crate::merkle::{MerkleTree, entry_digest};
use crate::node::NodeId;
use crate::record::Record;
use crate::replication::Message;

/// Rounds in which a node compares with every other member once.
pub const SWEEP_ROUNDS: usize = 8;

/// What a load of every local record ([`super::Effect::LoadRecords`]) is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordsJob {
    /// A round: hand off and collect tombstones; with `compare`, compare with the next peer
    /// (a leave starts a round without comparing).
    Round {
        /// Whether to compare with a peer.
        compare: bool,
    },
    /// Compare with `member` for a repair.
    Repair {
        /// The member.
        member: NodeId,
    },
    /// `from` sent the leaves of its tree: compare.
    CompareTrees {
        /// The peer.
        from: NodeId,
        /// Its leaves.
        leaves: Vec<u64>,
    },
    /// `from` answered this node's leaves with the subtrees of the buckets that differ.
    CompareSubLeaves {
        /// The peer.
        from: NodeId,
        /// Each differing bucket and its fine leaves.
        buckets: Vec<(u32, Vec<u64>)>,
    },
    /// `to` asked for this node's records in `buckets`.
    SendBuckets {
        /// The peer.
        to: NodeId,
        /// The buckets.
        buckets: BTreeSet<usize>,
    },
}

/// One member compared by a repair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepairStep {
    /// The member.
    pub member: NodeId,
    /// Members compared so far, this one included.
    pub done: usize,
    /// Members to compare.
    pub total: usize,
    /// Whether it answered in time.
    pub answered: bool,
    /// Sub-buckets (of 4,096) whose records differed and were exchanged.
    pub buckets_differing: usize,
}

/// A repair in progress: members still to compare, the one being compared and until when.
#[derive(Debug)]
pub(super) struct Repair {
    caller: Caller,
    queue: VecDeque<NodeId>,
    current: Option<(NodeId, u64)>,
    done: usize,
    total: usize,
}

impl Repair {
    fn report(&mut self, member: &NodeId, differing: Option<usize>) -> Effect {
        self.done += 1;
        let step = RepairStep {
            member: member.clone(),
            done: self.done,
            total: self.total,
            answered: differing.is_some(),
            buckets_differing: differing.unwrap_or(0),
        };
        Effect::Answer {
            caller: self.caller,
            answer: Answer::Repair(RepairEvent::Step(step)),
        }
    }

    /// Every member is compared, waited for, or queued: exactly once.
    pub(super) fn validate(&self) -> Result<(), String> {
        let counted = self.done + self.queue.len() + usize::from(self.current.is_some());
        if counted != self.total {
            return Err(format!(
                "a repair of {} members has {} done, {} queued and {} current",
                self.total,
                self.done,
                self.queue.len(),
                usize::from(self.current.is_some())
            ));
        }
        Ok(())
    }
}

/// The tree over `records` (a depth of `depth` levels).
pub fn tree(depth: u8, records: &[(Key, Record)]) -> MerkleTree {
    let mut tree = MerkleTree::new(depth);
    for (key, record) in records {
        tree.insert(
            key.as_bytes(),
            entry_digest(key.as_bytes(), &codec::encode(record)),
        );
    }
    tree
}

impl NodeState {
    /// Every local record has been loaded for `job`.
    pub(super) fn records(
        &mut self,
        job: RecordsJob,
        records: Vec<(Key, Record)>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let placed: Vec<Placed> = records
            .into_iter()
            .map(|(key, record)| {
                let replicas = self.replicas(&key);
                (key, record, replicas)
            })
            .collect();
        match job {
            RecordsJob::Round { compare } => {
                if compare {
                    self.round_loading = false;
                }
                self.hand_off(&placed, now_ms, effects);
                self.collect_tombstones(&placed, now_ms, effects);
                let peers: Vec<NodeId> = self.members.keys().cloned().collect();
                if compare && !peers.is_empty() {
                    // Every member once per `SWEEP_ROUNDS` rounds: a few peers a round in a
                    // large cluster, rather than one, whose sweep would take as many rounds as
                    // there are members.
                    for _ in 0..peers.len().div_ceil(SWEEP_ROUNDS) {
                        let peer = peers[self.next_peer % peers.len()].clone();
                        self.next_peer += 1;
                        self.compare_with(&peer, &placed, effects);
                    }
                }
            }
            RecordsJob::Repair { member } => {
                let current = self.repair.as_ref().and_then(|r| r.current.as_ref());
                if current.is_some_and(|(m, _)| *m == member) {
                    self.compare_with(&member, &placed, effects);
                }
            }
            RecordsJob::CompareTrees { from, leaves } => {
                let (coarse, fine) = (self.settings.tree_depth, self.settings.fine_depth);
                let Some(theirs) = MerkleTree::from_leaves(coarse, leaves) else {
                    return;
                };
                let ours = tree(fine, &self.shared_in(&placed, &from));
                let width = 1usize << (fine - coarse);
                let buckets = ours
                    .coarsen(coarse)
                    .diff(&theirs)
                    .into_iter()
                    .map(|b| (b as u32, ours.leaves()[b * width..(b + 1) * width].to_vec()))
                    .collect();
                // Always answered, even with no bucket: the comparison is complete (a repair
                // waits for it).
                effects.push(Effect::Send {
                    to: from,
                    message: Message::SubLeaves {
                        depth: fine,
                        coarse,
                        buckets,
                    },
                    deadline_ms: 0,
                });
            }
            RecordsJob::CompareSubLeaves { from, buckets } => {
                let (coarse, fine) = (self.settings.tree_depth, self.settings.fine_depth);
                let ours = tree(fine, &self.shared_in(&placed, &from));
                let width = 1usize << (fine - coarse);
                let mut differing = BTreeSet::new();
                for (bucket, theirs) in buckets {
                    let first = bucket as usize * width;
                    for (i, leaf) in theirs.iter().enumerate() {
                        if ours.leaves().get(first + i) != Some(leaf) {
                            differing.insert(first + i);
                        }
                    }
                }
                self.repair_answered(&from, differing.len(), effects);
                self.send_buckets(&from, &differing, &placed, effects);
                if !differing.is_empty() {
                    effects.push(Effect::Send {
                        to: from,
                        message: Message::Buckets {
                            depth: fine,
                            buckets: differing.into_iter().map(|b| b as u32).collect(),
                        },
                        deadline_ms: 0,
                    });
                }
            }
            RecordsJob::SendBuckets { to, buckets } => {
                self.send_buckets(&to, &buckets, &placed, effects)
            }
        }
    }

    /// The records of `placed` whose key both this node and `peer` replicate.
    fn shared_in(&self, placed: &[Placed], peer: &NodeId) -> Vec<(Key, Record)> {
        placed
            .iter()
            .filter(|(_, _, replicas)| {
                replicas.contains(peer) && replicas.contains(&self.settings.id)
            })
            .map(|(key, record, _)| (key.clone(), record.clone()))
            .collect()
    }

    /// Sends `peer` the leaves of the tree of what we share, after the departures we know
    /// (placement must agree before trees can).
    fn compare_with(&mut self, peer: &NodeId, placed: &[Placed], effects: &mut Vec<Effect>) {
        if !self.departed.is_empty() {
            effects.push(Effect::Send {
                to: peer.clone(),
                message: Message::Departed {
                    nodes: self.departed.iter().cloned().collect(),
                },
                deadline_ms: 0,
            });
        }
        let depth = self.settings.tree_depth;
        let tree = tree(self.settings.fine_depth, &self.shared_in(placed, peer)).coarsen(depth);
        effects.push(Effect::Send {
            to: peer.clone(),
            message: Message::TreeLeaves {
                depth,
                leaves: tree.leaves().to_vec(),
            },
            deadline_ms: 0,
        });
    }

    /// Sends `peer` our records in `buckets` (it merges them).
    fn send_buckets(
        &mut self,
        peer: &NodeId,
        buckets: &BTreeSet<usize>,
        placed: &[Placed],
        effects: &mut Vec<Effect>,
    ) {
        if buckets.is_empty() {
            return;
        }
        let probe = MerkleTree::new(self.settings.fine_depth);
        for (key, record) in self.shared_in(placed, peer) {
            if buckets.contains(&probe.bucket(key.as_bytes())) {
                effects.push(Effect::Observe(Observation::Repaired));
                effects.push(Effect::Send {
                    to: peer.clone(),
                    message: Message::Replicate {
                        request: 0,
                        key,
                        record,
                    },
                    deadline_ms: 0,
                });
            }
        }
    }

    pub(super) fn start_repair(&mut self, caller: Caller, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.repair.is_some() {
            effects.push(Effect::Answer {
                caller,
                answer: Answer::Repair(RepairEvent::Refused),
            });
            return;
        }
        let members: VecDeque<NodeId> = self.members.keys().cloned().collect();
        self.repair = Some(Repair {
            caller,
            total: members.len(),
            queue: members,
            current: None,
            done: 0,
        });
        effects.push(Effect::Answer {
            caller,
            answer: Answer::Repair(RepairEvent::Started),
        });
        self.repair_next(now_ms, effects);
    }

    /// Compares with the next member of a repair, or ends the repair.
    fn repair_next(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let wait = self.settings.repair_wait_ms;
        let Some(repair) = self.repair.as_mut() else {
            return;
        };
        match repair.queue.pop_front() {
            Some(member) => {
                repair.current = Some((member.clone(), now_ms + wait));
                effects.push(Effect::LoadRecords {
                    job: RecordsJob::Repair { member },
                });
            }
            None => {
                effects.push(Effect::Answer {
                    caller: repair.caller,
                    answer: Answer::Repair(RepairEvent::Over),
                });
                self.repair = None;
            }
        }
    }

    /// A member answered a comparison: if a repair waits for it, report it.
    fn repair_answered(&mut self, from: &NodeId, differing: usize, effects: &mut Vec<Effect>) {
        if let Some(repair) = self.repair.as_mut()
            && repair.current.as_ref().is_some_and(|(m, _)| m == from)
        {
            repair.current = None;
            effects.push(repair.report(from, Some(differing)));
        }
    }

    /// A member that did not answer a repair in time is reported and skipped; the next is
    /// compared.
    pub(super) fn repair_tick(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(repair) = self.repair.as_mut() else {
            return;
        };
        match &repair.current {
            Some((member, until)) if now_ms > *until => {
                let member = member.clone();
                repair.current = None;
                effects.push(repair.report(&member, None));
                self.repair_next(now_ms, effects);
            }
            Some(_) => {}
            None => self.repair_next(now_ms, effects),
        }
    }
}
