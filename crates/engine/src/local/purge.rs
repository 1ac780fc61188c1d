//! Removing a record for good. A node does it when another node now replicates the key
//! (handoff after a join or a leave) and when a tombstone is on every replica (tombstone
//! collection): `purge_if_unchanged`, a cluster's decision, never through the `Engine` trait.
//! An embedded store does it to values whose time to live has passed: `remove_expired`,
//! behind `Engine::purge_expired`, since nothing else holds them.

use agentstore_core::codec;
use redb::ReadableTable;

use super::changes::Gathered;
use super::{DATA, LocalEngine};
use crate::error::EngineError;
use crate::{Key, Record};

impl LocalEngine {
    /// Removes every value that expired by `now_ms`, in one transaction; returns how many
    /// (`Engine::purge_expired`, on the blocking pool). Only for a store no other replica
    /// holds (an embedded store): a cluster wraps this engine and purges an expired value only
    /// once every replica holds it, as it does a tombstone.
    pub(super) fn remove_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        let txn = self.write_txn()?;
        let mut gathered = Gathered::default();
        let mut expired = Vec::new();
        {
            let mut table = txn.open_table(DATA).map_err(EngineError::storage)?;
            for entry in table.iter().map_err(EngineError::storage)? {
                let (key, bytes) = entry.map_err(EngineError::storage)?;
                let Ok(record) = codec::decode(bytes.value()) else {
                    continue; // A read names the undecodable record; a purge leaves it.
                };
                if record.expired(now_ms) {
                    expired.push((key.value().to_vec(), bytes.value().to_vec()));
                }
            }
            for (key, bytes) in &expired {
                table.remove(key.as_slice()).map_err(EngineError::storage)?;
                if let Ok(key) = Key::new(key.clone()) {
                    gathered.record(&key, Some(bytes), None);
                }
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        self.shared.feed.commit(gathered, None, || {
            txn.commit().map_err(EngineError::storage)
        })?;
        Ok(expired.len())
    }

    /// Removes `key` durably if it still holds exactly `expected`; returns whether it did.
    /// A record that changed since `expected` was read stays (the caller looks again later).
    /// Blocks the calling thread for the commit: call it from a blocking context.
    pub fn purge_if_unchanged(&self, key: &Key, expected: &Record) -> Result<bool, EngineError> {
        let txn = self.write_txn()?;
        let mut gathered = Gathered::default();
        let purged = {
            let mut table = txn.open_table(DATA).map_err(EngineError::storage)?;
            let expected = codec::encode(expected);
            let unchanged = table
                .get(key.as_bytes())
                .map_err(EngineError::storage)?
                .is_some_and(|stored| stored.value() == expected.as_slice());
            if unchanged {
                table.remove(key.as_bytes()).map_err(EngineError::storage)?;
                gathered.record(key, Some(&expected), None);
            }
            unchanged
        };
        self.shared.feed.commit(gathered, None, || {
            txn.commit().map_err(EngineError::storage)
        })?;
        Ok(purged)
    }
}
