//! Applying a batch of writes to stored records: the part of `commit` every engine shares.

use agentstore_core::codec;
use agentstore_core::hlc::HybridClock;
use agentstore_core::record::{self, Record};
use agentstore_core::signing::{Signatures, check_mutation};

use crate::clock::NodeClock;
use crate::error::EngineError;
use crate::{Fence, Key, Write, batch_fences};

/// Computes the records a batch would write, stamping with the engine's clock: see
/// [`prepare_batch`].
pub(crate) fn prepare(
    stored: impl FnMut(&Key) -> Result<Option<Record>, EngineError>,
    clock: &NodeClock,
    writes: &[Write],
) -> Result<Vec<(Key, Record)>, EngineError> {
    let physical_ms = clock.physical_ms();
    // Held for the batch: the stamps of one batch come from one uninterrupted clock run.
    let mut hlc = clock.lock();
    prepare_batch(stored, &mut hlc, physical_ms, writes)
}

/// Computes the records a batch would write, without writing: checks every expectation and
/// applies every mutation to the stored record, or to the result of an earlier write of the
/// same batch, stamping with `hlc` at `physical_ms`. `stored` reads a key's stored record as
/// of the caller's transaction.
///
/// The result depends only on the arguments, so replicas of a replicated log that apply the
/// same batch to the same state with clocks in the same state compute the same records.
///
/// Returns one `(key, record)` per write, in order.
pub fn prepare_batch(
    mut stored: impl FnMut(&Key) -> Result<Option<Record>, EngineError>,
    hlc: &mut HybridClock,
    physical_ms: u64,
    writes: &[Write],
) -> Result<Vec<(Key, Record)>, EngineError> {
    let mut results: Vec<(Key, Record)> = Vec::with_capacity(writes.len());
    for write in writes {
        let earlier = results
            .iter()
            .rev()
            .find(|(key, _)| *key == write.key)
            .map(|(_, r)| r.clone());
        let current = match earlier {
            Some(record) => Some(record),
            None => stored(&write.key)?,
        };
        if let Some(expect) = &write.expect {
            expect
                .check(current.as_ref(), physical_ms)
                .map_err(|source| EngineError::ExpectationFailed {
                    key: write.key.clone(),
                    source,
                })?;
        }
        let next = record::apply(current.as_ref(), &write.mutation, hlc, physical_ms)
            .map_err(|refused| EngineError::refused(&write.key, refused))?;
        results.push((write.key.clone(), next));
    }
    Ok(results)
}

/// Refuses a batch with a write that a signed collection may not take at `now_ms` (the time
/// its stamps are drawn from; see `agentstore_core::signing`). Nothing of the batch applies.
pub fn check_signatures(
    signatures: Option<&dyn Signatures>,
    writes: &[Write],
    now_ms: u64,
) -> Result<(), EngineError> {
    let Some(signatures) = signatures else {
        return Ok(());
    };
    for write in writes {
        check_mutation(signatures, &write.key, &write.mutation, now_ms)
            .map_err(|why| EngineError::signature(&write.key, why))?;
    }
    Ok(())
}

/// Refuses a batch fenced by a token older than the highest seen for its lock (`highest`
/// reads it, 0 for a lock never seen); returns the fences to record once the batch is
/// written.
pub fn check_fences(
    mut highest: impl FnMut(&str) -> Result<u64, EngineError>,
    writes: &[Write],
) -> Result<Vec<Fence>, EngineError> {
    let batch = batch_fences(writes);
    for fence in &batch {
        let highest = highest(&fence.lock)?;
        if fence.token < highest {
            return Err(EngineError::Fenced {
                lock: fence.lock.clone(),
                token: fence.token,
                highest,
            });
        }
    }
    Ok(batch)
}

/// The last record written to each distinct key of a prepared batch, in first-write order.
pub(crate) fn final_records(results: &[(Key, Record)]) -> Vec<(&Key, &Record)> {
    let mut out: Vec<(&Key, &Record)> = Vec::new();
    for (key, record) in results {
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = record,
            None => out.push((key, record)),
        }
    }
    out
}

/// The distinct keys of a batch, in first-write order.
pub(crate) fn distinct_keys(writes: &[Write]) -> Vec<&Key> {
    let mut keys: Vec<&Key> = Vec::new();
    for write in writes {
        if !keys.contains(&&write.key) {
            keys.push(&write.key);
        }
    }
    keys
}

/// Decodes the stored bytes of `key`, naming the key if they are not a record.
pub(crate) fn decode(key: &Key, bytes: &[u8]) -> Result<Record, EngineError> {
    codec::decode(bytes).map_err(|source| EngineError::Decode {
        key: key.clone(),
        source,
    })
}

/// Decodes the stored bytes of `key`, if any, naming the key if they are not a record.
pub fn decode_stored(key: &Key, bytes: Option<&[u8]>) -> Result<Option<Record>, EngineError> {
    bytes.map(|bytes| decode(key, bytes)).transpose()
}
