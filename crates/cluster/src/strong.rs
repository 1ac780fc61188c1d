//! Strong collections in a cluster: the node's member of the Raft group
//! ([`agentstore_consensus::Group`]) on the node's own transport, seen as an engine.
//!
//! Raft messages travel as opaque `Raft` / `RaftReply` frames on the same connections as
//! replication, in their own inbox (so a busy replication loop never delays a heartbeat into
//! an election). A call waits for its reply by request id; a call with no reply in time is a
//! timeout, which the group treats as possibly delivered.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentstore_consensus::{
    Group, GroupConfig, GroupError, GroupStatus, MemberId, ReadLevel, Rpc, RpcError, RpcFuture,
};
use agentstore_core::record::{Expect, Mutation};
use agentstore_core::replication::Message;
use agentstore_core::signing::Signatures;
use agentstore_core::{Key, NodeId, Record};
use agentstore_engine::changelog::ChangePage;
use agentstore_engine::{DynEngine, EngineError, EngineFuture, Write, lock};
use agentstore_wire::Envelope;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::metrics::registered;
use crate::node::now_ms;
use crate::signatures::SignedCollections;
use crate::transport::{Incoming, RaftRoute, ServeFuture, Transport};

/// Raft requests served at once.
const SERVING: usize = 256;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

/// The transport as the Raft member sees it.
#[derive(Debug)]
struct RaftRpc {
    transport: Transport,
    waiting: Waiting,
    next: AtomicU64,
}

impl Rpc for RaftRpc {
    fn call(&self, to: &MemberId, addr: &str, request: Vec<u8>, timeout: Duration) -> RpcFuture {
        let member = to.0.clone();
        let (Ok(node), Ok(addr)) = (NodeId::new(member.clone()), addr.parse::<SocketAddr>()) else {
            return Box::pin(async move { Err(RpcError::Unreachable(member)) });
        };
        self.transport.add_peer(&node, addr);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        lock(&self.waiting).insert(id, reply);
        self.transport.send(
            &node,
            Envelope {
                request: id,
                deadline_ms: now_ms() + timeout.as_millis() as u64,
                message: Message::Raft {
                    request: id,
                    data: request,
                },
            },
        );
        let waiting = Arc::clone(&self.waiting);
        Box::pin(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(bytes)) => Ok(bytes),
                _ => {
                    // A late reply finds nobody waiting.
                    lock(&waiting).remove(&id);
                    Err(RpcError::Timeout { member, timeout })
                }
            }
        })
    }
}

/// Serves one Raft request from another member, once one of `slots` is free, on a task of
/// its own (an append waits for its fsync; the next request need not).
async fn serve(group: Group, transport: Transport, slots: Arc<Semaphore>, incoming: Incoming) {
    let Incoming { from, envelope } = incoming;
    let Message::Raft { request, data } = envelope.message else {
        return;
    };
    let Ok(slot) = slots.acquire_owned().await else {
        return;
    };
    tokio::spawn(async move {
        let data = group.serve(&data).await;
        transport.send(&from, Envelope::new(Message::RaftReply { request, data }));
        drop(slot);
    });
}

/// How the node's Raft member is set up.
#[derive(Debug, Clone)]
pub struct StrongConfig {
    /// The node.
    pub id: NodeId,
    /// Where the node listens for peers (told to the other members).
    pub peer_addr: SocketAddr,
    /// The data directory (the Raft files live beside the local engine's).
    pub dir: PathBuf,
    /// The members the group starts with, this node included, by peer address.
    pub voters: BTreeMap<NodeId, SocketAddr>,
    /// How long a strong write or read may take.
    pub request_timeout: Duration,
    /// The check of signed collections, run by every member on every entry it applies.
    pub signatures: Option<Arc<SignedCollections>>,
}

/// The node's member of the Raft group, as an engine for strong collections: writes and
/// batches through the log, linearizable reads and scans through the leader.
#[derive(Debug, Clone)]
pub struct StrongEngine {
    group: Group,
    metrics: Arc<StrongMetrics>,
}

