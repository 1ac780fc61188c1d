//! Causal replication under faults, deterministic: the real causal delivery
//! ([`agentstore_core::causal::Delivery`]), session rule ([`causal::covers`]) and replicator
//! ([`agentstore_core::causal_sync::Replicator`]: pushes, pulls, snapshots, trimming) of every
//! node, over an in-memory network that drops, duplicates, delays and reorders messages (through
//! the real wire encoding) and partitions the cluster; nodes crash (losing their buffer and
//! what is in flight, keeping what they committed) and restart; physical clocks are skewed.
//!
//! Sessions move between nodes at random; a node that has not caught up with a session's
//! token makes it wait (it tries again later, elsewhere). Most operations read and write LWW
//! registers (unique values, for the causal checker); some add to a PN-counter key, whose
//! concurrent additions converge by the counter's merge. The report holds each session's
//! history for the causal checker, the sum of every addition made, and every node's final
//! state.

use std::collections::BTreeMap;

use agentstore_check::causal::CausalOp;
use agentstore_core::causal::{self, CausalWrite, Delivery, Offered};
use agentstore_core::causal_sync::{self as sync, Replicator};
use agentstore_core::crdt::Crdt;
use agentstore_core::record::{self, Mutation, Record, Value};
use agentstore_core::replication::Message;
use agentstore_core::{HybridClock, Key, NodeId, VersionVector};
use agentstore_wire as wire;

use crate::Rng;

/// One operation of a session, as the causal checker reads it.
pub type Op = CausalOp<String, String>;

/// The cluster, its sessions and its faults.
#[derive(Debug, Clone)]
pub struct CausalSettings {
    /// Nodes (every one holds every key).
    pub nodes: usize,
    /// Client sessions.
    pub sessions: usize,
    /// Operations issued in all.
    pub operations: usize,
    /// Keys written and read.
    pub keys: usize,
    /// Percent of messages dropped while faults are on.
    pub loss: u64,
    /// Percent of messages duplicated while faults are on.
    pub duplication: u64,
    /// Largest network delay, in ms (messages overtake each other).
    pub max_delay_ms: u64,
    /// Largest clock skew of a node, in ms.
    pub max_skew_ms: u64,
    /// Remote writes a node buffers at most (small, so back-pressure happens).
    pub buffer: usize,
}

