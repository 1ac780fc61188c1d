//! A node: the replication coordinator, the local engine and the transport, in one loop.
//!
//! The loop owns the [`Coordinator`] and executes its effects: local applies and reads on the
//! engine, messages on the transport, hints in the engine's durable hint table, replies to the
//! waiting callers. It also does a replica's duties (merge a replicated record and acknowledge
//! it; answer reads) and delivers stored hints every half second until the peer acknowledges
//! them.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentstore_core::codec;
use agentstore_core::merkle::{MerkleTree, entry_digest};
use agentstore_core::placement::Ring;
use agentstore_core::record::Mutation;
use agentstore_core::replication::{
    Coordinator, Effect, HINT_REQUEST_BIT, Input, Message, Outcome, RequestId,
};
use agentstore_core::{Causality, Key, NodeId, Record};
use agentstore_engine::{Engine, EngineMetrics, Instrumented, LocalEngine};
use agentstore_wire::Envelope;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::metrics::NodeMetrics;
use crate::transport::{Incoming, Transport};

/// Client requests waiting for the loop.
const COMMANDS: usize = 1024;
/// Depth of the anti-entropy trees (64 buckets).
const TREE_DEPTH: u8 = 6;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub id: NodeId,
    /// Every other node and its peer address.
    pub peers: BTreeMap<NodeId, SocketAddr>,
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
}

/// Why a call to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node has shut down.
    #[error("the node has shut down")]
    Stopped,
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
}

/// A running node. Dropping it (or calling [`Node::shutdown`]) stops it.
#[derive(Debug)]
pub struct Node {
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    registry: Registry,
}

impl Node {
    /// Starts a node serving peers on `listener`.
    pub fn start(config: NodeConfig, engine: LocalEngine, listener: TcpListener) -> Self {
        let (stop, stopped) = watch::channel(false);
        let mut registry = Registry::default();
        let measured = Instrumented::new(
            engine.clone(),
            "local",
            EngineMetrics::register(&mut registry),
        );
        let metrics = NodeMetrics::register(&mut registry);
        let (transport, inbox) = Transport::start(
            config.id.clone(),
            listener,
            config.peers.clone(),
            stopped.clone(),
            metrics.dropped(),
        );
        let (commands, requests) = mpsc::channel(COMMANDS);
        let mut nodes: Vec<NodeId> = config.peers.keys().cloned().collect();
        nodes.push(config.id.clone());
        let state = Loop {
            ring: Ring::new(nodes, 64),
            coordinator: Coordinator::new(config.id.clone()),
            config,
            engine,
            measured,
            metrics,
            transport,
            replies: BTreeMap::new(),
            next_request: 1,
            next_peer: 0,
        };
        let task = tokio::spawn(state.run(requests, inbox, stopped));
        Self {
            commands,
            stop,
            task,
            registry,
        }
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

    /// This node's metrics in the OpenMetrics text format (served as `/metrics`).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Stops the node: its loop, its listener and its connections end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Loop {
    config: NodeConfig,
    ring: Ring,
    coordinator: Coordinator,
    /// The engine itself, for hints (node-local state the `Engine` trait does not cover).
    engine: LocalEngine,
    /// The same engine, measured: every record read and write goes through it.
    measured: Instrumented<LocalEngine>,
    metrics: NodeMetrics,
    transport: Transport,
    replies: BTreeMap<RequestId, (&'static str, oneshot::Sender<Outcome>)>,
    /// The peer the next anti-entropy round compares with.
    next_peer: usize,
    next_request: RequestId,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Loop {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<Incoming>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut hints = tokio::time::interval(Duration::from_millis(500));
        let mut sync = tokio::time::interval(self.config.anti_entropy_interval);
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                Some(command) = requests.recv() => self.command(command).await,
                Some(incoming) = inbox.recv() => self.incoming(incoming).await,
                _ = tick.tick() => {
                    let effects = self.coordinator.step(Input::Tick, now_ms());
                    self.execute(effects).await;
                }
                _ = hints.tick() => self.deliver_hints().await,
                _ = sync.tick() => self.start_anti_entropy().await,
            }
        }
    }

