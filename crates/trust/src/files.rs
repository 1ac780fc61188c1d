//! Secrets on disk: files readable by their owner alone, written whole or not at all.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::TrustError;

/// Creates `dir` and its missing parents with mode 0700 (a data directory holds the node's
/// key and every record); an existing directory is left as it is. (The engines create their
/// directories the same way, through `agentstore_engine::redb_file`, which this crate does
/// not depend on.)
fn create_private_dir(dir: &Path) -> Result<(), TrustError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TrustError::io(dir, &e))
}

/// Writes `bytes` to a new file `path` with mode 0600, whole or not at all. Refuses to replace
/// an existing file (a key is never overwritten by accident).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    write_whole(path, bytes, false)
}

/// Writes `bytes` to `path` with mode 0600, replacing what is there, whole or not at all.
pub(crate) fn replace_private_file(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    write_whole(path, bytes, true)
}

/// Through a temporary file in the same directory, fsynced, then moved into place (renamed
/// over `path`, or hard-linked, which fails if `path` exists), so a crash leaves the old state
/// or the new one.
fn write_whole(path: &Path, bytes: &[u8], replace: bool) -> Result<(), TrustError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    if !replace && path.exists() {
        return Err(TrustError::File {
            path: path.to_owned(),
            reason: "already exists; not overwritten".into(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        if replace {
            fs::rename(&temporary, path)?;
        } else {
            fs::hard_link(&temporary, path)?;
            fs::remove_file(&temporary)?;
        }
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written.map_err(|e| TrustError::io(path, &e))
}
