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

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_core::causal::{self, CausalWrite};
use agentstore_core::replication::Message;
use agentstore_core::signing::Signatures;
use agentstore_core::{Key, NodeId, Record, VersionVector};
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
/// Most writes sent in one answer to a peer's `CausalHave` (a lagging peer asks again).
const MAX_CATCH_UP: usize = 2048;
/// Most writes in one `CausalWrites` message, and records in one snapshot chunk.
const MAX_PER_MESSAGE: usize = 256;
/// How long a peer that needed a snapshot waits before it is sent another.
const SNAPSHOT_AGAIN: Duration = Duration::from_secs(5);
/// Most records of a snapshot being received (bounds the memory it takes).
const MAX_SNAPSHOT_RECORDS: usize = 4_000_000;

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
        let replicator = Replicator {
            shared: Arc::downgrade(&shared),
            transport,
            members,
            acks: BTreeMap::new(),
            trimmed_to: VersionVector::new(),
            snapshots_sent: BTreeMap::new(),
            receiving: BTreeMap::new(),
            metrics,
        };
        tokio::spawn(replicator.run(incoming, committed, config.sync_interval));
        Ok(Self { shared })
    }

    /// What this node has applied, per origin.
    pub fn applied(&self) -> VersionVector {
        self.shared.applied.borrow().clone()
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
}

/// The network side: pushes this node's writes, answers peers' `CausalHave`, hands peers'
/// writes to the store, trims the log.
struct Replicator {
    /// The engine's state; the replicator ends when the engine is dropped.
    shared: std::sync::Weak<Shared>,
    transport: Transport,
    members: watch::Receiver<Vec<NodeId>>,
    /// What each member last said it has applied.
    acks: BTreeMap<NodeId, VersionVector>,
    /// How far the log was last trimmed.
    trimmed_to: VersionVector,
    /// When each peer was last sent a snapshot.
    snapshots_sent: BTreeMap<NodeId, Instant>,
    /// Snapshots being received, by sender: applied once every chunk is here.
    receiving: BTreeMap<NodeId, Receiving>,
    metrics: CausalMetrics,
}

/// The chunks of one snapshot received so far.
struct Receiving {
    id: u64,
    total: u32,
    applied: VersionVector,
    chunks: BTreeMap<u32, Vec<(Key, Record)>>,
    records: usize,
}

