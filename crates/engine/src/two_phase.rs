//! Two-phase commit, participant side: the contract every participant keeps, and its
//! implementation on redb tables, shared by the embedded engine and the Raft state machine.
//!
//! - **prepare** `(txn, writes)`: checks every condition of the writes now (compare-and-set,
//!   fencing tokens, value kinds), raises the fences, locks every key against other writers
//!   and keeps the writes durably under `txn`. After it answers `Ok`, the participant applies
//!   them when told to commit, whatever happens in between (restarts included). Until then a
//!   write to a locked key is refused with [`EngineError::InTransaction`], and reads see the
//!   values from before the transaction. Preparing a `txn` again answers `Ok` again.
//! - **resolve** `(txn, commit)`: applies (commit) or drops (abort) what `txn` prepared, and
//!   unlocks its keys. A `txn` not prepared here (never, or already resolved) answers `Ok`
//!   with no records: the coordinator's durable decision, not the participant, says which
//!   outcome a transaction had, so resolving is safe to repeat.

use agentstore_core::hlc::HybridClock;
use agentstore_core::{Key, Record};
use redb::{ReadableTable, Table, TableDefinition};

use crate::batch::{self, decode, distinct_keys};
use crate::batch_codec::{decode_writes, encode_writes};
use crate::error::EngineError;
use crate::{Write, prepare_batch};

/// Keys held by prepared transactions: key → transaction id.
pub const TXN_LOCKS: TableDefinition<'_, &[u8], &str> = TableDefinition::new("txn_locks");
/// The writes of prepared transactions: transaction id → `batch_codec` writes.
pub const TXN_STAGED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("txn_staged");
/// Records by key, as the embedded engine and the Raft state machine keep them.
pub const RECORDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("records");
/// The highest fencing token seen per lock.
pub const FENCES: TableDefinition<'_, &str, u64> = TableDefinition::new("fences");

/// Up to `limit` records of a [`RECORDS`] table whose keys start with `prefix`, in key order,
/// after `start_after` when given: the scan of every engine that keeps records in redb.
pub fn scan_records(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    start_after: Option<&Key>,
    limit: usize,
) -> Result<Vec<(Key, Record)>, EngineError> {
    use std::ops::Bound;
    let start = match start_after {
        Some(after) if after.as_bytes() >= prefix => Bound::Excluded(after.as_bytes()),
        _ => Bound::Included(prefix),
    };
    let mut out = Vec::new();
    for entry in table
        .range::<&[u8]>((start, Bound::Unbounded))
        .map_err(EngineError::storage)?
    {
        if out.len() >= limit {
            break;
        }
        let (key, value) = entry.map_err(EngineError::storage)?;
        let key_bytes = key.value();
        if !key_bytes.starts_with(prefix) {
            break;
        }
        let key = Key::new(key_bytes).map_err(|e| EngineError::Storage {
            detail: format!(
                "stored key {:?} is invalid: {e}",
                key_bytes.escape_ascii().to_string()
            ),
        })?;
        let record = decode(&key, value.value())?;
        out.push((key, record));
    }
    Ok(out)
}

/// The writes a commit applies: their conditions were checked and their fences raised when
/// they were prepared, and with the keys locked since, nothing can have changed the answer.
pub fn unconditional(writes: Vec<Write>) -> Vec<Write> {
    writes
        .into_iter()
        .map(|w| Write::new(w.key, w.mutation))
        .collect()
}

fn storage(err: impl std::fmt::Display) -> EngineError {
    EngineError::Storage {
        detail: err.to_string(),
    }
}

/// Refuses `writes` if a prepared transaction holds one of their keys.
pub fn check_unlocked(
    locks: &impl ReadableTable<&'static [u8], &'static str>,
    writes: &[Write],
) -> Result<(), EngineError> {
    for key in distinct_keys(writes) {
        if let Some(holder) = locks.get(key.as_bytes()).map_err(storage)? {
            return Err(EngineError::InTransaction {
                key: key.clone(),
                txn: holder.value().to_owned(),
            });
        }
    }
    Ok(())
}

/// The tables a redb participant changes, open in the caller's write transaction.
#[allow(missing_debug_implementations)]
pub struct RedbParticipant<'a, 't> {
    /// [`RECORDS`].
    pub records: &'a mut Table<'t, &'static [u8], &'static [u8]>,
    /// [`FENCES`].
    pub fences: &'a mut Table<'t, &'static str, u64>,
    /// [`TXN_LOCKS`].
    pub locks: &'a mut Table<'t, &'static [u8], &'static str>,
    /// [`TXN_STAGED`].
    pub staged: &'a mut Table<'t, &'static str, &'static [u8]>,
    /// The change feed, which every record written is appended to.
    pub changes: &'a mut crate::changelog::ChangeLog<'t>,
}

impl RedbParticipant<'_, '_> {
    fn stored(
        records: &Table<'_, &'static [u8], &'static [u8]>,
        key: &Key,
    ) -> Result<Option<Record>, EngineError> {
        let bytes = records.get(key.as_bytes()).map_err(storage)?;
        bytes.map(|b| decode(key, b.value())).transpose()
    }

    /// Prepares `writes` for `txn` (see the module documentation), stamping the dry run
    /// with `hlc` at `physical_ms`.
    pub fn prepare(
        &mut self,
        hlc: &mut HybridClock,
        physical_ms: u64,
        txn: &str,
        writes: &[Write],
    ) -> Result<(), EngineError> {
        if self.staged.get(txn).map_err(storage)?.is_some() {
            return Ok(());
        }
        check_unlocked(&*self.locks, writes)?;
        // Every condition and kind, checked on the current records; nothing written yet.
        let records = &*self.records;
        prepare_batch(|key| Self::stored(records, key), hlc, physical_ms, writes)?;
        let fences = &*self.fences;
        let raised = batch::check_fences(
            |lock| Ok(fences.get(lock).map_err(storage)?.map_or(0, |v| v.value())),
            writes,
        )?;
        for fence in raised {
            self.fences
                .insert(fence.lock.as_str(), fence.token)
                .map_err(storage)?;
        }
        for key in distinct_keys(writes) {
            self.locks.insert(key.as_bytes(), txn).map_err(storage)?;
        }
        let staged = encode_writes(writes);
        self.staged
            .insert(txn, staged.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Applies (`commit`) or drops what `txn` prepared and unlocks its keys; returns the
    /// record of each write applied (none for an abort or a `txn` not prepared here).
    pub fn resolve(
        &mut self,
        hlc: &mut HybridClock,
        physical_ms: u64,
        txn: &str,
        commit: bool,
    ) -> Result<Vec<Record>, EngineError> {
        let Some(bytes) = self
            .staged
            .remove(txn)
            .map_err(storage)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(Vec::new());
        };
        let writes = decode_writes(&bytes).map_err(storage)?;
        for key in distinct_keys(&writes) {
            self.locks.remove(key.as_bytes()).map_err(storage)?;
        }
        if !commit {
            return Ok(Vec::new());
        }
        let writes = unconditional(writes);
        let records = &*self.records;
        let results = prepare_batch(|key| Self::stored(records, key), hlc, physical_ms, &writes)?;
        for (key, record) in &results {
            let bytes = agentstore_core::codec::encode(record);
            self.records
                .insert(key.as_bytes(), bytes.as_slice())
                .map_err(storage)?;
            self.changes.append(key, &bytes)?;
        }
        Ok(results.into_iter().map(|(_, r)| r).collect())
    }
}
