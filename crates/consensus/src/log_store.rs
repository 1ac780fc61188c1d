//! The Raft log on redb: entries by index, and the vote and the purge point.
//!
//! Obligations openraft states and this store keeps: the vote is durable before `save_vote`
//! returns; appended entries are readable as soon as `append` returns and durable before its
//! callback fires; `truncate_after` and `purge` are durable before they return. The committed
//! id is not persisted (openraft allows that): a restarted node learns it again from the
//! leader, and persisting it would add an fsync per commit.
//!
//! Writes go to one writer thread, in order, and the writer commits whatever has queued up as
//! one fsynced redb transaction. `append` of the member's own entries (it leads) does not wait
//! for that fsync: it hands the entries to the writer, keeps them in memory until they are
//! committed (so the replication streams read them at once), and returns. openraft's core can
//! then send the entries to the followers while the leader's own fsync runs, so a write waits
//! for the slower of the two fsyncs instead of their sum; the leader counts itself toward the
//! quorum only once the callback says its copy is durable.
//!
//! A follower's `append` (entries another member proposed) has nothing to overlap its fsync
//! with: the follower answers the leader only once the entries are durable. When nothing is
//! queued for the writer, it commits on the calling task instead, which saves the two thread
//! hand-offs (to the writer and back) that sit on every strong write's path. Every log write
//! comes from openraft's core, one at a time, so "nothing queued" cannot change meanwhile, and
//! the writes still reach the file in the order they were made.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use agentstore_engine::{group_commit, lock, redb_file};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::group::LOG_FILE;
use crate::health::{Health, redb_io};
use crate::types::{Entry, LogId, MemberId, TypeConfig, Vote, persist, restore};

/// Entries by index.
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// `vote`, `purged`.
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");

/// Writes queued for the writer at most; `append` waits beyond that.
const QUEUE: usize = 1024;

/// Reads of at most this many entries run on the calling task.
const INLINE_READ: u64 = 64;

/// Entries handed to the writer and not yet committed, by index.
type Pending = Arc<Mutex<BTreeMap<u64, Entry>>>;

/// The Raft log of one node. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

