//! Causal collections in a cluster: causal+ consistency by causal broadcast, seen as an
//! engine.
//!
//! Every member holds every causal key. A write is applied and made durable on the node that
//! takes it (available during partitions: no other node is asked), numbered, stamped with
//! its dependencies, and pushed to the members; a member applies it only after what it
//! depends on ([`agentstore_core::causal`]). Every `sync_interval` each node tells each
//! member what it has applied (`CausalHave`), and the member answers with what the node
//! lacks from its log — its own writes or others' it relays — so a lost push, a partition or
//! a restart heals, and a lagging node pulls at the pace it applies. Log entries every member
//! has applied are trimmed.
//!
//! Sessions ([`agentstore_engine::session`]): a call waits (at most `session_wait`) until
//! the node has applied the session's causal past, then answers from one consistent view and
//! grows the token by what that view has applied; a node that cannot catch up in time answers
//! [`EngineError::SessionBehind`], never an older state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_core::causal;
use agentstore_core::causal_sync as sync;
use agentstore_core::signing::Signatures;
use agentstore_core::{Key, NodeId, Record, VersionVector};
use agentstore_engine::changelog::ChangePage;
use agentstore_engine::{DynEngine, EngineError, EngineFuture, NodeClock, Write, session};
use agentstore_wire::Envelope;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use tokio::sync::{mpsc, oneshot, watch};

use crate::causal_store::{self, Committed, Request, Store, View};
use crate::metrics::registered;
use crate::node::now_ms;
use crate::signatures::SignedCollections;
use crate::transport::{Incoming, Transport};

/// Causal messages received and not yet handled.
const INBOX: usize = 1024;

/// How a node's causal replication is set up.
#[derive(Debug, Clone)]
pub struct CausalConfig {
    /// The data directory (the causal store lives beside the local engine's file).
    pub dir: PathBuf,
    /// The node's clock (the node's id and hybrid clock).
    pub clock: Arc<NodeClock>,
    /// How long a call waits for the node to catch up with its session.
    pub session_wait: Duration,
    /// How often the node tells each member what it has applied.
    pub sync_interval: Duration,
    /// Most remote writes waiting for their dependencies at once.
    pub buffer: usize,
    /// The check of signed collections (`None`: no collection is signed).
    pub signatures: Option<Arc<SignedCollections>>,
    /// Where the causal store's file is opened: the file system, or a test's disk.
    pub files: agentstore_engine::redb_file::Opener,
}

impl CausalConfig {
    /// The defaults: sessions wait up to 5 s, sync every 100 ms, 65 536 buffered writes.
    pub fn new(dir: PathBuf, clock: Arc<NodeClock>) -> Self {
        Self {
            dir,
            clock,
            session_wait: Duration::from_secs(5),
            sync_interval: Duration::from_millis(100),
            buffer: 65_536,
            signatures: None,
            files: agentstore_engine::redb_file::files(),
        }
    }
}

/// The node's causal collections as an engine.
#[derive(Debug, Clone)]
pub struct CausalEngine {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    applied: watch::Receiver<VersionVector>,
    session_wait: Duration,
    metrics: CausalMetrics,
}

#[derive(Debug, Clone)]
struct CausalMetrics {
    registry: Arc<Registry>,
    dependency_wait: Histogram,
    buffered: Gauge,
    buffer_full: Counter,
    session_waits: Counter,
    session_wait_seconds: Histogram,
    session_timeouts: Counter,
    writes: Counter,
    delivered: Counter,
    behind: Gauge,
    trimmed: Gauge,
    snapshots_sent: Counter,
    snapshots_applied: Counter,
}

