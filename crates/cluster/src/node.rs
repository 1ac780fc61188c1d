//! A node: the replication coordinator, the local engine and the transport, in one loop.
//!
//! The loop owns the [`Coordinator`] and executes its effects: local applies and reads on the
//! engine, messages on the transport, hints in the engine's durable hint table, replies to the
//! waiting callers. It also does a replica's duties (merge a replicated record and acknowledge
//! it; answer reads; coordinate writes that a non-replica forwards), delivers stored hints
//! every half second until the peer acknowledges them, and runs the membership protocol
//! ([`Membership`]): members that join enter placement, members that leave go out of it.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_core::codec;
use agentstore_core::crdt::Crdt;
use agentstore_core::merkle::{MerkleTree, entry_digest};
use agentstore_core::placement::Ring;
use agentstore_core::record::Mutation;
use agentstore_core::replication::{
    Coordinator, Effect, HINT_REQUEST_BIT, Input, LocalFailure, Message, Outcome, RequestId,
};
use agentstore_core::signing::{check_mutation, check_record};
use agentstore_core::{Causality, Key, NodeId, Record};
use agentstore_engine::{
    Engine, EngineError, EngineMetrics, Instrumented, LocalEngine, PhysicalClock, SystemClock,
};
use agentstore_wire::Envelope;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::membership::{Event, Liveness, Membership, Peer};
use crate::metrics::NodeMetrics;
use crate::observe::{AcknowledgedWrites, reachable_share};
use crate::signatures::SignedCollections;
use crate::transport::{Incoming, PeerSecurity, Transport};

/// Client requests waiting for the loop.
const COMMANDS: usize = 1024;
/// Depth of the anti-entropy trees (64 buckets).
const TREE_DEPTH: u8 = 6;
/// Request ids with this bit set belong to handoffs (a record sent to the key's replicas
/// because this node no longer replicates it); their acknowledgements go to the handoff, not
/// to the coordinator, which numbers client requests below it.
const HANDOFF_REQUEST_BIT: RequestId = 1 << 62;
/// Request ids with this bit set ask the other replicas for their copy of a tombstone about to
/// be collected; the answers go to the collection, not to the coordinator.
const COLLECT_REQUEST_BIT: RequestId = 1 << 61;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub id: NodeId,
    /// How its peer links are secured (mutual TLS with admissions, unless a closed network
    /// asks for plaintext).
    pub security: PeerSecurity,
    /// Where this node serves clients, told to the other members (for `status`).
    pub client_addr: Option<SocketAddr>,
    /// The nodes known from configuration and their peer addresses: this node announces itself
    /// to them, and learns the rest of the cluster from whichever answers. They are members
    /// (they hold keys) from the start.
    pub seeds: BTreeMap<NodeId, SocketAddr>,
    /// Replicas per key (N).
    pub replicas: usize,
    /// Write quorum (W).
    pub write_quorum: usize,
    /// Read quorum (R).
    pub read_quorum: usize,
    /// How long a request waits for its quorum.
    pub request_timeout: Duration,
    /// How often this node compares its data with one peer (Merkle anti-entropy), taking the
    /// peers in turn.
    pub anti_entropy_interval: Duration,
    /// How old a tombstone must be before it is collected (once every replica holds it).
    /// Longer than a replica may stay down with hints waiting for it: a hint older than the
    /// tombstone, delivered after the collection, would bring the deleted value back.
    pub tombstone_grace: Duration,
    /// The collections whose writes must be signed, checked before this node stores any of
    /// their records (`None`: no collection is signed).
    pub signatures: Option<Arc<SignedCollections>>,
}

/// Why a call to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node has shut down.
    #[error("the node has shut down")]
    Stopped,
    /// A repair is already running on this node.
    #[error("a repair is already running on this node")]
    RepairRunning,
    /// The node could not hand all its records to the other replicas in time; it is still a
    /// member, and asking it to leave again carries on.
    #[error("{remaining} record(s) not yet handed to their new replicas; still a member")]
    HandoffIncomplete {
        /// Records still held.
        remaining: usize,
    },
}

enum Command {
    Write {
        key: Key,
        mutation: Mutation,
        reply: oneshot::Sender<Outcome>,
    },
    Read {
        key: Key,
        reply: oneshot::Sender<Outcome>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Leave {
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Scan {
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: u32,
        reply: oneshot::Sender<ScanPage>,
    },
    Repair {
        progress: mpsc::Sender<RepairStep>,
        started: oneshot::Sender<bool>,
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
    /// Buckets (of 64) whose records differed and were exchanged.
    pub buckets_differing: usize,
}

/// Keys whose last acknowledged write a node remembers (read-your-writes violations).
const ACKNOWLEDGED_KEYS: usize = 16_384;

/// How long a repair waits for one member's comparison.
const REPAIR_WAIT: Duration = Duration::from_secs(5);

/// A repair in progress: members still to compare, the one being compared.
struct Repair {
    queue: VecDeque<NodeId>,
    current: Option<(NodeId, Instant)>,
    done: usize,
    total: usize,
    progress: mpsc::Sender<RepairStep>,
}

impl Repair {
    fn report(&mut self, member: &NodeId, differing: Option<usize>) {
        self.done += 1;
        let _ = self.progress.try_send(RepairStep {
            member: member.clone(),
            done: self.done,
            total: self.total,
            answered: differing.is_some(),
            buckets_differing: differing.unwrap_or(0),
        });
    }
}

/// A page of a scan across the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// Records in key order (each the join of the copies the members sent).
    pub entries: Vec<(Key, Record)>,
    /// Members that did not answer in time. Every key is still listed if fewer than N members
    /// are missing (each key has a replica that answered); otherwise keys may be missing.
    pub unanswered: Vec<NodeId>,
}

/// Scans across the cluster: the members still to answer, the join of what came in.
struct PendingScan {
    waiting: std::collections::BTreeSet<NodeId>,
    skipped: Vec<NodeId>,
    entries: BTreeMap<Key, Record>,
    limit: usize,
    deadline_ms: u64,
    reply: oneshot::Sender<ScanPage>,
}

/// A member of the cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemberStatus {
    /// The node.
    pub id: NodeId,
    /// Where it listens for peers.
    pub peer_addr: Option<SocketAddr>,
    /// Where it serves clients, once it has said so.
    pub client_addr: Option<SocketAddr>,
    /// Whether it answers.
    pub liveness: Liveness,
    /// The share of keys it replicates (of N copies each; the shares add up to N).
    pub share: f64,
}

/// What a node reports about itself and the cluster.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node: NodeId,
    /// Every member, this node included, in id order.
    pub members: Vec<MemberStatus>,
    /// Replicas per key (N).
    pub replicas: usize,
    /// Write quorum (W).
    pub write_quorum: usize,
    /// Read quorum (R).
    pub read_quorum: usize,
    /// Requests this node is coordinating.
    pub in_flight: usize,
}

