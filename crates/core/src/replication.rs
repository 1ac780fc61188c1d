//! Leaderless replication, as a sans-io state machine (the coordinator's side).
//!
//! A node that receives a client's write or read coordinates it over the key's replicas (from
//! [`crate::placement::Ring`]). This module decides *what* to do; the node runtime (or the
//! simulator) does it and feeds back what happened:
//!
//! - **Write**: apply the mutation locally ([`Effect::ApplyLocal`]), send the resulting record
//!   to every other replica ([`Message::Replicate`], which they merge), and answer the client
//!   once `w` replicas (this one included) hold it. A replica that has not acknowledged by
//!   the deadline gets a hint ([`Effect::Hint`]) that the runtime stores durably and delivers
//!   when the replica is back (hinted handoff). A write that misses its quorum by the deadline
//!   fails with [`Outcome::QuorumFailed`], which is indeterminate, not rolled back: the record
//!   is durable on the replicas that acknowledged and will spread.
//! - **Read**: read locally and ask the other replicas; answer with the join
//!   ([`Crdt::merge`]) of the first `r` answers. Every replica whose answer is older than the
//!   join gets the join (read repair), including replicas answering after the client got its
//!   answer.
//!
//! Time is an argument (`now_ms`); deadlines fire on [`Input::Tick`].

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::Crdt;
use crate::key::Key;
use crate::node::NodeId;
use crate::record::{Mutation, Record, WrongKind};
use crate::signing::SignatureRefused;

/// Identifies one client request at its coordinator.
pub type RequestId = u64;

