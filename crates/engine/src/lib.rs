//! Storage engines behind one contract.
//!
//! An [`Engine`] stores [`Record`]s by [`Key`]. Every change goes through [`Engine::commit`],
//! which applies a batch of [`Mutation`]s atomically, merging each into the stored record
//! inside one transaction (so read-modify-write operations such as counter increments and
//! CRDT merges are never lost to a concurrent writer). The [`conformance`] suite checks these
//! obligations, and every engine runs it unchanged.
//!
//! Architecture invariant: engines know nothing of collections, consistency levels or
//! configuration; they store records and apply mutations with `agentstore_core::record::apply`.

mod any;
mod batch;
pub mod batch_codec;
pub mod changelog;
mod clock;
pub mod conformance;
mod error;
pub mod file_handle;
pub mod group_commit;
mod local;
mod metrics;
#[cfg(feature = "postgres")]
mod postgres;
pub mod redb_file;
#[cfg(feature = "redis")]
mod redis;
pub mod session;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod two_phase;

use std::future::Future;

pub use agentstore_core::Key;
pub use agentstore_core::record::{Expect, Mutation, Record};
pub use any::{AnyEngine, DynEngine, EngineFuture};
pub use batch::{check_fences, check_signatures, decode_stored, prepare_batch};
pub use clock::{NodeClock, PhysicalClock, SystemClock};
pub use error::EngineError;
pub use local::{Committed, DATA_FILE, Hint, LocalEngine, WeakLocalEngine};
pub use metrics::{EngineMetrics, Instrumented};
#[cfg(feature = "postgres")]
pub use postgres::{Isolation, PostgresEngine, PostgresOptions};
#[cfg(feature = "redis")]
pub use redis::{LockGrant, RedisEngine, RedisOptions, Redlock, WaitPolicy};

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The key to change.
    pub key: Key,
    /// The change.
    pub mutation: Mutation,
    /// A condition on the stored record (compare-and-set); `None` applies unconditionally.
    pub expect: Option<Expect>,
    /// The fencing token of the lock the writer holds, if any (see [`Fence`]).
    pub fence: Option<Fence>,
}

/// A fencing token: a lock's name and the token its current grant carries. Tokens of one lock
/// only increase, so an engine that remembers the highest token it has seen per lock can
/// refuse a write from a holder whose lock has since been granted to someone else (a paused
/// or partitioned former holder), which a lock alone cannot prevent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The lock's name.
    pub lock: String,
    /// The token of the grant the writer holds.
    pub token: u64,
}

impl Write {
    /// An unconditional write.
    pub fn new(key: Key, mutation: Mutation) -> Self {
        Self {
            key,
            mutation,
            expect: None,
            fence: None,
        }
    }

    /// A conditional write.
    pub fn expecting(key: Key, mutation: Mutation, expect: Expect) -> Self {
        Self {
            key,
            mutation,
            expect: Some(expect),
            fence: None,
        }
    }

    /// The same write, fenced by `fence`.
    pub fn fenced(self, fence: Fence) -> Self {
        Self {
            fence: Some(fence),
            ..self
        }
    }
}

/// The fences of a batch: the highest token per lock (a batch fenced twice by one lock is
/// checked against its highest token).
pub(crate) fn batch_fences(writes: &[Write]) -> Vec<Fence> {
    let mut fences: Vec<Fence> = Vec::new();
    for fence in writes.iter().filter_map(|w| w.fence.as_ref()) {
        match fences.iter_mut().find(|f| f.lock == fence.lock) {
            Some(existing) => existing.token = existing.token.max(fence.token),
            None => fences.push(fence.clone()),
        }
    }
    fences
}