impl CausalSettings {
    /// The settings a seed picks: 3 to 5 nodes, 3 to 6 sessions, moderate faults.
    pub fn for_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0xca05_a1e5);
        Self {
            nodes: 3 + rng.below(3) as usize,
            sessions: 3 + rng.below(4) as usize,
            operations: 200,
            keys: 2 + rng.below(3) as usize,
            loss: rng.below(20),
            duplication: rng.below(10),
            max_delay_ms: 5 + rng.below(60),
            max_skew_ms: 300,
            buffer: 4 + rng.below(12) as usize,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalReport {
    /// Each session's operations, in the order it issued them (values are unique).
    pub histories: Vec<Vec<Op>>,
    /// Each node's applied vector at the end.
    pub applied: Vec<VersionVector>,
    /// Each node's records at the end.
    pub stores: Vec<BTreeMap<Key, Record>>,
    /// Writes each node made.
    pub made: Vec<u64>,
    /// The counter key, and the sum of every addition made to it.
    pub counted: (Key, i64),
    /// Times a session found a node behind its token and went elsewhere.
    pub session_waits: usize,
    /// Remote writes refused by a full buffer (pulled again later).
    pub refused: usize,
    /// Faults injected: messages dropped, duplicated, partitions, crashes.
    pub faults: (usize, usize, usize, usize),
    /// Snapshots sent to peers that lacked writes already trimmed from every log.
    pub snapshots: usize,
    /// The first broken invariant of a node's replicator, if any.
    pub invalid: Option<String>,
}

struct SimNode {
    id: NodeId,
    clock: HybridClock,
    skew: i64,
    delivery: Delivery,
    /// Committed state: records, log (by origin and seq), survives a crash.
    records: BTreeMap<Key, Record>,
    log: BTreeMap<(NodeId, u64), CausalWrite>,
    /// How far the log was trimmed (durable with it).
    trimmed: VersionVector,
    /// The replicator's state: lost in a crash.
    replicator: Replicator,
    up: bool,
}

/// Small bounds, so catching up takes several rounds and trimmed logs need snapshots.
fn limits() -> sync::Limits {
    sync::Limits {
        max_catch_up: 16,
        max_per_message: 8,
        snapshot_again_ms: 200,
        max_snapshot_records: 10_000,
    }
}

impl SimNode {
    fn physical(&self, now: u64) -> u64 {
        (1_000_000 + now as i64 + self.skew) as u64
    }

    fn store(&mut self, write: &CausalWrite, now: u64) {
        self.merge(&write.entries, now);
        self.log
            .insert((write.origin.clone(), write.seq), write.clone());
    }

    fn merge(&mut self, entries: &[(Key, Record)], now: u64) {
        for (key, remote) in entries {
            let merged = match self.records.get(key) {
                Some(current) => {
                    let mut merged = current.clone();
                    merged.merge(remote);
                    merged
                }
                None => remote.clone(),
            };
            let physical = self.physical(now);
            let _ = self.clock.observe(&merged.stamp, physical);
            self.records.insert(key.clone(), merged);
        }
    }
}

struct InFlight {
    at: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

struct Sim {
    rng: Rng,
    settings: CausalSettings,
    nodes: Vec<SimNode>,
    network: Vec<InFlight>,
    /// Which side of a partition each node is on (all 0: no partition).
    side: Vec<u8>,
    faults_on: bool,
    refused: usize,
    faults: (usize, usize, usize, usize),
    snapshots: usize,
    invalid: Option<String>,
}

impl Sim {
    /// Feeds node `at`'s replicator one input and executes its effects, and the inputs they
    /// return, in order.
    fn step(&mut self, now: u64, at: usize, input: sync::Input) {
        let mut queue = std::collections::VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let node = &mut self.nodes[at];
            let applied = node.delivery.applied().clone();
            let effects = node.replicator.step(input, &applied, node.physical(now));
            if let Err(broken) = node.replicator.validate() {
                self.invalid.get_or_insert(format!("{}: {broken}", node.id));
            }
            for effect in effects {
                if let Some(next) = self.execute(now, at, effect) {
                    queue.push_back(next);
                }
            }
        }
    }

    fn execute(&mut self, now: u64, at: usize, effect: sync::Effect) -> Option<sync::Input> {
        match effect {
            sync::Effect::Send { to, message } => {
                let to = self.index_of(&to);
                self.send(now, at, to, message);
                None
            }
            sync::Effect::SendSnapshot { to, chunks } => {
                let to = self.index_of(&to);
                for chunk in chunks {
                    self.send(now, at, to, chunk);
                }
                None
            }
            sync::Effect::ReadLog {
                peer,
                wanted,
                limit,
            } => {
                let node = &self.nodes[at];
                let trimmed = wanted
                    .iter()
                    .any(|(origin, first, _)| node.trimmed.get(origin) >= *first);
                let read = if trimmed {
                    sync::LogRead::Trimmed
                } else {
                    let writes = wanted
                        .iter()
                        .flat_map(|(origin, first, last)| {
                            (*first..=*last)
                                .filter_map(|seq| node.log.get(&(origin.clone(), seq)))
                                .take(limit)
                        })
                        .cloned()
                        .collect();
                    sync::LogRead::Writes(writes)
                };
                Some(sync::Input::LogRead { peer, read })
            }
            sync::Effect::LoadSnapshot { peer } => {
                let node = &self.nodes[at];
                Some(sync::Input::SnapshotLoaded {
                    peer,
                    applied: node.delivery.applied().clone(),
                    records: node
                        .records
                        .iter()
                        .map(|(k, r)| (k.clone(), r.clone()))
                        .collect(),
                })
            }
            sync::Effect::Deliver { writes } => {
                let node = &mut self.nodes[at];
                for write in writes {
                    if node.delivery.offer(write, now) == Offered::Full {
                        self.refused += 1;
                    }
                    for delivered in node.delivery.take_ready(now) {
                        node.store(&delivered.write, now);
                    }
                }
                None
            }
            sync::Effect::ApplySnapshot { entries, applied } => {
                let node = &mut self.nodes[at];
                // Both states are causally closed, so their join is too.
                node.merge(&entries, now);
                node.delivery.absorb(&applied);
                for delivered in node.delivery.take_ready(now) {
                    node.store(&delivered.write, now);
                }
                // The snapshot's writes are not in this log: a peer that lacks them gets a
                // snapshot from here too.
                node.trimmed.merge(&applied);
                None
            }
            sync::Effect::Trim { floor } => {
                let node = &mut self.nodes[at];
                node.log.retain(|(origin, seq), _| *seq > floor.get(origin));
                node.trimmed.merge(&floor);
                None
            }
            sync::Effect::Observe(sync::Observation::SnapshotSent { .. }) => {
                self.snapshots += 1;
                None
            }
            sync::Effect::Observe(_) => None,
        }
    }

    fn index_of(&self, id: &NodeId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == *id)
            .expect("a member")
    }

    /// Everyone but node `at`.
    fn others(&self, at: usize) -> Vec<NodeId> {
        let me = &self.nodes[at].id;
        self.nodes
            .iter()
            .filter(|n| n.id != *me)
            .map(|n| n.id.clone())
            .collect()
    }

    fn send(&mut self, now: u64, from: usize, to: usize, message: Message) {
        if self.side[from] != self.side[to] {
            self.faults.0 += 1;
            return;
        }
        if self.faults_on && self.rng.chance(self.settings.loss) {
            self.faults.0 += 1;
            return;
        }
        let bytes = wire::encode(&wire::Envelope::new(message));
        let copies = if self.faults_on && self.rng.chance(self.settings.duplication) {
            self.faults.1 += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(self.settings.max_delay_ms);
            self.network.push(InFlight {
                at: now + delay,
                from,
                to,
                bytes: bytes.clone(),
            });
        }
    }

    fn deliver(&mut self, now: u64) {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.network.len() {
            if self.network[i].at <= now {
                due.push(self.network.swap_remove(i));
            } else {
                i += 1;
            }
        }
        // Messages due at once arrive in any order.
        while !due.is_empty() {
            let pick = self.rng.below(due.len() as u64) as usize;
            let message = due.swap_remove(pick);
            self.receive(now, message);
        }
    }

    fn receive(
        &mut self,
        now: u64,
        InFlight {
            from, to, bytes, ..
        }: InFlight,
    ) {
        if !self.nodes[to].up {
            return;
        }
        let envelope = wire::decode(&bytes).expect("the simulator sends valid frames");
        let from = self.nodes[from].id.clone();
        let message = envelope.message;
        self.step(now, to, sync::Input::Received { from, message });
    }

    fn sync(&mut self, now: u64) {
        for at in 0..self.nodes.len() {
            if self.nodes[at].up {
                let members = self.others(at);
                self.step(now, at, sync::Input::Sync { members });
            }
        }
    }

    fn write(&mut self, now: u64, at: usize, key: &Key, mutation: &Mutation) -> VersionVector {
        let node = &mut self.nodes[at];
        let physical = node.physical(now);
        let record = record::apply(node.records.get(key), mutation, &mut node.clock, physical)
            .expect("each key keeps one kind");
        let (seq, deps) = node.delivery.local_write(&node.id.clone());
        let write = CausalWrite {
            origin: node.id.clone(),
            seq,
            deps,
            entries: vec![(key.clone(), record)],
        };
        node.store(&write, now);
        let applied = node.delivery.applied().clone();
        self.step(now, at, sync::Input::Committed { own: vec![write] });
        applied
    }

    fn faults(&mut self) {
        // Partitions come and go.
        if self.rng.chance(2) {
            if self.side.iter().all(|s| *s == 0) {
                self.faults.2 += 1;
                for side in &mut self.side {
                    *side = self.rng.below(2) as u8;
                }
            } else {
                self.side.iter_mut().for_each(|s| *s = 0);
            }
        }
        // A node crashes (its buffer and in-flight messages are lost) or comes back.
        if self.rng.chance(1) {
            let n = self.rng.below(self.nodes.len() as u64) as usize;
            let node = &mut self.nodes[n];
            if node.up {
                self.faults.3 += 1;
                node.up = false;
                node.delivery =
                    Delivery::new(node.delivery.applied().clone(), self.settings.buffer);
                node.replicator = Replicator::new(limits());
                // What it buffered was never committed: its applied vector only counts what
                // `store` wrote, which `take_ready` and `local_write` advance together.
            } else {
                node.up = true;
            }
        }
    }
}