impl CausalMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("agentstore_causal");
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        Self {
            dependency_wait: registered(
                &mut registry,
                "dependency_wait_seconds",
                "Time a peer's write waited in the buffer for the writes it depends on",
                seconds(),
            ),
            buffered: registered(
                &mut registry,
                "buffered_updates",
                "Peers' writes waiting for their dependencies",
                Gauge::default(),
            ),
            buffer_full: registered(
                &mut registry,
                "buffer_refused",
                "Peers' writes refused because the buffer was full (sent again on the next sync)",
                Counter::default(),
            ),
            session_waits: registered(
                &mut registry,
                "session_waits",
                "Calls that waited for this node to catch up with their session",
                Counter::default(),
            ),
            session_wait_seconds: registered(
                &mut registry,
                "session_wait_seconds",
                "How long calls waited for this node to catch up with their session",
                seconds(),
            ),
            session_timeouts: registered(
                &mut registry,
                "session_timeouts",
                "Calls refused because this node did not catch up with their session in time",
                Counter::default(),
            ),
            writes: registered(
                &mut registry,
                "writes",
                "Causal writes made on this node",
                Counter::default(),
            ),
            delivered: registered(
                &mut registry,
                "delivered",
                "Peers' causal writes applied on this node",
                Counter::default(),
            ),
            behind: registered(
                &mut registry,
                "behind_writes",
                "Writes the members have applied that this node has not (replication lag, in writes)",
                Gauge::default(),
            ),
            trimmed: registered(
                &mut registry,
                "log_trimmed_writes",
                "Causal writes this node has trimmed from its log (every member had applied them)",
                Gauge::default(),
            ),
            snapshots_sent: registered(
                &mut registry,
                "snapshots_sent",
                "Whole-state snapshots sent to members that lacked writes trimmed from the log",
                Counter::default(),
            ),
            snapshots_applied: registered(
                &mut registry,
                "snapshots_applied",
                "Members' whole-state snapshots applied here",
                Counter::default(),
            ),
            // Last: every field above has registered its metric by now.
            registry: Arc::new(registry),
        }
    }
}

impl CausalEngine {
    /// Opens the causal store and starts replicating with the node's members over its
    /// transport.
    pub fn start(
        config: CausalConfig,
        transport: Transport,
        members: watch::Receiver<Vec<NodeId>>,
    ) -> Result<Self, EngineError> {
        let (store, applied, committed) = causal_store::open(
            &config.dir,
            &config.files,
            Arc::clone(&config.clock),
            config.buffer,
            config
                .signatures
                .clone()
                .map(|signatures| signatures as Arc<dyn Signatures>),
        )?;
        let (inbox, incoming) = mpsc::channel(INBOX);
        transport.route_causal(inbox);
        let metrics = CausalMetrics::new();
        let shared = Arc::new(Shared {
            store,
            applied: applied.clone(),
            session_wait: config.session_wait,
            metrics: metrics.clone(),
        });
        let (finished, done) = mpsc::unbounded_channel();
        let replicator = Replicator {
            shared: Arc::downgrade(&shared),
            transport,
            members,
            state: sync::Replicator::new(sync::Limits::default()),
            metrics,
            finished,
        };
        tokio::spawn(replicator.run(incoming, committed, done, config.sync_interval));
        Ok(Self { shared })
    }

    /// What this node has applied, per origin.
    pub fn applied(&self) -> VersionVector {
        self.shared.applied.borrow().clone()
    }

    /// Every record of the causal store, read in one transaction (for a backup).
    pub fn snapshot(&self) -> Result<Vec<(Key, Record)>, EngineError> {
        View::new(&self.shared.store.db)?.scan(b"", None, usize::MAX)
    }

    /// `Err` with the failure if the last write to the causal store failed (a full disk); `Ok`
    /// again once a write succeeds: the store reopens its file by itself.
    pub fn health(&self) -> Result<(), String> {
        self.shared.store.db.health()
    }

    /// The causal metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        crate::metrics::text(&self.shared.metrics.registry)
    }

    /// Waits until this node has applied the current session's causal past.
    async fn catch_up(&self) -> Result<(), EngineError> {
        let Some(token) = session::current() else {
            return Ok(());
        };
        let mut applied = self.shared.applied.clone();
        if causal::covers(&applied.borrow(), &token.causal) {
            return Ok(());
        }
        let metrics = &self.shared.metrics;
        metrics.session_waits.inc();
        let started = Instant::now();
        let waited = tokio::time::timeout(
            self.shared.session_wait,
            applied.wait_for(|applied| causal::covers(applied, &token.causal)),
        )
        .await
        .map(|caught_up| caught_up.map(drop));
        metrics
            .session_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(EngineError::Closed),
            Err(_) => {
                metrics.session_timeouts.inc();
                let have = self.shared.applied.borrow().clone();
                let missing: Vec<String> = causal::missing(&token.causal, &have)
                    .into_iter()
                    .map(|(origin, first, last)| format!("{origin} {first}..={last}"))
                    .collect();
                Err(EngineError::SessionBehind {
                    backend: "causal",
                    waited_ms: started.elapsed().as_millis() as u64,
                    detail: format!("writes not yet here: {}", missing.join(", ")),
                })
            }
        }
    }

    /// Runs `read` on one consistent view once the node has caught up with the session, and
    /// grows the session by what the view has applied.
    async fn read<T>(
        &self,
        read: impl FnOnce(&View) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.catch_up().await?;
        let view = View::new(&self.shared.store.db)?;
        let out = read(&view)?;
        let applied = view.applied()?;
        session::observe(|token| token.observe_causal(&applied));
        Ok(out)
    }
}

