//! Merkle-tree anti-entropy, in two levels. Every interval this node (A) sends the next peer
//! (B) the 64 bucket sums of a tree over the records both replicate. B answers with the
//! subtree leaves (64 each) of the buckets that differ; A finds the sub-buckets (of 4,096)
//! that differ, sends its records in them, and names them, for which B sends its own. What
//! crosses the network is one fixed-size message plus a part proportional to the divergence;
//! records are sent only from sub-buckets that differ. A repair does the same with every
//! member in turn, now, and reports each.
//!
//! The trees follow the local engine's commits ([`super::Input::Committed`]: the digests of
//! each changed record before and after), so a round compares without reading any record;
//! only the records of differing sub-buckets are loaded, to be sent. Every [`SWEEP_EVERY`]
//! rounds a sweep loads every record ([`RecordsJob::Round`]): handoff and tombstone
//! collection ([`super::upkeep`]) need them, and the trees are rebuilt from them, so nothing
//! the commits failed to describe outlives a sweep. A load is one snapshot, numbered by the
//! last commit it includes: commits after it are applied to the rebuilt trees again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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

/// Every how many rounds a round loads every record (handoff, tombstone collection, trees
/// rebuilt).
pub const SWEEP_EVERY: u64 = 10;

/// The most commits kept for loads in flight (beyond, the loads are given up).
const MAX_SINCE_LOAD: usize = 65_536;

/// One record the local engine changed: the digests (`merkle::entry_digest` of the key and
/// the encoded record) before and after; `None`: absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// The record's digest before the commit.
    pub before: Option<u64>,
    /// Its digest after.
    pub after: Option<u64>,
}

/// What a load of local records ([`super::Effect::LoadRecords`]) is for.
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
    /// Send `to` this node's records in `buckets` (fine buckets): the one job that loads only
    /// the records of those buckets.
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

impl RecordsJob {
    /// The fine buckets whose records the job needs, if not every record.
    pub fn buckets(&self) -> Option<&BTreeSet<usize>> {
        match self {
            RecordsJob::SendBuckets { buckets, .. } => Some(buckets),
            _ => None,
        }
    }
}

/// The fine tree of what this node shares with each member, kept current by the commits.
#[derive(Debug, Default)]
pub(super) struct Trees {
    /// `None` until a load of every record built them (and after placement changed).
    by_peer: Option<BTreeMap<NodeId, MerkleTree>>,
    /// The last commit the trees include.
    seq: u64,
    /// Loads of every record in flight, and the commits seen since the oldest was asked for
    /// (applied again to the trees a load rebuilds, past its snapshot).
    loads: usize,
    since_load: Vec<(u64, Option<Vec<Change>>)>,
}

impl Trees {
    /// Placement changed: the trees compare other key sets; the next load rebuilds them.
    pub(super) fn invalidate(&mut self) {
        self.by_peer = None;
    }
}

impl NodeState {
    /// Asks for the records `job` needs; a load of every record will rebuild the trees, so
    /// the commits seen meanwhile are kept.
    pub(super) fn load(&mut self, job: RecordsJob, effects: &mut Vec<Effect>) {
        if job.buckets().is_none() {
            self.trees.loads += 1;
        }
        effects.push(Effect::LoadRecords { job });
    }

    /// Whether the trees are current (a comparison needs no load).
    pub(super) fn has_trees(&self) -> bool {
        self.trees.by_peer.is_some()
    }

    /// The local engine committed `changes` as commit `seq`.
    pub(super) fn committed(&mut self, seq: u64, changes: Option<Vec<Change>>) {
        if self.trees.loads > 0 {
            if self.trees.since_load.len() >= MAX_SINCE_LOAD {
                // A load that takes this long is as good as lost: forget it, and let the next
                // round load again.
                self.trees.since_load.clear();
                self.trees.loads = 0;
                self.trees.by_peer = None;
            } else {
                self.trees.since_load.push((seq, changes.clone()));
            }
        }
        self.apply_commit(seq, changes.as_deref());
    }

