//! Transactions: writes to several keys that apply all together or not at all.

use std::fmt;

use agentstore_core::config::ConflictStrategy;
use agentstore_engine::{Engine, EngineError, Expect, Fence, Record, Write};
use serde::Serialize;

use super::{Call, Result, Storage, StorageError, Version, WriteReceipt, traced};

/// Writes to several keys that apply all together or not at all, made by
/// [`Storage::transaction`] and applied by [`Transaction::commit`].
///
/// When every write's collection is served by one engine, the transaction is one atomic
/// commit of it: one redb transaction on the embedded engine, one Raft log entry for strong
/// collections in a cluster, one serializable PostgreSQL transaction, one `MULTI`/`EXEC` on
/// Redis. Across engines (a Raft collection and a PostgreSQL one, say) it is a two-phase
/// commit coordinated by this store, with a durable coordinator record: all or nothing, even
/// if this process dies in the middle (it finishes the transaction when it opens again); see
/// the `two_phase` module for what readers see meanwhile. Every condition
/// (compare-and-set, fencing token) is checked before anything is written, so one failed
/// condition writes nothing. Redis and a cluster's eventual collections cannot take part in
/// a two-phase commit (`unsupported`), and a cluster's eventual collections have no leader
/// to order even a single-engine batch (`unsupported`).
///
/// ```no_run
/// # async fn demo(storage: &p2p_ai_agents::storage::Storage) -> p2p_ai_agents::storage::Result<()> {
/// let mut transfer = storage.transaction();
/// transfer.counter_add("bank:alice", -10).counter_add("bank:bob", 10);
/// transfer.commit().await?;
/// # Ok(()) }
/// ```
pub struct Transaction<'s> {
    storage: &'s Storage,
    staged: Vec<(Call<'s>, Write)>,
    /// The first write that could not be staged; the commit reports it and writes nothing.
    error: Option<StorageError>,
    /// The fence every write carries ([`Transaction::fenced`]).
    pub(super) fence: Option<Fence>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field(
                "writes",
                &self.staged.iter().map(|(_, w)| w).collect::<Vec<_>>(),
            )
            .field("error", &self.error)
            .finish()
    }
}

impl Storage {
    /// An empty transaction; see [`Transaction`].
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction {
            storage: self,
            staged: Vec::new(),
            error: None,
            fence: None,
        }
    }
}

impl Storage {
    /// Applies `writes` atomically: in one commit of their engine, or by two-phase commit
    /// when their collections live on different engines. Returns the record of each write.
    pub(crate) async fn commit_writes(&self, writes: Vec<Write>) -> Result<Vec<Record>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        match self.batch_engine(writes.iter().map(|w| w.key.collection())) {
            Some(engine) => Ok(engine.commit(writes).await?),
            None => self.two_phase_commit(writes).await,
        }
    }
}

impl<'s> Transaction<'s> {
    /// Stages the write `build` makes for `key`, or keeps the first error.
    fn stage(&mut self, key: &str, build: impl FnOnce(&Call<'s>) -> Result<Write>) -> &mut Self {
        if self.error.is_none() {
            match self.storage.call(key, None).and_then(|call| {
                let write = build(&call)?;
                Ok((call, write))
            }) {
                Ok(staged) => self.staged.push(staged),
                Err(err) => self.error = Some(err),
            }
        }
        self
    }

    /// Writes `value` (see [`Storage::set`]).
    pub fn set<T: Serialize>(&mut self, key: &str, value: T) -> &mut Self {
        self.stage(key, |call| {
            let mutation = Storage::set_mutation(call, &value, None)?;
            Ok(Write::new(call.key.clone(), mutation))
        })
    }

    /// Writes `value` only if the key is at `expected` (`None`: has no value); otherwise the
    /// whole transaction fails with [`StorageError::VersionMismatch`].
    pub fn compare_and_set<T: Serialize>(
        &mut self,
        key: &str,
        value: T,
        expected: Option<&Version>,
    ) -> &mut Self {
        self.stage(key, |call| {
            if call.plan.conflict != ConflictStrategy::Register {
                return Err(Storage::wrong(
                    call,
                    "compare_and_set",
                    "compare-and-set needs an lww collection",
                ));
            }
            let mutation = Storage::lww(call, Some(Storage::encode(call, &value)?))?;
            let expect = expected.map_or(Expect::Absent, |v| Expect::Version(v.0.clone()));
            Ok(Write::expecting(call.key.clone(), mutation, expect))
        })
    }

    /// Deletes an `lww` key (a tombstone).
    pub fn delete(&mut self, key: &str) -> &mut Self {
        self.stage(key, |call| match call.plan.conflict {
            ConflictStrategy::Register => {
                Ok(Write::new(call.key.clone(), Storage::lww(call, None)?))
            }
            _ => Err(Storage::wrong(
                call,
                "delete",
                "inside a transaction only lww keys can be deleted; delete others on their own",
            )),
        })
    }

    /// Deletes an `lww` key only if it is at `expected`; otherwise the whole transaction fails
    /// with [`StorageError::VersionMismatch`].
    pub fn compare_and_delete(&mut self, key: &str, expected: &Version) -> &mut Self {
        self.stage(key, |call| {
            if call.plan.conflict != ConflictStrategy::Register {
                return Err(Storage::wrong(
                    call,
                    "compare_and_delete",
                    "compare-and-delete needs an lww collection",
                ));
            }
            let mutation = Storage::lww(call, None)?;
            Ok(Write::expecting(
                call.key.clone(),
                mutation,
                Expect::Version(expected.0.clone()),
            ))
        })
    }

    /// Adds `delta` to a counter (see [`Storage::counter_add`]).
    pub fn counter_add(&mut self, key: &str, delta: i64) -> &mut Self {
        self.stage(key, |call| {
            let mutation = Storage::counter_mutation(call, delta)?;
            Ok(Write::new(call.key.clone(), mutation))
        })
    }

    /// Applies every staged write atomically; returns a receipt per write, in order. Nothing
    /// is written if a write could not be staged, a condition fails, or the collections are
    /// served by different engines.
    pub async fn commit(self) -> Result<Vec<WriteReceipt>> {
        let first_key = self
            .staged
            .first()
            .map(|(call, _)| call.key.to_string())
            .unwrap_or_default();
        traced("transaction", &first_key, async move {
            if let Some(err) = self.error {
                return Err(err);
            }
            let writes: Vec<Write> = self
                .staged
                .iter()
                .map(|(_, w)| match &self.fence {
                    Some(fence) => w.clone().fenced(fence.clone()),
                    None => w.clone(),
                })
                .collect();
            let records = match self.storage.commit_writes(writes).await {
                Ok(records) => records,
                Err(StorageError::Engine(EngineError::ExpectationFailed { key, .. })) => {
                    return Err(StorageError::VersionMismatch {
                        key: key.to_string(),
                    });
                }
                Err(err) => return Err(err),
            };
            Ok(self
                .staged
                .iter()
                .zip(&records)
                .map(|((call, _), record)| Storage::receipt(call, record))
                .collect())
        })
        .await
    }
}
