//! A seeded, deterministic simulator for agentstore's leaderless replication.
//!
//! Every simulated node runs the real [`NodeState`], the state machine a node's runtime runs,
//! and this simulator plays the runtime's part: it executes the state machine's effects on an
//! in-memory store (records applied with the same `record::apply` as every engine), a durable
//! hint table and a physical clock skewed by up to ±300 ms, and feeds back what they return.
//! Messages cross an in-memory network as real wire frames that drop, duplicate, delay and
//! reorder; nodes crash (losing everything but their store and hints) and restart; partitions
//! cut the cluster and heal; nodes join and leave. The failure detector is simulated: each
//! node learns a crash, a restart, a partition or a join after its own random delay. After the
//! faults stop, the nodes' own hinted handoff, handoff, anti-entropy rounds and tombstone
//! collection run until the cluster settles, and [`check`] verifies the invariants.
//! [`NodeState::validate`] runs after every step of every node.
//!
//! Everything random comes from one seed, so a failing seed replays exactly.

pub mod causal;
pub mod convergence;
mod rng;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use agentstore_core::codec;
use agentstore_core::merkle::{MerkleTree, entry_digest};
use agentstore_core::node_state::upkeep::past_grace;
use agentstore_core::node_state::{
    self, Answer, Call as NodeCall, Caller, Change, Effect, Input, Liveness, NodeState, StoredHint,
};
use agentstore_core::placement::Ring;
use agentstore_core::record::{self, Mutation, Record, Value};
use agentstore_core::replication::{LocalFailure, Message, Outcome};
use agentstore_core::{Crdt, HybridClock, Key, NodeId};
use agentstore_wire as wire;

pub use rng::Rng;

/// The cluster and its faults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Nodes at the start.
    pub nodes: usize,
    /// Replicas of each key (N), placed by the consistent-hash ring.
    pub replication: usize,
    /// Write quorum.
    pub w: usize,
    /// Read quorum.
    pub r: usize,
    /// Client operations issued.
    pub operations: usize,
    /// Percent of messages dropped while faults are on.
    pub loss: u64,
    /// Percent of messages duplicated while faults are on.
    pub duplication: u64,
    /// Largest clock skew of a node, in ms (each node gets a fixed skew in ±this).
    pub max_skew_ms: u64,
    /// Nodes that join while faults are on.
    pub joins: usize,
    /// Nodes asked to leave while faults are on.
    pub leaves: usize,
}

impl Settings {
    /// The settings a seed picks: 3 or 5 nodes, N = 3, W and R from {1, 2, 3}, moderate
    /// faults, and up to one join and one leave.
    pub fn for_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x5e77_1a65);
        Self {
            nodes: if rng.chance(50) { 3 } else { 5 },
            replication: 3,
            w: 1 + rng.below(3) as usize,
            r: 1 + rng.below(3) as usize,
            operations: 60,
            loss: rng.below(15),
            duplication: rng.below(10),
            max_skew_ms: 300,
            joins: rng.below(2) as usize,
            leaves: rng.below(2) as usize,
        }
    }
}

/// The simulated nodes' timings (virtual ms): short, so a run covers many rounds.
fn node_settings(id: NodeId, settings: &Settings) -> node_state::Settings {
    let mut node = node_state::Settings::new(id, settings.replication, settings.w, settings.r);
    node.request_timeout_ms = 200;
    node.anti_entropy_interval_ms = 100;
    // Longer than any node stays down or cut off while faults are on, as the documentation
    // asks of a deployment: a hint older than a collected tombstone would bring its value back.
    node.tombstone_grace_ms = 3_000;
    node.hint_interval_ms = 50;
    node.retry_ms = 300;
    node.repair_wait_ms = 300;
    node.leave_timeout_ms = 2_000;
    node.vnodes = 32;
    node
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a unique value to a register key.
    Put(Key, Vec<u8>),
    /// Write a unique value to a register key that expires at the given time (ms).
    PutExpiring(Key, Vec<u8>, u64),
    /// Delete a register key.
    Delete(Key),
    /// Add 1 to a counter key.
    Increment(Key),
    /// Read a key.
    Read(Key),
}

impl Op {
    fn key(&self) -> &Key {
        match self {
            Op::Put(key, _)
            | Op::PutExpiring(key, _, _)
            | Op::Delete(key)
            | Op::Increment(key)
            | Op::Read(key) => key,
        }
    }
}

/// One client operation and what became of it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The operation.
    pub op: Op,
    /// When it was issued (virtual ms).
    pub issued_ms: u64,
    /// When it was answered, and the answer (`None`: no answer, its node crashed).
    pub answer: Option<(u64, Outcome)>,
}

/// A client write some replica applied to its store (it exists, answered or not).
#[derive(Debug, Clone)]
pub struct Applied {
    /// The key.
    pub key: Key,
    /// The mutation.
    pub mutation: Mutation,
    /// The record the replica stored.
    pub record: Record,
}