    /// A load failed: nothing comes back for it.
    pub(super) fn load_failed(&mut self, job: RecordsJob) {
        if job.buckets().is_none() {
            self.trees.loads = self.trees.loads.saturating_sub(1);
            if self.trees.loads == 0 {
                self.trees.since_load.clear();
            }
        }
        if matches!(job, RecordsJob::Round { compare: true }) {
            self.round_loading = false;
        }
    }

    /// Applies one commit to the trees, unless they include it already.
    fn apply_commit(&mut self, seq: u64, changes: Option<&[Change]>) {
        if seq <= self.trees.seq {
            return;
        }
        self.trees.seq = seq;
        let Some(changes) = changes else {
            // Changes nobody described: the trees are unknown until the next load.
            self.trees.by_peer = None;
            return;
        };
        let Some(mut trees) = self.trees.by_peer.take() else {
            return;
        };
        let me = self.settings.id.clone();
        for change in changes {
            let replicas = self.replicas(&change.key);
            if !replicas.contains(&me) {
                continue;
            }
            for replica in replicas.iter().filter(|r| **r != me) {
                if let Some(tree) = trees.get_mut(replica) {
                    let key = change.key.as_bytes();
                    if let Some(before) = change.before {
                        tree.remove(key, before);
                    }
                    if let Some(after) = change.after {
                        tree.insert(key, after);
                    }
                }
            }
        }
        self.trees.by_peer = Some(trees);
    }

    /// The local records `job` asked for have been loaded, in a snapshot that includes the
    /// commits up to `seq`.
    pub(super) fn records(
        &mut self,
        job: RecordsJob,
        seq: u64,
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
        // Only a load of every record rebuilds the trees.
        let job = match job {
            RecordsJob::SendBuckets { to, buckets } => {
                return self.send_buckets(&to, &buckets, &placed, effects);
            }
            job => job,
        };
        self.rebuild_trees(seq, &placed);
        match job {
            RecordsJob::Round { compare } => {
                if compare {
                    self.round_loading = false;
                }
                self.hand_off(&placed, now_ms, effects);
                self.collect_tombstones(&placed, now_ms, effects);
                if compare {
                    self.compare_round(effects);
                }
            }
            RecordsJob::Repair { member } => {
                let current = self.repair.as_ref().and_then(|r| r.current.as_ref());
                if current.is_some_and(|(m, _)| *m == member) {
                    self.compare_with(&member, effects);
                }
            }
            RecordsJob::CompareTrees { from, leaves } => self.answer_leaves(from, leaves, effects),
            RecordsJob::CompareSubLeaves { from, buckets } => {
                self.compare_sub_leaves(&from, buckets, Some(&placed), effects)
            }
            RecordsJob::SendBuckets { .. } => {}
        }
    }

    /// Rebuilds the trees from a snapshot including the commits up to `seq`, then applies
    /// the commits seen since that are not in it.
    fn rebuild_trees(&mut self, seq: u64, placed: &[Placed]) {
        let fine = self.settings.fine_depth;
        let me = &self.settings.id;
        let mut trees: BTreeMap<NodeId, MerkleTree> = self
            .members
            .keys()
            .map(|member| (member.clone(), MerkleTree::new(fine)))
            .collect();
        for (key, record, replicas) in placed {
            if !replicas.contains(me) {
                continue;
            }
            // Each record encoded and digested once, whatever the number of members.
            let digest = entry_digest(key.as_bytes(), &codec::encode(record));
            for replica in replicas.iter().filter(|r| *r != me) {
                if let Some(tree) = trees.get_mut(replica) {
                    tree.insert(key.as_bytes(), digest);
                }
            }
        }
        self.trees.by_peer = Some(trees);
        self.trees.seq = seq;
        let since = std::mem::take(&mut self.trees.since_load);
        for (seq, changes) in &since {
            self.apply_commit(*seq, changes.as_deref());
        }
        self.trees.loads = self.trees.loads.saturating_sub(1);
        if self.trees.loads > 0 {
            self.trees.since_load = since;
        }
    }

