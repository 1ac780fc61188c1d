//! The Raft log on redb: entries by index, and the vote, the committed id and the purge point.
//!
//! Obligations openraft states and this store keeps: the vote is durable before `save_vote`
//! returns; appended entries are durable before their callback fires; `truncate_after` and
//! `purge` are durable before they return. The committed id is not persisted (openraft
//! allows that): a restarted node learns it again from the leader, and persisting it would
//! add an fsync per commit. Every write is one fsynced redb transaction, run on
//! a blocking thread so an fsync never stalls the async runtime.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::types::{Entry, LogId, TypeConfig, Vote, persist, restore};

/// Entries by index.
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// `vote`, `committed`, `purged`.
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");

/// The Raft log of one node. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
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
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::builder().create(path).map_err(io_error)?;
        let txn = db.begin_write().map_err(io_error)?;
        txn.open_table(LOG).map_err(io_error)?;
        txn.open_table(STATE).map_err(io_error)?;
        txn.commit().map_err(io_error)?;
        Ok(Self { db: Arc::new(db) })
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

    async fn write_state<T: serde::Serialize>(
        &self,
        name: &'static str,
        value: &T,
    ) -> io::Result<()> {
        let bytes = persist(value)?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            let txn = db.begin_write().map_err(io_error)?;
            txn.open_table(STATE)
                .map_err(io_error)?
                .insert(name, bytes.as_slice())
                .map_err(io_error)?;
            txn.commit().map_err(io_error)
        })
        .await
    }

    /// The index and log id of the last entry, if any.
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
        let db = Arc::clone(&self.db);
        blocking(move || {
            let txn = db.begin_read().map_err(io_error)?;
            let table = txn.open_table(LOG).map_err(io_error)?;
            let iter = match end {
                Some(end) if end <= start => return Ok(Vec::new()),
                Some(end) => table.range(start..end),
                None => table.range(start..),
            }
            .map_err(io_error)?;
            let mut entries = Vec::new();
            for item in iter {
                let (_, value) = item.map_err(io_error)?;
                entries.push(restore(value.value())?);
            }
            Ok(entries)
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Self::read_state(&self.db, "vote")
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = Self::read_state(&self.db, "purged")?;
        let last = Self::last_entry(&self.db)?.or_else(|| purged.clone());
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_state("vote", vote).await
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
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.index(), persist(&entry)?));
        }
        let db = Arc::clone(&self.db);
        let result = blocking(move || {
            let txn = db.begin_write().map_err(io_error)?;
            {
                let mut table = txn.open_table(LOG).map_err(io_error)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice()).map_err(io_error)?;
                }
            }
            txn.commit().map_err(io_error)
        })
        .await;
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(err) => {
                callback.io_completed(Err(io_error(&err)));
                Err(err)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        let db = Arc::clone(&self.db);
        blocking(move || {
            let txn = db.begin_write().map_err(io_error)?;
            txn.open_table(LOG)
                .map_err(io_error)?
                .retain_in(from.., |_, _| false)
                .map_err(io_error)?;
            txn.commit().map_err(io_error)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let purged = persist(&log_id)?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            let txn = db.begin_write().map_err(io_error)?;
            txn.open_table(STATE)
                .map_err(io_error)?
                .insert("purged", purged.as_slice())
                .map_err(io_error)?;
            txn.open_table(LOG)
                .map_err(io_error)?
                .retain_in(..=upto, |_, _| false)
                .map_err(io_error)?;
            txn.commit().map_err(io_error)
        })
        .await
    }
}