/// Everything a run produced, for the checkers.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The settings.
    pub settings: Settings,
    /// Every client operation.
    pub calls: Vec<Call>,
    /// Every client write applied by a coordinator.
    pub applied: Vec<Applied>,
    /// Each node's store at the end, by node id (nodes that left included).
    pub stores: BTreeMap<NodeId, BTreeMap<Key, Record>>,
    /// The members at the end (nodes that left are not).
    pub members: Vec<NodeId>,
    /// Nodes that left, and whether their leave said it was complete.
    pub left: BTreeMap<NodeId, bool>,
    /// The first broken invariant of a node's state machine, if any.
    pub invalid: Option<String>,
    /// A scan of every key through one member after the cluster settled.
    pub final_scan: Option<node_state::ScanPage>,
    /// Messages dropped, duplicated; crashes; partitions; joins; leaves.
    pub faults: Faults,
    /// When the faults stopped and when the run ended (virtual ms).
    pub settled_ms: (u64, u64),
}

/// The faults a run injected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Messages dropped.
    pub dropped: usize,
    /// Messages duplicated.
    pub duplicated: usize,
    /// Node crashes.
    pub crashes: usize,
    /// Partitions.
    pub partitions: usize,
    /// Nodes that joined.
    pub joins: usize,
    /// Nodes asked to leave.
    pub leaves: usize,
}

impl Faults {
    /// Every fault counted.
    pub fn total(&self) -> usize {
        self.dropped + self.duplicated + self.crashes + self.partitions + self.joins + self.leaves
    }
}

impl Node {
    /// Numbers a change of the store as the engine would, for the state machine's trees.
    fn commit(&mut self, key: &Key, before: Option<&Record>, after: Option<&Record>) {
        let digest = |record: &Record| entry_digest(key.as_bytes(), &codec::encode(record));
        self.commits += 1;
        self.committed.push(Input::Committed {
            seq: self.commits,
            changes: Some(vec![Change {
                key: key.clone(),
                before: before.map(digest),
                after: after.map(digest),
            }]),
        });
    }
}

/// One simulated node: the state machine and what its runtime keeps.
pub(crate) struct Node {
    pub(crate) id: NodeId,
    pub(crate) state: NodeState,
    pub(crate) store: BTreeMap<Key, Record>,
    /// The store's commits so far (what the runtime's engine numbers them by).
    commits: u64,
    /// Commits not yet told to the state machine.
    committed: Vec<Input>,
    hints: BTreeMap<u64, (NodeId, Key, Record)>,
    next_hint: u64,
    clock: HybridClock,
    skew_ms: i64,
    pub(crate) up: bool,
    /// It left the cluster and stopped.
    pub(crate) gone: bool,
    /// A leave was asked and has not ended.
    leaving: bool,
}

/// A message in flight, as the bytes of its wire frame: every simulated message goes through
/// the real wire encoding and decoding.
struct InFlight {
    at_ms: u64,
    from: usize,
    to: usize,
    frame: Vec<u8>,
}

/// A liveness change a node's failure detector will report.
struct Detection {
    at_ms: u64,
    observer: usize,
    member: usize,
    liveness: Liveness,
}

/// What a caller waits for.
enum Waiter {
    Client(usize),
    Leave(usize),
    Scan,
}

pub(crate) struct Sim {
    pub(crate) rng: Rng,
    pub(crate) now_ms: u64,
    pub(crate) nodes: Vec<Node>,
    network: Vec<InFlight>,
    detections: Vec<Detection>,
    cut: BTreeSet<(usize, usize)>,
    faults_on: bool,
    settings: Settings,
    calls: Vec<Call>,
    applied: Vec<Applied>,
    waiters: BTreeMap<Caller, Waiter>,
    next_caller: Caller,
    left: BTreeMap<NodeId, bool>,
    final_scan: Option<node_state::ScanPage>,
    invalid: Option<String>,
    faults: Faults,
    /// Nodes whose leave timed out, to ask again.
    leave_again: Vec<usize>,
    /// Bytes of anti-entropy messages sent: the fixed part of every comparison (bucket sums,
    /// an empty answer), and the rest (sub-leaves, bucket lists, repaired records).
    pub(crate) anti_entropy_bytes: [u64; 2],
    /// Adjusts every node's settings after [`node_settings`].
    tune: fn(&mut node_state::Settings),
}

impl Sim {
    pub(crate) fn new(seed: u64, settings: Settings) -> Self {
        Self::tuned(seed, settings, |_| {})
    }

