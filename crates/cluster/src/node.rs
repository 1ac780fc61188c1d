//! A node: the sans-io [`NodeState`] executed against the local engine, the transport and
//! the membership protocol.
//!
//! Everything the node decides (coordinating reads and writes, a replica's duties,
//! forwarding, hinted handoff, handoff, tombstone collection, anti-entropy, repairs, scans)
//! is [`NodeState::step`]'s, in `agentstore-core`; the simulator runs the same state machine.
//! This module is its runtime: a select loop that feeds it inputs (client calls, peer
//! messages, engine results, liveness from SWIM, ticks of an injected clock) and an executor
//! of its effects (engine work off the loop, so concurrent requests share group commits;
//! messages on the transport; answers to the waiting callers; metrics).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_core::crdt::Crdt;
use agentstore_core::merkle::MerkleTree;
use agentstore_core::node_state::upkeep::past_grace;
use agentstore_core::node_state::{
    Answer, Call, Caller, Effect, Input, Liveness, NodeState, Observation, Purpose, RepairEvent,
    Settings, StoredHint,
};
use agentstore_core::record::Mutation;
use agentstore_core::replication::{LocalFailure, Message, Outcome, RequestId};
use agentstore_core::signing::{check_mutation, check_record};
use agentstore_core::{Causality, Key, NodeId, Record};
use agentstore_engine::{
    Committed, Engine, EngineError, EngineMetrics, Instrumented, LocalEngine, PhysicalClock,
    SystemClock, Write,
};
use agentstore_wire::Envelope;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::membership::{Event, Membership, Peer};
use crate::metrics::NodeMetrics;
use crate::signatures::SignedCollections;
use crate::transport::{Incoming, PeerSecurity, Transport};

pub use agentstore_core::node_state::{RepairStep, ScanPage};

/// Client requests waiting for the loop.
const COMMANDS: usize = 1024;
/// How often the state machine's time advances.
const TICK: Duration = Duration::from_millis(10);
/// Inputs handled, at most, before the messages they caused are sent.
const READY_BATCH: usize = 256;
/// Hints delivered to one peer per hint interval.
const HINTS_PER_DELIVERY: usize = 256;

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
    /// The node could not hand all its records to the other replicas in time, or not every
    /// live member confirmed it knows of the leave; it is still a member, and asking it to
    /// leave again carries on.
    #[error(
        "{remaining} record(s) not yet handed to their new replicas, or a member not yet told \
         of the leave; still a member"
    )]
    HandoffIncomplete {
        /// Records still held.
        remaining: usize,
    },
}

enum Command {
    // Boxed: a call carries a record, far larger than a status request.
    Call { call: Box<Call>, waiter: Waiting },
    Status { reply: oneshot::Sender<Status> },
}

