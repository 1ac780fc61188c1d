//! A seeded, deterministic simulator for agentstore's replication protocol.
//!
//! It runs the real [`Coordinator`] of every node (the same code a node runtime runs) and plays
//! the runtime's part itself: each node has an in-memory store that applies records with the
//! same `record::apply` as every engine, durable hints, and a physical clock skewed by up to
//! ±300 ms. Messages cross an in-memory network that drops, duplicates, delays and reorders
//! them; nodes crash (losing their in-flight requests, keeping their store and hints) and
//! restart; partitions cut the cluster and heal. After the faults stop, hinted handoff and a
//! Merkle-tree anti-entropy pass run, and [`check`] verifies the invariants.
//!
//! Everything random comes from one seed, so a failing seed replays exactly.

pub mod causal;
mod rng;

use std::collections::{BTreeMap, BTreeSet};

use agentstore_core::crdt::Crdt;
use agentstore_core::merkle::{MerkleTree, entry_digest};
use agentstore_core::placement::Ring;
use agentstore_core::record::{self, Mutation, Record, Value};
use agentstore_core::replication::{
    Coordinator, Effect, HINT_REQUEST_BIT, Input, LocalFailure, Message, Outcome, RequestId,
};
use agentstore_core::{HybridClock, Key, NodeId, codec};
use agentstore_wire as wire;

pub use rng::Rng;

/// The cluster and its faults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Nodes.
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
}

impl Settings {
    /// The settings a seed picks: 3 or 5 nodes, N = 3, W and R from {1, 2, 3}, moderate faults.
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
        }
    }
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a unique value to a register key.
    Put(Key, Vec<u8>),
    /// Add 1 to a counter key.
    Increment(Key),
    /// Read a key.
    Read(Key),
}

/// One client operation and what became of it.
#[derive(Debug, Clone)]
pub struct Call {
    /// The operation.
    pub op: Op,
    /// When it was issued (virtual ms).
    pub issued_ms: u64,
    /// When it was answered, and the answer (`None`: no answer, its coordinator crashed).
    pub answer: Option<(u64, Outcome)>,
    /// Whether the coordinator applied it to its durable store (writes only): an applied
    /// write exists even if the client got no answer.
    pub applied: Option<Record>,
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
    /// Each node's store at the end.
    pub stores: Vec<BTreeMap<Key, Record>>,
    /// The replicas (node indexes) of every key the run used.
    pub replicas: BTreeMap<Key, Vec<usize>>,
    /// Messages dropped, duplicated; crashes; partitions.
    pub faults: (usize, usize, usize, usize),
}

struct Node {
    id: NodeId,
    store: BTreeMap<Key, Record>,
    hints: Vec<(u64, NodeId, Key, Record)>,
    clock: HybridClock,
    skew_ms: i64,
    coordinator: Coordinator,
    up: bool,
}

/// A message in flight, as the bytes of its wire frame: every simulated message goes through
/// the real wire encoding and decoding.
struct Envelope {
    at_ms: u64,
    from: usize,
    to: usize,
    frame: Vec<u8>,
}

struct Sim {
    rng: Rng,
    now_ms: u64,
    nodes: Vec<Node>,
    network: Vec<Envelope>,
    cut: BTreeSet<(usize, usize)>,
    faults_on: bool,
    settings: Settings,
    ring: Ring,
    /// What each request in flight asked, to forward it if it reached a non-replica.
    inputs: BTreeMap<RequestId, Input>,
    calls: Vec<Call>,
    /// Request id → (coordinating node, call index).
    requests: BTreeMap<RequestId, (usize, usize)>,
    next_request: RequestId,
    next_hint: u64,
    faults: (usize, usize, usize, usize),
}

