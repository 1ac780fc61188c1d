//! A redb file's open handle, replaced after a failed write.
//!
//! After one I/O error redb answers `PreviousIo` to every call on that `Database`, reads
//! included, until it is reopened: a disk that filled up and then got space back would keep
//! failing until a restart. So a failed write gives up the handle (once the reads in progress
//! let go of it), and the next call opens the file again, which fails as long as the disk is
//! still full and works once it is not. The failure is kept for [`FileHandle::health`] until a
//! write succeeds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use crate::error::EngineError;

/// How long a failed write waits for reads in progress to release the old handle.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// How a file is opened again after a failed write gave its handle up.
pub type Reopen = Arc<dyn Fn(&Path) -> Result<Database, EngineError> + Send + Sync>;

/// A redb file's handle, given up after a failed write and reopened on the next call.
pub struct FileHandle {
    path: PathBuf,
    reopen: Reopen,
    slot: RwLock<Option<Arc<Database>>>,
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileHandle {
    /// `db`, open at `path`; `reopen` opens it again after a failed write.
    pub fn new(
        path: &Path,
        db: Database,
        reopen: impl Fn(&Path) -> Result<Database, EngineError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            path: path.to_owned(),
            reopen: Arc::new(reopen),
            slot: RwLock::new(Some(Arc::new(db))),
            failure: Mutex::new(None),
        }
    }

    /// The open database, opening the file again if a failed write gave the handle up.
    pub fn get(&self) -> Result<Arc<Database>, EngineError> {
        if let Some(db) = &*self.slot.read().unwrap_or_else(PoisonError::into_inner) {
            return Ok(Arc::clone(db));
        }
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = &*slot {
            return Ok(Arc::clone(db));
        }
        let db = Arc::new((self.reopen)(&self.path)?);
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    /// A write failed with `err` (the caller holds no clone of the handle any more): keep the
    /// failure for [`FileHandle::health`], and give the handle up so the next call reopens it.
    pub fn failed(&self, err: &EngineError) {
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(err.to_string());
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        let Some(mut db) = slot.take() else { return };
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match Arc::try_unwrap(db) {
                // Dropped here: the file lock goes with it.
                Ok(_closed) => return,
                Err(shared) if Instant::now() >= deadline => {
                    // Reads still hold it: keep it; the next failure tries again.
                    *slot = Some(shared);
                    return;
                }
                Err(shared) => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// A write succeeded: the engine is healthy again.
    pub fn succeeded(&self) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_some() {
            *failure = None;
        }
    }

    /// `Err` with the last write's failure if the last write failed.
    pub fn health(&self) -> Result<(), String> {
        match &*self.failure.lock().unwrap_or_else(PoisonError::into_inner) {
            None => Ok(()),
            Some(failure) => Err(failure.clone()),
        }
    }
}