/// The storage contract.
///
/// Obligations of every implementation (checked by [`conformance`]):
///
/// 1. **Durability**: when `commit` returns `Ok`, the batch survives a crash of the process
///    and of the machine (the local engine fsyncs before acknowledging).
/// 2. **Atomicity**: a batch applies whole or not at all; if any expectation fails, nothing
///    of it is written and the error names the key.
/// 3. **Merge inside the transaction**: each write is applied to the record stored at that
///    moment (`agentstore_core::record::apply`), with no other writer in between; later writes
///    of a batch see earlier ones.
/// 4. **Read-your-writes**: a `get` that starts after `commit` returned sees the commit.
/// 5. **Tombstones**: a delete stores a tombstone record; `get` and `scan` return it, so
///    replication can carry deletes. Callers that want live values filter them.
/// 6. **Order**: `scan` returns keys in byte order.
/// 7. **Fencing**: a batch whose writes carry a [`Fence`] older than the highest token the
///    engine has seen for that lock is refused whole ([`EngineError::Fenced`]); otherwise the
///    engine records the token as the highest, durably and atomically with the batch.
/// 8. **Typed failure**: backend and data errors are [`EngineError`]s, never panics.
pub trait Engine: Send + Sync + 'static {
    /// The stored record of `key`, tombstones included.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, EngineError>> + Send;

    /// The record of `key` as this node has it, which may lag behind the latest write where
    /// the engine replicates through a leader (a follower read of a Raft group). Engines
    /// without such a cheaper read answer as [`Engine::get`] does.
    fn get_stale(
        &self,
        key: &Key,
    ) -> impl Future<Output = Result<Option<Record>, EngineError>> + Send {
        self.get(key)
    }

    /// Up to `limit` records whose keys start with `prefix`, in key order, starting after
    /// `start_after` when given (for paging).
    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Key, Record)>, EngineError>> + Send;

    /// Applies `writes` atomically and durably; returns the resulting record of each write.
    fn commit(
        &self,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<Vec<Record>, EngineError>> + Send;

    /// Applies one unconditional mutation; returns the resulting record.
    fn apply(
        &self,
        key: Key,
        mutation: Mutation,
    ) -> impl Future<Output = Result<Record, EngineError>> + Send {
        async move { single(self.commit(vec![Write::new(key, mutation)]).await?) }
    }

    /// Applies one mutation if the stored record matches `expect` (compare-and-set).
    fn apply_if(
        &self,
        key: Key,
        mutation: Mutation,
        expect: Expect,
    ) -> impl Future<Output = Result<Record, EngineError>> + Send {
        async move {
            single(
                self.commit(vec![Write::expecting(key, mutation, expect)])
                    .await?,
            )
        }
    }

    /// Two-phase commit, first phase: checks `writes`, locks their keys and keeps them for
    /// `txn` (see [`two_phase`]). Engines that cannot take part answer
    /// [`EngineError::Unsupported`].
    fn prepare(
        &self,
        txn: &str,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<(), EngineError>> + Send {
        let _ = (txn, writes);
        async { Err(no_two_phase()) }
    }

    /// Two-phase commit, second phase: applies (`commit`) or drops what `txn` prepared; see
    /// [`two_phase`].
    fn resolve(
        &self,
        txn: &str,
        commit: bool,
    ) -> impl Future<Output = Result<Vec<Record>, EngineError>> + Send {
        let _ = (txn, commit);
        async { Err(no_two_phase()) }
    }

    /// Up to `limit` changes to keys under `prefix` after position `after` of this engine's
    /// change feed (from now when `None`), waiting up to `wait` for one; see [`changelog`].
    /// Engines without a feed answer [`EngineError::Unsupported`].
    fn changes(
        &self,
        prefix: &[u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> impl Future<Output = Result<changelog::ChangePage, EngineError>> + Send {
        let _ = (prefix, after, limit, wait);
        async { Err(no_change_feed()) }
    }

    /// Removes the stored values that expired by `now_ms`, where this engine alone decides
    /// what it holds, and answers how many. Reads hide an expired value from the moment it
    /// expires whatever the engine; this gives its space back. Engines whose records other
    /// replicas hold too (a cluster's leaderless and causal engines, which collect expired
    /// values as tombstones, or not yet), that expire values themselves (Redis) or that reach a
    /// node (a client) remove nothing here: 0.
    fn purge_expired(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<usize, EngineError>> + Send {
        let _ = now_ms;
        async { Ok(0) }
    }
}

/// Locks `mutex`, taking over one a panicking holder left poisoned: every mutex agentstore
/// shares guards state that stays consistent between statements (queues, tokens, maps).
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What an engine that cannot take part in a two-phase commit answers.
pub fn no_two_phase() -> EngineError {
    EngineError::Unsupported {
        detail: "this engine cannot take part in a two-phase commit (the embedded engine, \
                 PostgreSQL and a cluster's strong collections can)"
            .into(),
    }
}

/// What an engine without a change feed answers to a watch.
pub fn no_change_feed() -> EngineError {
    EngineError::Unsupported {
        detail: "this backend keeps no change feed: watch collections on the embedded engine \
                 or a cluster's eventual, causal and strong collections"
            .into(),
    }
}

/// The one unconditional, unfenced write of `writes`: all that an engine without multi-key
/// transactions or compare-and-set (a leaderless cluster) can apply. Anything else is
/// [`EngineError::Unsupported`], naming what would be needed.
pub fn single_unconditional(mut writes: Vec<Write>) -> Result<Write, EngineError> {
    match writes.pop() {
        Some(write) if writes.is_empty() && write.expect.is_none() && write.fence.is_none() => {
            Ok(write)
        }
        _ => Err(EngineError::Unsupported {
            detail: "a cluster write applies one unconditional mutation to one key; multi-key \
                     batches, compare-and-set and fenced writes need the strong level"
                .into(),
        }),
    }
}

fn single(mut records: Vec<Record>) -> Result<Record, EngineError> {
    records.pop().ok_or(EngineError::Internal {
        detail: "a one-write batch returned no record".into(),
    })
}