/// A running node. Dropping it (or calling [`Node::shutdown`]) stops it.
#[derive(Debug)]
pub struct Node {
    commands: mpsc::Sender<Command>,
    transport: Transport,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    registry: Registry,
    members: watch::Receiver<Vec<NodeId>>,
    signatures: Option<Arc<SignedCollections>>,
    /// The node's local engine, for its health.
    local: LocalEngine,
}

impl Node {
    /// Starts a node serving peers on `listener`, and announces it to the seeds.
    pub fn start(config: NodeConfig, engine: LocalEngine, listener: TcpListener) -> Self {
        let peer_addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (stop, stopped) = watch::channel(false);
        let mut registry = Registry::default();
        let measured = Instrumented::new(
            engine.clone(),
            "local",
            EngineMetrics::register(&mut registry),
        );
        let metrics = NodeMetrics::register(&mut registry);
        if let Some(signatures) = &config.signatures {
            signatures.register(&mut registry);
        }
        let (transport, inbox) = Transport::start(
            config.id.clone(),
            config.security.clone(),
            listener,
            config.seeds.clone(),
            stopped.clone(),
            metrics.dropped(),
        );
        let (commands, requests) = mpsc::channel(COMMANDS);
        let shared_transport = transport.clone();
        let me = Peer::new(
            config.id.clone(),
            peer_addr,
            config.client_addr.unwrap_or(peer_addr),
        );
        let seed = agentstore_core::hash::stable_hash(now_ms(), config.id.as_str().as_bytes());
        let membership = Membership::new(me, config.seeds.len() + 1, seed);
        let members = config
            .seeds
            .iter()
            .map(|(id, addr)| (id.clone(), Peer::seed(id.clone(), *addr)))
            .collect();
        // Unbounded, yet bounded in practice: one message per engine call in flight.
        let (finished, done) = mpsc::unbounded_channel();
        let (placed_on, members_seen) = watch::channel(Vec::new());
        let mut state = Loop {
            placed_on,
            finished,
            ring: Ring::new([config.id.clone()], 64),
            coordinator: Coordinator::new(config.id.clone()),
            config,
            engine,
            measured,
            metrics,
            transport,
            membership,
            members,
            peer_addr,
            waiters: BTreeMap::new(),
            forwarded: BTreeMap::new(),
            handoffs: BTreeMap::new(),
            scans: BTreeMap::new(),
            collecting: BTreeMap::new(),
            acknowledged: AcknowledgedWrites::new(ACKNOWLEDGED_KEYS),
            replicating: BTreeMap::new(),
            observed: Instant::now(),
            repair: None,
            leaving: None,
            departed: Default::default(),
            next_request: 1,
            next_peer: 0,
        };
        state.rebuild_ring();
        let signatures = state.config.signatures.clone();
        let local = state.engine.clone();
        let task = tokio::spawn(state.run(requests, inbox, done, stopped));
        Self {
            commands,
            transport: shared_transport,
            stop,
            task,
            registry,
            members: members_seen,
            signatures,
            local,
        }
    }

    /// `Err` with the failure if the last write to this node's data file failed (a full
    /// disk); `Ok` again once a write succeeds (see `LocalEngine::health`).
    pub fn local_health(&self) -> Result<(), String> {
        self.local.health()
    }

    /// The check of signed collections this node runs, if any collection is signed.
    pub fn signatures(&self) -> Option<&Arc<SignedCollections>> {
        self.signatures.as_ref()
    }

    /// The other members (those that hold keys), in id order, as they change.
    pub fn members(&self) -> watch::Receiver<Vec<NodeId>> {
        self.members.clone()
    }