/// Who waits for the answers to a call.
enum Waiting {
    Outcome(oneshot::Sender<Outcome>),
    Scan(oneshot::Sender<ScanPage>),
    Leave(oneshot::Sender<Result<(), NodeError>>),
    Repair {
        started: Option<oneshot::Sender<bool>>,
        progress: mpsc::Sender<RepairStep>,
    },
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
        Self::start_with_clock(config, engine, listener, Arc::new(SystemClock))
    }

    /// [`Node::start`] with the clock the node's state machine reads.
    pub fn start_with_clock(
        config: NodeConfig,
        engine: LocalEngine,
        listener: TcpListener,
        clock: Arc<dyn PhysicalClock>,
    ) -> Self {
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
        let me = Peer::new(
            config.id.clone(),
            peer_addr,
            config.client_addr.unwrap_or(peer_addr),
        );
        let now = clock.now_ms();
        let seed = agentstore_core::hash::stable_hash(now, config.id.as_str().as_bytes());
        let membership = Membership::new(me, config.seeds.len() + 1, seed);
        let peers = config
            .seeds
            .iter()
            .map(|(id, addr)| (id.clone(), Peer::seed(id.clone(), *addr)))
            .collect();
        let state = NodeState::new(config.settings(), config.seeds.keys().cloned(), now);
        // Unbounded, yet bounded in practice: one message per engine call in flight.
        let (finished, done) = mpsc::unbounded_channel();
        // The members placement starts with (the seeds): later changes come as effects.
        let (placed_on, members_seen) =
            watch::channel(state.members().keys().cloned().collect::<Vec<NodeId>>());
        let runtime = Runtime {
            state,
            clock,
            placed_on,
            finished,
            config,
            engine: engine.clone(),
            measured,
            metrics,
            transport: transport.clone(),
            membership,
            peers,
            told: BTreeMap::new(),
            peer_addr,
            waiting: BTreeMap::new(),
            next_caller: 1,
            corked: None,
            merges: Vec::new(),
            applies: Vec::new(),
        };
        let signatures = runtime.config.signatures.clone();
        let commits = engine.commits();
        let task = tokio::spawn(runtime.run(requests, inbox, done, commits, stopped));
        Self {
            commands,
            transport,
            stop,
            task,
            registry,
            members: members_seen,
            signatures,
            local: engine,
        }
    }

    /// `Err` with the failure if the last write to this node's data file failed (a full
    /// disk); `Ok` again once a write succeeds (see `LocalEngine::health`).
    pub fn local_health(&self) -> Result<(), String> {
        self.local.health()
    }

    /// Every record this node stores, read in one transaction (a consistent snapshot of its
    /// data file, for a backup).
    pub async fn snapshot(&self) -> Result<Vec<(Key, Record)>, EngineError> {
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || local.snapshot(|_| true).map(|(_, records)| records))
            .await
            .map_err(|e| EngineError::Internal {
                detail: format!("the snapshot's thread failed: {e}"),
            })?
    }

    /// Up to `limit` changes this node stored under `prefix` after position `after` of its
    /// change feed (its own writes and its replicas' alike), waiting up to `wait` for one.
    pub async fn changes(
        &self,
        prefix: &[u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<agentstore_engine::changelog::ChangePage, EngineError> {
        self.local.changes(prefix, after, limit, wait).await
    }

    /// The check of signed collections this node runs, if any collection is signed.
    pub fn signatures(&self) -> Option<&Arc<SignedCollections>> {
        self.signatures.as_ref()
    }

    /// The other members (those that hold keys), in id order, as they change.
    pub fn members(&self) -> watch::Receiver<Vec<NodeId>> {
        self.members.clone()
    }

    async fn call(&self, call: Call, waiter: Waiting) -> Result<(), NodeError> {
        self.commands
            .send(Command::Call {
                call: Box::new(call),
                waiter,
            })
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Writes `mutation` to `key` through this node (forwarded to a replica if this node is
    /// not one).
    pub async fn write(&self, key: Key, mutation: Mutation) -> Result<Outcome, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.call(Call::Write { key, mutation }, Waiting::Outcome(reply))
            .await?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Reads `key` through this node.
    pub async fn read(&self, key: Key) -> Result<Outcome, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.call(Call::Read { key }, Waiting::Outcome(reply))
            .await?;
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
        let call = Call::Scan {
            prefix,
            after,
            limit,
        };
        self.call(call, Waiting::Scan(reply)).await?;
        answer.await.map_err(|_| NodeError::Stopped)
    }

    /// Compares this node's data with every member now, one after the other, exchanging the
    /// records that differ; each member compared is reported on the returned channel, which
    /// closes when the repair is over.
    pub async fn repair(&self) -> Result<mpsc::Receiver<RepairStep>, NodeError> {
        let (progress, steps) = mpsc::channel(1024);
        let (started, answer) = oneshot::channel();
        let waiter = Waiting::Repair {
            started: Some(started),
            progress,
        };
        self.call(Call::Repair, waiter).await?;
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
        self.call(Call::Leave, Waiting::Leave(reply)).await?;
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

impl NodeConfig {
    /// What the state machine needs of this configuration.
    fn settings(&self) -> Settings {
        let mut settings = Settings::new(
            self.id.clone(),
            self.replicas,
            self.write_quorum,
            self.read_quorum,
        );
        settings.request_timeout_ms = self.request_timeout.as_millis() as u64;
        settings.anti_entropy_interval_ms = self.anti_entropy_interval.as_millis() as u64;
        settings.tombstone_grace_ms = self.tombstone_grace.as_millis() as u64;
        settings
    }
}

/// The node's runtime: it owns the state machine and carries out its effects.
struct Runtime {
    state: NodeState,
    clock: Arc<dyn PhysicalClock>,
    /// The other members, published for the layers beside the loop (causal replication).
    placed_on: watch::Sender<Vec<NodeId>>,
    config: NodeConfig,
    /// The engine itself, for hints and purges (node-local state the `Engine` trait does not
    /// cover).
    engine: LocalEngine,
    /// The same engine, measured: every record read and write goes through it.
    measured: Instrumented<LocalEngine>,
    metrics: NodeMetrics,
    transport: Transport,
    membership: Membership,
    /// Where each member listens, as the membership protocol last told.
    peers: BTreeMap<NodeId, Peer>,
    /// The liveness last told to the state machine, per member.
    told: BTreeMap<NodeId, Liveness>,
    peer_addr: SocketAddr,
    /// Where engine work done off the loop reports back.
    finished: mpsc::UnboundedSender<Input>,
    /// Who waits for each call's answers.
    waiting: BTreeMap<Caller, Waiting>,
    next_caller: Caller,
    /// Messages held until the inputs ready now are handled (see [`Runtime::run`]).
    corked: Option<BTreeMap<NodeId, Vec<Envelope>>>,
    /// Records from peers to merge, gathered the same way (one commit for all).
    merges: Vec<Merge>,
    /// Writes this node coordinates to apply locally, gathered the same way.
    applies: Vec<(RequestId, Key, Mutation)>,
}

/// A record from a peer to merge (see [`Effect::Merge`]).
struct Merge {
    key: Key,
    record: Record,
    horizon_ms: u64,
    ack: Option<(NodeId, RequestId)>,
}

impl Runtime {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<Incoming>,
        mut done: mpsc::UnboundedReceiver<Input>,
        mut commits: mpsc::UnboundedReceiver<Committed>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        let events = self.membership.start(&self.config.seeds, Instant::now());
        self.membership_events(events);
        loop {
            // Messages wait until every input ready now is handled: what goes to one peer
            // leaves in one write.
            self.corked = Some(BTreeMap::new());
            tokio::select! {
                _ = stopped.changed() => return,
                Some(command) = requests.recv() => self.command(command),
                Some(incoming) = inbox.recv() => self.incoming(incoming),
                Some(input) = done.recv() => self.step(input),
                Some(Committed { seq, changes }) = commits.recv() => {
                    self.step(Input::Committed { seq, changes });
                }
                _ = tick.tick() => {
                    let events = self.membership.tick(Instant::now());
                    self.membership_events(events);
                    self.tell_liveness();
                    self.step(Input::Tick);
                }
            }
            for _ in 0..READY_BATCH {
                let mut handled = false;
                if let Ok(command) = requests.try_recv() {
                    self.command(command);
                    handled = true;
                }
                if let Ok(incoming) = inbox.try_recv() {
                    self.incoming(incoming);
                    handled = true;
                }
                if let Ok(input) = done.try_recv() {
                    self.step(input);
                    handled = true;
                }
                if let Ok(Committed { seq, changes }) = commits.try_recv() {
                    self.step(Input::Committed { seq, changes });
                    handled = true;
                }
                if !handled {
                    break;
                }
            }
            for (to, envelopes) in self.corked.take().unwrap_or_default() {
                self.transport.send_all(&to, envelopes);
            }
            self.apply_all();
            self.merge_all();
        }
    }

    /// Feeds the state machine one input and executes its effects.
    fn step(&mut self, input: Input) {
        let effects = self.state.step(input, self.clock.now_ms());
        debug_assert_eq!(self.state.validate(), Ok(()));
        for effect in effects {
            self.execute(effect);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Call { call, waiter } => {
                let caller = self.next_caller;
                self.next_caller += 1;
                self.waiting.insert(caller, waiter);
                self.step(Input::Call {
                    caller,
                    call: *call,
                });
            }
        }
    }

    fn incoming(&mut self, Incoming { from, envelope }: Incoming) {
        match envelope.message {
            Message::Gossip { data } => {
                let events = self.membership.receive(&data, Instant::now());
                self.membership_events(events);
            }
            message => {
                if matches!(message, Message::Leaving) {
                    tracing::info!(node = %from, "member leaves");
                }
                self.step(Input::Received {
                    from,
                    message,
                    deadline_ms: envelope.deadline_ms,
                });
            }
        }
    }

    fn membership_events(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Send(peer, data) => {
                    self.transport.add_peer(&peer.id, peer.peer_addr);
                    self.transport
                        .send(&peer.id, Envelope::new(Message::Gossip { data }));
                }
                Event::Up(peer) => {
                    self.transport.add_peer(&peer.id, peer.peer_addr);
                    let joined = !self.state.members().contains_key(&peer.id);
                    tracing::info!(node = %peer.id, joined, "member up");
                    self.peers.insert(peer.id.clone(), peer);
                }
                Event::Down(peer) => tracing::warn!(node = %peer.id, "member down"),
            }
        }
        self.tell_liveness();
    }

    /// Tells the state machine every change of a member's liveness the membership protocol
    /// sees (a member it does not know yet joins when it is first seen alive).
    fn tell_liveness(&mut self) {
        let known: Vec<NodeId> = self.peers.keys().cloned().collect();
        for member in known {
            let liveness = self.membership.liveness(&member);
            if self.told.get(&member) != Some(&liveness) {
                self.told.insert(member.clone(), liveness);
                self.step(Input::Liveness { member, liveness });
            }
        }
    }

    fn status(&self) -> Status {
        let shares = self.state.shares();
        let mut members: Vec<MemberStatus> = self
            .state
            .members()
            .keys()
            .map(|id| {
                let peer = self.peers.get(id);
                MemberStatus {
                    id: id.clone(),
                    peer_addr: peer.map(|p| p.peer_addr),
                    client_addr: peer.and_then(|p| p.client_addr),
                    liveness: self.membership.liveness(id),
                    share: shares.get(id).copied().unwrap_or(0.0),
                }
            })
            .collect();
        members.push(MemberStatus {
            id: self.config.id.clone(),
            peer_addr: Some(self.peer_addr),
            client_addr: self.config.client_addr,
            liveness: Liveness::Alive,
            share: shares.get(&self.config.id).copied().unwrap_or(0.0),
        });
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Status {
            node: self.config.id.clone(),
            members,
            replicas: self.config.replicas,
            write_quorum: self.config.write_quorum,
            read_quorum: self.config.read_quorum,
            in_flight: self.state.in_flight(),
        }
    }

    /// Runs engine work off the loop, and feeds what it returns (if anything) back in.
    fn off_loop<F>(&self, work: F)
    where
        F: Future<Output = Option<Input>> + Send + 'static,
    {
        let finished = self.finished.clone();
        tokio::spawn(async move {
            if let Some(input) = work.await {
                let _ = finished.send(input);
            }
        });
    }

    /// Runs blocking engine work (hints, purges) on the blocking pool.
    fn blocking<T, F>(&self, work: F, then: impl FnOnce(T) -> Option<Input> + Send + 'static)
    where
        T: Send + 'static,
        F: FnOnce(&LocalEngine) -> T + Send + 'static,
    {
        let engine = self.engine.clone();
        self.off_loop(async move {
            let done = tokio::task::spawn_blocking(move || work(&engine)).await;
            done.ok().and_then(then)
        });
    }

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Send {
                to,
                message,
                deadline_ms,
            } => {
                let mut envelope = Envelope::new(message);
                envelope.deadline_ms = deadline_ms;
                match self.corked.as_mut() {
                    Some(corked) => corked.entry(to).or_default().push(envelope),
                    None => self.transport.send(&to, envelope),
                }
            }
            Effect::Apply {
                request,
                key,
                mutation,
            } => {
                self.applies.push((request, key, mutation));
                if self.corked.is_none() {
                    self.apply_all();
                }
            }
            Effect::Read { request, key } => {
                let measured = self.measured.clone();
                self.off_loop(async move {
                    // A failed local read counts as an answer with nothing; the other replicas
                    // still answer, and the error is logged.
                    let record = measured.get(&key).await.unwrap_or_else(|err| {
                        tracing::warn!(%err, "local read failed");
                        None
                    });
                    Some(Input::LocalRead { request, record })
                });
            }
            Effect::Merge {
                key,
                record,
                horizon_ms,
                ack,
            } => {
                self.merges.push(Merge {
                    key,
                    record,
                    horizon_ms,
                    ack,
                });
                if self.corked.is_none() {
                    self.merge_all();
                }
            }
            Effect::ServeRead { to, request, key } => {
                let (measured, transport) = (self.measured.clone(), self.transport.clone());
                self.off_loop(async move {
                    if let Ok(record) = measured.get(&key).await {
                        transport.send(&to, Envelope::new(Message::ReadReply { request, record }));
                    }
                    None
                });
            }
            Effect::ServeScan {
                to,
                request,
                prefix,
                after,
                limit,
            } => {
                let (measured, transport) = (self.measured.clone(), self.transport.clone());
                self.off_loop(async move {
                    if let Ok(entries) = measured.scan(&prefix, after.as_ref(), limit).await {
                        let message = Message::Scanned { request, entries };
                        transport.send(&to, Envelope::new(message));
                    }
                    None
                });
            }
            Effect::ScanLocal {
                request,
                prefix,
                after,
                limit,
            } => {
                let measured = self.measured.clone();
                self.off_loop(async move {
                    let entries = measured
                        .scan(&prefix, after.as_ref(), limit)
                        .await
                        .unwrap_or_else(|err| {
                            tracing::warn!(%err, "local scan failed");
                            Vec::new()
                        });
                    Some(Input::LocalPage { request, entries })
                });
            }
            Effect::LoadRecords { job } => {
                let depth = self.state.settings().fine_depth;
                self.blocking(
                    move |engine| match job.buckets() {
                        None => (job, engine.snapshot(|_| true)),
                        Some(buckets) => {
                            let probe = MerkleTree::new(depth);
                            let loaded =
                                engine.snapshot(|key| buckets.contains(&probe.bucket(key)));
                            (job, loaded)
                        }
                    },
                    |(job, loaded)| match loaded {
                        Ok((seq, records)) => Some(Input::Records { job, seq, records }),
                        Err(err) => {
                            tracing::warn!(%err, "loading the local records failed");
                            Some(Input::LoadFailed { job })
                        }
                    },
                );
            }
            Effect::Purge {
                key,
                record,
                purpose,
            } => {
                let metrics = self.metrics.clone();
                self.blocking(
                    move |engine| engine.purge_if_unchanged(&key, &record),
                    move |purged| {
                        if let Ok(true) = purged {
                            match purpose {
                                Purpose::HandedOff => metrics.handed_off(),
                                Purpose::Collected => metrics.tombstone_collected(),
                            }
                        }
                        None
                    },
                );
            }
            Effect::StoreHint { node, key, record } => {
                let metrics = self.metrics.clone();
                self.blocking(
                    move |engine| engine.store_hint(&node, &key, &record),
                    move |stored| {
                        match stored {
                            Ok(_) => metrics.hint_stored(),
                            Err(err) => tracing::warn!(
                                %err,
                                "a hint could not be stored; anti-entropy will repair the replica"
                            ),
                        }
                        None
                    },
                );
            }
            Effect::LoadHints { peer } => {
                let node = peer.clone();
                self.blocking(
                    move |engine| engine.hints_for(&node, HINTS_PER_DELIVERY),
                    move |hints| {
                        let hints = hints
                            .ok()?
                            .into_iter()
                            .map(|hint| StoredHint {
                                id: hint.id,
                                key: hint.key,
                                record: hint.record,
                            })
                            .collect();
                        Some(Input::Hints { peer, hints })
                    },
                );
            }
            Effect::RemoveHint { peer, id } => {
                let metrics = self.metrics.clone();
                self.blocking(
                    move |engine| engine.remove_hint(&peer, id),
                    move |removed| {
                        if removed.is_ok() {
                            metrics.hint_delivered();
                        }
                        None
                    },
                );
            }
            Effect::Answer { caller, answer } => self.answer(caller, answer),
            Effect::Placement { others } => {
                self.placed_on.send_if_modified(|known| {
                    let changed = *known != others;
                    *known = others;
                    changed
                });
            }
            Effect::Left => {
                let events = self.membership.leave(Instant::now());
                self.membership_events(events);
                tracing::info!("left the cluster");
            }
            Effect::Observe(observation) => self.observe(observation),
        }
    }

    /// Applies the writes this node coordinates, gathered since the last call, in one commit
    /// off the loop (each checked against its collection's signature rule first), and feeds
    /// each its outcome.
    fn apply_all(&mut self) {
        if self.applies.is_empty() {
            return;
        }
        let applies = std::mem::take(&mut self.applies);
        let (measured, finished) = (self.measured.clone(), self.finished.clone());
        let signatures = self.config.signatures.clone();
        let now = self.clock.now_ms();
        tokio::spawn(async move {
            let mut outcomes = Vec::with_capacity(applies.len());
            let (mut writes, mut requests) = (Vec::new(), Vec::<RequestId>::new());
            for (request, key, mutation) in applies {
                if let Some(signatures) = &signatures
                    && let Err(why) = check_mutation(&**signatures, &key, &mutation, now)
                {
                    outcomes.push((request, Err(LocalFailure::SignatureRefused(why))));
                    continue;
                }
                writes.push(Write::new(key, mutation));
                requests.push(request);
            }
            // A batch keeps its writes for the fallback below; a lone write needs none.
            let committed = match writes.len() {
                0 => Ok(Vec::new()),
                1 => measured.commit(std::mem::take(&mut writes)).await,
                _ => measured.commit(writes.clone()).await,
            };
            match committed {
                Ok(records) => {
                    outcomes.extend(requests.into_iter().zip(records.into_iter().map(Ok)))
                }
                // One write the batch cannot take (a value of another kind) must not fail the
                // others: each alone, with its own outcome.
                Err(_) if writes.len() > 1 => {
                    for (write, request) in writes.into_iter().zip(requests) {
                        let one = measured.commit(vec![write]).await.and_then(|mut records| {
                            records.pop().ok_or(EngineError::Internal {
                                detail: "a commit of one write returned no record".into(),
                            })
                        });
                        outcomes.push((request, one.map_err(local_failure)));
                    }
                }
                Err(err) => {
                    let failure = local_failure(err);
                    outcomes.extend(requests.into_iter().map(|r| (r, Err(failure.clone()))));
                }
            }
            for (request, result) in outcomes {
                let _ = finished.send(Input::Applied { request, result });
            }
        });
    }

    /// Merges the records from peers (and read repairs) gathered since the last call into the
    /// local engine, off the loop, in one commit: the replications of many writes cost one
    /// transaction and their acknowledgements one write per peer. Signature checks run in
    /// that task too.
    fn merge_all(&mut self) {
        if self.merges.is_empty() {
            return;
        }
        let merges = std::mem::take(&mut self.merges);
        let (measured, metrics, transport) = (
            self.measured.clone(),
            self.metrics.clone(),
            self.transport.clone(),
        );
        let signatures = self.config.signatures.clone();
        self.off_loop(async move {
            let mut acks: BTreeMap<NodeId, Vec<Envelope>> = BTreeMap::new();
            let mut ack = |to: Option<(NodeId, RequestId)>| {
                if let Some((to, request)) = to {
                    let envelope = Envelope::new(Message::Replicated { request });
                    acks.entry(to).or_default().push(envelope);
                }
            };
            let mut writes = Vec::new();
            let mut waiting = Vec::new();
            for Merge {
                key,
                record,
                horizon_ms,
                ack: to,
            } in merges
            {
                let stored = measured.get(&key).await;
                // A record this replica already holds (a repeated repair, a duplicate) changes
                // nothing: acknowledge without a commit. Nor does an old tombstone of a key
                // this replica holds nothing of (see `past_grace`).
                let known = match &stored {
                    Ok(Some(stored)) => {
                        let mut merged = stored.clone();
                        merged.merge(&record);
                        merged == *stored
                    }
                    Ok(None) => past_grace(&record, horizon_ms),
                    Err(_) => false,
                };
                if known {
                    ack(to);
                    continue;
                }
                // Only a record that would change what is stored needs its signature checked
                // (anti-entropy re-sends what replicas already hold).
                if refuses(signatures.as_deref(), &key, &record) {
                    continue;
                }
                if let Ok(Some(stored)) = &stored
                    && stored.causality(&record) == Causality::Concurrent
                {
                    metrics.conflict(record.value.kind().as_str());
                }
                writes.push(Write::new(key, Mutation::Merge(record)));
                waiting.push(to);
            }
            if !writes.is_empty() {
                let batch = match writes.len() {
                    1 => std::mem::take(&mut writes),
                    _ => writes.clone(),
                };
                match measured.commit(batch).await {
                    Ok(_) => waiting.into_iter().for_each(&mut ack),
                    Err(err) if writes.is_empty() => {
                        tracing::warn!(%err, "merging a replicated record failed")
                    }
                    // One record the batch cannot take (a value of another kind) must not
                    // hold up the others: each alone.
                    Err(_) => {
                        for (write, to) in writes.into_iter().zip(waiting) {
                            match measured.commit(vec![write]).await {
                                Ok(_) => ack(to),
                                Err(err) => {
                                    tracing::warn!(%err, "merging a replicated record failed")
                                }
                            }
                        }
                    }
                }
            }
            for (to, envelopes) in acks {
                transport.send_all(&to, envelopes);
            }
            None
        });
    }

    fn answer(&mut self, caller: Caller, answer: Answer) {
        let answer = match answer {
            Answer::Repair(event) => return self.repair_event(caller, event),
            answer => answer,
        };
        let Some(waiter) = self.waiting.remove(&caller) else {
            return;
        };
        match (waiter, answer) {
            (Waiting::Outcome(reply), Answer::Write(outcome)) => {
                self.metrics.request("write", &outcome);
                let _ = reply.send(outcome);
            }
            (Waiting::Outcome(reply), Answer::Read(outcome)) => {
                self.metrics.request("read", &outcome);
                let _ = reply.send(outcome);
            }
            (Waiting::Scan(reply), Answer::Scan(page)) => {
                let _ = reply.send(page);
            }
            (Waiting::Leave(reply), Answer::Leave(result)) => {
                let result = result.map_err(|remaining| NodeError::HandoffIncomplete { remaining });
                let _ = reply.send(result);
            }
            _ => tracing::error!(caller, "an answer of the wrong kind"),
        }
    }

    /// A repair's progress: the caller learns whether it started, then gets each step on its
    /// channel, which closes when the repair is over.
    fn repair_event(&mut self, caller: Caller, event: RepairEvent) {
        let Some(Waiting::Repair { started, progress }) = self.waiting.get_mut(&caller) else {
            return;
        };
        match event {
            RepairEvent::Started => {
                if let Some(started) = started.take() {
                    let _ = started.send(true);
                }
            }
            RepairEvent::Step(step) => {
                let _ = progress.try_send(step);
            }
            RepairEvent::Refused => {
                if let Some(started) = started.take() {
                    let _ = started.send(false);
                }
                self.waiting.remove(&caller);
            }
            RepairEvent::Over => {
                self.waiting.remove(&caller);
            }
        }
    }

    fn observe(&self, observation: Observation) {
        match observation {
            Observation::ReplicationLag { ms } => self.metrics.replication_lag(ms as f64 / 1000.0),
            Observation::QuorumReachable {
                write,
                read,
                over_ms,
            } => self
                .metrics
                .quorum_reachable(write, read, over_ms as f64 / 1000.0),
            Observation::Expired => self.metrics.expired(),
            Observation::ReadYourWritesMissed => self.metrics.read_your_writes_violated(),
            Observation::Repaired => self.metrics.repaired(),
            Observation::ForwardedWrite(outcome) => {
                self.metrics.request("forwarded_write", &outcome)
            }
        }
    }
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