/// What replicas send each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Merge `record` into `key` durably, then answer [`Message::Replicated`].
    Replicate {
        /// The coordinator's request (0: a repair nobody waits for).
        request: RequestId,
        /// The key.
        key: Key,
        /// The state to merge.
        record: Record,
    },
    /// `Replicate` was merged durably.
    Replicated {
        /// The request it answers.
        request: RequestId,
    },
    /// Send your record of `key`.
    Read {
        /// The coordinator's request.
        request: RequestId,
        /// The key.
        key: Key,
    },
    /// A replica's record of the key.
    ReadReply {
        /// The request it answers.
        request: RequestId,
        /// What the replica holds.
        record: Option<Record>,
    },
    /// Anti-entropy: the leaves of the sender's Merkle tree over the keys both nodes replicate.
    TreeLeaves {
        /// The tree's depth (`2^depth` leaves).
        depth: u8,
        /// The leaves.
        leaves: Vec<u64>,
    },
    /// Anti-entropy, the second level: for each bucket of the sender's `TreeLeaves` found
    /// different, the leaves of that bucket's subtree (the tree `depth` deep, whose first
    /// `coarse` levels the `TreeLeaves` covered): only the sub-buckets that still differ are
    /// exchanged, so what crosses the network follows the divergence, not the data.
    SubLeaves {
        /// The fine tree's depth.
        depth: u8,
        /// The depth of the `TreeLeaves` it refines.
        coarse: u8,
        /// Each differing coarse bucket, with its `2^(depth - coarse)` fine leaves.
        buckets: Vec<(u32, Vec<u64>)>,
    },
    /// Anti-entropy: the buckets found different; send your records in them.
    Buckets {
        /// The tree's depth.
        depth: u8,
        /// The differing buckets.
        buckets: Vec<u32>,
    },
    /// Coordinate this client write: the sender is not one of the key's replicas. Answered
    /// with [`Message::Forwarded`].
    Forward {
        /// The sender's request.
        request: RequestId,
        /// The key.
        key: Key,
        /// The change.
        mutation: Mutation,
    },
    /// The outcome of a forwarded write.
    Forwarded {
        /// The request it answers.
        request: RequestId,
        /// What the coordinating replica answered.
        outcome: Outcome,
    },
    /// A membership protocol (SWIM) packet, opaque to replication.
    Gossip {
        /// The packet.
        data: Vec<u8>,
    },
    /// The sender leaves the cluster for good: take it out of placement.
    Leaving,
    /// These nodes left the cluster for good: take them out of placement. Members pass on
    /// the departures they know with every anti-entropy round, so a member that missed a
    /// node's own `Leaving` (down or cut off while it left) still learns of it.
    Departed {
        /// The nodes that left.
        nodes: Vec<NodeId>,
    },
    /// Send your records of keys starting with `prefix`, after `after`, at most `limit`.
    Scan {
        /// The coordinator's request.
        request: RequestId,
        /// The key prefix (a collection and its `:`, or empty for every key).
        prefix: Vec<u8>,
        /// Resume after this key.
        after: Option<Key>,
        /// At most this many records.
        limit: u32,
    },
    /// A node's page of a scan, in key order.
    Scanned {
        /// The request it answers.
        request: RequestId,
        /// The records.
        entries: Vec<(Key, Record)>,
    },
    /// A request to the receiver's Raft member, opaque to replication.
    Raft {
        /// The sender's request, echoed by the reply.
        request: RequestId,
        /// The Raft request.
        data: Vec<u8>,
    },
    /// The Raft member's reply to a [`Message::Raft`].
    RaftReply {
        /// The request it answers.
        request: RequestId,
        /// The Raft reply.
        data: Vec<u8>,
    },
    /// Causal writes (see [`crate::causal`]): pushed by their origin, or sent to a peer that
    /// lacks them.
    CausalWrites {
        /// The writes, each origin's in sequence order.
        writes: Vec<crate::causal::CausalWrite>,
    },
    /// What the sender has applied of the causal writes: the receiver sends what the sender
    /// lacks, and knows what it may forget.
    CausalHave {
        /// The sender's applied vector.
        applied: crate::version::VersionVector,
    },
    /// One chunk of a snapshot of the sender's causal state, for a peer that lacks writes
    /// already trimmed from every log: the receiver applies the snapshot once it has every
    /// chunk, never a part of it.
    CausalSnapshot {
        /// Names the snapshot (chunks of different snapshots never mix).
        id: u64,
        /// This chunk's place, from 0.
        index: u32,
        /// How many chunks the snapshot has.
        total: u32,
        /// What the snapshot's state has applied (the same in every chunk).
        applied: crate::version::VersionVector,
        /// Records, keys strictly increasing.
        entries: Vec<(Key, Record)>,
    },
}

impl Message {
    /// The request the message belongs to.
    pub fn request(&self) -> RequestId {
        match self {
            Message::Replicate { request, .. }
            | Message::Replicated { request }
            | Message::Read { request, .. }
            | Message::ReadReply { request, .. }
            | Message::Forward { request, .. }
            | Message::Forwarded { request, .. }
            | Message::Scan { request, .. }
            | Message::Scanned { request, .. }
            | Message::Raft { request, .. }
            | Message::RaftReply { request, .. } => *request,
            Message::TreeLeaves { .. }
            | Message::SubLeaves { .. }
            | Message::Buckets { .. }
            | Message::Gossip { .. }
            | Message::Leaving
            | Message::Departed { .. }
            | Message::CausalWrites { .. }
            | Message::CausalHave { .. }
            | Message::CausalSnapshot { .. } => 0,
        }
    }
}

