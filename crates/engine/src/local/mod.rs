//! The local engine: records in one redb file, written by a group-commit writer thread.
//!
//! redb gives ACID transactions with one writer at a time and an fsync per commit
//! (`Durability::Immediate`). Committing every client write on its own would cap throughput
//! at one fsync per write, so writes go through a bounded queue to one writer thread, which
//! applies every request waiting in the queue inside one transaction, commits once, and only
//! then acknowledges each of them (group commit). Reads run directly on the caller's thread:
//! a redb read transaction is an in-memory snapshot lookup that takes microseconds, cheaper
//! than a hop to a blocking pool.

mod changes;
mod hints;
mod purge;
mod writer;

pub use changes::Committed;
pub use hints::Hint;

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition,
};
use tokio::sync::{mpsc, oneshot};

use crate::batch;
use crate::clock::NodeClock;
use crate::error::EngineError;
use crate::file_handle::FileHandle;
use crate::{Engine, Key, Record, Write};

/// Name of the data file inside the data directory.
pub const DATA_FILE: &str = "agentstore.redb";

// Records by key bytes, and the highest fencing token per lock: the tables the Raft state
// machine keeps too.
use crate::two_phase::{FENCES, RECORDS as DATA};
/// Facts about the file itself (its format version).
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The data-file format this version writes and the newest it reads.
const FILE_FORMAT: u64 = 1;
/// Requests waiting for the writer; senders wait when it is full (back-pressure).
const QUEUE_DEPTH: usize = 1024;

/// The embedded engine. Cheap to clone; the file closes when the last clone is dropped.
#[derive(Clone)]
pub struct LocalEngine {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<FileHandle>,
    path: PathBuf,
    clock: Arc<NodeClock>,
    turn: writer::Turn,
    feed: Arc<changes::Feed>,
    queue: Option<mpsc::Sender<writer::Request>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has committed what it holds; joining it
        // means the file lock is released when the last handle is gone.
        self.queue.take();
        let handle = self.writer.lock().map(|mut h| h.take()).unwrap_or(None);
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// A handle that does not keep the engine open: [`WeakLocalEngine::upgrade`] gives the engine
/// while some [`LocalEngine`] still holds it. For background work that must not outlive it.
#[derive(Clone)]
pub struct WeakLocalEngine {
    shared: std::sync::Weak<Shared>,
}

impl fmt::Debug for WeakLocalEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakLocalEngine").finish_non_exhaustive()
    }
}

impl WeakLocalEngine {
    /// The engine, if it is still open.
    pub fn upgrade(&self) -> Option<LocalEngine> {
        self.shared.upgrade().map(|shared| LocalEngine { shared })
    }
}