impl DynEngine for CausalEngine {
    fn backend(&self) -> &'static str {
        "causal"
    }

    fn get<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        Box::pin(self.read(move |view| view.get(key)))
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
        start_after: Option<&'a Key>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(Key, Record)>> {
        Box::pin(self.read(move |view| view.scan(prefix, start_after, limit)))
    }

    fn commit(&self, writes: Vec<Write>) -> EngineFuture<'_, Vec<Record>> {
        Box::pin(async move {
            if writes.is_empty() {
                return Ok(Vec::new());
            }
            if writes
                .iter()
                .any(|w| w.expect.is_some() || w.fence.is_some())
            {
                return Err(EngineError::Unsupported {
                    detail: "a causal collection takes unconditional writes (one key or a \
                             batch, applied atomically everywhere); compare-and-set and fenced \
                             writes need the strong level"
                        .into(),
                });
            }
            // Writes follow the session's reads and earlier writes: the node must have them
            // before this write can depend on them.
            self.catch_up().await?;
            let (reply, answer) = oneshot::channel();
            self.shared
                .store
                .requests
                .send(Request::Local { writes, reply })
                .await
                .map_err(|_| EngineError::Closed)?;
            let (records, applied) = answer.await.map_err(|_| EngineError::Closed)??;
            session::observe(|token| token.observe_causal(&applied));
            self.shared.metrics.writes.inc();
            Ok(records)
        })
    }

    fn changes<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> EngineFuture<'a, ChangePage> {
        // The store applies a write only after everything it depends on: its feed is in
        // causal order.
        Box::pin(async move {
            let store = &self.shared.store;
            store
                .head
                .wait_for(after, wait, |after| {
                    View::new(&store.db)?.changes(prefix, after, limit)
                })
                .await
        })
    }
}

/// The network side: the runtime of core's causal [`sync::Replicator`]. It feeds it this
/// node's commits, peers' causal messages, log reads and syncs, and carries out its effects on
/// the store and the transport.
struct Replicator {
    /// The engine's state; the replicator ends when the engine is dropped.
    shared: std::sync::Weak<Shared>,
    transport: Transport,
    members: watch::Receiver<Vec<NodeId>>,
    state: sync::Replicator,
    metrics: CausalMetrics,
    /// Where log reads and snapshot loads done off the loop report back.
    finished: mpsc::UnboundedSender<sync::Input>,
}