    /// A round: compares with the next members of the sweep. Every member once per
    /// `SWEEP_ROUNDS` rounds: a few peers a round in a large cluster, rather than one, whose
    /// sweep would take as many rounds as there are members.
    pub(super) fn compare_round(&mut self, effects: &mut Vec<Effect>) {
        let peers: Vec<NodeId> = self.members.keys().cloned().collect();
        if peers.is_empty() {
            return;
        }
        for _ in 0..peers.len().div_ceil(SWEEP_ROUNDS) {
            let peer = peers[self.next_peer % peers.len()].clone();
            self.next_peer += 1;
            self.compare_with(&peer, effects);
        }
    }

    /// The current fine tree of what this node shares with `peer` (empty if none).
    fn tree_with(&self, peer: &NodeId) -> MerkleTree {
        self.trees
            .by_peer
            .as_ref()
            .and_then(|trees| trees.get(peer).cloned())
            .unwrap_or_else(|| MerkleTree::new(self.settings.fine_depth))
    }

    /// `from` sent the coarse leaves of its tree: answer with the fine leaves of every coarse
    /// bucket that differs (always, even with none: the comparison is then complete).
    pub(super) fn answer_leaves(
        &mut self,
        from: NodeId,
        leaves: Vec<u64>,
        effects: &mut Vec<Effect>,
    ) {
        let (coarse, fine) = (self.settings.tree_depth, self.settings.fine_depth);
        let Some(theirs) = MerkleTree::from_leaves(coarse, leaves) else {
            return;
        };
        let ours = self.tree_with(&from);
        let width = 1usize << (fine - coarse);
        let buckets = ours
            .coarsen(coarse)
            .diff(&theirs)
            .into_iter()
            .map(|b| (b as u32, ours.leaves()[b * width..(b + 1) * width].to_vec()))
            .collect();
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

    /// `from` answered this node's comparison with the fine leaves of the coarse buckets that
    /// differ: this node sends its records of the fine buckets that differ (from `placed` if
    /// loaded, else by loading them). In a repair it also asks for `from`'s records of them
    /// (`Buckets`); in a round it does not, since `from`'s own rounds push them here.
    pub(super) fn compare_sub_leaves(
        &mut self,
        from: &NodeId,
        buckets: Vec<(u32, Vec<u64>)>,
        placed: Option<&[Placed]>,
        effects: &mut Vec<Effect>,
    ) {
        let (coarse, fine) = (self.settings.tree_depth, self.settings.fine_depth);
        let ours = self.tree_with(from);
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
        let repairing = self
            .repair
            .as_ref()
            .and_then(|r| r.current.as_ref())
            .is_some_and(|(m, _)| m == from);
        self.repair_answered(from, differing.len(), effects);
        if differing.is_empty() {
            return;
        }
        if repairing {
            effects.push(Effect::Send {
                to: from.clone(),
                message: Message::Buckets {
                    depth: fine,
                    buckets: differing.iter().map(|b| *b as u32).collect(),
                },
                deadline_ms: 0,
            });
        }
        match placed {
            Some(placed) => self.send_buckets(from, &differing, placed, effects),
            None => {
                let job = RecordsJob::SendBuckets {
                    to: from.clone(),
                    buckets: differing,
                };
                self.load(job, effects);
            }
        }
    }

    /// Sends `peer` the coarse leaves of the tree of what we share, after the departures we
    /// know (placement must agree before trees can).
    fn compare_with(&mut self, peer: &NodeId, effects: &mut Vec<Effect>) {
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
        let tree = self.tree_with(peer).coarsen(depth);
        effects.push(Effect::Send {
            to: peer.clone(),
            message: Message::TreeLeaves {
                depth,
                leaves: tree.leaves().to_vec(),
            },
            deadline_ms: 0,
        });
    }

    /// Sends `peer` our records in `buckets` (it merges them): those of keys both replicate.
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
        let me = &self.settings.id;
        for (key, record, replicas) in placed {
            let shared = replicas.contains(peer) && replicas.contains(me);
            if shared && buckets.contains(&probe.bucket(key.as_bytes())) {
                effects.push(Effect::Observe(Observation::Repaired));
                effects.push(Effect::Send {
                    to: peer.clone(),
                    message: Message::Replicate {
                        request: 0,
                        key: key.clone(),
                        record: record.clone(),
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
                self.load(RecordsJob::Repair { member }, effects);
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