    /// Writes `mutation` to `key` through this node (it must be one of the key's replicas).
    pub async fn write(&self, key: Key, mutation: Mutation) -> Result<Outcome, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Write {
                key,
                mutation,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Reads `key` through this node.
    pub async fn read(&self, key: Key) -> Result<Outcome, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Read { key, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// What this node knows of the cluster.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Lists the records of keys starting with `prefix` (after `after`, at most `limit`),
    /// asking every member and joining their copies.
    pub async fn scan(
        &self,
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: u32,
    ) -> Result<ScanPage, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Scan {
                prefix,
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Compares this node's data with every member now, one after the other, exchanging the
    /// records that differ; each member compared is reported on the returned channel, which
    /// closes when the repair is over.
    pub async fn repair(&self) -> Result<mpsc::Receiver<RepairStep>, NodeError> {
        let (progress, steps) = mpsc::channel(1024);
        let (started, answer) = oneshot::channel();
        self.commands
            .send(Command::Repair { progress, started })
            .await
            .map_err(|_| NodeError::Stopped)?;
        match answer.await {
            Ok(true) => Ok(steps),
            Ok(false) => Err(NodeError::RepairRunning),
            Err(_) => Err(NodeError::Stopped),
        }
    }

    /// Leaves the cluster for good: hands every record to the replicas that take this node's
    /// place (waiting until each of them acknowledged it), tells the members, then stops
    /// answering as a member. Call [`Node::shutdown`] afterwards.
    pub async fn leave(&self) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Leave { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        answer.await.map_err(|_| NodeError::Stopped)?
    }

    /// The node's transport (the Raft member of strong collections shares it).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// This node's metrics in the OpenMetrics text format (served as `/metrics`).
    pub fn metrics_text(&self) -> String {
        crate::metrics::text(&self.registry)
    }

    /// Stops the node: its loop, its listener and its connections end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Loop {
    /// The other members, published for the layers beside the loop (causal replication).
    placed_on: watch::Sender<Vec<NodeId>>,
    config: NodeConfig,
    ring: Ring,
    coordinator: Coordinator,
    /// The engine itself, for hints (node-local state the `Engine` trait does not cover).
    engine: LocalEngine,
    /// The same engine, measured: every record read and write goes through it.
    measured: Instrumented<LocalEngine>,
    metrics: NodeMetrics,
    transport: Transport,
    membership: Membership,
    /// The other members: they hold keys (placement), whether they answer or not.
    members: BTreeMap<NodeId, Peer>,
    /// Members that left (told us so): their gossip no longer makes them members. Kept in
    /// memory: a node restarted with a departed node among its seeds places keys on it again
    /// until it hears `Leaving` (the departed node's id should leave the configuration).
    departed: std::collections::BTreeSet<NodeId>,
    peer_addr: SocketAddr,
    /// Where engine work done off the loop reports back to the coordinator.
    finished: mpsc::UnboundedSender<Input>,
    /// Who waits for each request this node coordinates.
    waiters: BTreeMap<RequestId, Waiter>,
    /// Writes this node forwarded to a replica, waiting for its answer.
    forwarded: BTreeMap<RequestId, Forwarded>,
    /// Records being handed to the replicas of keys this node no longer replicates, by
    /// request id: the record sent and the replicas that have not acknowledged it yet.
    handoffs: BTreeMap<RequestId, Asked>,
    /// Writes acknowledged to this node's clients, to notice reads that miss them.
    acknowledged: AcknowledgedWrites,
    /// When each client write was first sent to the replicas (replication lag).
    replicating: BTreeMap<RequestId, Instant>,
    /// When quorum reachability was last observed.
    observed: Instant,
    /// Scans waiting for members' pages.
    scans: BTreeMap<RequestId, PendingScan>,
    /// Tombstones about to be collected: the tombstone and the replicas yet to confirm it.
    collecting: BTreeMap<RequestId, Asked>,
    /// A repair in progress (one at a time: another is refused while it runs).
    repair: Option<Repair>,
    /// Set while leaving: who waits for the handoff to finish, and until when.
    leaving: Option<(oneshot::Sender<Result<(), NodeError>>, Instant)>,
    /// The peer the next anti-entropy round compares with.
    next_peer: usize,
    next_request: RequestId,
}

/// Who waits for a request's outcome.
enum Waiter {
    /// A client of this node: the operation, the key, the reply.
    Client(&'static str, Key, oneshot::Sender<Outcome>),
    /// A node that forwarded the write, under its own request id.
    Peer(NodeId, RequestId),
}

/// A local record on which this node waits for answers from other replicas: a handoff (the
/// key moved away) or a tombstone collection.
struct Asked {
    key: Key,
    record: Record,
    /// Replicas that have not answered yet.
    waiting: Vec<NodeId>,
    sent: Instant,
}

/// How long a handoff or a collection waits for its answers before it asks again.
const HANDOFF_RETRY: Duration = Duration::from_secs(5);

/// A write forwarded to one of its replicas.
struct Forwarded {
    key: Key,
    reply: oneshot::Sender<Outcome>,
    needed: usize,
    deadline_ms: u64,
}

/// A local record and its key's replicas under the current placement.
type Placed = (Key, Record, Vec<NodeId>);

/// Joins a member's page of a scan into what the other members sent.
fn merge_page(entries: &mut BTreeMap<Key, Record>, page: Vec<(Key, Record)>) {
    for (key, record) in page {
        match entries.get_mut(&key) {
            Some(known) => known.merge(&record),
            None => {
                entries.insert(key, record);
            }
        }
    }
}

/// Whether `record` is a tombstone past the grace period (stamped at or before `horizon`):
/// one that collection may purge, and that a replica holding nothing of its key does not take
/// back. Such a replica reads the key as deleted either way; taking the tombstone back would
/// undo its collection, and anti-entropy from a replica that has not collected yet would hand
/// it back again and again, so the replicas could take turns holding it and never all be rid
/// of it.
fn past_grace_tombstone(record: &Record, horizon: u64) -> bool {
    record.is_tombstone() && record.stamp.wall_ms <= horizon
}

/// The wall clock in milliseconds since the Unix epoch (the engines' `SystemClock`).
pub(crate) fn now_ms() -> u64 {
    SystemClock.now_ms()
}

/// Whether `record` must not be stored here: a record of a signed collection whose
/// signature does not hold (the check counts and logs the refusal).
fn refuses(signatures: Option<&SignedCollections>, key: &Key, record: &Record) -> bool {
    signatures.is_some_and(|signatures| check_record(signatures, key, record).is_err())
}

impl Loop {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<Incoming>,
        mut done: mpsc::UnboundedReceiver<Input>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut hints = tokio::time::interval(Duration::from_millis(500));
        // The first round one interval after start, not at once: a node just started has no
        // connection to anyone yet, and a round racing the first writes would repair what
        // replication is still delivering.
        let period = self.config.anti_entropy_interval;
        let mut sync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let events = self.membership.start(&self.config.seeds, Instant::now());
        self.membership_events(events);
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                Some(command) = requests.recv() => self.command(command).await,
                Some(incoming) = inbox.recv() => self.incoming(incoming).await,
                Some(input) = done.recv() => {
                    let effects = self.coordinator.step(input, now_ms());
                    self.execute(effects).await;
                }
                _ = tick.tick() => {
                    let events = self.membership.tick(Instant::now());
                    self.membership_events(events);
                    self.expire_forwarded();
                    self.finish_scans(true);
                    self.repair_tick().await;
                    let effects = self.coordinator.step(Input::Tick, now_ms());
                    self.execute(effects).await;
                }
                _ = hints.tick() => {
                    self.deliver_hints().await;
                    self.observe_quorums();
                }
                _ = sync.tick() => self.start_anti_entropy().await,
            }
        }
    }

    /// Placement over the members; a leaving node places nothing on itself.
    fn rebuild_ring(&mut self) {
        let mut nodes: Vec<NodeId> = self.members.keys().cloned().collect();
        if self.leaving.is_none() {
            nodes.push(self.config.id.clone());
        }
        nodes.sort();
        let others: Vec<NodeId> = nodes
            .iter()
            .filter(|n| **n != self.config.id)
            .cloned()
            .collect();
        self.placed_on.send_if_modified(|known| {
            let changed = *known != others;
            *known = others;
            changed
        });
        self.ring = Ring::new(nodes, 64);
    }

    /// Handoff: sends every local record of a key this node no longer replicates to the key's
    /// replicas; a record acknowledged by all of them is purged here (if it has not changed
    /// meanwhile). Handoffs unacknowledged for [`HANDOFF_RETRY`] are sent again.
    fn hand_off(&mut self, placed: &[Placed]) {
        self.handoffs
            .retain(|_, h| h.sent.elapsed() < HANDOFF_RETRY);
        let in_flight: std::collections::BTreeSet<Key> =
            self.handoffs.values().map(|h| h.key.clone()).collect();
        let me = self.config.id.clone();
        if self.leaving.is_some() {
            // Sent every round: a lost message must not keep a member placing keys here.
            for member in self.members.keys() {
                self.transport.send(member, Envelope::new(Message::Leaving));
            }
        }
        let moved: Vec<&Placed> = placed
            .iter()
            .filter(|(_, _, replicas)| !replicas.contains(&me))
            .collect();
        if moved.is_empty() {
            if self.leaving.is_some() {
                self.finish_leaving();
            }
            return;
        }
        if let Some((_, until)) = &self.leaving
            && Instant::now() > *until
        {
            if let Some((reply, _)) = self.leaving.take() {
                let _ = reply.send(Err(NodeError::HandoffIncomplete {
                    remaining: moved.len(),
                }));
            }
            self.rebuild_ring();
            return;
        }
        for (key, record, replicas) in moved {
            if in_flight.contains(key) {
                continue;
            }
            let replicate = |request, key: &Key, record: &Record| Message::Replicate {
                request,
                key: key.clone(),
                record: record.clone(),
            };
            let entry = (key.clone(), record.clone());
            let (request, asked) =
                self.ask(HANDOFF_REQUEST_BIT, entry, replicas.clone(), replicate);
            self.handoffs.insert(request, asked);
        }
    }

    /// Tombstones stamped at or before this time are past the grace period.
    fn collect_horizon(&self) -> u64 {
        now_ms().saturating_sub(self.config.tombstone_grace.as_millis() as u64)
    }

    /// Tombstone collection, step 1: ask the other replicas of each tombstone older than the
    /// grace period for their copy. Unanswered questions are asked again next round.
    fn collect_tombstones(&mut self, placed: &[Placed]) {
        self.collecting
            .retain(|_, c| c.sent.elapsed() < HANDOFF_RETRY);
        let in_flight: std::collections::BTreeSet<Key> =
            self.collecting.values().map(|c| c.key.clone()).collect();
        let horizon = self.collect_horizon();
        let me = self.config.id.clone();
        for (key, record, replicas) in placed {
            let collectable = past_grace_tombstone(record, horizon);
            if !collectable || !replicas.contains(&me) || in_flight.contains(key) {
                continue;
            }
            let others: Vec<NodeId> = replicas.iter().filter(|n| **n != me).cloned().collect();
            let read = |request, key: &Key, _: &Record| Message::Read {
                request,
                key: key.clone(),
            };
            let entry = (key.clone(), record.clone());
            let (request, asked) = self.ask(COLLECT_REQUEST_BIT, entry, others, read);
            self.collecting.insert(request, asked);
        }
    }

    /// Tombstone collection, step 2: a replica answered. It must hold the same tombstone or
    /// nothing (it collected it already): a replica with anything else (an older live value
    /// it would spread back) stops the collection. Once every replica has answered so, the
    /// tombstone is purged here.
    async fn tombstone_confirmed(
        &mut self,
        from: &NodeId,
        request: RequestId,
        theirs: Option<Record>,
    ) {
        let Some(collecting) = self.collecting.get_mut(&request) else {
            return;
        };
        if theirs.is_some_and(|r| r != collecting.record) {
            self.collecting.remove(&request);
            return;
        }
        collecting.waiting.retain(|n| n != from);
        if !collecting.waiting.is_empty() {
            return;
        }
        let Some(Asked { key, record, .. }) = self.collecting.remove(&request) else {
            return;
        };
        let engine = self.engine.clone();
        if let Ok(Ok(true)) =
            tokio::task::spawn_blocking(move || engine.purge_if_unchanged(&key, &record)).await
        {
            self.metrics.tombstone_collected();
        }
    }

    async fn handoff_acknowledged(&mut self, from: &NodeId, request: RequestId) {
        let Some(handoff) = self.handoffs.get_mut(&request) else {
            return;
        };
        handoff.waiting.retain(|n| n != from);
        if !handoff.waiting.is_empty() {
            return;
        }
        let Some(Asked { key, record, .. }) = self.handoffs.remove(&request) else {
            return;
        };
        let engine = self.engine.clone();
        if let Ok(Ok(true)) =
            tokio::task::spawn_blocking(move || engine.purge_if_unchanged(&key, &record)).await
        {
            self.metrics.handed_off();
        }
    }

    /// Every record is with its new replicas (and the members know this node leaves): leave
    /// the membership.
    fn finish_leaving(&mut self) {
        let events = self.membership.leave(Instant::now());
        self.membership_events(events);
        if let Some((reply, _)) = self.leaving.take() {
            let _ = reply.send(Ok(()));
        }
        tracing::info!("left the cluster");
    }

    fn membership_events(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Send(peer, data) => {
                    self.transport.add_peer(&peer.id, peer.peer_addr);
                    self.transport
                        .send(&peer.id, Envelope::new(Message::Gossip { data }));
                }
                Event::Up(peer) if self.departed.contains(&peer.id) => {}
                Event::Up(peer) => {
                    self.transport.add_peer(&peer.id, peer.peer_addr);
                    let joined = !self.members.contains_key(&peer.id);
                    tracing::info!(node = %peer.id, joined, "member up");
                    self.members.insert(peer.id.clone(), peer);
                    if joined {
                        self.rebuild_ring();
                    }
                }
                Event::Down(peer) => tracing::warn!(node = %peer.id, "member down"),
            }
        }
    }

    fn status(&self) -> Status {
        let mut members: Vec<MemberStatus> = self
            .members
            .values()
            .map(|peer| MemberStatus {
                id: peer.id.clone(),
                peer_addr: Some(peer.peer_addr),
                client_addr: peer.client_addr,
                liveness: self.membership.liveness(&peer.id),
                share: 0.0,
            })
            .collect();
        members.push(MemberStatus {
            id: self.config.id.clone(),
            peer_addr: Some(self.peer_addr),
            client_addr: self.config.client_addr,
            liveness: Liveness::Alive,
            share: 0.0,
        });
        members.sort_by(|a, b| a.id.cmp(&b.id));
        // Each member's share of a fixed sample of keys: what placement gives it.
        const SAMPLE: usize = 4096;
        for i in 0..SAMPLE {
            for node in self
                .ring
                .replicas(format!("sample:{i}").as_bytes(), self.config.replicas)
            {
                if let Some(member) = members.iter_mut().find(|m| m.id == node) {
                    member.share += 1.0 / SAMPLE as f64;
                }
            }
        }
        Status {
            node: self.config.id.clone(),
            members,
            replicas: self.config.replicas,
            write_quorum: self.config.write_quorum,
            read_quorum: self.config.read_quorum,
            in_flight: self.coordinator.in_flight() + self.forwarded.len(),
        }
    }

    async fn start_scan(
        &mut self,
        request: RequestId,
        prefix: Vec<u8>,
        after: Option<Key>,
        limit: u32,
        reply: oneshot::Sender<ScanPage>,
        deadline_ms: u64,
    ) {
        // Members known dead are not waited for; they count as unanswered.
        let (waiting, skipped): (Vec<NodeId>, Vec<NodeId>) = self
            .members
            .keys()
            .cloned()
            .partition(|m| self.membership.liveness(m) != Liveness::Dead);
        let mut scan = PendingScan {
            waiting: waiting.into_iter().collect(),
            skipped,
            entries: BTreeMap::new(),
            limit: limit as usize,
            deadline_ms,
            reply,
        };
        for member in &scan.waiting {
            let message = Message::Scan {
                request,
                prefix: prefix.clone(),
                after: after.clone(),
                limit,
            };
            self.transport.send(member, Envelope::new(message));
        }
        match self
            .measured
            .scan(&prefix, after.as_ref(), limit as usize)
            .await
        {
            Ok(page) => merge_page(&mut scan.entries, page),
            Err(err) => tracing::warn!(%err, "local scan failed"),
        }
        self.scans.insert(request, scan);
        self.finish_scans(false);
    }

    /// Answers the scans every member has answered (or, with `expired`, whose deadline passed).
    fn finish_scans(&mut self, expired: bool) {
        let now = now_ms();
        let done: Vec<RequestId> = self
            .scans
            .iter()
            .filter(|(_, s)| s.waiting.is_empty() || (expired && s.deadline_ms <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(scan) = self.scans.remove(&id) {
                let entries = scan.entries.into_iter().take(scan.limit).collect();
                let mut unanswered: Vec<NodeId> = scan.waiting.into_iter().collect();
                unanswered.extend(scan.skipped);
                unanswered.sort();
                let _ = scan.reply.send(ScanPage {
                    entries,
                    unanswered,
                });
            }
        }
    }

    /// Records how much of the key space has a reachable quorum now, and forgets the send
    /// times of writes old enough that no acknowledgement will be measured for them.
    fn observe_quorums(&mut self) {
        let mut alive: std::collections::BTreeSet<NodeId> = self
            .members
            .keys()
            .filter(|m| self.membership.liveness(m) != Liveness::Dead)
            .cloned()
            .collect();
        alive.insert(self.config.id.clone());
        let n = self.config.replicas;
        let write = reachable_share(&self.ring, &alive, n, self.config.write_quorum, 256);
        let read = reachable_share(&self.ring, &alive, n, self.config.read_quorum, 256);
        self.metrics
            .quorum_reachable(write, read, self.observed.elapsed().as_secs_f64());
        self.observed = Instant::now();
        let horizon = self.config.request_timeout * 4;
        self.replicating.retain(|_, sent| sent.elapsed() < horizon);
    }

    /// Forwarded writes whose replica did not answer in time: indeterminate, like a missed
    /// quorum (the replica may have applied it).
    fn expire_forwarded(&mut self) {
        let now = now_ms();
        let expired: Vec<RequestId> = self
            .forwarded
            .iter()
            .filter(|(_, f)| f.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(forwarded) = self.forwarded.remove(&id) {
                let outcome = Outcome::QuorumFailed {
                    answered: 0,
                    needed: forwarded.needed,
                };
                self.metrics.request("write", &outcome);
                let _ = forwarded.reply.send(outcome);
            }
        }
    }

    /// Sends a client's write to one of its replicas (the first that answers probes), which
    /// coordinates it.
    fn forward(
        &mut self,
        request: RequestId,
        key: Key,
        mutation: Mutation,
        replicas: Vec<NodeId>,
        reply: oneshot::Sender<Outcome>,
        deadline_ms: u64,
    ) {
        let target = replicas
            .iter()
            .find(|n| self.membership.liveness(n) == Liveness::Alive)
            .or(replicas.first())
            .cloned();
        let Some(target) = target else {
            let _ = reply.send(Outcome::NotAReplica { replicas });
            return;
        };
        self.forwarded.insert(
            request,
            Forwarded {
                key: key.clone(),
                reply,
                needed: self.config.write_quorum,
                deadline_ms,
            },
        );
        let mut envelope = Envelope::new(Message::Forward {
            request,
            key,
            mutation,
        });
        envelope.deadline_ms = deadline_ms;
        self.transport.send(&target, envelope);
    }

    async fn command(&mut self, command: Command) {
        let request = self.next_request;
        self.next_request += 1;
        let deadline_ms = now_ms() + self.config.request_timeout.as_millis() as u64;
        let input = match command {
            Command::Status { reply } => {
                let _ = reply.send(self.status());
                return;
            }
            Command::Scan {
                prefix,
                after,
                limit,
                reply,
            } => {
                self.start_scan(request, prefix, after, limit, reply, deadline_ms)
                    .await;
                return;
            }
            Command::Repair { progress, started } => {
                if self.repair.is_some() {
                    let _ = started.send(false);
                    return;
                }
                let members: VecDeque<NodeId> = self.members.keys().cloned().collect();
                self.repair = Some(Repair {
                    total: members.len(),
                    queue: members,
                    current: None,
                    done: 0,
                    progress,
                });
                let _ = started.send(true);
                self.repair_next().await;
                return;
            }
            Command::Leave { reply } => {
                // Handoff rounds run with anti-entropy; give them a minute.
                self.leaving = Some((reply, Instant::now() + Duration::from_secs(60)));
                self.rebuild_ring();
                let placed = self.placed_records().await;
                self.hand_off(&placed);
                return;
            }
            Command::Write {
                key,
                mutation,
                reply,
            } => {
                let replicas = self.ring.replicas(key.as_bytes(), self.config.replicas);
                if !replicas.contains(&self.config.id) {
                    self.forward(request, key, mutation, replicas, reply, deadline_ms);
                    return;
                }
                self.waiters
                    .insert(request, Waiter::Client("write", key.clone(), reply));
                Input::Write {
                    request,
                    key,
                    mutation,
                    replicas,
                    w: self.config.write_quorum,
                    deadline_ms,
                }
            }
            Command::Read { key, reply } => {
                self.waiters
                    .insert(request, Waiter::Client("read", key.clone(), reply));
                let replicas = self.ring.replicas(key.as_bytes(), self.config.replicas);
                Input::Read {
                    request,
                    key,
                    replicas,
                    r: self.config.read_quorum,
                    deadline_ms,
                }
            }
        };
        let effects = self.coordinator.step(input, now_ms());
        self.execute(effects).await;
    }

    /// A replica's duties, and the coordinator's messages.
    async fn incoming(&mut self, Incoming { from, envelope }: Incoming) {
        // Work whose requester has given up is dropped (reads, and forwarded writes, which
        // the forwarding node has answered as indeterminate by now).
        let reads_or_forwards = matches!(
            envelope.message,
            Message::Read { .. } | Message::Forward { .. }
        );
        if reads_or_forwards && envelope.deadline_ms != 0 && envelope.deadline_ms < now_ms() {
            self.metrics.expired();
            return;
        }
        match envelope.message {
            Message::Replicate {
                request,
                key,
                record,
            } => {
                // Off the loop: concurrent merges share the engine's group commits, and
                // signature checks run in parallel.
                let (measured, metrics, transport) = (
                    self.measured.clone(),
                    self.metrics.clone(),
                    self.transport.clone(),
                );
                let horizon = self.collect_horizon();
                let signatures = self.config.signatures.clone();
                tokio::spawn(async move {
                    let stored = measured.get(&key).await;
                    // A record this replica already holds (a repeated repair, a duplicate)
                    // changes nothing: acknowledge without a commit. Nor does an old tombstone
                    // of a key this replica holds nothing of (see `past_grace_tombstone`).
                    let known = match &stored {
                        Ok(Some(stored)) => {
                            let mut merged = stored.clone();
                            merged.merge(&record);
                            merged == *stored
                        }
                        Ok(None) => past_grace_tombstone(&record, horizon),
                        Err(_) => false,
                    };
                    // Only a record that would change what is stored needs its signature
                    // checked (anti-entropy re-sends what replicas already hold).
                    if !known && refuses(signatures.as_deref(), &key, &record) {
                        return;
                    }
                    if let Ok(Some(stored)) = &stored
                        && stored.causality(&record) == Causality::Concurrent
                    {
                        metrics.conflict(record.value.kind().as_str());
                    }
                    let merged =
                        known || measured.apply(key, Mutation::Merge(record)).await.is_ok();
                    if merged && request != 0 {
                        transport.send(&from, Envelope::new(Message::Replicated { request }));
                    }
                });
            }
            Message::Read { request, key } => {
                let (measured, transport) = (self.measured.clone(), self.transport.clone());
                tokio::spawn(async move {
                    if let Ok(record) = measured.get(&key).await {
                        transport
                            .send(&from, Envelope::new(Message::ReadReply { request, record }));
                    }
                });
            }
            Message::Forward {
                request: theirs,
                key,
                mutation,
            } => {
                let request = self.next_request;
                self.next_request += 1;
                self.waiters.insert(request, Waiter::Peer(from, theirs));
                let replicas = self.ring.replicas(key.as_bytes(), self.config.replicas);
                let input = Input::Write {
                    request,
                    key,
                    mutation,
                    replicas,
                    w: self.config.write_quorum,
                    deadline_ms: now_ms() + self.config.request_timeout.as_millis() as u64,
                };
                let effects = self.coordinator.step(input, now_ms());
                self.execute(effects).await;
            }
            Message::Forwarded { request, outcome } => {
                if let Some(forwarded) = self.forwarded.remove(&request) {
                    self.metrics.request("write", &outcome);
                    if let Outcome::Written { record } = &outcome {
                        self.acknowledged
                            .acknowledged(&forwarded.key, &record.version);
                    }
                    let _ = forwarded.reply.send(outcome);
                }
            }
            Message::Scan {
                request,
                prefix,
                after,
                limit,
            } => {
                // At most 1000 records a page: a page stays far below the frame limit.
                let limit = limit.min(1000) as usize;
                if let Ok(entries) = self.measured.scan(&prefix, after.as_ref(), limit).await {
                    let message = Message::Scanned { request, entries };
                    self.transport.send(&from, Envelope::new(message));
                }
            }
            Message::Scanned { request, entries } => {
                if let Some(scan) = self.scans.get_mut(&request) {
                    scan.waiting.remove(&from);
                    merge_page(&mut scan.entries, entries);
                    self.finish_scans(false);
                }
            }
            Message::Gossip { data } => {
                let events = self.membership.receive(&data, Instant::now());
                self.membership_events(events);
            }
            Message::Leaving => {
                tracing::info!(node = %from, "member leaves");
                self.departed.insert(from.clone());
                if self.members.remove(&from).is_some() {
                    self.rebuild_ring();
                }
            }
            Message::TreeLeaves { depth, leaves } => self.compare_trees(&from, depth, leaves).await,
            Message::Buckets { depth, buckets } if depth == TREE_DEPTH => {
                let differing = buckets.len();
                let buckets: std::collections::BTreeSet<usize> =
                    buckets.into_iter().map(|b| b as usize).collect();
                if !buckets.is_empty() {
                    self.send_buckets(&from, &buckets).await;
                }
                self.repair_answered(&from, differing);
            }
            Message::ReadReply { request, record } if request & COLLECT_REQUEST_BIT != 0 => {
                self.tombstone_confirmed(&from, request, record).await;
            }
            Message::Replicated { request } if request & HANDOFF_REQUEST_BIT != 0 => {
                self.handoff_acknowledged(&from, request).await;
            }
            Message::Replicated { request } if request & HINT_REQUEST_BIT != 0 => {
                let (engine, id) = (self.engine.clone(), request & !HINT_REQUEST_BIT);
                if let Ok(Ok(())) =
                    tokio::task::spawn_blocking(move || engine.remove_hint(&from, id)).await
                {
                    self.metrics.hint_delivered();
                }
            }
            message => {
                if let Message::Replicated { request } = &message
                    && let Some(sent) = self.replicating.get(request)
                {
                    self.metrics.replication_lag(sent.elapsed().as_secs_f64());
                }
                let effects = self
                    .coordinator
                    .step(Input::Received { from, message }, now_ms());
                self.execute(effects).await;
            }
        }
    }

    /// Every local record of a key that both this node and `peer` replicate.
    async fn shared_with(&self, peer: &NodeId) -> Vec<(Key, Record)> {
        self.shared_in(&self.placed_records().await, peer)
    }

    /// The records of `placed` whose key both this node and `peer` replicate.
    fn shared_in(&self, placed: &[Placed], peer: &NodeId) -> Vec<(Key, Record)> {
        placed
            .iter()
            .filter(|(_, _, replicas)| {
                replicas.contains(peer) && replicas.contains(&self.config.id)
            })
            .map(|(key, record, _)| (key.clone(), record.clone()))
            .collect()
    }

    /// Every local record with its key's replicas under the current placement (one scan).
    async fn placed_records(&self) -> Vec<Placed> {
        let mut placed = Vec::new();
        let mut after: Option<Key> = None;
        loop {
            let Ok(page) = self.measured.scan(b"", after.as_ref(), 1024).await else {
                break;
            };
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, record) in page {
                let replicas = self.ring.replicas(key.as_bytes(), self.config.replicas);
                placed.push((key, record, replicas));
            }
        }
        placed
    }

    /// Sends `message(request)` to each of `to` under a fresh request id marked with `bit`,
    /// and returns what to track until they all answer.
    fn ask(
        &mut self,
        bit: RequestId,
        (key, record): (Key, Record),
        to: Vec<NodeId>,
        message: impl Fn(RequestId, &Key, &Record) -> Message,
    ) -> (RequestId, Asked) {
        let request = bit | self.next_request;
        self.next_request += 1;
        for node in &to {
            self.transport
                .send(node, Envelope::new(message(request, &key, &record)));
        }
        let asked = Asked {
            key,
            record,
            waiting: to,
            sent: Instant::now(),
        };
        (request, asked)
    }

    fn tree(records: &[(Key, Record)]) -> MerkleTree {
        let mut tree = MerkleTree::new(TREE_DEPTH);
        for (key, record) in records {
            tree.insert(
                key.as_bytes(),
                entry_digest(key.as_bytes(), &codec::encode(record)),
            );
        }
        tree
    }

    /// Anti-entropy, step 1: send the next peer the leaves of the tree of what we share.
    /// Also hands off what this node no longer replicates, and collects old tombstones; the
    /// three share one scan of the local records.
    async fn start_anti_entropy(&mut self) {
        let placed = self.placed_records().await;
        self.hand_off(&placed);
        self.collect_tombstones(&placed);
        let peers: Vec<NodeId> = self.members.keys().cloned().collect();
        if peers.is_empty() {
            return;
        }
        let peer = peers[self.next_peer % peers.len()].clone();
        self.next_peer += 1;
        self.compare_with(&peer, &placed);
    }

    /// Sends `peer` the leaves of the tree of what we share; it answers with the buckets that
    /// differ (and their records).
    fn compare_with(&mut self, peer: &NodeId, placed: &[Placed]) {
        let tree = Self::tree(&self.shared_in(placed, peer));
        let message = Message::TreeLeaves {
            depth: TREE_DEPTH,
            leaves: tree.leaves().to_vec(),
        };
        self.transport.send(peer, Envelope::new(message));
    }

    /// Compares with the next member of a repair, or ends the repair.
    async fn repair_next(&mut self) {
        let Some(repair) = self.repair.as_mut() else {
            return;
        };
        match repair.queue.pop_front() {
            Some(member) => {
                repair.current = Some((member.clone(), Instant::now() + REPAIR_WAIT));
                let placed = self.placed_records().await;
                self.compare_with(&member, &placed);
            }
            None => self.repair = None,
        }
    }

    /// A member answered a comparison: if a repair waits for it, report and go on.
    fn repair_answered(&mut self, from: &NodeId, differing: usize) {
        if let Some(repair) = self.repair.as_mut()
            && repair.current.as_ref().is_some_and(|(m, _)| m == from)
        {
            repair.current = None;
            repair.report(from, Some(differing));
        }
    }

    /// A member that did not answer a repair in time is reported and skipped.
    async fn repair_tick(&mut self) {
        let Some(repair) = self.repair.as_mut() else {
            return;
        };
        match &repair.current {
            Some((member, until)) if Instant::now() > *until => {
                let member = member.clone();
                repair.current = None;
                repair.report(&member, None);
                self.repair_next().await;
            }
            Some(_) => {}
            None => self.repair_next().await,
        }
    }

    /// Anti-entropy, step 2: compare with the peer's leaves; send our records of the buckets
    /// that differ, and ask for theirs.
    async fn compare_trees(&mut self, from: &NodeId, depth: u8, leaves: Vec<u64>) {
        let Some(theirs) =
            MerkleTree::from_leaves(depth, leaves).filter(|t| t.depth() == TREE_DEPTH)
        else {
            return;
        };
        let ours = Self::tree(&self.shared_with(from).await);
        let buckets: std::collections::BTreeSet<usize> = ours.diff(&theirs).into_iter().collect();
        // Always answered, even with no bucket: the comparison is complete (a repair waits
        // for it).
        self.send_buckets(from, &buckets).await;
        let buckets = buckets.into_iter().map(|b| b as u32).collect();
        self.transport.send(
            from,
            Envelope::new(Message::Buckets {
                depth: TREE_DEPTH,
                buckets,
            }),
        );
    }

    /// Anti-entropy, step 3: send `peer` our records in `buckets` (it merges them).
    async fn send_buckets(&mut self, peer: &NodeId, buckets: &std::collections::BTreeSet<usize>) {
        if buckets.is_empty() {
            return;
        }
        let probe = MerkleTree::new(TREE_DEPTH);
        for (key, record) in self.shared_with(peer).await {
            if buckets.contains(&probe.bucket(key.as_bytes())) {
                self.metrics.repaired();
                self.transport.send(
                    peer,
                    Envelope::new(Message::Replicate {
                        request: 0,
                        key,
                        record,
                    }),
                );
            }
        }
    }

    async fn deliver_hints(&mut self) {
        for peer in self.members.keys() {
            let (engine, node) = (self.engine.clone(), peer.clone());
            let Ok(Ok(hints)) =
                tokio::task::spawn_blocking(move || engine.hints_for(&node, 256)).await
            else {
                continue;
            };
            for hint in hints {
                let message = Message::Replicate {
                    request: hint.id | HINT_REQUEST_BIT,
                    key: hint.key,
                    record: hint.record,
                };
                self.transport.send(peer, Envelope::new(message));
            }
        }
    }

    /// Executes effects in order; effects that feed the coordinator add their own.
    async fn execute(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                // Engine work runs off the loop, so concurrent requests share the engine's group
                // commits; what the coordinator must learn comes back through `finished`.
                Effect::ApplyLocal {
                    request,
                    key,
                    mutation,
                } => {
                    let (measured, finished) = (self.measured.clone(), self.finished.clone());
                    let signatures = self.config.signatures.clone();
                    tokio::spawn(async move {
                        if let Some(signatures) = signatures
                            && let Err(why) =
                                check_mutation(&*signatures, &key, &mutation, now_ms())
                        {
                            let result = Err(LocalFailure::SignatureRefused(why));
                            let _ = finished.send(Input::LocalApplied { request, result });
                            return;
                        }
                        let result = measured.apply(key, mutation).await.map_err(local_failure);
                        let _ = finished.send(Input::LocalApplied { request, result });
                    });
                }
                Effect::ReadLocal { request, key } => {
                    let (measured, finished) = (self.measured.clone(), self.finished.clone());
                    tokio::spawn(async move {
                        // A failed local read counts as an answer with nothing; the other
                        // replicas still answer, and the error is logged.
                        let record = measured.get(&key).await.unwrap_or_else(|err| {
                            tracing::warn!(%err, "local read failed");
                            None
                        });
                        let _ = finished.send(Input::LocalRead { request, record });
                    });
                }
                Effect::MergeLocal { key, record } => {
                    let measured = self.measured.clone();
                    let horizon = self.collect_horizon();
                    let signatures = self.config.signatures.clone();
                    tokio::spawn(async move {
                        if refuses(signatures.as_deref(), &key, &record) {
                            return;
                        }
                        if past_grace_tombstone(&record, horizon)
                            && matches!(measured.get(&key).await, Ok(None))
                        {
                            return;
                        }
                        if let Err(err) = measured.apply(key, Mutation::Merge(record)).await {
                            tracing::warn!(%err, "read repair of the local copy failed");
                        }
                    });
                }
                Effect::Send { to, message } => {
                    if let Message::Replicate { request, .. } = &message
                        && *request != 0
                    {
                        self.replicating
                            .entry(*request)
                            .or_insert_with(Instant::now);
                    }
                    // A read is worth answering only while its coordinator waits; a write is
                    // always applied (it is durable where it lands, and spreads).
                    let mut envelope = Envelope::new(message);
                    if matches!(envelope.message, Message::Read { .. }) {
                        envelope.deadline_ms =
                            now_ms() + self.config.request_timeout.as_millis() as u64;
                    }
                    self.transport.send(&to, envelope);
                }
                Effect::Hint { node, key, record } => {
                    let engine = self.engine.clone();
                    let stored = tokio::task::spawn_blocking(move || {
                        engine.store_hint(&node, &key, &record)
                    })
                    .await;
                    if matches!(stored, Ok(Ok(_))) {
                        self.metrics.hint_stored();
                    } else {
                        tracing::warn!(
                            "a hint could not be stored; anti-entropy will repair the replica"
                        );
                    }
                }
                Effect::Reply { request, outcome } => match self.waiters.remove(&request) {
                    Some(Waiter::Client(op, key, reply)) => {
                        self.metrics.request(op, &outcome);
                        match &outcome {
                            Outcome::Written { record } => {
                                self.acknowledged.acknowledged(&key, &record.version);
                            }
                            Outcome::Read { record } => {
                                let version = record.as_ref().map(|r| &r.version);
                                if self.acknowledged.missed(&key, version) {
                                    self.metrics.read_your_writes_violated();
                                }
                            }
                            _ => {}
                        }
                        let _ = reply.send(outcome);
                    }
                    Some(Waiter::Peer(origin, theirs)) => {
                        self.metrics.request("forwarded_write", &outcome);
                        let message = Message::Forwarded {
                            request: theirs,
                            outcome,
                        };
                        self.transport.send(&origin, Envelope::new(message));
                    }
                    None => {}
                },
            }
        }
    }
}

/// The local engine's failure as the coordinator passes it on: what a caller must tell apart
/// (a full disk, a refused signature) stays typed, on forwarded writes too.
fn local_failure(err: EngineError) -> LocalFailure {
    match err {
        EngineError::DiskFull { detail } => LocalFailure::DiskFull(detail),
        EngineError::SignatureRefused { source, .. } => LocalFailure::SignatureRefused(source),
        EngineError::WrongKind { source, .. } => LocalFailure::WrongKind(source),
        other => LocalFailure::Storage(other.to_string()),
    }
}
