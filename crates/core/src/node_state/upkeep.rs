//! A node's upkeep of its records, run with every anti-entropy round:
//!
//! - **handoff**: a record of a key this node no longer replicates (a member joined, or this
//!   node leaves) is sent to the key's replicas, and purged here once all of them acknowledged
//!   it (if it has not changed meanwhile);
//! - **tombstone collection**: a tombstone past the grace period is purged once every other
//!   replica answers that it holds the same tombstone or nothing;
//! - **hinted handoff**: hints stored for a replica that missed a write are delivered every
//!   hint interval until it acknowledges them;
//! - **leaving**: a node that leaves tells the members every round, and leaves the membership
//!   once it holds no record of anyone else's.

use std::collections::BTreeSet;

use super::{Answer, Effect, Job, Liveness, NodeState};
use crate::key::Key;
use crate::node::NodeId;
use crate::record::Record;
use crate::replication::{Message, RequestId};

/// A hint the runtime stored durably: a record for a replica that missed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHint {
    /// The hint's id in the store.
    pub id: u64,
    /// The key.
    pub key: Key,
    /// The state to deliver.
    pub record: Record,
}

/// Why a record is purged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Its key's replicas hold it, and this node is not one of them.
    HandedOff,
    /// A tombstone past the grace period that every replica holds.
    Collected,
}

/// A local record on which this node waits for answers from other replicas.
#[derive(Debug)]
pub(super) struct Asked {
    pub(super) key: Key,
    pub(super) record: Record,
    /// Replicas that have not answered yet.
    pub(super) waiting: Vec<NodeId>,
    sent_ms: u64,
}

/// A local record and its key's replicas under the current placement.
pub(super) type Placed = (Key, Record, Vec<NodeId>);

/// Whether `record` is dead past the grace period: a tombstone stamped, or an expiring value
/// that expired, at or before `horizon_ms`. Collection may purge it, and a replica holding
/// nothing of its key does not take it back. Such a replica reads the key as absent either
/// way; taking the record back would undo its collection, and anti-entropy from a replica
/// that has not collected yet would hand it back again and again, so the replicas could take
/// turns holding it and never all be rid of it. An expired value is never resurrected: it
/// carries its expiry wherever it goes.
pub fn past_grace(record: &Record, horizon_ms: u64) -> bool {
    record
        .dead_since_ms()
        .is_some_and(|since| since <= horizon_ms)
}

impl Job {
    fn handoff(&self) -> Option<&Asked> {
        match self {
            Job::Handoff(asked) => Some(asked),
            _ => None,
        }
    }

    fn collect(&self) -> Option<&Asked> {
        match self {
            Job::Collect(asked) => Some(asked),
            _ => None,
        }
    }
}

impl NodeState {
    /// Sends `record` to each of `to` as `message(request)` under a fresh request id, and
    /// returns the id and what to track until they all answer.
    fn ask(
        &mut self,
        (key, record): (Key, Record),
        to: Vec<NodeId>,
        now_ms: u64,
        message: impl Fn(RequestId, &Key, &Record) -> Message,
        effects: &mut Vec<Effect>,
    ) -> (RequestId, Asked) {
        let request = self.next_request();
        for node in &to {
            effects.push(Effect::Send {
                to: node.clone(),
                message: message(request, &key, &record),
                deadline_ms: 0,
            });
        }
        let asked = Asked {
            key,
            record,
            waiting: to,
            sent_ms: now_ms,
        };
        (request, asked)
    }

    /// The keys of the jobs of one kind still waiting (dropping those older than the retry
    /// period: they are asked again).
    fn asked_keys(&mut self, kind: fn(&Job) -> Option<&Asked>, now_ms: u64) -> BTreeSet<Key> {
        let retry = self.settings.retry_ms;
        self.jobs
            .retain(|_, job| kind(job).is_none_or(|asked| asked.sent_ms + retry > now_ms));
        self.jobs
            .values()
            .filter_map(kind)
            .map(|asked| asked.key.clone())
            .collect()
    }

    /// Handoff: sends every local record of a key this node no longer replicates to the key's
    /// replicas. Handoffs unacknowledged for the retry period are sent again.
    pub(super) fn hand_off(&mut self, placed: &[Placed], now_ms: u64, effects: &mut Vec<Effect>) {
        let in_flight = self.asked_keys(Job::handoff, now_ms);
        let me = self.settings.id.clone();
        let mut uninformed = Vec::new();
        if let Some(leaving) = &self.leaving {
            // Sent every round until confirmed: a lost message must not keep a member placing
            // keys here.
            uninformed = self
                .members
                .keys()
                .filter(|m| !leaving.informed.contains(*m))
                .cloned()
                .collect();
            for member in &uninformed {
                effects.push(Effect::Send {
                    to: member.clone(),
                    message: Message::Leaving,
                    deadline_ms: 0,
                });
            }
        }
        let moved: Vec<&Placed> = placed
            .iter()
            .filter(|(_, _, replicas)| !replicas.contains(&me))
            .collect();
        // Members known dead learn of the leave from the others (`Departed`) once back, so at
        // least one member must know (a node cut off from all of them waits for the heal).
        let some_know = self
            .leaving
            .as_ref()
            .is_none_or(|l| !l.informed.is_empty() || self.members.is_empty());
        let told = some_know
            && uninformed
                .iter()
                .all(|m| self.members.get(m) == Some(&Liveness::Dead));
        if moved.is_empty() && told {
            if self.leaving.is_some() {
                self.finish_leaving(effects);
            }
            return;
        }
        if self.leaving.as_ref().is_some_and(|l| now_ms > l.until_ms) {
            if let Some(leaving) = self.leaving.take() {
                for caller in leaving.callers {
                    let answer = Answer::Leave(Err(moved.len()));
                    effects.push(Effect::Answer { caller, answer });
                }
            }
            self.rebuild_ring(effects);
            return;
        }
        for (key, record, replicas) in moved {
            // No replica to take it (this node is the last member): it stays.
            if in_flight.contains(key) || replicas.is_empty() {
                continue;
            }
            let replicate = |request, key: &Key, record: &Record| Message::Replicate {
                request,
                key: key.clone(),
                record: record.clone(),
            };
            let entry = (key.clone(), record.clone());
            let (request, asked) = self.ask(entry, replicas.clone(), now_ms, replicate, effects);
            self.jobs.insert(request, Job::Handoff(asked));
        }
    }