/// What happens to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A client writes.
    Write {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
        /// The change.
        mutation: Mutation,
        /// The key's replicas (the coordinator may or may not be one of them).
        replicas: Vec<NodeId>,
        /// Acknowledgements needed.
        w: usize,
        /// When to give up waiting.
        deadline_ms: u64,
    },
    /// The local engine applied a write's mutation (or failed to).
    LocalApplied {
        /// The request.
        request: RequestId,
        /// The resulting record, or why it failed.
        result: Result<Record, LocalFailure>,
    },
    /// A client reads.
    Read {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
        /// The key's replicas.
        replicas: Vec<NodeId>,
        /// Answers needed.
        r: usize,
        /// When to give up waiting.
        deadline_ms: u64,
    },
    /// The local engine's record of a read's key.
    LocalRead {
        /// The request.
        request: RequestId,
        /// The record.
        record: Option<Record>,
    },
    /// A message from another replica.
    Received {
        /// The sender.
        from: NodeId,
        /// The message.
        message: Message,
    },
    /// Time passed.
    Tick,
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Apply `mutation` to `key` on the local engine, then feed [`Input::LocalApplied`].
    ApplyLocal {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
        /// The change.
        mutation: Mutation,
    },
    /// Read `key` from the local engine, then feed [`Input::LocalRead`].
    ReadLocal {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
    },
    /// Merge `record` into the local engine (read repair of this node).
    MergeLocal {
        /// The key.
        key: Key,
        /// The state to merge.
        record: Record,
    },
    /// Send a message.
    Send {
        /// The recipient.
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// Store `record` for `node` durably and deliver it when `node` is reachable again.
    Hint {
        /// The replica that missed the write.
        node: NodeId,
        /// The key.
        key: Key,
        /// The state to deliver.
        record: Record,
    },
    /// Answer the client.
    Reply {
        /// The request.
        request: RequestId,
        /// The answer.
        outcome: Outcome,
    },
}

/// The answer to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The write is durable on at least `w` replicas.
    Written {
        /// The record written.
        record: Record,
    },
    /// The join of at least `r` replicas' records.
    Read {
        /// What they hold together.
        record: Option<Record>,
    },
    /// The quorum was not reached by the deadline. For a write: indeterminate, not failed —
    /// it is durable where it was acknowledged and will spread.
    QuorumFailed {
        /// Replicas that answered.
        answered: usize,
        /// Replicas needed.
        needed: usize,
    },
    /// This node is not one of the key's replicas; forward the write to one of them.
    NotAReplica {
        /// The key's replicas.
        replicas: Vec<NodeId>,
    },
    /// The local engine failed.
    LocalFailure {
        /// Why.
        failure: LocalFailure,
    },
}

/// Why the local engine did not apply a write, as far as a caller must tell it apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalFailure {
    /// The disk is full: nothing was written; it may work once there is space.
    DiskFull(String),
    /// A signed collection's rule refused the write (see [`crate::signing`]).
    SignatureRefused(SignatureRefused),
    /// The key holds another kind of value than the mutation needs.
    WrongKind(WrongKind),
    /// Any other failure of the engine.
    Storage(String),
}

impl std::fmt::Display for LocalFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DiskFull(detail) | Self::Storage(detail) => f.write_str(detail),
            Self::SignatureRefused(why) => write!(f, "{why}"),
            Self::WrongKind(wrong) => write!(f, "{wrong}"),
        }
    }
}

#[derive(Debug)]
enum Pending {
    Write {
        key: Key,
        record: Option<Record>,
        others: BTreeSet<NodeId>,
        acked: BTreeSet<NodeId>,
        w: usize,
        deadline_ms: u64,
        replied: bool,
    },
    Read {
        key: Key,
        answers: BTreeMap<NodeId, Option<Record>>,
        expected: BTreeSet<NodeId>,
        r: usize,
        deadline_ms: u64,
        replied: Option<Option<Record>>,
    },
}

/// The coordinator of one node.
#[derive(Debug)]
pub struct Coordinator {
    node: NodeId,
    pending: BTreeMap<RequestId, Pending>,
}

fn join(a: Option<&Record>, b: Option<&Record>) -> Option<Record> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let mut joined = a.clone();
            joined.merge(b);
            Some(joined)
        }
        (a, b) => a.or(b).cloned(),
    }
}

