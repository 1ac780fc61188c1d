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
mod clock;
pub mod conformance;
mod error;
mod local;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::future::Future;

pub use agentstore_core::Key;
pub use agentstore_core::record::{Expect, Mutation, Record};
pub use any::AnyEngine;
pub use clock::{NodeClock, PhysicalClock, SystemClock};
pub use error::EngineError;
pub use local::{DATA_FILE, LocalEngine};
#[cfg(feature = "postgres")]
pub use postgres::{Isolation, PostgresEngine, PostgresOptions};
#[cfg(feature = "redis")]
pub use redis::{RedisEngine, RedisOptions, WaitPolicy};

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The key to change.
    pub key: Key,
    /// The change.
    pub mutation: Mutation,
    /// A condition on the stored record (compare-and-set); `None` applies unconditionally.
    pub expect: Option<Expect>,
}

impl Write {
    /// An unconditional write.
    pub fn new(key: Key, mutation: Mutation) -> Self {
        Self {
            key,
            mutation,
            expect: None,
        }
    }

    /// A conditional write.
    pub fn expecting(key: Key, mutation: Mutation, expect: Expect) -> Self {
        Self {
            key,
            mutation,
            expect: Some(expect),
        }
    }
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
/// 7. **Typed failure**: backend and data errors are [`EngineError`]s, never panics.
pub trait Engine: Send + Sync + 'static {
    /// The stored record of `key`, tombstones included.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Record>, EngineError>> + Send;

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
}

fn single(mut records: Vec<Record>) -> Result<Record, EngineError> {
    records.pop().ok_or(EngineError::Internal {
        detail: "a one-write batch returned no record".into(),
    })
}
