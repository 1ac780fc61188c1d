//! Where a node keeps its causal collections: one redb file (`causal.redb`) holding the
//! records, the causal log and the applied vector, written by one thread.
//!
//! Every change — a write this node makes, a peer's write delivered — commits in one
//! transaction with the log entry that lets the node pass it on and the applied vector that
//! counts it, so after a crash the three agree: nothing applied is forgotten, nothing is
//! counted that was not applied. The writer thread owns the [`Delivery`] buffer and applies
//! every queued request in one transaction (group commit, one fsync), in order.
//!
//! Tables: `records` (key bytes → encoded record, as the embedded engine stores them),
//! `causal_log` (origin, a 0 byte, seq big-endian → encoded [`CausalWrite`]), `causal_applied`
//! (origin → writes applied) and `causal_trimmed` (origin → the highest seq removed from the
//! log, because every member has it).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use agentstore_core::causal::{CausalWrite, Delivered, Delivery, Offered};
use agentstore_core::codec::{self, Reader};
use agentstore_core::crdt::Crdt;
use agentstore_core::signing::{Signatures, check_record};
use agentstore_core::{Key, NodeId, Record, VersionVector};
use agentstore_engine::changelog::{self, ChangeLog, Head};
use agentstore_engine::file_handle::FileHandle;
use agentstore_engine::two_phase::{RECORDS, scan_records};
use agentstore_engine::{
    EngineError, NodeClock, Write, check_signatures, decode_stored, group_commit, prepare_batch,
    redb_file,
};
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

const LOG: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("causal_log");
const APPLIED: TableDefinition<'_, &str, u64> = TableDefinition::new("causal_applied");
const TRIMMED: TableDefinition<'_, &str, u64> = TableDefinition::new("causal_trimmed");

/// The store's file inside the data directory.
pub(crate) const CAUSAL_FILE: &str = "causal.redb";

fn storage(err: impl std::fmt::Display) -> EngineError {
    EngineError::Storage {
        detail: format!("causal store: {err}"),
    }
}

/// A failed write to the file: typed [`EngineError::DiskFull`] when the disk is full.
fn failure(err: impl Into<redb::Error>) -> EngineError {
    match redb_file::write_failure(err) {
        EngineError::DiskFull { detail } => EngineError::DiskFull {
            detail: format!("causal store: {detail}"),
        },
        other => storage(other),
    }
}

/// Opens the file through `files` (again, after a failed write).
fn open_file(files: &redb_file::Opener, path: &Path) -> Result<Database, EngineError> {
    files.open(&Database::builder(), path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => EngineError::Locked {
            path: path.to_owned(),
        },
        other => storage(other),
    })
}

fn log_key(origin: &NodeId, seq: u64) -> Vec<u8> {
    let mut key = origin.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// What the writer thread is asked to do.
pub(crate) enum Request {
    /// A write by this node's client: unconditional writes, applied as one causal write.
    Local {
        writes: Vec<Write>,
        reply: oneshot::Sender<Result<(Vec<Record>, VersionVector), EngineError>>,
    },
    /// Writes received from a peer at `now_ms`.
    Remote {
        writes: Vec<CausalWrite>,
        now_ms: u64,
    },
    /// Forget log entries every member has (`floor`: per origin, up to which seq).
    Trim { floor: VersionVector },
    /// A peer's whole state (records and what they have applied), received at `now_ms`.
    Snapshot {
        entries: Vec<(Key, Record)>,
        applied: VersionVector,
        now_ms: u64,
    },
}

/// What the writer thread reports after each commit.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// Writes this node made: to push to the peers.
    pub(crate) own: Vec<CausalWrite>,
    /// How long each delivered remote write waited for its dependencies, in ms.
    pub(crate) waits_ms: Vec<u64>,
    /// Writes refused because the buffer was full.
    pub(crate) dropped: u64,
    /// Writes waiting in the buffer after the commit.
    pub(crate) buffered: usize,
    /// Peers' snapshots applied.
    pub(crate) snapshots: u64,
}