impl Replicator {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut committed: mpsc::UnboundedReceiver<Committed>,
        interval: Duration,
    ) {
        let mut sync = tokio::time::interval(interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(Incoming { from, envelope }) = incoming.recv() => {
                    let Some(shared) = self.shared.upgrade() else { return };
                    self.incoming(&shared, from, envelope.message);
                }
                report = committed.recv() => {
                    let Some(report) = report else { return };
                    self.committed(report);
                }
                _ = sync.tick() => {
                    let Some(shared) = self.shared.upgrade() else { return };
                    self.sync(&shared);
                }
            }
        }
    }

    fn members(&self) -> Vec<NodeId> {
        self.members.borrow().clone()
    }

    fn send_writes(&self, to: &NodeId, writes: &[CausalWrite]) {
        for chunk in writes.chunks(MAX_PER_MESSAGE) {
            self.transport.send(
                to,
                Envelope::new(Message::CausalWrites {
                    writes: chunk.to_vec(),
                }),
            );
        }
    }

    fn committed(&mut self, report: Committed) {
        let metrics = &self.metrics;
        for waited in &report.waits_ms {
            metrics.dependency_wait.observe(*waited as f64 / 1000.0);
        }
        metrics.delivered.inc_by(report.waits_ms.len() as u64);
        metrics.buffer_full.inc_by(report.dropped);
        metrics.buffered.set(report.buffered as i64);
        metrics.snapshots_applied.inc_by(report.snapshots);
        if !report.own.is_empty() {
            for member in self.members() {
                self.send_writes(&member, &report.own);
            }
        }
    }

    fn incoming(&mut self, shared: &Shared, from: NodeId, message: Message) {
        match message {
            Message::CausalWrites { writes } => {
                let request = Request::Remote {
                    writes,
                    now_ms: now_ms(),
                };
                // A full queue drops the writes: the peer sends them again on its next sync.
                if shared.store.requests.try_send(request).is_err() {
                    self.metrics.buffer_full.inc();
                }
            }
            Message::CausalHave { applied } => {
                self.answer_have(shared, &from, &applied);
                self.acks.insert(from, applied);
            }
            Message::CausalSnapshot {
                id,
                index,
                total,
                applied,
                entries,
            } => self.snapshot_chunk(shared, from, id, index, total, applied, entries),
            _ => {}
        }
    }

    /// Sends `peer` what it lacks of this node's log, up to [`MAX_CATCH_UP`] writes.
    fn answer_have(&mut self, shared: &Shared, peer: &NodeId, theirs: &VersionVector) {
        let mine = shared.applied.borrow().clone();
        let wanted = causal::missing(&mine, theirs);
        if wanted.is_empty() {
            return;
        }
        let view = match View::new(&shared.store.db) {
            Ok(view) => view,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the causal log");
                return;
            }
        };
        let trimmed = view.trimmed().unwrap_or_default();
        if wanted
            .iter()
            .any(|(origin, first, _)| trimmed.get(origin) >= *first)
        {
            // Every member known when they were trimmed had them: this peer is new (or lost
            // its data). It gets this node's whole state instead.
            self.send_snapshot(peer, view);
            return;
        }
        let mut batch = Vec::new();
        for (origin, first, last) in wanted {
            match view.logged(&origin, first, last, MAX_CATCH_UP - batch.len()) {
                Ok(writes) => batch.extend(writes),
                Err(err) => tracing::warn!(error = %err, "cannot read the causal log"),
            }
            if batch.len() >= MAX_CATCH_UP {
                break;
            }
        }
        self.send_writes(peer, &batch);
    }

    /// Sends `peer` the whole state of `view` in chunks, at most every [`SNAPSHOT_AGAIN`].
    fn send_snapshot(&mut self, peer: &NodeId, view: View) {
        let recently = self
            .snapshots_sent
            .get(peer)
            .is_some_and(|sent| sent.elapsed() < SNAPSHOT_AGAIN);
        if recently {
            return;
        }
        self.snapshots_sent.insert(peer.clone(), Instant::now());
        self.metrics.snapshots_sent.inc();
        let (applied, records) = match (view.applied(), view.scan(b"", None, usize::MAX)) {
            (Ok(applied), Ok(records)) => (applied, records),
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "cannot read the causal state for a snapshot");
                return;
            }
        };
        let id = now_ms() ^ (records.len() as u64).rotate_left(40);
        let chunks: Vec<Vec<(Key, Record)>> = if records.is_empty() {
            vec![Vec::new()]
        } else {
            records.chunks(MAX_PER_MESSAGE).map(<[_]>::to_vec).collect()
        };
        let total = chunks.len() as u32;
        tracing::info!(%peer, records = records.len(), chunks = total, "sending a causal snapshot");
        let (transport, peer) = (self.transport.clone(), peer.clone());
        // Paced, so the peer's queue (which drops what does not fit) takes every chunk.
        tokio::spawn(async move {
            for (index, entries) in chunks.into_iter().enumerate() {
                let message = Message::CausalSnapshot {
                    id,
                    index: index as u32,
                    total,
                    applied: applied.clone(),
                    entries,
                };
                transport.send(&peer, Envelope::new(message));
                if index % 64 == 63 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
    }

    /// Keeps a snapshot chunk; applies the snapshot once every chunk is here.
    #[allow(clippy::too_many_arguments)]
    fn snapshot_chunk(
        &mut self,
        shared: &Shared,
        from: NodeId,
        id: u64,
        index: u32,
        total: u32,
        applied: VersionVector,
        entries: Vec<(Key, Record)>,
    ) {
        let fresh = Receiving {
            id,
            total,
            applied,
            chunks: BTreeMap::new(),
            records: 0,
        };
        let receiving = match self.receiving.entry(from.clone()) {
            Entry::Occupied(kept) if kept.get().id == id => kept.into_mut(),
            // A newer snapshot replaces one that lost chunks.
            Entry::Occupied(mut older) => {
                older.insert(fresh);
                older.into_mut()
            }
            Entry::Vacant(none) => none.insert(fresh),
        };
        receiving.records += entries.len();
        if receiving.records > MAX_SNAPSHOT_RECORDS {
            tracing::warn!(%from, "a causal snapshot is too large to receive; ignored");
            self.receiving.remove(&from);
            return;
        }
        receiving.chunks.insert(index, entries);
        if receiving.chunks.len() < receiving.total as usize {
            return;
        }
        let Some(done) = self.receiving.remove(&from) else {
            return;
        };
        let entries: Vec<(Key, Record)> = done.chunks.into_values().flatten().collect();
        let request = Request::Snapshot {
            entries,
            applied: done.applied,
            now_ms: now_ms(),
        };
        if shared.store.requests.try_send(request).is_err() {
            // Busy: the peer sends another snapshot after `SNAPSHOT_AGAIN`.
            self.metrics.buffer_full.inc();
        }
    }

    fn sync(&mut self, shared: &Shared) {
        let members = self.members();
        let mine = shared.applied.borrow().clone();
        for member in &members {
            self.transport.send(
                member,
                Envelope::new(Message::CausalHave {
                    applied: mine.clone(),
                }),
            );
        }
        // Replication lag in writes: what some member has applied and this node has not.
        let behind: u64 = self
            .acks
            .iter()
            .filter(|(node, _)| members.contains(node))
            .map(|(_, theirs)| {
                causal::missing(theirs, &mine)
                    .iter()
                    .map(|(_, first, last)| last + 1 - first)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        self.metrics.behind.set(behind as i64);
        // Trim what every member has: all of them must have reported.
        self.acks.retain(|node, _| members.contains(node));
        if self.acks.len() < members.len() {
            return;
        }
        let floor = causal::stable(self.acks.values().chain(std::iter::once(&mine)));
        if floor.dominates(&self.trimmed_to) && floor != self.trimmed_to {
            self.trimmed_to = floor.clone();
            let total: u64 = floor.iter().map(|(_, n)| n).sum();
            if shared
                .store
                .requests
                .try_send(Request::Trim { floor })
                .is_ok()
            {
                self.metrics.trimmed.set(total as i64);
            }
        }
    }
}