impl Sim {
    fn new(seed: u64, settings: Settings) -> Self {
        let mut rng = Rng::new(seed);
        let nodes = (0..settings.nodes)
            .map(|i| {
                let id = NodeId::new(format!("n{i}")).expect("valid id");
                let skew_ms =
                    rng.below(2 * settings.max_skew_ms + 1) as i64 - settings.max_skew_ms as i64;
                Node {
                    clock: HybridClock::new(id.clone(), 500),
                    coordinator: Coordinator::new(id.clone()),
                    id,
                    store: BTreeMap::new(),
                    hints: Vec::new(),
                    skew_ms,
                    up: true,
                }
            })
            .collect::<Vec<Node>>();
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
        Self {
            rng,
            now_ms: 1_000_000,
            nodes,
            network: Vec::new(),
            cut: BTreeSet::new(),
            faults_on: true,
            ring: Ring::new(ids, 32),
            inputs: BTreeMap::new(),
            settings,
            calls: Vec::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            next_hint: 1,
            faults: (0, 0, 0, 0),
        }
    }

    fn physical(&self, node: usize) -> u64 {
        self.now_ms.saturating_add_signed(self.nodes[node].skew_ms)
    }

    fn replicas(&self, key: &Key) -> Vec<NodeId> {
        self.ring
            .replicas(key.as_bytes(), self.settings.replication)
    }