    async fn command(&mut self, command: Command) {
        let request = self.next_request;
        self.next_request += 1;
        let deadline_ms = now_ms() + self.config.request_timeout.as_millis() as u64;
        let input = match command {
            Command::Write {
                key,
                mutation,
                reply,
            } => {
                self.replies.insert(request, ("write", reply));
                let replicas = self.ring.replicas(key.as_bytes(), self.config.replicas);
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
                self.replies.insert(request, ("read", reply));
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
        match envelope.message {
            Message::Replicate {
                request,
                key,
                record,
            } => {
                if let Ok(Some(stored)) = self.measured.get(&key).await
                    && stored.causality(&record) == Causality::Concurrent
                {
                    self.metrics.conflict(record.value.kind().as_str());
                }
                if self
                    .measured
                    .apply(key, Mutation::Merge(record))
                    .await
                    .is_ok()
                    && request != 0
                {
                    self.transport
                        .send(&from, Envelope::new(Message::Replicated { request }));
                }
            }
            Message::Read { request, key } => {
                if let Ok(record) = self.measured.get(&key).await {
                    self.transport
                        .send(&from, Envelope::new(Message::ReadReply { request, record }));
                }
            }
            Message::TreeLeaves { depth, leaves } => self.compare_trees(&from, depth, leaves).await,
            Message::Buckets { depth, buckets } if depth == TREE_DEPTH => {
                let buckets: std::collections::BTreeSet<usize> =
                    buckets.into_iter().map(|b| b as usize).collect();
                self.send_buckets(&from, &buckets).await;
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
                let effects = self
                    .coordinator
                    .step(Input::Received { from, message }, now_ms());
                self.execute(effects).await;
            }
        }
    }

    /// Every local record that `peer` replicates too.
    async fn shared_with(&self, peer: &NodeId) -> Vec<(Key, Record)> {
        let mut shared = Vec::new();
        let mut after: Option<Key> = None;
        loop {
            let Ok(page) = self.measured.scan(b"", after.as_ref(), 1024).await else {
                break;
            };
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, record) in page {
                if self
                    .ring
                    .replicas(key.as_bytes(), self.config.replicas)
                    .contains(peer)
                {
                    shared.push((key, record));
                }
            }
        }
        shared
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
    async fn start_anti_entropy(&mut self) {
        let peers: Vec<NodeId> = self.config.peers.keys().cloned().collect();
        if peers.is_empty() {
            return;
        }
        let peer = peers[self.next_peer % peers.len()].clone();
        self.next_peer += 1;
        let tree = Self::tree(&self.shared_with(&peer).await);
        let message = Message::TreeLeaves {
            depth: TREE_DEPTH,
            leaves: tree.leaves().to_vec(),
        };
        self.transport.send(&peer, Envelope::new(message));
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
        if buckets.is_empty() {
            return;
        }
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
        for peer in self.config.peers.keys() {
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
                Effect::ApplyLocal {
                    request,
                    key,
                    mutation,
                } => {
                    let result = self
                        .measured
                        .apply(key, mutation)
                        .await
                        .map_err(|e| e.to_string());
                    queue.extend(
                        self.coordinator
                            .step(Input::LocalApplied { request, result }, now_ms()),
                    );
                }
                Effect::ReadLocal { request, key } => {
                    // A failed local read counts as an answer with nothing; the other replicas
                    // still answer, and the error is logged.
                    let record = self.measured.get(&key).await.unwrap_or_else(|err| {
                        tracing::warn!(%err, "local read failed");
                        None
                    });
                    queue.extend(
                        self.coordinator
                            .step(Input::LocalRead { request, record }, now_ms()),
                    );
                }
                Effect::MergeLocal { key, record } => {
                    if let Err(err) = self.measured.apply(key, Mutation::Merge(record)).await {
                        tracing::warn!(%err, "read repair of the local copy failed");
                    }
                }
                Effect::Send { to, message } => self.transport.send(&to, Envelope::new(message)),
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
                Effect::Reply { request, outcome } => {
                    if let Some((op, reply)) = self.replies.remove(&request) {
                        self.metrics.request(op, &outcome);
                        let _ = reply.send(outcome);
                    }
                }
            }
        }
    }
}
