//! The engine layer's one error type.

use std::path::PathBuf;

use agentstore_core::Key;
use agentstore_core::codec::DecodeError;
use agentstore_core::ot::EditRefused;
use agentstore_core::record::{ExpectationFailed, WrongKind};

/// What can go wrong in an engine. Variants carry what a caller needs to act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Another process has the data directory open.
    #[error("the data directory {} is in use by another agentstore process", path.display())]
    Locked {
        /// The data file.
        path: PathBuf,
    },
    /// The data file is damaged or is not an agentstore data file.
    #[error("the data file {} is corrupted: {detail}", path.display())]
    Corrupted {
        /// The data file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The data file was written by a newer version of agentstore.
    #[error("the data file {} has format {found}; this version reads up to format {supported}", path.display())]
    UnsupportedFormat {
        /// The data file.
        path: PathBuf,
        /// Its format.
        found: u64,
        /// The newest format this version reads.
        supported: u64,
    },
    /// A stored record could not be decoded.
    #[error("the stored record of `{key}` cannot be decoded: {source}")]
    Decode {
        /// The key.
        key: Key,
        /// Why.
        source: DecodeError,
    },
    /// The mutation does not apply to the kind of value stored under the key.
    #[error("`{key}`: {source}")]
    WrongKind {
        /// The key.
        key: Key,
        /// The kinds involved.
        source: WrongKind,
    },
    /// A document edit that cannot apply (against a revision the document has not reached
    /// or no longer keeps, or not spanning the document): nothing was written.
    #[error("`{key}`: {source}")]
    EditRefused {
        /// The key.
        key: Key,
        /// Why.
        source: EditRefused,
    },
    /// The disk is full: the write was not made. The engine recovers by itself once there is
    /// space again (no restart needed).
    #[error("the disk is full; nothing was written ({detail})")]
    DiskFull {
        /// The underlying error.
        detail: String,
    },
    /// A write or record of a collection that requires signed writes was refused: unsigned,
    /// a signature that does not hold, or stamped outside the window of its signing time.
    /// Nothing in its batch was written.
    #[error("`{key}`: {source}")]
    SignatureRefused {
        /// The key.
        key: Key,
        /// Why.
        source: agentstore_core::signing::SignatureRefused,
    },
    /// A conditional write found another version; nothing in its batch was written.
    #[error("`{key}`: {source}")]
    ExpectationFailed {
        /// The key whose expectation failed.
        key: Key,
        /// What was expected and found.
        source: ExpectationFailed,
    },
    /// The batch carries a fencing token older than one already seen for its lock: the
    /// writer's lock was granted to someone else since. Nothing was written.
    #[error("fenced off: lock `{lock}` has seen token {highest}, this write carries {token}")]
    Fenced {
        /// The lock.
        lock: String,
        /// The token the write carried.
        token: u64,
        /// The highest token seen for the lock.
        highest: u64,
    },
    /// A key of the batch is locked by a prepared two-phase transaction that has not been
    /// committed or aborted yet. Nothing was written; retry once it is resolved.
    #[error(
        "`{key}` is locked by transaction {txn}, prepared and not yet resolved; nothing was written"
    )]
    InTransaction {
        /// The locked key.
        key: Key,
        /// The transaction holding it.
        txn: String,
    },
    /// The storage below the engine failed (I/O, disk full, ...). The batch was not
    /// acknowledged; it may or may not have been applied only if the error says so.
    #[error("storage failure: {detail}")]
    Storage {
        /// The underlying error.
        detail: String,
    },
    /// The engine's settings cannot work (a wrong kind of URL, an unsupported schema...).
    #[error("invalid engine settings: {detail}")]
    InvalidSettings {
        /// What is wrong and what is needed.
        detail: String,
    },
    /// The backend server cannot be reached (connection refused, dropped, timed out). The
    /// operation was not acknowledged; a write may or may not have been applied.
    #[error("{backend} is unavailable: {detail}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// The underlying error.
        detail: String,
    },
    /// The server refused the caller: no valid credential (`unauthenticated`), or one that does
    /// not grant this operation (`forbidden`). Nothing was done.
    #[error("{backend} refused the caller ({code}): {detail}")]
    Denied {
        /// Which backend.
        backend: &'static str,
        /// The server's code: `unauthenticated`, `invalid_token`, `token_expired` or
        /// `forbidden`.
        code: String,
        /// The server's message.
        detail: String,
    },
    /// Concurrent writers kept changing the same keys; the batch was retried `attempts` times
    /// and not applied.
    #[error("the batch lost to concurrent writers {attempts} times and was not applied")]
    Contention {
        /// How many times it was tried.
        attempts: u32,
    },
    /// A strong write reached the primary but fewer replicas than required acknowledged it in
    /// time. The outcome is indeterminate, not failed: the write is on the primary and will
    /// normally replicate, but a failover before it does can lose it.
    #[error(
        "write applied on the primary but only {acknowledged} of {required} replicas acknowledged \
         it within {timeout_ms} ms (indeterminate: it may be lost if the primary fails now)"
    )]
    ReplicationShortfall {
        /// Replicas that acknowledged.
        acknowledged: u64,
        /// Replicas required.
        required: u64,
        /// How long the write waited.
        timeout_ms: u64,
    },
    /// A lock could not be taken (or kept): fewer masters than a majority granted it in time.
    #[error("lock `{lock}` not acquired: {granted} of the {needed} masters needed granted it")]
    LockNotAcquired {
        /// The lock.
        lock: String,
        /// Masters that granted it.
        granted: usize,
        /// Masters needed (a majority).
        needed: usize,
    },
    /// A cluster write reached fewer replicas than its write quorum in time. Indeterminate,
    /// not failed: it is durable on the replicas that acknowledged and will spread.
    #[error(
        "only {acknowledged} of the {needed} replicas needed acknowledged in time (indeterminate: durable where acknowledged, it will spread)"
    )]
    QuorumFailed {
        /// Replicas that acknowledged.
        acknowledged: usize,
        /// The write quorum.
        needed: usize,
    },
    /// The engine cannot do what was asked (a cluster node refuses multi-key batches and
    /// conditional writes: they need the strong level).
    #[error("not supported here: {detail}")]
    Unsupported {
        /// What, and what to use instead.
        detail: String,
    },
    /// The write's answer was lost (a leader change, a timeout after sending it): it may or
    /// may not have been applied. Reading the key tells which.
    #[error("{backend}: the write's outcome is unknown ({detail}); it may have been applied")]
    Indeterminate {
        /// The engine.
        backend: &'static str,
        /// What happened.
        detail: String,
    },
    /// The node has not caught up with the session's causal past in time: answering now could
    /// show the session something older than what it has already seen or written.
    #[error(
        "{backend}: this node has not caught up with the session in {waited_ms} ms ({detail}); retry, or use another node"
    )]
    SessionBehind {
        /// The engine.
        backend: &'static str,
        /// How long the call waited.
        waited_ms: u64,
        /// What is missing.
        detail: String,
    },
    /// A change-feed position this node cannot resume from: older than the changes it keeps
    /// (or than a snapshot that replaced its records), or one another feed handed out
    /// (positions are per node). List the keys again (a scan), then watch from now.
    #[error("{}", position_unavailable(requested, detail))]
    PositionUnavailable {
        /// The position asked for (empty when `detail` is a remote node's whole message).
        requested: String,
        /// Why, and which positions this feed can resume after.
        detail: String,
    },
    /// The engine has shut down.
    #[error("the engine is closed")]
    Closed,
    /// A broken internal invariant (a bug); reported instead of panicking.
    #[error("internal error: {detail}")]
    Internal {
        /// What broke.
        detail: String,
    },
}