    fn index_of(&self, id: &NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == *id)
            .expect("a known node")
    }

    fn send(&mut self, from: usize, to: usize, message: Message) {
        if self.faults_on && self.rng.chance(self.settings.loss) {
            self.faults.0 += 1;
            return;
        }
        let copies = if self.faults_on && self.rng.chance(self.settings.duplication) {
            self.faults.1 += 1;
            2
        } else {
            1
        };
        let frame = wire::encode_frame(&wire::Envelope::new(message));
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults_on { 40 } else { 5 });
            self.network.push(Envelope {
                at_ms: self.now_ms + delay,
                from,
                to,
                frame: frame.clone(),
            });
        }
    }

    /// Runs a node's coordinator on one input, then executes its effects.
    fn step(&mut self, node: usize, input: Input) {
        let now = self.now_ms;
        let effects = self.nodes[node].coordinator.step(input, now);
        for effect in effects {
            self.execute(node, effect);
        }
    }

    fn execute(&mut self, node: usize, effect: Effect) {
        match effect {
            Effect::ApplyLocal {
                request,
                key,
                mutation,
            } => {
                let physical = self.physical(node);
                let n = &mut self.nodes[node];
                let result = record::apply(n.store.get(&key), &mutation, &mut n.clock, physical);
                if let Ok(record) = &result {
                    n.store.insert(key, record.clone());
                    if let Some((_, call)) = self.requests.get(&request) {
                        self.calls[*call].applied = Some(record.clone());
                    }
                }
                self.step(
                    node,
                    Input::LocalApplied {
                        request,
                        result: result.map_err(|e| LocalFailure::Storage(e.to_string())),
                    },
                );
            }
            Effect::ReadLocal { request, key } => {
                let record = self.nodes[node].store.get(&key).cloned();
                self.step(node, Input::LocalRead { request, record });
            }
            Effect::MergeLocal { key, record } => self.merge(node, key, &record),
            Effect::Send { to, message } => {
                let to = self.index_of(&to);
                self.send(node, to, message);
            }
            Effect::Hint {
                node: target,
                key,
                record,
            } => {
                let id = self.next_hint;
                self.next_hint += 1;
                self.nodes[node].hints.push((id, target, key, record));
            }
            Effect::Reply {
                request,
                outcome: Outcome::NotAReplica { replicas },
            } => {
                // What a node runtime does: forward the write to a replica that is up.
                let target = replicas
                    .iter()
                    .map(|id| self.index_of(id))
                    .find(|&i| self.nodes[i].up);
                let (Some(target), Some(input)) = (target, self.inputs.get(&request).cloned())
                else {
                    return;
                };
                if let Some(entry) = self.requests.get_mut(&request) {
                    entry.0 = target;
                }
                self.step(target, input);
            }
            Effect::Reply { request, outcome } => {
                self.inputs.remove(&request);
                if let Some((_, call)) = self.requests.remove(&request) {
                    self.calls[call].answer = Some((self.now_ms, outcome));
                }
            }
        }
    }

    fn merge(&mut self, node: usize, key: Key, record: &Record) {
        let n = &mut self.nodes[node];
        let merged = match n.store.get(&key) {
            Some(current) => {
                let mut merged = current.clone();
                merged.merge(record);
                merged
            }
            None => record.clone(),
        };
        n.store.insert(key, merged);
    }

    /// A replica's own duties when a message arrives.
    fn deliver(&mut self, envelope: Envelope) {
        let Envelope {
            from, to, frame, ..
        } = envelope;
        let mut decoder = wire::FrameDecoder::new();
        decoder.push(&frame);
        let message = match decoder.next_envelope() {
            Ok(Some(envelope)) => envelope.message,
            other => panic!("a frame this simulator encoded does not decode: {other:?}"),
        };
        if !self.nodes[to].up || self.cut.contains(&(from.min(to), from.max(to))) {
            return;
        }
        match message {
            Message::Replicate {
                request,
                key,
                record,
            } => {
                self.merge(to, key, &record);
                if request != 0 {
                    self.send(to, from, Message::Replicated { request });
                }
            }
            Message::Read { request, key } => {
                let record = self.nodes[to].store.get(&key).cloned();
                self.send(to, from, Message::ReadReply { request, record });
            }
            Message::Replicated { request } if request & HINT_REQUEST_BIT != 0 => {
                self.nodes[to]
                    .hints
                    .retain(|(id, ..)| *id != request & !HINT_REQUEST_BIT);
            }
            message => {
                let from = self.nodes[from].id.clone();
                self.step(to, Input::Received { from, message });
            }
        }
    }

    fn issue(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect();
        if up.is_empty() {
            return;
        }
        let node = up[self.rng.below(up.len() as u64) as usize];
        let which = self.rng.below(3);
        let op = match self.rng.below(3) {
            0 => Op::Put(
                format!("reg:{which}").parse().expect("key"),
                format!("v{}", self.calls.len()).into_bytes(),
            ),
            1 => Op::Increment(format!("ctr:{which}").parse().expect("key")),
            _ => Op::Read(
                format!(
                    "{}:{which}",
                    if self.rng.chance(50) { "reg" } else { "ctr" }
                )
                .parse()
                .expect("key"),
            ),
        };
        let request = self.next_request;
        self.next_request += 1;
        self.requests.insert(request, (node, self.calls.len()));
        self.calls.push(Call {
            op: op.clone(),
            issued_ms: self.now_ms,
            answer: None,
            applied: None,
        });
        let deadline_ms = self.now_ms + 200;
        let key = match &op {
            Op::Put(key, _) | Op::Increment(key) | Op::Read(key) => key.clone(),
        };
        let replicas = self.replicas(&key);
        let input = match op {
            Op::Put(key, value) => Input::Write {
                request,
                key,
                mutation: Mutation::Put(value),
                replicas,
                w: self.settings.w,
                deadline_ms,
            },
            Op::Increment(key) => Input::Write {
                request,
                key,
                mutation: Mutation::PnCounterAdd(1),
                replicas,
                w: self.settings.w,
                deadline_ms,
            },
            Op::Read(key) => Input::Read {
                request,
                key,
                replicas,
                r: self.settings.r,
                deadline_ms,
            },
        };
        self.inputs.insert(request, input.clone());
        self.step(node, input);
    }

    fn crash_or_restart(&mut self) {
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        if self.nodes[node].up {
            self.faults.2 += 1;
            self.nodes[node].up = false;
            // In-flight requests die with the process; the store and hints are durable.
            self.nodes[node].coordinator = Coordinator::new(self.nodes[node].id.clone());
            self.requests
                .retain(|_, (coordinator, _)| *coordinator != node);
            let requests = &self.requests;
            self.inputs.retain(|id, _| requests.contains_key(id));
        } else {
            self.nodes[node].up = true;
        }
    }

    fn partition_or_heal(&mut self) {
        if self.cut.is_empty() {
            self.faults.3 += 1;
            let isolated = self.rng.below(self.nodes.len() as u64) as usize;
            for other in (0..self.nodes.len()).filter(|&o| o != isolated) {
                self.cut.insert((isolated.min(other), isolated.max(other)));
            }
        } else {
            self.cut.clear();
        }
    }

    fn deliver_hints(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect();
        for node in up {
            let hints = self.nodes[node].hints.clone();
            for (id, target, key, record) in hints {
                let to = self.index_of(&target);
                self.send(
                    node,
                    to,
                    Message::Replicate {
                        request: id | HINT_REQUEST_BIT,
                        key,
                        record,
                    },
                );
            }
        }
    }

    /// Advances virtual time by 1 ms: delivers due messages, fires deadlines.
    fn tick(&mut self) {
        self.now_ms += 1;
        let (due, later): (Vec<Envelope>, Vec<Envelope>) = std::mem::take(&mut self.network)
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
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect();
        for node in up {
            self.step(node, Input::Tick);
        }
        if self.now_ms.is_multiple_of(50) {
            self.deliver_hints();
        }
    }

    /// Merkle-tree anti-entropy between every pair: exchange only the differing buckets.
    /// Merkle-tree anti-entropy between every pair of nodes, over the keys they both
    /// replicate: only the keys of differing buckets are exchanged.
    fn anti_entropy(&mut self) {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a == b {
                    continue;
                }
                let (id_a, id_b) = (self.nodes[a].id.clone(), self.nodes[b].id.clone());
                let shared = |store: &BTreeMap<Key, Record>| -> BTreeMap<Key, Record> {
                    store
                        .iter()
                        .filter(|(k, _)| {
                            let replicas = self.replicas(k);
                            replicas.contains(&id_a) && replicas.contains(&id_b)
                        })
                        .map(|(k, r)| (k.clone(), r.clone()))
                        .collect()
                };
                let (ours, theirs) = (shared(&self.nodes[a].store), shared(&self.nodes[b].store));
                let (ta, tb) = (tree(&ours), tree(&theirs));
                let buckets: BTreeSet<usize> = ta.diff(&tb).into_iter().collect();
                for (key, record) in ours
                    .into_iter()
                    .filter(|(k, _)| buckets.contains(&ta.bucket(k.as_bytes())))
                {
                    self.merge(b, key, &record);
                }
            }
        }
    }
}

