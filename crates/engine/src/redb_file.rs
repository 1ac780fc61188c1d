//! redb files whose growth is written out, not left sparse.
//!
//! redb grows its file with `set_len`, which leaves the new region sparse: the first commit
//! that writes a page there makes the filesystem allocate blocks, and that commit's fsync then
//! also writes the allocation's metadata. On this machine's ext4 an fsync after overwriting a
//! page costs about a third of one after writing the same page into a sparse region
//! (`BENCHMARKS.md`). Every durable commit of an append-mostly file (the Raft log, the local
//! engine's records) lands in fresh pages, so [`create`] gives redb a backend that writes
//! zeros over each new region as the file grows: the cost moves to the rare commit that grows
//! the file, out of every other one.
//!
//! Everything else (reads, writes, `sync_data`, the file locks that keep two processes from
//! opening one file) is redb's own [`FileBackend`].

use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use redb::backends::FileBackend;
use redb::{BackendError, Builder, Database, DatabaseError, StorageBackend};

/// Zeros are written in pieces of this size.
const ZEROS: usize = 1 << 20;

/// Creates `dir` and its missing parents readable by their owner alone (mode 0700): a data
/// directory holds every record and the node's key.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Opens (creating if needed) the redb database at a path, as a builder sets it up: [`create`]
/// on the file system, or another store of files (a test's disk that loses its page cache).
#[derive(Clone)]
pub struct Opener(std::sync::Arc<OpenFn>);

/// What an [`Opener`] calls.
type OpenFn = dyn Fn(&Builder, &Path) -> Result<Database, DatabaseError> + Send + Sync;

impl Opener {
    /// An opener that opens with `open`.
    pub fn new(
        open: impl Fn(&Builder, &Path) -> Result<Database, DatabaseError> + Send + Sync + 'static,
    ) -> Self {
        Self(std::sync::Arc::new(open))
    }

    /// Opens (creating if needed) the database at `path`, as `builder` sets it up.
    pub fn open(&self, builder: &Builder, path: &Path) -> Result<Database, DatabaseError> {
        (self.0)(builder, path)
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener")
    }
}

/// The [`Opener`] of the file system: [`create`].
pub fn files() -> Opener {
    Opener::new(create)
}

/// Opens (creating if needed, with mode 0600) the redb database at `path`, as `builder` sets
/// it up, on a file whose growth is written out.
pub fn create(builder: &Builder, path: &Path) -> Result<Database, DatabaseError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let filler = file.try_clone()?;
    let inner = FileBackend::new(file)?;
    let backend = WrittenGrowth { inner, filler };
    if restart_interrupted_creation(&backend)? {
        tracing::warn!(path = %path.display(), "the file's creation was interrupted (nothing was ever committed to it): creating it again");
    }
    builder.create_with_backend(backend)
}

/// redb writes a new file's magic number last, once the rest is on disk, so a file whose
/// creation a crash interrupted starts with zeros where the magic goes, and redb refuses to
/// open it ("not a redb database") although no transaction can have committed to it. Such a
/// file is emptied, so it is created again; whether that happened.
pub fn restart_interrupted_creation(backend: &impl StorageBackend) -> IoResult<bool> {
    // redb's magic number is its file's first 9 bytes.
    const MAGIC: usize = 9;
    let len = backend.len()?;
    if len == 0 {
        return Ok(false);
    }
    let mut start = [0xFFu8; MAGIC];
    if len >= MAGIC as u64 {
        backend.read(0, &mut start)?;
    } else {
        start = [0; MAGIC];
    }
    if start != [0; MAGIC] {
        return Ok(false);
    }
    backend.set_len(0)?;
    backend.sync_data()?;
    Ok(true)
}

/// redb's file backend, except that growing the file writes zeros over the new region.
#[derive(Debug)]
struct WrittenGrowth {
    inner: FileBackend,
    /// The same file, for the zeros.
    filler: File,
}

/// What the backend methods return (redb without its `experimental-api-5` feature: `io::Error`).
type IoResult<T> = Result<T, std::io::Error>;

impl StorageBackend for WrittenGrowth {
    fn len(&self) -> IoResult<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> IoResult<()> {
        self.inner.read(offset, out)
    }

    /// New positions must read as zero, which the zeros written over them guarantee as much as
    /// `set_len` itself does.
    fn set_len(&self, len: u64) -> IoResult<()> {
        let old = self.inner.len()?;
        self.inner.set_len(len)?;
        if len > old {
            let zeros = vec![0u8; ZEROS];
            let mut at = old;
            while at < len {
                let n = ((len - at) as usize).min(ZEROS);
                self.filler.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> IoResult<()> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> IoResult<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// A failed write as an engine error: [`EngineError::DiskFull`] when the disk is out of
/// space, a storage failure otherwise.
pub fn write_failure(err: impl Into<redb::Error>) -> crate::EngineError {
    match err.into() {
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            crate::EngineError::DiskFull {
                detail: io.to_string(),
            }
        }
        other => crate::EngineError::Storage {
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
    use std::os::unix::fs::MetadataExt;

    const TABLE: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("t");

    #[test]
    fn a_grown_file_is_fully_allocated_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let db = create(&Database::builder(), &path).unwrap();
        let value = vec![7u8; 1000];
        for i in 0..2000u64 {
            let txn = db.begin_write().unwrap();
            txn.open_table(TABLE)
                .unwrap()
                .insert(i, value.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        drop(db);
        let meta = std::fs::metadata(&path).unwrap();
        // No holes: the blocks allocated cover the file's length.
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} bytes allocated for {} bytes",
            meta.blocks() * 512,
            meta.len()
        );
        let db = create(&Database::builder(), &path).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(TABLE).unwrap();
        assert_eq!(table.len().unwrap(), 2000);
        assert_eq!(table.get(1999).unwrap().unwrap().value(), value.as_slice());
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let _db = create(&Database::builder(), &path).unwrap();
        assert!(matches!(
            create(&Database::builder(), &path),
            Err(DatabaseError::DatabaseAlreadyOpen)
        ));
    }
}