impl EngineError {
    /// A stable, short name of the error's kind (for metrics and logs).
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Locked { .. } => "locked",
            EngineError::Corrupted { .. } => "corrupted",
            EngineError::UnsupportedFormat { .. } => "unsupported_format",
            EngineError::Decode { .. } => "decode",
            EngineError::WrongKind { .. } => "wrong_kind",
            EngineError::EditRefused { .. } => "edit_refused",
            EngineError::SignatureRefused { .. } => "signature_refused",
            EngineError::ExpectationFailed { .. } => "expectation_failed",
            EngineError::Fenced { .. } => "fenced",
            EngineError::InTransaction { .. } => "in_transaction",
            EngineError::Storage { .. } => "storage",
            EngineError::DiskFull { .. } => "disk_full",
            EngineError::InvalidSettings { .. } => "invalid_settings",
            EngineError::Unavailable { .. } => "unavailable",
            EngineError::Contention { .. } => "contention",
            EngineError::Denied { .. } => "denied",
            EngineError::ReplicationShortfall { .. } => "replication_shortfall",
            EngineError::LockNotAcquired { .. } => "lock_not_acquired",
            EngineError::Unsupported { .. } => "unsupported",
            EngineError::QuorumFailed { .. } => "quorum_failed",
            EngineError::Indeterminate { .. } => "indeterminate",
            EngineError::SessionBehind { .. } => "session_behind",
            EngineError::PositionUnavailable { .. } => "position_unavailable",
            EngineError::Closed => "closed",
            EngineError::Internal { .. } => "internal",
        }
    }

    /// Why `record::apply` refused a mutation of `key`.
    pub fn refused(key: &Key, refused: agentstore_core::record::Refused) -> Self {
        use agentstore_core::record::Refused;
        let key = key.clone();
        match refused {
            Refused::WrongKind(source) => EngineError::WrongKind { key, source },
            Refused::Edit(source) => EngineError::EditRefused { key, source },
        }
    }

    /// The refusal of a write to `key`'s signed collection.
    pub fn signature(key: &Key, source: agentstore_core::signing::SignatureRefused) -> Self {
        EngineError::SignatureRefused {
            key: key.clone(),
            source,
        }
    }

    pub(crate) fn storage(err: impl std::fmt::Display) -> Self {
        EngineError::Storage {
            detail: err.to_string(),
        }
    }

    /// The failure of a group commit as each request of the group gets it: a full disk stays
    /// [`EngineError::DiskFull`], anything else becomes a storage failure with its text.
    pub fn for_each_request(&self) -> Self {
        match self {
            EngineError::DiskFull { detail } => EngineError::DiskFull {
                detail: detail.clone(),
            },
            other => EngineError::Storage {
                detail: other.to_string(),
            },
        }
    }
}

fn position_unavailable(requested: &str, detail: &str) -> String {
    if requested.is_empty() {
        return detail.to_owned();
    }
    format!(
        "position {requested} cannot be resumed here ({detail}); scan the prefix again and \
         watch from now"
    )
}