impl Coordinator {
    /// The coordinator of `node`.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            pending: BTreeMap::new(),
        }
    }

    /// Requests still in flight (waiting for a quorum, or for late replicas).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether `request` is still in flight.
    pub fn is_pending(&self, request: RequestId) -> bool {
        self.pending.contains_key(&request)
    }

    /// Feeds one input at time `now_ms`; returns what to do, in order.
    pub fn step(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Write {
                request,
                key,
                mutation,
                replicas,
                w,
                deadline_ms,
            } => {
                if !replicas.contains(&self.node) {
                    // Only a replica may stamp and store the key: the runtime forwards the write.
                    effects.push(Effect::Reply {
                        request,
                        outcome: Outcome::NotAReplica { replicas },
                    });
                    return effects;
                }
                let others: BTreeSet<NodeId> =
                    replicas.into_iter().filter(|n| *n != self.node).collect();
                let w = w.clamp(1, others.len() + 1);
                effects.push(Effect::ApplyLocal {
                    request,
                    key: key.clone(),
                    mutation,
                });
                self.pending.insert(
                    request,
                    Pending::Write {
                        key,
                        record: None,
                        others,
                        acked: BTreeSet::new(),
                        w,
                        deadline_ms,
                        replied: false,
                    },
                );
            }
            Input::LocalApplied { request, result } => {
                self.local_applied(request, result, &mut effects)
            }
            Input::Read {
                request,
                key,
                replicas,
                r,
                deadline_ms,
            } => {
                let expected: BTreeSet<NodeId> = replicas.into_iter().collect();
                let r = r.clamp(1, expected.len().max(1));
                if expected.contains(&self.node) {
                    effects.push(Effect::ReadLocal {
                        request,
                        key: key.clone(),
                    });
                }
                for node in expected.iter().filter(|n| **n != self.node) {
                    effects.push(Effect::Send {
                        to: node.clone(),
                        message: Message::Read {
                            request,
                            key: key.clone(),
                        },
                    });
                }
                self.pending.insert(
                    request,
                    Pending::Read {
                        key,
                        answers: BTreeMap::new(),
                        expected,
                        r,
                        deadline_ms,
                        replied: None,
                    },
                );
            }
            Input::LocalRead { request, record } => {
                let node = self.node.clone();
                self.read_answer(request, node, record, &mut effects);
            }
            Input::Received { from, message } => match message {
                Message::Replicated { request } => self.acked(request, from, &mut effects),
                Message::ReadReply { request, record } => {
                    self.read_answer(request, from, record, &mut effects)
                }
                // A replica's own duties (merge and answer) are the runtime's: they need no state.
                Message::Replicate { .. }
                | Message::Read { .. }
                | Message::TreeLeaves { .. }
                | Message::SubLeaves { .. }
                | Message::Buckets { .. }
                | Message::Forward { .. }
                | Message::Forwarded { .. }
                | Message::Gossip { .. }
                | Message::Leaving
                | Message::Departed { .. }
                | Message::Scan { .. }
                | Message::Scanned { .. }
                | Message::Raft { .. }
                | Message::RaftReply { .. }
                | Message::CausalWrites { .. }
                | Message::CausalHave { .. }
                | Message::CausalSnapshot { .. } => {}
            },
            Input::Tick => self.expire(now_ms, &mut effects),
        }
        effects
    }

    fn local_applied(
        &mut self,
        request: RequestId,
        result: Result<Record, LocalFailure>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(Pending::Write {
            key,
            record,
            others,
            acked,
            ..
        }) = self.pending.get_mut(&request)
        else {
            return;
        };
        match result {
            Err(failure) => {
                self.pending.remove(&request);
                effects.push(Effect::Reply {
                    request,
                    outcome: Outcome::LocalFailure { failure },
                });
            }
            Ok(applied) => {
                for node in others.iter() {
                    let message = Message::Replicate {
                        request,
                        key: key.clone(),
                        record: applied.clone(),
                    };
                    effects.push(Effect::Send {
                        to: node.clone(),
                        message,
                    });
                }
                *record = Some(applied);
                acked.insert(self.node.clone());
                self.settle(request, effects);
            }
        }
    }

    fn acked(&mut self, request: RequestId, from: NodeId, effects: &mut Vec<Effect>) {
        if let Some(Pending::Write { others, acked, .. }) = self.pending.get_mut(&request)
            && others.contains(&from)
        {
            acked.insert(from);
            self.settle(request, effects);
        }
    }

    /// Replies once the quorum is reached; forgets the write once every replica acknowledged.
    fn settle(&mut self, request: RequestId, effects: &mut Vec<Effect>) {
        let Some(Pending::Write {
            record: Some(record),
            others,
            acked,
            w,
            replied,
            ..
        }) = self.pending.get_mut(&request)
        else {
            return;
        };
        if !*replied && acked.len() >= *w {
            *replied = true;
            effects.push(Effect::Reply {
                request,
                outcome: Outcome::Written {
                    record: record.clone(),
                },
            });
        }
        if acked.len() == others.len() + 1 {
            self.pending.remove(&request);
        }
    }

    fn read_answer(
        &mut self,
        request: RequestId,
        from: NodeId,
        record: Option<Record>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(Pending::Read {
            key,
            answers,
            expected,
            r,
            replied,
            ..
        }) = self.pending.get_mut(&request)
        else {
            return;
        };
        if !expected.contains(&from) {
            return;
        }
        answers.insert(from, record);
        let joined = answers
            .values()
            .fold(None, |acc, rec| join(acc.as_ref(), rec.as_ref()));
        if replied.is_none() && answers.len() >= *r {
            effects.push(Effect::Reply {
                request,
                outcome: Outcome::Read {
                    record: joined.clone(),
                },
            });
            *replied = Some(joined.clone());
        }
        if let Some(best) = replied.as_ref().and(joined.as_ref()) {
            // Read repair: everyone who answered with less than the join gets the join.
            for (node, answer) in answers.iter() {
                if answer.as_ref() != Some(best) {
                    if *node == self.node {
                        effects.push(Effect::MergeLocal {
                            key: key.clone(),
                            record: best.clone(),
                        });
                    } else {
                        let message = Message::Replicate {
                            request: 0,
                            key: key.clone(),
                            record: best.clone(),
                        };
                        effects.push(Effect::Send {
                            to: node.clone(),
                            message,
                        });
                    }
                }
            }
            for answer in answers.values_mut() {
                *answer = Some(best.clone());
            }
        }
        if answers.len() == expected.len().max(1) {
            self.pending.remove(&request);
        }
    }

    fn expire(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let expired: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| match p {
                Pending::Write { deadline_ms, .. } | Pending::Read { deadline_ms, .. } => {
                    now_ms >= *deadline_ms
                }
            })
            .map(|(id, _)| *id)
            .collect();
        for request in expired {
            match self.pending.remove(&request) {
                Some(Pending::Write {
                    key,
                    record,
                    others,
                    acked,
                    w,
                    replied,
                    ..
                }) => {
                    if !replied {
                        effects.push(Effect::Reply {
                            request,
                            outcome: Outcome::QuorumFailed {
                                answered: acked.len(),
                                needed: w,
                            },
                        });
                    }
                    if let Some(record) = record {
                        for node in others.difference(&acked) {
                            effects.push(Effect::Hint {
                                node: node.clone(),
                                key: key.clone(),
                                record: record.clone(),
                            });
                        }
                    }
                }
                Some(Pending::Read {
                    answers,
                    r,
                    replied: None,
                    ..
                }) => {
                    let outcome = Outcome::QuorumFailed {
                        answered: answers.len(),
                        needed: r,
                    };
                    effects.push(Effect::Reply { request, outcome });
                }
                Some(Pending::Read { .. }) | None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
