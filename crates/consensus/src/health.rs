//! Whether the member's files take writes: the last failed write to the Raft log or the state
//! machine, until one succeeds again.
//!
//! openraft stops a member for good after any storage error, so a full disk would take the
//! member out until a restart. The group watches for that, reopens the files once writes can
//! succeed again (see `Group`), and answers in the meantime with the failure kept here, typed:
//! [`EngineError::DiskFull`] when the disk is out of space.

use std::io;
use std::sync::Mutex;

use agentstore_engine::{EngineError, lock};

/// The last failed write, shared by the log store, the state machine and the group.
#[derive(Debug, Default)]
pub(crate) struct Health(Mutex<Option<EngineError>>);

impl Health {
    /// A write to `file` failed with `err`. The first failure since the last success is kept:
    /// it is the cause, and what follows is often its echo (redb answers "Previous I/O error
    /// occurred" to every write after one failed, which would hide a full disk).
    pub(crate) fn failed(&self, file: &str, err: &io::Error) {
        let mut last = lock(&self.0);
        if last.is_some() {
            return;
        }
        let detail = format!("{file}: {err}");
        // Some paths carry the failure as text only (an engine error inside an apply, the
        // reason openraft gives): ENOSPC's text says it as surely as the kind does.
        let full = err.kind() == io::ErrorKind::StorageFull || detail.contains("(os error 28)");
        *last = Some(if full {
            EngineError::DiskFull { detail }
        } else {
            EngineError::Storage { detail }
        });
    }

    /// A write succeeded.
    pub(crate) fn succeeded(&self) {
        let mut last = lock(&self.0);
        if last.is_some() {
            *last = None;
        }
    }

    /// The last write's failure, if the last write failed.
    pub(crate) fn failure(&self) -> Option<EngineError> {
        lock(&self.0).as_ref().map(EngineError::for_each_request)
    }
}

/// A redb error as an I/O error that keeps the kind of an underlying I/O failure (a full disk
/// stays `StorageFull`).
pub(crate) fn redb_io(err: impl Into<redb::Error>) -> io::Error {
    match err.into() {
        redb::Error::Io(io) => io::Error::new(io.kind(), io.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_kept_typed_until_a_success() {
        let health = Health::default();
        let text_only =
            io::Error::other("sessions: I/O error: No space left on device (os error 28)");
        health.failed("raft-state.redb", &text_only);
        health.failed(
            "raft-state.redb",
            &io::Error::other(
                "Previous I/O error occurred. Please close and re-open the database.",
            ),
        );
        assert!(
            matches!(health.failure(), Some(EngineError::DiskFull { detail }) if detail.contains("os error 28")),
            "{:?}",
            health.failure()
        );
        health.succeeded();
        assert!(health.failure().is_none());
        health.failed("raft-log.redb", &io::Error::other("broken pipe"));
        assert!(matches!(
            health.failure(),
            Some(EngineError::Storage { .. })
        ));
    }
}