/// The store: the read side, and the queue to its writer thread.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) db: Arc<FileHandle>,
    /// The change feed's last position (see `agentstore_engine::changelog`).
    pub(crate) head: Arc<Head>,
    pub(crate) requests: mpsc::Sender<Request>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it holds.
        let (closed, _) = mpsc::channel(1);
        self.requests = closed;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Opens (creating) the store in `dir`; returns it, a watch of the applied vector (updated
/// after every commit) and the stream of commit reports.
pub(crate) fn open(
    dir: &Path,
    files: &redb_file::Opener,
    clock: Arc<NodeClock>,
    buffer: usize,
    signatures: Option<Arc<dyn Signatures>>,
) -> Result<
    (
        Store,
        watch::Receiver<VersionVector>,
        mpsc::UnboundedReceiver<Committed>,
    ),
    EngineError,
> {
    redb_file::create_private_dir(dir).map_err(storage)?;
    let path = dir.join(CAUSAL_FILE);
    let db = open_file(files, &path)?;
    let txn = db.begin_write().map_err(storage)?;
    {
        txn.open_table(RECORDS).map_err(storage)?;
        txn.open_table(LOG).map_err(storage)?;
        txn.open_table(APPLIED).map_err(storage)?;
        txn.open_table(TRIMMED).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    let applied = read_vector(&db.begin_read().map_err(storage)?, APPLIED)?;
    let head = Arc::new(Head::new(changelog::head_of(&db)?));
    let db = Arc::new(FileHandle::new(&path, db, {
        let files = files.clone();
        move |path: &Path| open_file(&files, path)
    }));
    let (applied_tx, applied_rx) = watch::channel(applied.clone());
    let (requests, queue) = mpsc::channel(1024);
    let (reports, committed) = mpsc::unbounded_channel();
    let writer = Writer {
        db: Arc::clone(&db),
        me: clock.node(),
        clock,
        delivery: Delivery::new(applied, buffer),
        buffer,
        applied: applied_tx,
        reports,
        head: Arc::clone(&head),
        signatures,
    };
    let writer = std::thread::Builder::new()
        .name("agentstore-causal".into())
        .spawn(move || writer.run(queue))
        .map_err(storage)?;
    Ok((
        Store {
            db,
            head,
            requests,
            writer: Some(writer),
        },
        applied_rx,
        committed,
    ))
}

fn read_vector(
    txn: &ReadTransaction,
    table: TableDefinition<'_, &str, u64>,
) -> Result<VersionVector, EngineError> {
    let table = txn.open_table(table).map_err(storage)?;
    let mut vector = VersionVector::new();
    for entry in table.iter().map_err(storage)? {
        let (node, counter) = entry.map_err(storage)?;
        let node = NodeId::new(node.value()).map_err(storage)?;
        vector.witness(&node, counter.value());
    }
    Ok(vector)
}

/// A consistent view of the store: records and the applied vector of one snapshot.
pub(crate) struct View(ReadTransaction);

impl View {
    pub(crate) fn new(db: &FileHandle) -> Result<Self, EngineError> {
        Ok(Self(db.get()?.begin_read().map_err(storage)?))
    }

    /// What this view has applied: the causal past of everything it shows.
    pub(crate) fn applied(&self) -> Result<VersionVector, EngineError> {
        read_vector(&self.0, APPLIED)
    }

    /// Up to `limit` changes under `prefix` after position `after` (see
    /// `agentstore_engine::changelog`).
    pub(crate) fn changes(
        &self,
        prefix: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<agentstore_engine::changelog::ChangePage, EngineError> {
        changelog::read(&self.0, prefix, after, limit)
    }

    /// What log entries were trimmed, per origin.
    pub(crate) fn trimmed(&self) -> Result<VersionVector, EngineError> {
        read_vector(&self.0, TRIMMED)
    }

    pub(crate) fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let table = self.0.open_table(RECORDS).map_err(storage)?;
        let stored = table.get(key.as_bytes()).map_err(storage)?;
        decode_stored(key, stored.as_ref().map(|v| v.value()))
    }

    pub(crate) fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let table = self.0.open_table(RECORDS).map_err(storage)?;
        scan_records(&table, prefix, start_after, limit)
    }

    /// Up to `limit` logged writes of `origin` from `first` to `last` (inclusive), in order.
    pub(crate) fn logged(
        &self,
        origin: &NodeId,
        first: u64,
        last: u64,
        limit: usize,
    ) -> Result<Vec<CausalWrite>, EngineError> {
        let table = self.0.open_table(LOG).map_err(storage)?;
        let (from, to) = (log_key(origin, first), log_key(origin, last));
        let mut out = Vec::new();
        for entry in table
            .range::<&[u8]>(from.as_slice()..=to.as_slice())
            .map_err(storage)?
        {
            if out.len() >= limit {
                break;
            }
            let (_, bytes) = entry.map_err(storage)?;
            let bytes = bytes.value();
            let write = CausalWrite::decode(&mut Reader::new(bytes)).map_err(storage)?;
            out.push(write);
        }
        Ok(out)
    }
}

struct Writer {
    db: Arc<FileHandle>,
    me: NodeId,
    clock: Arc<NodeClock>,
    delivery: Delivery,
    buffer: usize,
    applied: watch::Sender<VersionVector>,
    reports: mpsc::UnboundedSender<Committed>,
    /// The change feed's last position, advanced after each commit.
    head: Arc<Head>,
    /// The check of signed collections: local writes that fail it are refused; peers'
    /// records that fail it are neither stored nor passed on.
    signatures: Option<Arc<dyn Signatures>>,
}

type Replies = Vec<(
    oneshot::Sender<Result<(Vec<Record>, VersionVector), EngineError>>,
    Result<(Vec<Record>, VersionVector), EngineError>,
)>;

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        while let Some(group) = group_commit::next_group(&mut queue) {
            self.commit_group(group);
        }
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let before = self.delivery.applied().clone();
        let mut replies: Replies = Vec::new();
        let mut report = Committed::default();
        let outcome = self.apply_group(group, &mut replies, &mut report);
        if let Err(err) = outcome {
            // Nothing of the group is stored: start again from what is. Remote writes come
            // again with the peers' next sync; local writers get the error. The file is
            // opened again for the next group (see `FileHandle`).
            tracing::warn!(error = %err, "causal store commit failed");
            self.db.failed(&err);
            self.delivery = Delivery::new(before, self.buffer);
            for (reply, _) in replies {
                let _ = reply.send(Err(err.for_each_request()));
            }
            return;
        }
        self.db.succeeded();
        self.applied.send_replace(self.delivery.applied().clone());
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        report.buffered = self.delivery.buffered();
        let _ = self.reports.send(report);
    }

    fn apply_group(
        &mut self,
        group: Vec<Request>,
        replies: &mut Replies,
        report: &mut Committed,
    ) -> Result<(), EngineError> {
        let db = self.db.get()?;
        let txn = db.begin_write().map_err(failure)?;
        let mut changes = ChangeLog::open(&txn)?;
        {
            let mut records = txn.open_table(RECORDS).map_err(failure)?;
            let mut log = txn.open_table(LOG).map_err(failure)?;
            let mut trimmed = txn.open_table(TRIMMED).map_err(failure)?;
            for request in group {
                match request {
                    Request::Local { writes, reply } => {
                        let stored = |key: &Key| {
                            let bytes = records.get(key.as_bytes()).map_err(failure)?;
                            decode_stored(key, bytes.as_ref().map(|v| v.value()))
                        };
                        let physical_ms = self.clock.physical_ms();
                        let prepared =
                            check_signatures(self.signatures.as_deref(), &writes, physical_ms)
                                .and_then(|()| {
                                    prepare_batch(
                                        stored,
                                        &mut self.clock.lock(),
                                        physical_ms,
                                        &writes,
                                    )
                                });
                        let results = match prepared {
                            Ok(results) => results,
                            Err(err) => {
                                replies.push((reply, Err(err)));
                                continue;
                            }
                        };
                        let (seq, deps) = self.delivery.local_write(&self.me);
                        let write = CausalWrite {
                            origin: self.me.clone(),
                            seq,
                            deps,
                            entries: final_entries(&results),
                        };
                        for (key, record) in &write.entries {
                            let bytes = codec::encode(record);
                            records
                                .insert(key.as_bytes(), bytes.as_slice())
                                .map_err(failure)?;
                            changes.append(key, &bytes)?;
                        }
                        log_write(&mut log, &write)?;
                        report.own.push(write);
                        let answer = results.into_iter().map(|(_, r)| r).collect();
                        replies.push((reply, Ok((answer, self.delivery.applied().clone()))));
                    }
                    Request::Remote { writes, now_ms } => {
                        let mut ready = Vec::new();
                        for write in writes {
                            if self.delivery.offer(write, now_ms) == Offered::Full {
                                report.dropped += 1;
                            }
                            // Taken after each offer: a full buffer takes only what can be
                            // applied at once (see `Delivery::offer`).
                            ready.extend(self.delivery.take_ready(now_ms));
                        }
                        self.deliver(&mut records, &mut changes, &mut log, ready, report)?;
                    }
                    Request::Snapshot {
                        entries,
                        applied,
                        now_ms,
                    } => {
                        // Both states are causally closed, so their join is too.
                        self.merge_entries(&mut records, &mut changes, &entries)?;
                        self.delivery.absorb(&applied);
                        let ready = self.delivery.take_ready(now_ms);
                        self.deliver(&mut records, &mut changes, &mut log, ready, report)?;
                        // The snapshot's writes are not in this log: a peer that lacks them
                        // gets a snapshot from here too.
                        for (origin, counter) in applied.iter() {
                            if counter > trimmed_upto(&trimmed, origin)? {
                                trimmed.insert(origin.as_str(), counter).map_err(failure)?;
                            }
                        }
                        report.snapshots += 1;
                    }
                    Request::Trim { floor } => {
                        for (origin, upto) in floor.iter() {
                            let done = trimmed_upto(&trimmed, origin)?;
                            if upto <= done {
                                continue;
                            }
                            let (from, to) = (log_key(origin, done + 1), log_key(origin, upto));
                            log.retain_in(from.as_slice()..=to.as_slice(), |_, _| false)
                                .map_err(failure)?;
                            trimmed.insert(origin.as_str(), upto).map_err(failure)?;
                        }
                    }
                }
            }
            let mut applied = txn.open_table(APPLIED).map_err(failure)?;
            for (origin, counter) in self.delivery.applied().iter() {
                applied.insert(origin.as_str(), counter).map_err(failure)?;
            }
        }
        let last = changes.finish()?;
        txn.commit().map_err(failure)?;
        if let Some(last) = last {
            self.head.advance(last);
        }
        Ok(())
    }

    /// Applies peers' writes whose dependencies are here: merges their records and logs
    /// them, so this node can pass them on.
    fn deliver(
        &self,
        records: &mut redb::Table<'_, &[u8], &[u8]>,
        changes: &mut ChangeLog<'_>,
        log: &mut redb::Table<'_, &[u8], &[u8]>,
        ready: Vec<Delivered>,
        report: &mut Committed,
    ) -> Result<(), EngineError> {
        for Delivered {
            mut write,
            waited_ms,
        } in ready
        {
            // The write still counts as delivered (its origin's sequence moves on, and what
            // depends on it can apply), but a record that fails the check of signed
            // collections is neither stored nor passed on.
            write
                .entries
                .retain(|(key, record)| self.admits(key, record));
            self.merge_entries(records, changes, &write.entries)?;
            log_write(log, &write)?;
            report.waits_ms.push(waited_ms);
        }
        Ok(())
    }

    /// Whether a peer's record may be stored here (see `agentstore_core::signing`; a
    /// refusal is counted and logged by the check).
    fn admits(&self, key: &Key, record: &Record) -> bool {
        self.signatures
            .as_deref()
            .is_none_or(|signatures| check_record(signatures, key, record).is_ok())
    }

    /// Joins peers' records into the stored ones; the feed gets each record that changed.
    fn merge_entries(
        &self,
        records: &mut redb::Table<'_, &[u8], &[u8]>,
        changes: &mut ChangeLog<'_>,
        entries: &[(Key, Record)],
    ) -> Result<(), EngineError> {
        for (key, remote) in entries {
            if !self.admits(key, remote) {
                continue;
            }
            let stored = records.get(key.as_bytes()).map_err(failure)?;
            let stored_bytes = stored.as_ref().map(|v| v.value().to_vec());
            drop(stored);
            let merged = match decode_stored(key, stored_bytes.as_deref())? {
                Some(mut current) => {
                    current.merge(remote);
                    current
                }
                None => remote.clone(),
            };
            // A local write stamps after the record it overwrites, so a write that follows
            // this one causally wins by LWW too; the clock observing the stamp keeps other
            // keys' stamps close. A stamp too far ahead is refused by the clock, not here.
            let physical_ms = self.clock.physical_ms();
            let _ = self.clock.lock().observe(&merged.stamp, physical_ms);
            let bytes = codec::encode(&merged);
            if stored_bytes.as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            records
                .insert(key.as_bytes(), bytes.as_slice())
                .map_err(failure)?;
            changes.append(key, &bytes)?;
        }
        Ok(())
    }
}