#[derive(Debug)]
struct StrongMetrics {
    registry: Registry,
    commit_seconds: Histogram,
    term: Gauge,
    leader: Gauge,
    leader_changes: Gauge,
    last_log: Gauge,
    committed: Gauge,
    applied: Gauge,
    apply_lag: Gauge,
    quorum_ack_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl StrongMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("agentstore_raft");
        let commit_seconds = registered(
            &mut registry,
            "commit_seconds",
            "Time from proposing a strong write to its answer (applied by the leader)",
            Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            registered(registry, name, help, Gauge::default())
        };
        let term = gauge(&mut registry, "term", "The current Raft term");
        let leader = gauge(
            &mut registry,
            "is_leader",
            "1 if this node leads the Raft group",
        );
        let leader_changes = gauge(
            &mut registry,
            "leader_changes",
            "Leader changes this node has seen since it started",
        );
        let last_log = gauge(
            &mut registry,
            "last_log_index",
            "The last entry in this node's log",
        );
        let committed = gauge(
            &mut registry,
            "committed_index",
            "The last entry known committed by a quorum",
        );
        let applied = gauge(
            &mut registry,
            "applied_index",
            "The last entry applied to this node's state machine",
        );
        let apply_lag = gauge(
            &mut registry,
            "apply_lag_entries",
            "Committed entries not yet applied here",
        );
        let quorum_ack_seconds = registered(
            &mut registry,
            "quorum_ack_age_seconds",
            "On the leader: how long ago a quorum last acknowledged it (large = no quorum); -1 elsewhere",
            Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
        );
        Self {
            registry,
            commit_seconds,
            term,
            leader,
            leader_changes,
            last_log,
            committed,
            applied,
            apply_lag,
            quorum_ack_seconds,
        }
    }

    fn observe(&self, status: &GroupStatus) {
        let index = |i: Option<u64>| i.map_or(0, |i| i as i64 + 1);
        self.term.set(status.term as i64);
        self.leader.set(i64::from(status.state == "leader"));
        self.leader_changes.set(status.leader_changes as i64);
        self.last_log.set(index(status.last_log));
        self.committed.set(index(status.committed));
        self.applied.set(index(status.applied));
        self.apply_lag
            .set((index(status.committed) - index(status.applied)).max(0));
        self.quorum_ack_seconds.set(
            status
                .quorum_ack_ms
                .filter(|_| status.state == "leader")
                .map_or(-1.0, |ms| ms as f64 / 1000.0),
        );
    }
}

fn group_error(err: GroupError) -> EngineError {
    match err {
        GroupError::NoLeader { .. } => EngineError::Unavailable {
            backend: "raft",
            detail: err.to_string(),
        },
        GroupError::Indeterminate { detail } => EngineError::Indeterminate {
            backend: "raft",
            detail,
        },
        GroupError::Refused(refused) => refused,
        GroupError::Storage { detail } => EngineError::Storage { detail },
        GroupError::Membership { detail } => EngineError::InvalidSettings { detail },
        // A full disk stays typed: `DiskFull`.
        GroupError::Down(failure) => failure,
    }
}

impl StrongEngine {
    /// Starts the node's Raft member on `transport` (which from now on routes Raft frames to
    /// it).
    pub async fn start(config: StrongConfig, transport: Transport) -> Result<Self, EngineError> {
        let waiting: Waiting = Arc::default();
        let rpc = Arc::new(RaftRpc {
            transport: transport.clone(),
            waiting: Arc::clone(&waiting),
            next: AtomicU64::new(1),
        });
        let voters = config
            .voters
            .iter()
            .map(|(id, addr)| (MemberId(id.to_string()), addr.to_string()))
            .collect();
        let mut group_config = GroupConfig::new(
            MemberId(config.id.to_string()),
            config.peer_addr.to_string(),
            config.dir,
            voters,
        );
        group_config.request_timeout = config.request_timeout;
        group_config.signatures = config
            .signatures
            .map(|signatures| signatures as Arc<dyn Signatures>);
        // Requests that arrive while the group starts wait for it.
        let (started, group_of) = watch::channel::<Option<Group>>(None);
        let slots = Arc::new(Semaphore::new(SERVING));
        transport.route_raft(RaftRoute {
            requests: Arc::new({
                let transport = transport.clone();
                move |incoming| -> ServeFuture {
                    let (mut group_of, transport, slots) =
                        (group_of.clone(), transport.clone(), Arc::clone(&slots));
                    Box::pin(async move {
                        let group = match group_of.wait_for(Option::is_some).await {
                            Ok(group) => group.clone().expect("waited for a group"),
                            Err(_) => return,
                        };
                        serve(group, transport, slots, incoming).await;
                    })
                }
            }),
            replies: Arc::new(move |request, data| {
                // A late reply finds nobody waiting.
                if let Some(caller) = lock(&waiting).remove(&request) {
                    let _ = caller.send(data);
                }
            }),
        });
        let group = Group::start(group_config, rpc).await.map_err(group_error)?;
        started.send_replace(Some(group.clone()));
        Ok(Self {
            group,
            metrics: Arc::new(StrongMetrics::new()),
        })
    }

