//! The facade's one error type.

use std::path::PathBuf;

use agentstore_core::ConsistencyLevel;
use agentstore_core::config::{ConfigError, ConflictStrategy};
use agentstore_core::key::KeyError;
use agentstore_engine::EngineError;

/// What a storage call can fail with. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The configuration file is invalid; the error names the file, line, column and field.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration built in code breaks a rule.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The key is not a valid key.
    #[error("invalid key {key:?}: {source}")]
    Key {
        /// The key as given.
        key: String,
        /// Which rule it breaks.
        source: KeyError,
    },
    /// The value could not be serialized to JSON.
    #[error("cannot serialize the value for `{key}`: {source}")]
    Serialize {
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The stored value does not deserialize into the requested type.
    #[error("the value of `{key}` does not deserialize into the requested type: {source}")]
    Deserialize {
        /// The key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// A value of an encrypted collection does not open with this store's key: another key,
    /// or altered, or written without encryption.
    #[error(
        "the value of `{key}` does not decrypt with this store's key (another key, or altered)"
    )]
    Unsealable {
        /// The key.
        key: String,
    },
    /// A write to a signed collection through a handle with no token to sign it
    /// (`Storage::signing_with`).
    #[error(
        "collection `{collection}` takes only signed writes: write through `Storage::signing_with(token)` (the CLI: `--sign`)"
    )]
    SignatureRequired {
        /// The collection.
        collection: String,
    },
    /// The operation does not fit the collection's conflict strategy.
    #[error(
        "`{key}`: collection `{collection}` holds {strategy} values, which do not support {operation}; \
         {hint}"
    )]
    WrongOperation {
        /// The key.
        key: String,
        /// Its collection.
        collection: String,
        /// The collection's strategy.
        strategy: ConflictStrategy,
        /// The operation attempted.
        operation: &'static str,
        /// What to do instead.
        hint: String,
    },
    /// A multi-value key has several concurrent values; read them with `get_siblings`.
    #[error(
        "`{key}` has {count} concurrent values; read them with get_siblings and write back with the context"
    )]
    Siblings {
        /// The key.
        key: String,
        /// How many values.
        count: usize,
    },
    /// Compare-and-set found another version; nothing was written.
    #[error("`{key}` is not at the expected version (compare-and-set failed); nothing was written")]
    VersionMismatch {
        /// The key.
        key: String,
    },
    /// The lock is held by another holder whose lease has not expired.
    #[error("lock `{lock}` is held by `{holder}` until {expires_at_ms} ms (Unix time)")]
    LockHeld {
        /// The lock's key.
        lock: String,
        /// Who holds it.
        holder: String,
        /// When that lease expires.
        expires_at_ms: u64,
    },
    /// A cross-engine transaction is decided (`committed` or aborted) but a participant has
    /// not applied the decision yet; the store keeps telling it in the background, and its
    /// keys stay locked until it has.
    #[error(
        "transaction {txn} is decided ({}) but `{collection}` has not applied it yet ({detail}); \
         it will be applied in the background, and its keys stay locked until then",
        if *committed { "committed" } else { "aborted" }
    )]
    TransactionUnfinished {
        /// The transaction.
        txn: String,
        /// Whether the decision was to commit.
        committed: bool,
        /// A participant's collection that has not applied it.
        collection: String,
        /// Why.
        detail: String,
    },
    /// The call asks for a level the collection's mechanism cannot deliver.
    #[error(
        "collection `{collection}` delivers {delivered} but the call asks for {requested}; \
         configure it with `storage.collections.{collection}.consistency: {requested}` on a backend \
         that provides it"
    )]
    LevelUnavailable {
        /// The collection.
        collection: String,
        /// What the collection delivers.
        delivered: ConsistencyLevel,
        /// What the call asked for.
        requested: ConsistencyLevel,
    },
    /// A session token that does not parse.
    #[error("{0}")]
    InvalidSession(String),
    /// The engine failed (data directory in use, corruption, I/O, ...).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl StorageError {
    /// A stable, short name of the error's kind (for logs and traces).
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::Config(_)
            | StorageError::ConfigFile { .. }
            | StorageError::InvalidConfig(_) => "config",
            StorageError::Key { .. } => "invalid_key",
            StorageError::Serialize { .. } => "serialize",
            StorageError::Deserialize { .. } => "deserialize",
            StorageError::Unsealable { .. } => "unsealable",
            StorageError::SignatureRequired { .. } => "signature_required",
            StorageError::WrongOperation { .. } => "wrong_operation",
            StorageError::Siblings { .. } => "siblings",
            StorageError::VersionMismatch { .. } => "version_mismatch",
            StorageError::TransactionUnfinished { .. } => "transaction_unfinished",
            StorageError::LockHeld { .. } => "lock_held",
            StorageError::LevelUnavailable { .. } => "level_unavailable",
            StorageError::InvalidSession(_) => "invalid_session",
            StorageError::Engine(err) => err.kind(),
        }
    }
}

/// `Result` with [`StorageError`] as the default error.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