struct Inner {
    db: Arc<Database>,
    /// The member this log belongs to: entries it proposed are its own (it leads).
    member: MemberId,
    pending: Pending,
    /// Writes handed to the writer and not yet completed.
    queued: Arc<AtomicUsize>,
    /// Set once a commit failed: nothing more is written or acknowledged.
    failed: Arc<AtomicBool>,
    /// Where every commit's outcome is reported, on the writer's path and the inline one.
    health: Arc<Health>,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    /// Lets the writer finish what is queued and close the database before the store is gone,
    /// so the file can be opened again at once.
    fn drop(&mut self) {
        drop(self.writes.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// One write for the writer thread.
enum Write {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        callback: IOFlushed<TypeConfig>,
    },
    /// Removes every entry from `from` on.
    Truncate {
        from: u64,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Records the purge point and removes every entry up to `upto`.
    Purge {
        upto: u64,
        purged: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
    State {
        name: &'static str,
        bytes: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
}

impl Write {
    fn apply(&self, txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
        match self {
            Write::Append { entries, .. } => {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in entries {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            Write::Truncate { from, .. } => {
                txn.open_table(LOG)?.retain_in(*from.., |_, _| false)?;
            }
            Write::Purge { upto, purged, .. } => {
                txn.open_table(STATE)?.insert("purged", purged.as_slice())?;
                txn.open_table(LOG)?.retain_in(..=*upto, |_, _| false)?;
            }
            Write::State { name, bytes, .. } => {
                txn.open_table(STATE)?.insert(*name, bytes.as_slice())?;
            }
        }
        Ok(())
    }

    /// Reports the outcome to whoever waits for this write.
    fn complete(self, result: &Result<(), Failure>, pending: &Pending) {
        let result = || {
            result
                .as_ref()
                .map(|&()| ())
                .map_err(|(kind, detail)| io::Error::new(*kind, detail.clone()))
        };
        match self {
            Write::Append { entries, callback } => {
                if result().is_ok() {
                    let mut pending = lock(pending);
                    for (index, _) in &entries {
                        pending.remove(index);
                    }
                }
                callback.io_completed(result());
            }
            Write::Truncate { done, .. }
            | Write::Purge { done, .. }
            | Write::State { done, .. } => {
                let _ = done.send(result());
            }
        }
    }
}

/// The writer thread: takes the queued writes in order, commits them as one transaction, then
/// reports each. After a failed commit it fails everything that follows.
fn write_loop(
    db: Arc<Database>,
    mut writes: mpsc::Receiver<Write>,
    pending: Pending,
    queued: Arc<AtomicUsize>,
    failed: Arc<AtomicBool>,
    health: Arc<Health>,
) {
    while let Some(group) = group_commit::next_group(&mut writes) {
        let result = commit_unless_failed(&db, &group, &failed);
        report(&health, &result);
        let done = group.len();
        for write in group {
            write.complete(&result, &pending);
        }
        queued.fetch_sub(done, Ordering::AcqRel);
    }
}

/// A failed commit: the kind of its I/O error (a full disk stays `StorageFull`) and its text.
type Failure = (io::ErrorKind, String);

/// Tells `health` how a commit went.
fn report(health: &Health, result: &Result<(), Failure>) {
    match result {
        Ok(()) => health.succeeded(),
        Err((kind, detail)) => health.failed(LOG_FILE, &io::Error::new(*kind, detail.clone())),
    }
}

/// Commits `group` as one fsynced transaction, unless an earlier commit failed; a failure
/// stops every later write.
fn commit_unless_failed(
    db: &Database,
    group: &[Write],
    failed: &AtomicBool,
) -> Result<(), Failure> {
    if failed.load(Ordering::Acquire) {
        return Err((
            io::ErrorKind::Other,
            "an earlier write to the Raft log failed".to_owned(),
        ));
    }
    let result = commit(db, group).map_err(|e| {
        let e = redb_io(e);
        (e.kind(), e.to_string())
    });
    if result.is_err() {
        failed.store(true, Ordering::Release);
    }
    result
}

fn commit(db: &Database, group: &[Write]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    for write in group {
        write.apply(&txn)?;
    }
    txn.commit()?;
    Ok(())
}

pub(crate) fn io_error(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

/// Runs `work` on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io_error(format!("storage task failed: {e}")))?
}

impl LogStore {
    /// Opens (creating if needed) the log of `member` at `path`.
    pub fn open(path: &Path, member: MemberId) -> io::Result<Self> {
        Self::open_watched(path, member, Arc::default(), &redb_file::files())
    }

    /// [`LogStore::open`] through `files`, reporting the outcome of every commit to `health`.
    pub(crate) fn open_watched(
        path: &Path,
        member: MemberId,
        health: Arc<Health>,
        files: &redb_file::Opener,
    ) -> io::Result<Self> {
        let db = files.open(&Database::builder(), path).map_err(io_error)?;
        let txn = db.begin_write().map_err(io_error)?;
        txn.open_table(LOG).map_err(io_error)?;
        txn.open_table(STATE).map_err(io_error)?;
        txn.commit().map_err(io_error)?;
        let db = Arc::new(db);
        let pending = Pending::default();
        let queued = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let (writes, queue) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("raft-log-writer".to_owned())
            .spawn({
                let (db, pending, queued, failed) = (
                    Arc::clone(&db),
                    Arc::clone(&pending),
                    Arc::clone(&queued),
                    Arc::clone(&failed),
                );
                let health = Arc::clone(&health);
                move || write_loop(db, queue, pending, queued, failed, health)
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                member,
                pending,
                queued,
                failed,
                health,
                writes: Some(writes),
                writer: Some(writer),
            }),
        })
    }

    async fn send(&self, write: Write) -> io::Result<()> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(io_error("an earlier write to the Raft log failed"));
        }
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self
            .inner
            .writes
            .as_ref()
            .expect("the writer runs while the store lives")
            .send(write)
            .await;
        sent.map_err(|_| {
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            io_error("the Raft log writer has stopped")
        })
    }

    /// Queues a write and waits until it is durable.
    async fn write_and_wait(
        &self,
        write: impl FnOnce(oneshot::Sender<io::Result<()>>) -> Write,
    ) -> io::Result<()> {
        let (done, durable) = oneshot::channel();
        self.send(write(done)).await?;
        durable
            .await
            .map_err(|_| io_error("the Raft log writer has stopped"))?
    }

    fn read_state<T: for<'de> serde::Deserialize<'de>>(
        db: &Database,
        name: &str,
    ) -> io::Result<Option<T>> {
        let txn = db.begin_read().map_err(io_error)?;
        let table = txn.open_table(STATE).map_err(io_error)?;
        let value = table.get(name).map_err(io_error)?;
        value.map(|v| restore(v.value())).transpose()
    }

    /// The log id of the last committed entry, if any.
    fn last_entry(db: &Database) -> io::Result<Option<LogId>> {
        let txn = db.begin_read().map_err(io_error)?;
        let table = txn.open_table(LOG).map_err(io_error)?;
        let last = table.last().map_err(io_error)?;
        last.map(|(_, v)| restore::<Entry>(v.value()).map(|e| e.log_id()))
            .transpose()
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&n) => n,
        Bound::Excluded(&n) => n.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&n) => Some(n.saturating_add(1)),
        Bound::Excluded(&n) => Some(n),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        // The pending entries first, then the table: an entry the writer commits in between
        // is then in one or the other (or both), never in neither.
        let pending: BTreeMap<u64, Entry> = {
            let pending = lock(&self.inner.pending);
            let range = match end {
                Some(end) => pending.range(start..end),
                None => pending.range(start..),
            };
            range.map(|(i, e)| (*i, e.clone())).collect()
        };
        // Just-appended entries, as a replication stream asks for them: no table read.
        let contiguous = pending.keys().zip(start..).all(|(i, n)| *i == n)
            && end.is_some_and(|end| pending.len() as u64 == end - start);
        if contiguous {
            return Ok(pending.into_values().collect());
        }
        let db = Arc::clone(&self.inner.db);
        let read = move || {
            let txn = db.begin_read().map_err(io_error)?;
            let table = txn.open_table(LOG).map_err(io_error)?;
            let iter = match end {
                Some(end) => table.range(start..end),
                None => table.range(start..),
            }
            .map_err(io_error)?;
            let mut entries = BTreeMap::new();
            for item in iter {
                let (index, value) = item.map_err(io_error)?;
                entries.insert(index.value(), restore(value.value())?);
            }
            entries.extend(pending);
            Ok(entries.into_values().collect())
        };
        // The state machine reads each committed entry back before applying it: a few recent
        // entries are in redb's page cache and read in microseconds, so they are read here
        // rather than pay two thread hand-offs on every strong write's path.
        if end.is_some_and(|end| end - start <= INLINE_READ) {
            read()
        } else {
            blocking(read).await
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Self::read_state(&self.inner.db, "vote")
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = Self::read_state(&self.inner.db, "purged")?;
        let pending_last = {
            let pending = lock(&self.inner.pending);
            pending.values().next_back().map(|e| e.log_id())
        };
        let last = pending_last
            .or(Self::last_entry(&self.inner.db)?)
            .or_else(|| purged.clone());
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = persist(vote)?;
        self.write_and_wait(|done| Write::State {
            name: "vote",
            bytes,
            done,
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for entry in &entries {
            encoded.push((entry.index(), persist(entry)?));
        }
        let proposed_elsewhere = entries
            .first()
            .is_some_and(|e| e.log_id.leader_id.node_id != self.inner.member);
        if proposed_elsewhere && self.inner.queued.load(Ordering::Acquire) == 0 {
            // A follower's append with nothing queued ahead of it: durable before returning.
            let group = [Write::Append {
                entries: encoded,
                callback,
            }];
            let result = commit_unless_failed(&self.inner.db, &group, &self.inner.failed);
            report(&self.inner.health, &result);
            let [write] = group;
            // As on the writer's path, a failure reaches openraft through the callback.
            write.complete(&result, &self.inner.pending);
            return Ok(());
        }
        lock(&self.inner.pending).extend(entries.into_iter().map(|e| (e.index(), e)));
        self.send(Write::Append {
            entries: encoded,
            callback,
        })
        .await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        // Every append queued before it completes (and leaves `pending`) before it does.
        self.write_and_wait(|done| Write::Truncate { from, done })
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let purged = persist(&log_id)?;
        self.write_and_wait(|done| Write::Purge { upto, purged, done })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Command;
    use openraft::EntryPayload;
    use openraft::testing::log_id;
    use openraft::type_config::TypeConfigExt;
    use openraft::type_config::alias::OneshotReceiverOf;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id::<TypeConfig>(term, "n1".into(), index),
            payload: EntryPayload::Normal(Command(format!("{term}/{index}").into_bytes())),
        }
    }

    async fn append(
        log: &mut LogStore,
        entries: Vec<Entry>,
    ) -> OneshotReceiverOf<TypeConfig, io::Result<()>> {
        let (tx, flushed) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        flushed
    }

    async fn all(log: &mut LogStore) -> Vec<Entry> {
        log.try_get_log_entries(0..).await.unwrap()
    }

    #[tokio::test]
    async fn appended_entries_are_readable_at_once_and_survive_a_reopen_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        let written: Vec<Entry> = (1..=50).map(|i| entry(1, i)).collect();
        let flushed = append(&mut log, written[..20].to_vec()).await;
        let later = append(&mut log, written[20..].to_vec()).await;
        // Readable before the callbacks, whatever the writer has committed so far.
        assert_eq!(log.try_get_log_entries(1..51).await.unwrap(), written);
        assert_eq!(
            log.try_get_log_entries(10..30).await.unwrap(),
            written[9..29]
        );
        flushed.await.unwrap().unwrap();
        later.await.unwrap().unwrap();
        assert_eq!(
            log.try_get_log_entries(10..30).await.unwrap(),
            written[9..29]
        );
        drop(log);
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        assert_eq!(all(&mut log).await, written);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(written[49].log_id.clone()));
    }

    #[tokio::test]
    async fn a_truncation_comes_after_the_appends_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        // Not waited for: the truncation must still apply after them.
        let _first = append(&mut log, (1..=10).map(|i| entry(1, i)).collect()).await;
        log.truncate_after(Some(entry(1, 5).log_id)).await.unwrap();
        let replaced: Vec<Entry> = (6..=8).map(|i| entry(2, i)).collect();
        append(&mut log, replaced.clone())
            .await
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<Entry> = (1..=5).map(|i| entry(1, i)).chain(replaced).collect();
        assert_eq!(all(&mut log).await, expected);
        drop(log);
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        assert_eq!(all(&mut log).await, expected);
    }