fn log_write(
    log: &mut redb::Table<'_, &[u8], &[u8]>,
    write: &CausalWrite,
) -> Result<(), EngineError> {
    let mut bytes = Vec::new();
    write.encode(&mut bytes);
    log.insert(
        log_key(&write.origin, write.seq).as_slice(),
        bytes.as_slice(),
    )
    .map_err(failure)?;
    Ok(())
}

/// Up to which seq the log of `origin` has been trimmed (0: nothing).
fn trimmed_upto(trimmed: &redb::Table<'_, &str, u64>, origin: &NodeId) -> Result<u64, EngineError> {
    Ok(trimmed
        .get(origin.as_str())
        .map_err(failure)?
        .map_or(0, |v| v.value()))
}

/// One record per key (the last write of a key in a batch wins), in key order.
fn final_entries(results: &[(Key, Record)]) -> Vec<(Key, Record)> {
    let mut by_key: std::collections::BTreeMap<Key, Record> = Default::default();
    for (key, record) in results {
        by_key.insert(key.clone(), record.clone());
    }
    by_key.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use agentstore_engine::testkit::{
        CrashModel, Expected, LossyDisk, Seeded, assert_no_failed_seed, seeds,
    };

    use super::*;

    /// Local writes (puts, deletes, counter additions) until the machine loses power at a
    /// seeded point (its disk keeps only what was synced), then a restart: every acknowledged
    /// write is there, the one in flight whole or not at all, and the store agrees with
    /// itself: its applied vector counts this node's writes exactly as its log holds them.
    async fn run(seed: u64) -> Result<(), String> {
        const OPERATIONS: u64 = 60;
        let mut rng = Seeded::new(seed);
        let disk = LossyDisk::new(Some(rng.below(OPERATIONS * 8)));
        let dir = tempfile::tempdir().unwrap();
        let me = NodeId::new("n1").unwrap();
        let clock = NodeClock::system(me.clone(), 500);
        let mut model = CrashModel::default();
        if let Ok((store, _applied, _reports)) =
            open(dir.path(), &disk.opener(), Arc::clone(&clock), 1024, None)
        {
            for i in 0..OPERATIONS {
                let (key, mutation, after) = model.next_write(&mut rng, i, 12, 3);
                let (reply, answer) = oneshot::channel();
                let writes = vec![Write::new(key.clone(), mutation)];
                let sent = store.requests.send(Request::Local { writes, reply }).await;
                match (sent, answer.await) {
                    (Ok(()), Ok(Ok(_))) => model.acknowledged(key, after),
                    _ if disk.crashed() => {
                        model.in_doubt(key, after);
                        break;
                    }
                    (_, answer) => return Err(format!("write {i} failed: {answer:?}")),
                }
            }
            disk.crash_now();
        }
        disk.restart();
        let (store, _applied, _reports) = open(dir.path(), &disk.opener(), clock, 1024, None)
            .map_err(|e| format!("the store does not open after the restart: {e}"))?;
        let view = View::new(&store.db).map_err(|e| e.to_string())?;
        for key in model.keys() {
            let record = view.get(&key).map_err(|e| e.to_string())?;
            model.check(&key, Expected::of(record.as_ref().map(|r| &r.value)))?;
        }
        // Nothing applied is forgotten, nothing is counted that was not applied.
        let counted = view.applied().map_err(|e| e.to_string())?.get(&me);
        let logged = view
            .logged(&me, 1, counted.max(1), usize::MAX)
            .map_err(|e| e.to_string())?;
        if logged.len() as u64 != counted {
            return Err(format!(
                "{counted} writes counted, {} in the log",
                logged.len()
            ));
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_acknowledged_causal_write_is_lost_when_the_page_cache_is() {
        let mut failed = Vec::new();
        for seed in seeds(48) {
            if let Err(why) = run(seed).await {
                failed.push(format!("seed {seed}: {why}"));
            }
        }
        assert_no_failed_seed(&failed);
    }
}