    /// A new replica holds a handed-off record: once all of them do, it is purged here.
    pub(super) fn handoff_acknowledged(
        &mut self,
        from: &NodeId,
        request: RequestId,
        effects: &mut Vec<Effect>,
    ) {
        let Some(Job::Handoff(handoff)) = self.jobs.get_mut(&request) else {
            return;
        };
        handoff.waiting.retain(|n| n != from);
        if !handoff.waiting.is_empty() {
            return;
        }
        if let Some(Job::Handoff(Asked { key, record, .. })) = self.jobs.remove(&request) {
            effects.push(Effect::Purge {
                key,
                record,
                purpose: Purpose::HandedOff,
            });
        }
    }

    /// Every record is with its new replicas, and every member not known dead (and at least
    /// one) confirmed it took this node out of placement: leave the membership.
    fn finish_leaving(&mut self, effects: &mut Vec<Effect>) {
        if let Some(leaving) = self.leaving.take() {
            self.left = true;
            effects.push(Effect::Left);
            for caller in leaving.callers {
                let answer = Answer::Leave(Ok(()));
                effects.push(Effect::Answer { caller, answer });
            }
        }
    }

    /// Tombstone collection, step 1: ask the other replicas of each tombstone older than the
    /// grace period for their copy. Unanswered questions are asked again after the retry
    /// period. The only replica of a key purges at once.
    pub(super) fn collect_tombstones(
        &mut self,
        placed: &[Placed],
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let in_flight = self.asked_keys(Job::collect, now_ms);
        let horizon = self.collect_horizon(now_ms);
        let me = self.settings.id.clone();
        for (key, record, replicas) in placed {
            let collectable = past_grace(record, horizon);
            if !collectable || !replicas.contains(&me) || in_flight.contains(key) {
                continue;
            }
            let others: Vec<NodeId> = replicas.iter().filter(|n| **n != me).cloned().collect();
            if others.is_empty() {
                effects.push(Effect::Purge {
                    key: key.clone(),
                    record: record.clone(),
                    purpose: Purpose::Collected,
                });
                continue;
            }
            let read = |request, key: &Key, _: &Record| Message::Read {
                request,
                key: key.clone(),
            };
            let entry = (key.clone(), record.clone());
            let (request, asked) = self.ask(entry, others, now_ms, read, effects);
            self.jobs.insert(request, Job::Collect(asked));
        }
    }

    /// Tombstone collection, step 2: a replica answered. It must hold the same tombstone or
    /// nothing (it collected it already): a replica with anything else (an older live value
    /// it would spread back) stops the collection. Once every replica has answered so, the
    /// tombstone is purged here.
    pub(super) fn tombstone_confirmed(
        &mut self,
        from: &NodeId,
        request: RequestId,
        theirs: Option<Record>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(Job::Collect(collecting)) = self.jobs.get_mut(&request) else {
            return;
        };
        if theirs.is_some_and(|r| r != collecting.record) {
            self.jobs.remove(&request);
            return;
        }
        collecting.waiting.retain(|n| n != from);
        if !collecting.waiting.is_empty() {
            return;
        }
        if let Some(Job::Collect(Asked { key, record, .. })) = self.jobs.remove(&request) {
            effects.push(Effect::Purge {
                key,
                record,
                purpose: Purpose::Collected,
            });
        }
    }

    /// Hinted handoff, step 1: load the hints of every member not known dead (hints in
    /// flight for longer than the hint interval are sent again).
    pub(super) fn load_hints(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let interval = self.settings.hint_interval_ms;
        self.jobs.retain(|_, job| match job {
            Job::Hint { sent_ms, .. } => *sent_ms + interval > now_ms,
            _ => true,
        });
        for (peer, liveness) in &self.members {
            if *liveness != Liveness::Dead {
                effects.push(Effect::LoadHints { peer: peer.clone() });
            }
        }
    }

    /// Hinted handoff, step 2: send each hint not already on its way.
    pub(super) fn deliver_hints(
        &mut self,
        peer: NodeId,
        hints: Vec<StoredHint>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let on_the_way: BTreeSet<u64> = self
            .jobs
            .values()
            .filter_map(|job| match job {
                Job::Hint { peer: p, id, .. } if *p == peer => Some(*id),
                _ => None,
            })
            .collect();
        for hint in hints {
            if on_the_way.contains(&hint.id) {
                continue;
            }
            let request = self.next_request();
            effects.push(Effect::Send {
                to: peer.clone(),
                message: Message::Replicate {
                    request,
                    key: hint.key,
                    record: hint.record,
                },
                deadline_ms: 0,
            });
            let job = Job::Hint {
                peer: peer.clone(),
                id: hint.id,
                sent_ms: now_ms,
            };
            self.jobs.insert(request, job);
        }
    }
}
