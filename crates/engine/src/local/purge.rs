//! Removing a record for good: the node does it when another node now replicates the key
//! (handoff after a join or a leave) and when a tombstone is on every replica (tombstone
//! collection). Never through the `Engine` trait: purging is a cluster decision, not a write.

use agentstore_core::codec;
use redb::ReadableTable;

use super::changes::Gathered;
use super::{DATA, LocalEngine};
use crate::error::EngineError;
use crate::{Key, Record};

impl LocalEngine {
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