impl fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEngine")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl LocalEngine {
    /// Opens (creating if needed) the engine in `dir`, stamping writes with `clock`.
    ///
    /// Fails with [`EngineError::Locked`] if another process has `dir` open, and with
    /// [`EngineError::Corrupted`] if the data file is damaged or not an agentstore file.
    pub fn open(dir: &Path, clock: Arc<NodeClock>) -> Result<Self, EngineError> {
        crate::redb_file::create_private_dir(dir).map_err(|e| EngineError::Storage {
            detail: format!("cannot create the data directory {}: {e}", dir.display()),
        })?;
        let path = dir.join(DATA_FILE);
        let db = open_database(&path)?;
        Self::start(path, db, open_database, clock)
    }

    /// Opens (creating if needed) the engine on `disk`, a disk that loses what was not
    /// synced when it crashes (for crash tests).
    #[cfg(feature = "testkit")]
    pub fn open_on(
        disk: &crate::testkit::LossyDisk,
        clock: Arc<NodeClock>,
    ) -> Result<Self, EngineError> {
        let path = PathBuf::from("lossy-disk");
        let files = disk.opener();
        let open = move |path: &Path| {
            files
                .open(&Database::builder(), path)
                .map_err(EngineError::storage)
        };
        let db = open(&path)?;
        Self::start(path, db, open, clock)
    }

    /// Starts the engine on `db`, open at `path`; `reopen` opens it again after a failed
    /// write.
    fn start(
        path: PathBuf,
        db: Database,
        reopen: impl Fn(&Path) -> Result<Database, EngineError> + Send + Sync + 'static,
        clock: Arc<NodeClock>,
    ) -> Result<Self, EngineError> {
        check_format(&db, &path)?;
        let head = crate::changelog::head_of(&db)?;
        let db = Arc::new(FileHandle::new(&path, db, reopen));
        let (queue, requests) = mpsc::channel(QUEUE_DEPTH);
        let turn = writer::Turn::default();
        let feed = Arc::new(changes::Feed::new(head));
        let writer = writer::spawn(
            Arc::clone(&db),
            Arc::clone(&clock),
            Arc::clone(&turn),
            Arc::clone(&feed),
            requests,
        )
        .map_err(EngineError::storage)?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                path,
                clock,
                turn,
                feed,
                queue: Some(queue),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Hands `op` to the writer thread and waits for its outcome.
    async fn request(&self, op: writer::Op) -> Result<Vec<Record>, EngineError> {
        let queue = self.shared.queue.as_ref().ok_or(EngineError::Closed)?;
        let (reply, response) = oneshot::channel();
        queue
            .send(writer::Request { op, reply })
            .await
            .map_err(|_| EngineError::Closed)?;
        response.await.map_err(|_| EngineError::Closed)?
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// A read transaction on the file's current handle.
    fn read_txn(&self) -> Result<redb::ReadTransaction, EngineError> {
        self.shared
            .db
            .get()?
            .begin_read()
            .map_err(EngineError::storage)
    }

    /// A handle to this engine that does not keep it open.
    pub fn downgrade(&self) -> WeakLocalEngine {
        WeakLocalEngine {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// A write transaction on the file's current handle (outside the writer: hints, purges).
    fn write_txn(&self) -> Result<redb::WriteTransaction, EngineError> {
        self.shared
            .db
            .get()?
            .begin_write()
            .map_err(EngineError::storage)
    }

    /// `Err` with the failure if the last write to the data file failed (a full disk, an I/O
    /// error); `Ok` again after a write succeeds. The engine reopens its file after a failed
    /// write, so it recovers by itself once the cause is gone.
    pub fn health(&self) -> Result<(), String> {
        self.shared.db.health()
    }
}

fn open_database(path: &Path) -> Result<Database, EngineError> {
    let corrupted = |detail: String| EngineError::Corrupted {
        path: path.to_owned(),
        detail,
    };
    // redb asserts some invariants of files it wrote itself in debug builds; a damaged file can
    // trip them. Catching the panic turns that into the same typed error a release build gives.
    let opened = catch_unwind(AssertUnwindSafe(|| {
        crate::redb_file::create(&Database::builder(), path)
    }))
    .map_err(|panic| corrupted(panic_message(&panic)))?;
    match opened {
        Ok(db) => Ok(db),
        Err(DatabaseError::DatabaseAlreadyOpen) => Err(EngineError::Locked {
            path: path.to_owned(),
        }),
        Err(DatabaseError::Storage(StorageError::Corrupted(detail))) => Err(corrupted(detail)),
        Err(DatabaseError::Storage(StorageError::Io(err)))
            if err.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(corrupted(err.to_string()))
        }
        Err(DatabaseError::UpgradeRequired(found)) => Err(EngineError::UnsupportedFormat {
            path: path.to_owned(),
            found: u64::from(found),
            supported: FILE_FORMAT,
        }),
        Err(err) => Err(EngineError::storage(err)),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the storage library panicked while opening the file".into())
}

/// Creates the tables on first open and refuses files of a newer format.
fn check_format(db: &Database, path: &Path) -> Result<(), EngineError> {
    let txn = db.begin_write().map_err(EngineError::storage)?;
    {
        let mut meta = txn.open_table(META).map_err(EngineError::storage)?;
        let found = meta
            .get("format")
            .map_err(EngineError::storage)?
            .map(|v| v.value());
        match found {
            Some(found) if found > FILE_FORMAT => {
                return Err(EngineError::UnsupportedFormat {
                    path: path.to_owned(),
                    found,
                    supported: FILE_FORMAT,
                });
            }
            Some(_) => {}
            None => {
                meta.insert("format", FILE_FORMAT)
                    .map_err(EngineError::storage)?;
            }
        }
        txn.open_table(DATA).map_err(EngineError::storage)?;
        txn.open_table(FENCES).map_err(EngineError::storage)?;
    }
    txn.commit().map_err(EngineError::storage)
}

impl Engine for LocalEngine {
    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(DATA).map_err(EngineError::storage)?;
        let stored = table.get(key.as_bytes()).map_err(EngineError::storage)?;
        stored
            .map(|bytes| batch::decode(key, bytes.value()))
            .transpose()
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(DATA).map_err(EngineError::storage)?;
        crate::two_phase::scan_records(&table, prefix, start_after, limit)
    }

    async fn purge_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.remove_expired(now_ms))
            .await
            .map_err(|e| EngineError::Internal {
                detail: format!("the purge of expired values stopped: {e}"),
            })?
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        let queue = self.shared.queue.as_ref().ok_or(EngineError::Closed)?;
        // A lone writer commits on its own thread: handing the batch to the writer thread and
        // the reply back costs two thread wake-ups (about 100 µs on an idle machine), more than
        // a third of a commit. Only when nobody is committing and nothing is queued, so group
        // commit still gathers every write that arrives while a commit is in progress; and only
        // on a multi-thread runtime, where `block_in_place` lets other tasks move off this thread
        // during the fsync.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread
            && queue.capacity() == queue.max_capacity()
            && let Ok(_turn) = self.shared.turn.try_lock()
        {
            let shared = &self.shared;
            return tokio::task::block_in_place(|| {
                writer::commit_now(
                    &shared.db,
                    &shared.clock,
                    &shared.feed,
                    &writer::Op::Commit(writes),
                )
            });
        }
        self.request(writer::Op::Commit(writes)).await
    }

    async fn prepare(&self, txn: &str, writes: Vec<Write>) -> Result<(), EngineError> {
        self.request(writer::Op::Prepare(txn.to_owned(), writes))
            .await
            .map(drop)
    }

    async fn resolve(&self, txn: &str, commit: bool) -> Result<Vec<Record>, EngineError> {
        self.request(writer::Op::Resolve(txn.to_owned(), commit))
            .await
    }

    async fn changes(
        &self,
        prefix: &[u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<crate::changelog::ChangePage, EngineError> {
        LocalEngine::changes(self, prefix, after, limit, wait).await
    }
}