    /// The Raft member.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// `Err` with the failure if the last write to the Raft log or state machine failed (a
    /// full disk); `Ok` again once a write succeeds: the member starts again by itself.
    pub fn health(&self) -> Result<(), String> {
        self.group.health().map_err(|e| e.to_string())
    }

    /// The Raft metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        self.metrics.observe(&self.group.status());
        crate::metrics::text(&self.metrics.registry)
    }
}

impl StrongEngine {
    /// `purge_expired`: replaces, through the log, every value of the strong collections that expired by
    /// `now_ms` with a tombstone, and answers how many; only the leader does it (elsewhere:
    /// 0). Each delete is conditional on the expired record's version, so a key written again
    /// since keeps its new value; the value's space is given back, its key stays as the
    /// tombstone every strong delete leaves, and watchers see the delete.
    async fn delete_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        if self.group.status().state != "leader" {
            return Ok(0);
        }
        let mut purged = 0;
        let mut after: Option<Key> = None;
        loop {
            // The leader's own copy: the conditional delete through the log decides.
            let page = self
                .group
                .scan(b"", after.as_ref(), 1000, ReadLevel::Stale)
                .await
                .map_err(group_error)?;
            let Some((last, _)) = page.last() else {
                return Ok(purged);
            };
            after = Some(last.clone());
            for (key, record) in page {
                if record.is_tombstone() || !record.expired(now_ms) {
                    continue;
                }
                let delete =
                    Write::expecting(key, Mutation::Delete, Expect::Version(record.version));
                match self.group.write(vec![delete]).await {
                    Ok(_) => purged += 1,
                    // Written again (or deleted) since: nothing to purge.
                    Err(GroupError::Refused(EngineError::ExpectationFailed { .. })) => {}
                    Err(err) => return Err(group_error(err)),
                }
            }
        }
    }

    fn read<'a>(&'a self, key: &'a Key, level: ReadLevel) -> EngineFuture<'a, Option<Record>> {
        Box::pin(async move { self.group.read(key, level).await.map_err(group_error) })
    }
}

impl DynEngine for StrongEngine {
    fn backend(&self) -> &'static str {
        "raft"
    }

    fn purge_expired(&self, now_ms: u64) -> EngineFuture<'_, usize> {
        Box::pin(self.delete_expired(now_ms))
    }

    fn get<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        self.read(key, ReadLevel::Linearizable)
    }

    fn get_stale<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        self.read(key, ReadLevel::Stale)
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
        start_after: Option<&'a Key>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(Key, Record)>> {
        Box::pin(async move {
            self.group
                .scan(prefix, start_after, limit, ReadLevel::Linearizable)
                .await
                .map_err(group_error)
        })
    }

    fn commit(&self, writes: Vec<Write>) -> EngineFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.group.write(writes).await.map_err(group_error);
            self.metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }

    fn prepare<'a>(&'a self, txn: &'a str, writes: Vec<Write>) -> EngineFuture<'a, ()> {
        Box::pin(async move { self.group.prepare(txn, writes).await.map_err(group_error) })
    }

    fn resolve<'a>(&'a self, txn: &'a str, commit: bool) -> EngineFuture<'a, Vec<Record>> {
        Box::pin(async move { self.group.resolve(txn, commit).await.map_err(group_error) })
    }

    fn changes<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> EngineFuture<'a, ChangePage> {
        // What this member has applied, in the log's order.
        Box::pin(async move {
            self.group
                .changes(prefix, after, limit, wait)
                .await
                .map_err(group_error)
        })
    }
}