fn tree(store: &BTreeMap<Key, Record>) -> MerkleTree {
    let mut tree = MerkleTree::new(4);
    for (key, record) in store {
        tree.insert(
            key.as_bytes(),
            entry_digest(key.as_bytes(), &codec::encode(record)),
        );
    }
    tree
}

/// Runs one simulation.
pub fn run(seed: u64, settings: Settings) -> Report {
    let mut sim = Sim::new(seed, settings.clone());
    for _ in 0..settings.operations {
        sim.issue();
        let pause = 1 + sim.rng.below(20);
        for _ in 0..pause {
            sim.tick();
        }
        if sim.rng.chance(8) {
            sim.crash_or_restart();
        }
        if sim.rng.chance(6) {
            sim.partition_or_heal();
        }
    }
    // Faults stop: everyone up, the partition heals, the network becomes reliable; hints,
    // in-flight requests and anti-entropy settle everything.
    sim.faults_on = false;
    sim.cut.clear();
    for node in &mut sim.nodes {
        node.up = true;
    }
    for _ in 0..1_000 {
        sim.tick();
    }
    sim.anti_entropy();
    let keys: BTreeSet<Key> = sim
        .calls
        .iter()
        .map(|c| match &c.op {
            Op::Put(key, _) | Op::Increment(key) | Op::Read(key) => key.clone(),
        })
        .collect();
    let replicas = keys
        .into_iter()
        .map(|key| {
            let nodes = sim
                .replicas(&key)
                .iter()
                .map(|id| sim.index_of(id))
                .collect();
            (key, nodes)
        })
        .collect();
    Report {
        seed,
        replicas,
        settings,
        calls: sim.calls,
        stores: sim.nodes.into_iter().map(|n| n.store).collect(),
        faults: sim.faults,
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
}

/// Checks a run: convergence, no acknowledged write lost (except LWW supersession, counted),
/// exact counters, and, when W + R > N, that a read sees every write acknowledged before it
/// was issued.
pub fn check(report: &Report) -> Result<Observations, Violation> {
    let fail = |what: String| Err(Violation(format!("seed {}: {what}", report.seed)));
    // Every key's replicas agree, and no other node holds it.
    let mut first: BTreeMap<Key, Record> = BTreeMap::new();
    for (key, nodes) in &report.replicas {
        let held: Vec<Option<&Record>> = nodes.iter().map(|&n| report.stores[n].get(key)).collect();
        if held.iter().any(|r| *r != held[0]) {
            return fail(format!(
                "the replicas {nodes:?} of {key} did not converge after healing"
            ));
        }
        for (n, store) in report.stores.iter().enumerate() {
            if !nodes.contains(&n) && store.contains_key(key) {
                return fail(format!(
                    "node {n} holds {key} but is not one of its replicas {nodes:?}"
                ));
            }
        }
        if let Some(record) = held[0] {
            first.insert(key.clone(), record.clone());
        }
    }
    let first = &first;
    let mut observations = Observations::default();
    let mut applied_increments: BTreeMap<&Key, i64> = BTreeMap::new();
    for call in &report.calls {
        let acked = matches!(
            call.answer,
            Some((_, Outcome::Written { .. } | Outcome::Read { .. }))
        );
        if !acked {
            observations.indeterminate += 1;
        }
        match &call.op {
            Op::Increment(key) => {
                if call.applied.is_some() {
                    *applied_increments.entry(key).or_default() += 1;
                }
                if acked && call.applied.is_none() {
                    return fail(format!(
                        "an increment of {key} was acknowledged but never applied"
                    ));
                }
            }
            Op::Put(key, value) if acked => {
                let Some(Outcome::Written { record }) = call.answer.as_ref().map(|(_, o)| o) else {
                    continue;
                };
                let Some(stored) = first.get(key) else {
                    return fail(format!(
                        "acknowledged write to {key} is lost: the key is gone"
                    ));
                };
                if stored.value == Value::Register(Some(value.clone())) {
                    continue;
                }
                if stored.stamp > record.stamp {
                    // Overwritten: by a write that saw this one (a normal overwrite), or by a
                    // concurrent one that won on its timestamp (LWW's only loss, counted).
                    let winner = report
                        .calls
                        .iter()
                        .filter_map(|c| c.applied.as_ref())
                        .find(|r| r.stamp == stored.stamp);
                    match winner {
                        Some(winner) if winner.version.dominates(&record.version) => {
                            observations.overwritten += 1
                        }
                        Some(_) => observations.superseded_writes += 1,
                        None => return fail(format!("{key} holds a value no client wrote")),
                    }
                } else {
                    return fail(format!(
                        "acknowledged write {value:?} to {key} is lost, and nothing newer replaced it"
                    ));
                }
            }
            _ => {}
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
    if report.settings.w + report.settings.r > report.settings.replication {
        for read in &report.calls {
            let (Op::Read(key), Some((_, Outcome::Read { record }))) = (&read.op, &read.answer)
            else {
                continue;
            };
            for write in &report.calls {
                let (Op::Put(k, _) | Op::Increment(k)) = &write.op else {
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
                        return fail(format!(
                            "a read of {key} missed a write acknowledged before it began (W+R>N)"
                        ));
                    }
                }
            }
        }
    }
    Ok(observations)
}