impl Replicator {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut committed: mpsc::UnboundedReceiver<Committed>,
        mut done: mpsc::UnboundedReceiver<sync::Input>,
        interval: Duration,
    ) {
        let mut sync = tokio::time::interval(interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let input = tokio::select! {
                Some(Incoming { from, envelope }) = incoming.recv() => {
                    sync::Input::Received { from, message: envelope.message }
                }
                report = committed.recv() => {
                    let Some(report) = report else { return };
                    self.committed(&report);
                    sync::Input::Committed { own: report.own }
                }
                Some(input) = done.recv() => input,
                _ = sync.tick() => {
                    sync::Input::Sync { members: self.members.borrow().clone() }
                }
            };
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let applied = shared.applied.borrow().clone();
            let effects = self.state.step(input, &applied, now_ms());
            debug_assert_eq!(self.state.validate(), Ok(()));
            for effect in effects {
                self.execute(&shared, effect);
            }
        }
    }

    /// The store's metrics of a commit.
    fn committed(&self, report: &Committed) {
        let metrics = &self.metrics;
        for waited in &report.waits_ms {
            metrics.dependency_wait.observe(*waited as f64 / 1000.0);
        }
        metrics.delivered.inc_by(report.waits_ms.len() as u64);
        metrics.buffer_full.inc_by(report.dropped);
        metrics.buffered.set(report.buffered as i64);
        metrics.snapshots_applied.inc_by(report.snapshots);
    }

    fn execute(&mut self, shared: &Arc<Shared>, effect: sync::Effect) {
        match effect {
            sync::Effect::Send { to, message } => self.transport.send(&to, Envelope::new(message)),
            sync::Effect::SendSnapshot { to, chunks } => {
                let transport = self.transport.clone();
                // Paced, so the peer's queue (which drops what does not fit) takes every chunk.
                tokio::spawn(async move {
                    for (index, chunk) in chunks.into_iter().enumerate() {
                        transport.send(&to, Envelope::new(chunk));
                        if index % 64 == 63 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                });
            }
            sync::Effect::ReadLog {
                peer,
                wanted,
                limit,
            } => {
                let (shared, finished) = (Arc::clone(shared), self.finished.clone());
                tokio::task::spawn_blocking(move || {
                    if let Some(read) = read_log(&shared, &wanted, limit) {
                        let _ = finished.send(sync::Input::LogRead { peer, read });
                    }
                });
            }
            sync::Effect::LoadSnapshot { peer } => {
                let (shared, finished) = (Arc::clone(shared), self.finished.clone());
                tokio::task::spawn_blocking(move || {
                    let loaded = View::new(&shared.store.db)
                        .and_then(|view| Ok((view.applied()?, view.scan(b"", None, usize::MAX)?)));
                    match loaded {
                        Ok((applied, records)) => {
                            let _ = finished.send(sync::Input::SnapshotLoaded {
                                peer,
                                applied,
                                records,
                            });
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot read the causal state for a snapshot")
                        }
                    }
                });
            }
            sync::Effect::Deliver { writes } => {
                let request = Request::Remote {
                    writes,
                    now_ms: now_ms(),
                };
                // A full queue drops the writes: the peer sends them again on its next sync.
                if shared.store.requests.try_send(request).is_err() {
                    self.metrics.buffer_full.inc();
                }
            }
            sync::Effect::ApplySnapshot { entries, applied } => {
                let request = Request::Snapshot {
                    entries,
                    applied,
                    now_ms: now_ms(),
                };
                if shared.store.requests.try_send(request).is_err() {
                    // Busy: the peer sends another snapshot after a while.
                    self.metrics.buffer_full.inc();
                }
            }
            sync::Effect::Trim { floor } => {
                let _ = shared.store.requests.try_send(Request::Trim { floor });
            }
            sync::Effect::Observe(observation) => match observation {
                sync::Observation::Behind(writes) => {
                    self.metrics.behind.set(writes as i64);
                }
                sync::Observation::Trimmed(writes) => {
                    self.metrics.trimmed.set(writes as i64);
                }
                sync::Observation::SnapshotSent { peer, records } => {
                    self.metrics.snapshots_sent.inc();
                    tracing::info!(%peer, records, "sending a causal snapshot");
                }
                sync::Observation::SnapshotTooLarge { from } => {
                    tracing::warn!(%from, "a causal snapshot is too large to receive; ignored")
                }
            },
        }
    }
}

/// Reads the writes a peer lacks from the log (`None` if the log cannot be read).
fn read_log(shared: &Shared, wanted: &[(NodeId, u64, u64)], limit: usize) -> Option<sync::LogRead> {
    let view = View::new(&shared.store.db)
        .inspect_err(|err| tracing::warn!(error = %err, "cannot read the causal log"))
        .ok()?;
    let trimmed = view.trimmed().unwrap_or_default();
    if wanted
        .iter()
        .any(|(origin, first, _)| trimmed.get(origin) >= *first)
    {
        return Some(sync::LogRead::Trimmed);
    }
    let mut batch = Vec::new();
    for (origin, first, last) in wanted {
        match view.logged(origin, *first, *last, limit) {
            Ok(writes) => batch.extend(writes),
            Err(err) => tracing::warn!(error = %err, "cannot read the causal log"),
        }
    }
    Some(sync::LogRead::Writes(batch))
}