    /// A simulation whose nodes' settings `tune` adjusts.
    pub(crate) fn tuned(
        seed: u64,
        settings: Settings,
        tune: fn(&mut node_state::Settings),
    ) -> Self {
        let mut sim = Self {
            tune,
            rng: Rng::new(seed),
            now_ms: 1_000_000,
            nodes: Vec::new(),
            network: Vec::new(),
            detections: Vec::new(),
            cut: BTreeSet::new(),
            faults_on: true,
            settings,
            calls: Vec::new(),
            applied: Vec::new(),
            waiters: BTreeMap::new(),
            next_caller: 1,
            left: BTreeMap::new(),
            final_scan: None,
            invalid: None,
            faults: Faults::default(),
            leave_again: Vec::new(),
            anti_entropy_bytes: [0; 2],
        };
        for _ in 0..sim.settings.nodes {
            sim.add_node();
        }
        // The initial members know each other from the start.
        for observer in 0..sim.nodes.len() {
            for member in 0..sim.nodes.len() {
                if observer != member {
                    sim.tell(observer, member, Liveness::Alive);
                }
            }
        }
        sim
    }

    /// A new node whose seeds are the current members; it has heard from none of them yet.
    fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let id = NodeId::new(format!("n{index}")).expect("valid id");
        let max = self.settings.max_skew_ms;
        let skew_ms = self.rng.below(2 * max + 1) as i64 - max as i64;
        let seeds: Vec<NodeId> = self.members();
        let mut settings = node_settings(id.clone(), &self.settings);
        (self.tune)(&mut settings);
        let now = self.now_ms.saturating_add_signed(skew_ms);
        self.nodes.push(Node {
            state: NodeState::new(settings, seeds, now),
            clock: HybridClock::new(id.clone(), 500),
            id,
            store: BTreeMap::new(),
            commits: 0,
            committed: Vec::new(),
            hints: BTreeMap::new(),
            next_hint: 1,
            skew_ms,
            up: true,
            gone: false,
            leaving: false,
        });
        index
    }

    /// The nodes that have not left.
    pub(crate) fn members(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| !n.gone)
            .map(|n| n.id.clone())
            .collect()
    }

    fn physical(&self, node: usize) -> u64 {
        self.now_ms.saturating_add_signed(self.nodes[node].skew_ms)
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == *id)
    }

    fn live(&self, node: usize) -> bool {
        self.nodes[node].up && !self.nodes[node].gone
    }

    fn cut_off(&self, a: usize, b: usize) -> bool {
        self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Feeds one input to a node and executes its effects, and the inputs they return, in
    /// order.
    pub(crate) fn step(&mut self, node: usize, input: Input) {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            if !self.live(node) {
                return;
            }
            let now = self.physical(node);
            let effects = self.nodes[node].state.step(input, now);
            if self.invalid.is_none()
                && let Err(broken) = self.nodes[node].state.validate()
            {
                self.invalid = Some(format!(
                    "{} at {}: {broken}",
                    self.nodes[node].id, self.now_ms
                ));
            }
            for effect in effects {
                if let Some(next) = self.execute(node, effect) {
                    queue.push_back(next);
                }
                queue.extend(self.nodes[node].committed.drain(..));
            }
        }
    }

    /// Executes one effect; returns the input it feeds back, if any.
    fn execute(&mut self, node: usize, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Send {
                to,
                message,
                deadline_ms,
            } => {
                let to = self.index_of(&to)?;
                self.send(node, to, message, deadline_ms);
                None
            }
            Effect::Apply {
                request,
                key,
                mutation,
            } => {
                let physical = self.physical(node);
                let n = &mut self.nodes[node];
                let result = record::apply(n.store.get(&key), &mutation, &mut n.clock, physical);
                if let Ok(record) = &result {
                    let before = n.store.insert(key.clone(), record.clone());
                    n.commit(&key, before.as_ref(), Some(record));
                    self.applied.push(Applied {
                        key,
                        mutation,
                        record: record.clone(),
                    });
                }
                let result = result.map_err(|e| LocalFailure::Storage(e.to_string()));
                Some(Input::Applied { request, result })
            }
            Effect::Read { request, key } => {
                let record = self.nodes[node].store.get(&key).cloned();
                Some(Input::LocalRead { request, record })
            }
            Effect::Merge {
                key,
                record,
                horizon_ms,
                ack,
            } => {
                let n = &mut self.nodes[node];
                match n.store.get_mut(&key) {
                    Some(stored) => {
                        let before = stored.clone();
                        stored.merge(&record);
                        let after = stored.clone();
                        if after != before {
                            n.commit(&key, Some(&before), Some(&after));
                        }
                    }
                    None if past_grace(&record, horizon_ms) => {}
                    None => {
                        n.commit(&key, None, Some(&record));
                        n.store.insert(key, record);
                    }
                }
                if let Some((to, request)) = ack {
                    let to = self.index_of(&to)?;
                    self.send(node, to, Message::Replicated { request }, 0);
                }
                None
            }
            Effect::ServeRead { to, request, key } => {
                let record = self.nodes[node].store.get(&key).cloned();
                let to = self.index_of(&to)?;
                self.send(node, to, Message::ReadReply { request, record }, 0);
                None
            }
            Effect::ServeScan {
                to,
                request,
                prefix,
                after,
                limit,
            } => {
                let entries = self.scan(node, &prefix, after.as_ref(), limit);
                let to = self.index_of(&to)?;
                self.send(node, to, Message::Scanned { request, entries }, 0);
                None
            }
            Effect::ScanLocal {
                request,
                prefix,
                after,
                limit,
            } => {
                let entries = self.scan(node, &prefix, after.as_ref(), limit);
                Some(Input::LocalPage { request, entries })
            }
            Effect::LoadRecords { job } => {
                let n = &self.nodes[node];
                let probe = MerkleTree::new(n.state.settings().fine_depth);
                let wanted = |key: &Key| {
                    job.buckets()
                        .is_none_or(|buckets| buckets.contains(&probe.bucket(key.as_bytes())))
                };
                let records = n
                    .store
                    .iter()
                    .filter(|(k, _)| wanted(k))
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect();
                let seq = n.commits;
                Some(Input::Records { job, seq, records })
            }
            Effect::Purge { key, record, .. } => {
                let n = &mut self.nodes[node];
                if n.store.get(&key) == Some(&record) {
                    n.store.remove(&key);
                    n.commit(&key, Some(&record), None);
                }
                None
            }
            Effect::StoreHint {
                node: target,
                key,
                record,
            } => {
                let n = &mut self.nodes[node];
                n.hints.insert(n.next_hint, (target, key, record));
                n.next_hint += 1;
                None
            }
            Effect::LoadHints { peer } => {
                let hints = self.nodes[node]
                    .hints
                    .iter()
                    .filter(|(_, (target, ..))| *target == peer)
                    .take(256)
                    .map(|(id, (_, key, record))| StoredHint {
                        id: *id,
                        key: key.clone(),
                        record: record.clone(),
                    })
                    .collect();
                Some(Input::Hints { peer, hints })
            }
            Effect::RemoveHint { id, .. } => {
                self.nodes[node].hints.remove(&id);
                None
            }
            Effect::Answer { caller, answer } => {
                self.answered(node, caller, answer);
                None
            }
            Effect::Left => {
                let n = &mut self.nodes[node];
                n.gone = true;
                n.leaving = false;
                // The membership protocol announces the leave: every member sees it down
                // (and never up again).
                self.detect_everywhere(node, Liveness::Dead);
                None
            }
            Effect::Placement { .. } | Effect::Observe(_) => None,
        }
    }

    fn answered(&mut self, node: usize, caller: Caller, answer: Answer) {
        match (self.waiters.remove(&caller), answer) {
            (Some(Waiter::Client(call)), Answer::Write(outcome) | Answer::Read(outcome)) => {
                self.calls[call].answer = Some((self.now_ms, outcome));
            }
            (Some(Waiter::Leave(_)), Answer::Leave(result)) => {
                if result.is_err() {
                    // Timed out: the node is a member again; ask again next tick.
                    self.nodes[node].leaving = false;
                    self.leave_again.push(node);
                } else {
                    self.left.insert(self.nodes[node].id.clone(), true);
                }
            }
            (Some(Waiter::Scan), Answer::Scan(page)) => self.final_scan = Some(page),
            (_, answer) => {
                if self.invalid.is_none() {
                    self.invalid = Some(format!("an answer nobody waits for: {answer:?}"));
                }
            }
        }
    }

    fn scan(
        &self,
        node: usize,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Vec<(Key, Record)> {
        self.nodes[node]
            .store
            .iter()
            .filter(|(k, _)| k.as_bytes().starts_with(prefix) && after.is_none_or(|a| *k > a))
            .take(limit)
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    fn send(&mut self, from: usize, to: usize, message: Message, deadline_ms: u64) {
        if self.faults_on && self.rng.chance(self.settings.loss) {
            self.faults.dropped += 1;
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.settings.duplication) {
            self.faults.duplicated += 1;
            2
        } else {
            1
        };
        // Each comparison's sums, and its answer when nothing differs, have a fixed size.
        let anti_entropy = match &message {
            Message::TreeLeaves { .. } => Some(0),
            Message::SubLeaves { buckets, .. } if buckets.is_empty() => Some(0),
            Message::SubLeaves { .. }
            | Message::Buckets { .. }
            | Message::Replicate { request: 0, .. } => Some(1),
            _ => None,
        };
        let mut envelope = wire::Envelope::new(message);
        envelope.deadline_ms = deadline_ms;
        let frame = wire::encode_frame(&envelope);
        if let Some(part) = anti_entropy {
            self.anti_entropy_bytes[part] += frame.len() as u64;
        }
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults_on { 40 } else { 5 });
            self.network.push(InFlight {
                at_ms: self.now_ms + delay,
                from,
                to,
                frame: frame.clone(),
            });
        }
    }

    fn deliver(&mut self, envelope: InFlight) {
        let InFlight {
            from, to, frame, ..
        } = envelope;
        if !self.live(to) || self.cut_off(from, to) {
            return;
        }
        let mut decoder = wire::FrameDecoder::new();
        decoder.push(&frame);
        let envelope = match decoder.next_envelope() {
            Ok(Some(envelope)) => envelope,
            other => panic!("a frame this simulator encoded does not decode: {other:?}"),
        };
        let from = self.nodes[from].id.clone();
        let input = Input::Received {
            from,
            message: envelope.message,
            deadline_ms: envelope.deadline_ms,
        };
        self.step(to, input);
    }

    /// `observer`'s failure detector will report `member` as `liveness` after a random delay.
    fn detect(&mut self, observer: usize, member: usize, liveness: Liveness) {
        let delay = 5 + self.rng.below(if self.faults_on { 100 } else { 10 });
        // The detector reports the latest state: an earlier report not yet made is moot.
        self.detections
            .retain(|d| (d.observer, d.member) != (observer, member));
        self.detections.push(Detection {
            at_ms: self.now_ms + delay,
            observer,
            member,
            liveness,
        });
    }

    fn tell(&mut self, observer: usize, member: usize, liveness: Liveness) {
        if self.nodes[member].gone && liveness != Liveness::Dead {
            return;
        }
        let member = self.nodes[member].id.clone();
        self.step(observer, Input::Liveness { member, liveness });
    }

    /// Every other node will learn how `member` is now.
    fn detect_everywhere(&mut self, member: usize, liveness: Liveness) {
        for observer in 0..self.nodes.len() {
            if observer != member {
                self.detect(observer, member, liveness);
            }
        }
    }

    fn issue(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.live(i)).collect();
        if up.is_empty() {
            return;
        }
        let node = up[self.rng.below(up.len() as u64) as usize];
        let which = self.rng.below(3);
        let register: Key = format!("reg:{which}").parse().expect("key");
        let counter: Key = format!("ctr:{which}").parse().expect("key");
        let op = match self.rng.below(7) {
            0 => Op::Put(register, format!("v{}", self.calls.len()).into_bytes()),
            // A heartbeat: it expires 0.3 to 1.5 s from now (while the faults go on).
            1 => Op::PutExpiring(
                register,
                format!("v{}", self.calls.len()).into_bytes(),
                self.now_ms + 300 + self.rng.below(1200),
            ),
            2 => Op::Delete(register),
            3 | 4 => Op::Increment(counter),
            _ => Op::Read(if self.rng.chance(50) {
                register
            } else {
                counter
            }),
        };
        let call = match op.clone() {
            Op::Put(key, value) => NodeCall::Write {
                key,
                mutation: Mutation::Put(value),
            },
            Op::PutExpiring(key, value, expires_at_ms) => NodeCall::Write {
                key,
                mutation: Mutation::PutExpiring {
                    value,
                    expires_at_ms,
                },
            },
            Op::Delete(key) => NodeCall::Write {
                key,
                mutation: Mutation::Delete,
            },
            Op::Increment(key) => NodeCall::Write {
                key,
                mutation: Mutation::PnCounterAdd(1),
            },
            Op::Read(key) => NodeCall::Read { key },
        };
        let caller = self.next_caller;
        self.next_caller += 1;
        self.waiters
            .insert(caller, Waiter::Client(self.calls.len()));
        self.calls.push(Call {
            op,
            issued_ms: self.now_ms,
            answer: None,
        });
        self.step(node, Input::Call { caller, call });
    }

    /// A crash loses the node's state machine (its in-flight requests); its store and hints
    /// are durable. A restart begins a new state machine whose seeds are the members.
    fn crash_or_restart(&mut self) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].gone)
            .collect();
        let node = candidates[self.rng.below(candidates.len() as u64) as usize];
        if self.nodes[node].up {
            self.faults.crashes += 1;
            self.nodes[node].up = false;
            self.nodes[node].committed.clear();
            self.waiters
                .retain(|_, w| !matches!(w, Waiter::Leave(n) if *n == node));
            self.detect_everywhere(node, Liveness::Dead);
        } else {
            self.restart(node);
        }
    }

    fn restart(&mut self, node: usize) {
        let seeds = self.members();
        let mut settings = node_settings(self.nodes[node].id.clone(), &self.settings);
        (self.tune)(&mut settings);
        let now = self.physical(node);
        let n = &mut self.nodes[node];
        n.state = NodeState::new(settings, seeds, now);
        n.up = true;
        let leaving = std::mem::take(&mut n.leaving);
        for other in 0..self.nodes.len() {
            if other != node && self.live(other) && !self.cut_off(node, other) {
                self.detect(node, other, Liveness::Alive);
            }
        }
        self.detect_everywhere(node, Liveness::Alive);
        if leaving {
            // The leave died with the process: ask again.
            self.leave(node);
        }
    }

    fn partition_or_heal(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.live(n)).collect();
        if self.cut.is_empty() {
            if live.is_empty() {
                return;
            }
            self.faults.partitions += 1;
            let isolated = live[self.rng.below(live.len() as u64) as usize];
            for other in (0..self.nodes.len()).filter(|&o| o != isolated) {
                self.cut.insert((isolated.min(other), isolated.max(other)));
                self.detect(other, isolated, Liveness::Dead);
                self.detect(isolated, other, Liveness::Dead);
            }
        } else {
            let cut = std::mem::take(&mut self.cut);
            for (a, b) in cut {
                self.detect(a, b, Liveness::Alive);
                self.detect(b, a, Liveness::Alive);
            }
        }
    }

    fn join(&mut self) {
        self.faults.joins += 1;
        let node = self.add_node();
        for other in 0..node {
            if self.live(other) && !self.cut_off(node, other) {
                self.detect(node, other, Liveness::Alive);
                self.detect(other, node, Liveness::Alive);
            }
        }
    }

    fn leave(&mut self, node: usize) {
        if !self.live(node) || self.nodes[node].leaving {
            return;
        }
        self.nodes[node].leaving = true;
        let caller = self.next_caller;
        self.next_caller += 1;
        self.waiters.insert(caller, Waiter::Leave(node));
        self.step(
            node,
            Input::Call {
                caller,
                call: NodeCall::Leave,
            },
        );
    }

    fn ask_to_leave(&mut self) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.live(n) && !self.nodes[n].leaving)
            .collect();
        if candidates.len() <= self.settings.replication {
            return;
        }
        self.faults.leaves += 1;
        let node = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.leave(node);
    }

    /// Advances virtual time by 1 ms: delivers due messages and detections; every 10 ms,
    /// ticks every node.
    pub(crate) fn tick(&mut self) {
        self.now_ms += 1;
        for node in std::mem::take(&mut self.leave_again) {
            self.leave(node);
        }
        let (due, later): (Vec<Detection>, Vec<Detection>) = std::mem::take(&mut self.detections)
            .into_iter()
            .partition(|d| d.at_ms <= self.now_ms);
        self.detections = later;
        for detection in due {
            self.tell(detection.observer, detection.member, detection.liveness);
        }
        let (due, later): (Vec<InFlight>, Vec<InFlight>) = std::mem::take(&mut self.network)
            .into_iter()
            .partition(|e| e.at_ms <= self.now_ms);
        self.network = later;
        // Delivery order among messages due together is random: reordering.
        let mut due = due;
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        for envelope in due {
            self.deliver(envelope);
        }
        // Nodes tick every 10 ms, as the runtime does.
        if self.now_ms.is_multiple_of(10) {
            for node in 0..self.nodes.len() {
                self.step(node, Input::Tick);
            }
        }
    }

    /// Faults stop: every node up, partitions healed, a reliable network, and every node's
    /// failure detector up to date.
    pub(crate) fn stop_faults(&mut self) {
        self.faults_on = false;
        self.cut.clear();
        for node in 0..self.nodes.len() {
            if !self.nodes[node].gone && !self.nodes[node].up {
                self.restart(node);
            }
        }
        for observer in 0..self.nodes.len() {
            for member in 0..self.nodes.len() {
                if observer != member && !self.nodes[member].gone {
                    self.detect(observer, member, Liveness::Alive);
                }
            }
        }
    }
}