fn value_of(record: Option<&Record>) -> Option<String> {
    match &record?.value {
        Value::Register(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        _ => None,
    }
}

/// Runs one seeded simulation.
pub fn run_causal(seed: u64, settings: CausalSettings) -> CausalReport {
    let mut rng = Rng::new(seed);
    let nodes = (0..settings.nodes)
        .map(|i| {
            let id = NodeId::new(format!("n{i}")).unwrap();
            let span = settings.max_skew_ms * 2 + 1;
            SimNode {
                clock: HybridClock::new(id.clone(), 10_000),
                skew: rng.below(span) as i64 - settings.max_skew_ms as i64,
                delivery: Delivery::new(VersionVector::new(), settings.buffer),
                records: BTreeMap::new(),
                log: BTreeMap::new(),
                trimmed: VersionVector::new(),
                replicator: Replicator::new(limits()),
                up: true,
                id,
            }
        })
        .collect();
    let mut sim = Sim {
        rng,
        side: vec![0; settings.nodes],
        nodes,
        network: Vec::new(),
        faults_on: true,
        refused: 0,
        faults: (0, 0, 0, 0),
        snapshots: 0,
        invalid: None,
        settings: settings.clone(),
    };
    for at in 0..settings.nodes {
        let others = sim.others(at);
        sim.step(0, at, sync::Input::Sync { members: others });
    }
    let keys: Vec<Key> = (0..settings.keys)
        .map(|k| Key::new(format!("tasks:k{k}")).unwrap())
        .collect();
    let counter = Key::new("tasks:done").unwrap();
    let mut counted = 0i64;
    let mut tokens = vec![VersionVector::new(); settings.sessions];
    let mut histories = vec![Vec::new(); settings.sessions];
    let mut made = vec![0u64; settings.nodes];
    let (mut issued, mut waits, mut written) = (0, 0, 0usize);
    let mut now = 0u64;
    while issued < settings.operations {
        now += 1;
        sim.deliver(now);
        if now.is_multiple_of(50) {
            sim.sync(now);
        }
        if now.is_multiple_of(10) {
            sim.faults();
        }
        if !sim.rng.chance(30) {
            continue;
        }
        let session = sim.rng.below(settings.sessions as u64) as usize;
        let at = sim.rng.below(settings.nodes as u64) as usize;
        if !sim.nodes[at].up {
            continue;
        }
        if !causal::covers(sim.nodes[at].delivery.applied(), &tokens[session]) {
            // The node waits for the session's past; the client tries elsewhere later.
            waits += 1;
            continue;
        }
        issued += 1;
        if sim.rng.chance(10) {
            let delta = sim.rng.below(7) as i64 - 3;
            let applied = sim.write(now, at, &counter, &Mutation::PnCounterAdd(delta));
            made[at] += 1;
            counted += delta;
            tokens[session].merge(&applied);
            continue;
        }
        let key = keys[sim.rng.below(keys.len() as u64) as usize].clone();
        if sim.rng.chance(50) {
            // Updates read the key first (as an agent updating a task does), so the history
            // says which write each one overwrites.
            let node = &sim.nodes[at];
            histories[session].push(Op::Read {
                key: key.to_string(),
                value: value_of(node.records.get(&key)),
            });
            written += 1;
            let value = format!("s{session}-{written}");
            let put = Mutation::Put(value.as_bytes().to_vec());
            let applied = sim.write(now, at, &key, &put);
            made[at] += 1;
            tokens[session].merge(&applied);
            histories[session].push(Op::Write {
                key: key.to_string(),
                value,
            });
        } else {
            let node = &sim.nodes[at];
            let value = value_of(node.records.get(&key));
            let applied = node.delivery.applied().clone();
            tokens[session].merge(&applied);
            histories[session].push(Op::Read {
                key: key.to_string(),
                value,
            });
        }
    }
    // The faults stop: every node up, no partition, no loss; sync until nothing moves.
    sim.faults_on = false;
    sim.side.iter_mut().for_each(|s| *s = 0);
    sim.nodes.iter_mut().for_each(|n| n.up = true);
    for _ in 0..20_000 {
        now += 1;
        sim.deliver(now);
        if now.is_multiple_of(50) {
            let first = sim.nodes[0].delivery.applied().clone();
            if sim.network.is_empty() && sim.nodes.iter().all(|n| *n.delivery.applied() == first) {
                break;
            }
            sim.sync(now);
        }
    }
    CausalReport {
        histories,
        applied: sim
            .nodes
            .iter()
            .map(|n| n.delivery.applied().clone())
            .collect(),
        stores: sim.nodes.iter().map(|n| n.records.clone()).collect(),
        made,
        counted: (counter, counted),
        session_waits: waits,
        refused: sim.refused,
        faults: sim.faults,
        snapshots: sim.snapshots,
        invalid: sim.invalid,
    }
}
