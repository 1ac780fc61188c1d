//! Durable hints: records kept for a replica that missed them, delivered when it is back
//! (hinted handoff). They live in the data file, so a hint survives a crash of the node that
//! holds it.
//!
//! Table `hints`: key = node id, a 0 byte (node ids never contain one), the hint id
//! (big-endian, so a node's hints list in the order they were stored); value = key length
//! (u32, big-endian), key, encoded record.

use agentstore_core::{NodeId, codec};
use redb::{ReadableTable, TableDefinition};

use super::{LocalEngine, META};
use crate::batch;
use crate::error::EngineError;
use crate::{Key, Record};

const HINTS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("hints");

/// A record kept for `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// Identifies the hint (unique in this data file, increasing).
    pub id: u64,
    /// The replica it is for.
    pub node: NodeId,
    /// The key.
    pub key: Key,
    /// The state to deliver (the replica merges it).
    pub record: Record,
}

fn prefix(node: &NodeId) -> Vec<u8> {
    let mut out = node.as_str().as_bytes().to_vec();
    out.push(0);
    out
}

fn corrupt(detail: &str) -> EngineError {
    EngineError::Storage {
        detail: format!("malformed hint: {detail}"),
    }
}

impl LocalEngine {
    /// Stores a hint durably (one fsync) and returns its id. Blocks the calling thread for
    /// the commit: call it from a blocking context. Hints are rare (a replica is down).
    pub fn store_hint(
        &self,
        node: &NodeId,
        key: &Key,
        record: &Record,
    ) -> Result<u64, EngineError> {
        let txn = self.write_txn()?;
        let id = {
            let mut meta = txn.open_table(META).map_err(EngineError::storage)?;
            let id = meta
                .get("next_hint")
                .map_err(EngineError::storage)?
                .map_or(1, |v| v.value());
            meta.insert("next_hint", id + 1)
                .map_err(EngineError::storage)?;
            let mut hints = txn.open_table(HINTS).map_err(EngineError::storage)?;
            let mut hint_key = prefix(node);
            hint_key.extend_from_slice(&id.to_be_bytes());
            let key_bytes = key.as_bytes();
            let mut value = (key_bytes.len() as u32).to_be_bytes().to_vec();
            value.extend_from_slice(key_bytes);
            value.extend_from_slice(&codec::encode(record));
            hints
                .insert(hint_key.as_slice(), value.as_slice())
                .map_err(EngineError::storage)?;
            id
        };
        txn.commit().map_err(EngineError::storage)?;
        Ok(id)
    }

    /// Up to `limit` hints for `node`, oldest first.
    pub fn hints_for(&self, node: &NodeId, limit: usize) -> Result<Vec<Hint>, EngineError> {
        let txn = self.read_txn()?;
        let hints = match txn.open_table(HINTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(EngineError::storage(e)),
        };
        let start = prefix(node);
        let mut out = Vec::new();
        for entry in hints
            .range::<&[u8]>(start.as_slice()..)
            .map_err(EngineError::storage)?
        {
            let (hint_key, value) = entry.map_err(EngineError::storage)?;
            let (hint_key, value) = (hint_key.value(), value.value());
            if out.len() >= limit || !hint_key.starts_with(&start) {
                break;
            }
            let id_bytes: [u8; 8] = hint_key[start.len()..]
                .try_into()
                .map_err(|_| corrupt("bad id"))?;
            let key_len = value
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| corrupt("short"))?;
            let key_bytes = value
                .get(4..4 + key_len)
                .ok_or_else(|| corrupt("short key"))?;
            let key = Key::new(key_bytes).map_err(|e| corrupt(&e.to_string()))?;
            let record = batch::decode(&key, &value[4 + key_len..])?;
            out.push(Hint {
                id: u64::from_be_bytes(id_bytes),
                node: node.clone(),
                key,
                record,
            });
        }
        Ok(out)
    }

    /// Forgets a delivered hint (one fsync; blocks like [`LocalEngine::store_hint`]).
    pub fn remove_hint(&self, node: &NodeId, id: u64) -> Result<(), EngineError> {
        let txn = self.write_txn()?;
        {
            let mut hints = txn.open_table(HINTS).map_err(EngineError::storage)?;
            let mut hint_key = prefix(node);
            hint_key.extend_from_slice(&id.to_be_bytes());
            hints
                .remove(hint_key.as_slice())
                .map_err(EngineError::storage)?;
        }
        txn.commit().map_err(EngineError::storage)
    }
}