/// Runs one simulation.
pub fn run(seed: u64, settings: Settings) -> Report {
    let mut sim = Sim::new(seed, settings.clone());
    let joins_at: BTreeSet<u64> = (0..settings.joins)
        .map(|_| sim.rng.below(settings.operations as u64))
        .collect();
    let leaves_at: BTreeSet<u64> = (0..settings.leaves)
        .map(|_| sim.rng.below(settings.operations as u64))
        .collect();
    for op in 0..settings.operations as u64 {
        sim.issue();
        let pause = 1 + sim.rng.below(20);
        for _ in 0..pause {
            sim.tick();
        }
        if joins_at.contains(&op) {
            sim.join();
        }
        if leaves_at.contains(&op) {
            sim.ask_to_leave();
        }
        if sim.rng.chance(8) {
            sim.crash_or_restart();
        }
        if sim.rng.chance(6) {
            sim.partition_or_heal();
        }
    }
    // Faults stop; the nodes' own hints, handoffs, anti-entropy rounds and collections settle
    // everything, past the tombstone grace period, for values that expire up to 1.5 s after
    // the last operation too.
    let settled = sim.now_ms;
    sim.stop_faults();
    for _ in 0..8_000 {
        sim.tick();
    }
    // One scan through a member must list every key the members hold.
    if let Some(node) = (0..sim.nodes.len()).find(|&n| sim.live(n)) {
        let caller = sim.next_caller;
        sim.next_caller += 1;
        sim.waiters.insert(caller, Waiter::Scan);
        let call = NodeCall::Scan {
            prefix: Vec::new(),
            after: None,
            limit: 1000,
        };
        sim.step(node, Input::Call { caller, call });
        for _ in 0..50 {
            sim.tick();
        }
    }
    let members = sim.members();
    for node in &sim.nodes {
        if node.gone {
            sim.left.entry(node.id.clone()).or_insert(true);
        }
    }
    Report {
        seed,
        settings,
        calls: sim.calls,
        applied: sim.applied,
        stores: sim.nodes.into_iter().map(|n| (n.id, n.store)).collect(),
        members,
        left: sim.left,
        invalid: sim.invalid,
        final_scan: sim.final_scan,
        faults: sim.faults,
        settled_ms: (settled, sim.now_ms),
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// What a passing run observed (reported, never hidden).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observations {
    /// Acknowledged LWW writes superseded by a concurrent write with a greater stamp (the one
    /// loss last-writer-wins allows).
    pub superseded_writes: usize,
    /// Acknowledged writes replaced by a later write that had seen them (not a loss).
    pub overwritten: usize,
    /// Operations that got no answer or a quorum failure (indeterminate).
    pub indeterminate: usize,
    /// Tombstones collected (keys deleted and gone from every replica).
    pub collected: usize,
    /// Keys whose last write expired and that are gone from every replica.
    pub expired_collected: usize,
}

/// Checks a run: no state machine broke an invariant; replicas converge and only replicas
/// hold a key; no acknowledged write is lost (except LWW supersession, counted) and no deleted
/// or expired value comes back; counters are exact; tombstones and expired values past the
/// grace period are collected; a
/// scan lists every key; and, when W + R > N, a read sees every write acknowledged before it
/// was issued.
pub fn check(report: &Report) -> Result<Observations, Violation> {
    let fail = |what: String| Err(Violation(format!("seed {}: {what}", report.seed)));
    if let Some(broken) = &report.invalid {
        return fail(format!(
            "a node's state machine broke an invariant: {broken}"
        ));
    }
    let ring = Ring::new(report.members.clone(), 32);
    let keys: BTreeSet<&Key> = report.calls.iter().map(|c| c.op.key()).collect();
    // Every key's replicas agree, and no other member holds it.
    let mut first: BTreeMap<Key, Record> = BTreeMap::new();
    for key in keys {
        let replicas = ring.replicas(key.as_bytes(), report.settings.replication);
        let held: Vec<Option<&Record>> =
            replicas.iter().map(|n| report.stores[n].get(key)).collect();
        if held.iter().any(|r| *r != held[0]) {
            return fail(format!(
                "the replicas {replicas:?} of {key} did not converge after healing: {held:?}"
            ));
        }
        for member in &report.members {
            if !replicas.contains(member) && report.stores[member].contains_key(key) {
                return fail(format!(
                    "{member} holds {key} but is not one of its replicas {replicas:?}"
                ));
            }
        }
        if let Some(record) = held[0] {
            first.insert(key.clone(), record.clone());
        }
    }
    let mut observations = Observations::default();
    let (settled, end) = report.settled_ms;
    let grace = node_settings(report.members[0].clone(), &report.settings).tombstone_grace_ms;
    for (key, record) in &first {
        // A tombstone, or a value that expired: dead since then. Stamps and expiries are
        // physical time, skewed by up to the largest skew.
        let Some(dead) = record.dead_since_ms() else {
            continue;
        };
        let old = dead + grace + report.settings.max_skew_ms + 1_000 < end;
        if old && dead < settled {
            return fail(format!(
                "{key} is dead (a tombstone or an expired value) past its grace period yet every \
                 replica still holds it"
            ));
        }
    }
    // What removes a value: a delete, or a write that expires (once it has, and is collected).
    let deletes: Vec<&Applied> = report
        .applied
        .iter()
        .filter(|a| matches!(a.mutation, Mutation::Delete | Mutation::PutExpiring { .. }))
        .collect();
    observations.collected = deletes
        .iter()
        .filter(|d| matches!(d.mutation, Mutation::Delete))
        .map(|d| &d.key)
        .collect::<BTreeSet<_>>()
        .iter()
        .filter(|k| !first.contains_key(**k))
        .count();
    // The last write of each key, by stamp: an expiring one that is gone everywhere was
    // collected.
    let mut last: BTreeMap<&Key, &Applied> = BTreeMap::new();
    for applied in &report.applied {
        let newer = last
            .get(&applied.key)
            .is_none_or(|seen| applied.record.stamp > seen.record.stamp);
        if newer {
            last.insert(&applied.key, applied);
        }
    }
    observations.expired_collected = last
        .values()
        .filter(|a| {
            matches!(a.mutation, Mutation::PutExpiring { .. }) && !first.contains_key(&a.key)
        })
        .count();
    // No value outlives a delete that was applied after it: the tombstone wins everywhere,
    // and collecting it must not bring the value back.
    for (key, record) in &first {
        if let Value::Register(Some(_)) = record.value
            && !record.expired(end)
            && let Some(delete) = deletes
                .iter()
                .find(|d| d.key == *key && d.record.stamp > record.stamp)
        {
            return fail(format!(
                "{key} holds a value stamped {:?}, older than an applied delete stamped {:?}: \
                 a deleted value came back",
                record.stamp, delete.record.stamp
            ));
        }
    }
    let mut acked_increments: BTreeMap<&Key, i64> = BTreeMap::new();
    for call in &report.calls {
        let answer = call.answer.as_ref().map(|(_, outcome)| outcome);
        let acked = matches!(answer, Some(Outcome::Written { .. } | Outcome::Read { .. }));
        if !acked {
            observations.indeterminate += 1;
        }
        match (&call.op, answer) {
            (Op::Increment(key), Some(Outcome::Written { .. })) => {
                *acked_increments.entry(key).or_default() += 1
            }
            (
                Op::Put(key, value) | Op::PutExpiring(key, value, _),
                Some(Outcome::Written { record }),
            ) => {
                match first.get(key) {
                    Some(stored) if stored.value == Value::Register(Some(value.clone())) => {}
                    Some(stored) if stored.stamp > record.stamp => {
                        // Overwritten: by a write that saw this one (a normal overwrite), or by
                        // a concurrent one that won on its timestamp (LWW's only loss, counted).
                        match report
                            .applied
                            .iter()
                            .find(|a| a.record.stamp == stored.stamp)
                        {
                            Some(winner) if winner.record.version.dominates(&record.version) => {
                                observations.overwritten += 1
                            }
                            Some(_) => observations.superseded_writes += 1,
                            None => return fail(format!("{key} holds a value no client wrote")),
                        }
                    }
                    None if deletes
                        .iter()
                        .any(|d| d.key == *key && d.record.stamp > record.stamp) =>
                    {
                        // Deleted later, and the tombstone collected.
                        observations.overwritten += 1
                    }
                    // It expired, and was collected.
                    None if record.expires_at_ms.is_some() => observations.overwritten += 1,
                    _ => {
                        return fail(format!(
                            "acknowledged write {value:?} to {key} is lost, and nothing newer \
                             replaced it"
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    let mut applied_increments: BTreeMap<&Key, i64> = BTreeMap::new();
    for applied in &report.applied {
        if let Mutation::PnCounterAdd(n) = applied.mutation {
            *applied_increments.entry(&applied.key).or_default() += n;
        }
    }
    for (key, acked) in &acked_increments {
        let applied = applied_increments.get(key).copied().unwrap_or(0);
        if applied < *acked {
            return fail(format!(
                "{acked} increments of {key} were acknowledged but {applied} applied"
            ));
        }
    }
    for (key, expected) in applied_increments {
        let value = match first.get(key).map(|r| &r.value) {
            Some(Value::PnCounter(counter)) => counter.value(),
            _ => 0,
        };
        if value != expected {
            return fail(format!(
                "counter {key} is {value}, but {expected} increments were applied"
            ));
        }
    }
    match &report.final_scan {
        Some(page) => {
            let listed: BTreeSet<&Key> = page.entries.iter().map(|(k, _)| k).collect();
            let held: BTreeSet<&Key> = first.keys().collect();
            if listed != held || !page.unanswered.is_empty() {
                return fail(format!(
                    "a scan after healing listed {listed:?} (unanswered {:?}), the replicas \
                     hold {held:?}",
                    page.unanswered
                ));
            }
        }
        None => return fail("the scan after healing was never answered".into()),
    }
    if report.settings.w + report.settings.r > report.settings.replication
        && report.faults.joins + report.faults.leaves == 0
    {
        check_reads_see_acknowledged_writes(report)?;
    }
    Ok(observations)
}

/// With W + R > N and fixed membership, a read sees every write acknowledged before it began.
/// (While members join or leave, placement differs between nodes for a while, and quorums of
/// different placements need not meet: the documented guarantee is for a stable membership.)
fn check_reads_see_acknowledged_writes(report: &Report) -> Result<(), Violation> {
    for read in &report.calls {
        let (Op::Read(key), Some((_, Outcome::Read { record }))) = (&read.op, &read.answer) else {
            continue;
        };
        for write in &report.calls {
            let (Op::Put(k, _) | Op::Delete(k) | Op::Increment(k)) = &write.op else {
                continue;
            };
            let Some((answered, Outcome::Written { record: written })) = &write.answer else {
                continue;
            };
            if k == key && *answered < read.issued_ms {
                let seen = record
                    .as_ref()
                    .is_some_and(|r| r.version.dominates(&written.version));
                if !seen {
                    return Err(Violation(format!(
                        "seed {}: a read of {key} missed a write acknowledged before it began \
                         (W+R>N)",
                        report.seed
                    )));
                }
            }
        }
    }
    Ok(())
}
