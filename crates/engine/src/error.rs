//! The engine layer's one error type.

use std::path::PathBuf;

use agentstore_core::Key;
use agentstore_core::codec::DecodeError;
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
    /// A conditional write found another version; nothing in its batch was written.
    #[error("`{key}`: {source}")]
    ExpectationFailed {
        /// The key whose expectation failed.
        key: Key,
        /// What was expected and found.
        source: ExpectationFailed,
    },
    /// The storage below the engine failed (I/O, disk full, ...). The batch was not
    /// acknowledged; it may or may not have been applied only if the error says so.
    #[error("storage failure: {detail}")]
    Storage {
        /// The underlying error.
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
    pub(crate) fn storage(err: impl std::fmt::Display) -> Self {
        EngineError::Storage {
            detail: err.to_string(),
        }
    }
}