    #[tokio::test]
    async fn a_store_dropped_with_writes_queued_finishes_them_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        let written: Vec<Entry> = (1..=30).map(|i| entry(3, i)).collect();
        for chunk in written.chunks(3) {
            drop(append(&mut log, chunk.to_vec()).await);
        }
        drop(log);
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        assert_eq!(all(&mut log).await, written);
    }

    #[tokio::test]
    async fn a_followers_appends_keep_their_order_behind_queued_writes_and_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        // Member n2 led term 1, and now follows n1 in term 2.
        let mut log = LogStore::open(&path, "n2".into()).unwrap();
        let own: Vec<Entry> = (1..=10)
            .map(|i| Entry {
                log_id: log_id::<TypeConfig>(1, "n2".into(), i),
                payload: EntryPayload::Blank,
            })
            .collect();
        // Its own append returns before the writer commits it; the follower's append right
        // behind it, overwriting 8..=10, must not overtake it (it goes through the writer
        // while anything is queued), or the older entries would win.
        let queued = append(&mut log, own.clone()).await;
        let followed: Vec<Entry> = (8..=15).map(|i| entry(2, i)).collect();
        let flushed = append(&mut log, followed.clone()).await;
        queued.await.unwrap().unwrap();
        flushed.await.unwrap().unwrap();
        // Nothing queued now: this one commits on the calling task, durable once flushed.
        let more: Vec<Entry> = (16..=18).map(|i| entry(2, i)).collect();
        append(&mut log, more.clone()).await.await.unwrap().unwrap();
        let expected: Vec<Entry> = own[..7]
            .iter()
            .cloned()
            .chain(followed)
            .chain(more)
            .collect();
        assert_eq!(all(&mut log).await, expected);
        drop(log);
        let mut log = LogStore::open(&path, "n2".into()).unwrap();
        assert_eq!(all(&mut log).await, expected);
    }

    #[tokio::test]
    async fn a_purge_keeps_what_follows_the_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        drop(append(&mut log, (1..=10).map(|i| entry(1, i)).collect()).await);
        log.purge(entry(1, 4).log_id).await.unwrap();
        let expected: Vec<Entry> = (5..=10).map(|i| entry(1, i)).collect();
        assert_eq!(all(&mut log).await, expected);
        drop(log);
        let mut log = LogStore::open(&path, "n1".into()).unwrap();
        assert_eq!(all(&mut log).await, expected);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(entry(1, 4).log_id));
    }
}
