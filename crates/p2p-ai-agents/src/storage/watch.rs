//! Watching a prefix: every change to its keys, in the order the node serving the collection
//! applied them, from a position the caller can resume after (see
//! `agentstore_engine::changelog`).
//!
//! - **No gap.** The feed is a log written in the same transaction as the records: a watcher
//!   that resumes after the last position it handled gets every later change, across restarts
//!   of the node and of the watcher.
//! - **Order.** Eventual collections: the order this node stored its own and its replicas'
//!   writes. Causal collections: a causal order (a write is applied only after what it
//!   depends on). Strong collections: the Raft log's order, on every member.
//! - **Positions are per node.** A position names a change on the node that handed it out.
//!   Watching on another node, or after a position the node no longer keeps (it keeps the
//!   last 100 000 changes), answers `PositionUnavailable`: scan the prefix, then watch from
//!   now.
//! - **What a change carries.** The key's value after it (`None` once deleted), rendered as
//!   [`Storage::scan`] renders it, and its version.

use std::collections::VecDeque;
use std::time::Duration;

use agentstore_engine::Engine as _;
use agentstore_engine::changelog::{ChangePage, Position};
use serde_json::Value as Json;

use super::values::{self, Reading};
use super::{Result, Storage, Version, traced};

/// How many changes one read of the feed returns at most.
pub(crate) const PAGE: usize = 256;
/// How long [`Watch::next`] waits in one read of the feed before it asks again.
const WAIT: Duration = Duration::from_secs(30);

/// One change to a watched key.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Its position in the serving node's feed: resume after it.
    pub position: Position,
    /// The key.
    pub key: String,
    /// The value from then on (as [`Storage::scan`] renders it), `None` once deleted.
    pub value: Option<Json>,
    /// The record's version after the change.
    pub version: Version,
}

/// A page of changes: what was found, and the position to read after next.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes {
    /// The changes under the prefix, in order.
    pub changes: Vec<Change>,
    /// Where the next read starts: after this position (it moves on past changes to other
    /// prefixes too).
    pub position: Position,
}

/// A watch of a prefix (see [`Storage::watch`]).
#[derive(Debug)]
pub struct Watch {
    storage: Storage,
    prefix: String,
    position: Option<Position>,
    pending: VecDeque<Change>,
}

impl Watch {
    /// The next change, waiting for one as long as it takes.
    pub async fn next(&mut self) -> Result<Change> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                self.position = Some(change.position);
                return Ok(change);
            }
            let page = self
                .storage
                .changes(&self.prefix, self.position, PAGE, WAIT)
                .await?;
            self.position = Some(page.position);
            self.pending.extend(page.changes);
        }
    }

    /// A watch that goes on from `page`, a page already read: its changes come first.
    #[cfg(feature = "node")]
    pub(crate) fn from_page(storage: &Storage, prefix: &str, page: Changes) -> Self {
        Self {
            storage: storage.clone(),
            prefix: prefix.to_owned(),
            position: Some(page.position),
            pending: page.changes.into(),
        }
    }

    /// The position of the last change [`Watch::next`] returned (or the feed's position when
    /// the watch started from now): pass it to [`Storage::watch`] to resume.
    pub fn position(&self) -> Option<Position> {
        self.position
    }
}

impl Storage {
    /// Watches the keys under `prefix` (a collection name alone watches the collection),
    /// after `after` (from now when `None`); see [`Watch::next`].
    pub fn watch(&self, prefix: &str, after: Option<Position>) -> Watch {
        Watch {
            storage: self.clone(),
            prefix: prefix.to_owned(),
            position: after,
            pending: VecDeque::new(),
        }
    }

    /// Up to `limit` changes under `prefix` after position `after` (from now when `None`),
    /// waiting up to `wait` for one: returns as soon as there is one, or with none when
    /// `wait` has passed.
    pub async fn changes(
        &self,
        prefix: &str,
        after: Option<Position>,
        limit: usize,
        wait: Duration,
    ) -> Result<Changes> {
        traced("changes", prefix, async move {
            let prefix = collection_prefix(prefix);
            let collection = prefix.split(':').next().unwrap_or_default();
            let route = self.inner.routes.get(collection);
            let page = route
                .engine
                .changes(prefix.as_bytes(), after, limit.max(1), wait)
                .await?;
            self.render(&route.plan, page)
        })
        .await
    }

    fn render(&self, plan: &super::CollectionPlan, page: ChangePage) -> Result<Changes> {
        let sealer = self.sealer_of(plan);
        let (feed, position) = (page.feed, page.position());
        let mut changes = Vec::with_capacity(page.changes.len());
        for change in page.changes {
            let value = match values::read(Some(&change.record), sealer, &change.key)? {
                Reading::Absent => None,
                Reading::One(json) => Some(json),
                Reading::Siblings(values) => Some(Json::Array(values)),
            };
            changes.push(Change {
                position: Position {
                    feed,
                    seq: change.position,
                },
                key: change.key.to_string(),
                value,
                version: Version(change.record.version),
            });
        }
        Ok(Changes { changes, position })
    }
}

/// A prefix as [`Storage::scan`] reads it: one without `:` names a whole collection.
pub(crate) fn collection_prefix(prefix: &str) -> String {
    if prefix.contains(':') {
        prefix.to_owned()
    } else {
        format!("{prefix}:")
    }
}

/// A feed page as the node sends it to a [`super::remote::NodeClient`]: the feed's id and
/// the last position read (8 bytes each, big-endian), the number of changes (4 bytes), each change's position (8
/// bytes each), then the changes' keys and records (`agentstore_wire::encode_entries`).
#[cfg(any(feature = "node", test))]
pub(crate) fn encode_page(page: &ChangePage) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + page.changes.len() * 8);
    out.extend_from_slice(&page.feed.to_be_bytes());
    out.extend_from_slice(&page.last.to_be_bytes());
    let count = u32::try_from(page.changes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for change in &page.changes {
        out.extend_from_slice(&change.position.to_be_bytes());
    }
    let entries: Vec<(agentstore_core::Key, agentstore_core::Record)> = page
        .changes
        .iter()
        .map(|c| (c.key.clone(), c.record.clone()))
        .collect();
    out.extend_from_slice(&agentstore_wire::encode_entries(&entries));
    out
}

/// The page [`encode_page`] wrote, or why the bytes are not one.
pub(crate) fn decode_page(bytes: &[u8]) -> std::result::Result<ChangePage, String> {
    let short = "a feed page is shorter than its header";
    let (feed, rest) = bytes.split_first_chunk::<8>().ok_or(short)?;
    let (last, rest) = rest.split_first_chunk::<8>().ok_or(short)?;
    let (count, mut rest) = rest
        .split_first_chunk::<4>()
        .ok_or("a feed page is shorter than its header")?;
    let count = u32::from_be_bytes(*count) as usize;
    let mut positions = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let (position, tail) = rest
            .split_first_chunk::<8>()
            .ok_or("a feed page ends inside its positions")?;
        positions.push(u64::from_be_bytes(*position));
        rest = tail;
    }
    let entries = agentstore_wire::decode_entries(rest).map_err(|e| e.to_string())?;
    if entries.len() != positions.len() {
        return Err(format!(
            "a feed page has {} positions for {} changes",
            positions.len(),
            entries.len()
        ));
    }
    Ok(ChangePage {
        feed: u64::from_be_bytes(*feed),
        changes: positions
            .into_iter()
            .zip(entries)
            .map(
                |(position, (key, record))| agentstore_engine::changelog::Change {
                    position,
                    key,
                    record,
                },
            )
            .collect(),
        last: u64::from_be_bytes(*last),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentstore_core::hlc::Timestamp;
    use agentstore_core::record::{Record, Value};
    use agentstore_core::{NodeId, VersionVector};

    #[test]
    fn a_feed_page_survives_its_encoding_and_a_cut_one_is_refused() {
        let node = NodeId::new("n").unwrap();
        let record = |value: &str| Record {
            value: Value::Register(Some(value.as_bytes().to_vec())),
            version: VersionVector::new(),
            stamp: Timestamp {
                wall_ms: 7,
                logical: 0,
                node: node.clone(),
            },
            attestation: None,
            expires_at_ms: None,
        };
        let page = ChangePage {
            feed: 0xfeed,
            changes: vec![
                agentstore_engine::changelog::Change {
                    position: 3,
                    key: "a:x".parse().unwrap(),
                    record: record("1"),
                },
                agentstore_engine::changelog::Change {
                    position: 9,
                    key: "a:y".parse().unwrap(),
                    record: record("2"),
                },
            ],
            last: 12,
        };
        let bytes = encode_page(&page);
        assert_eq!(decode_page(&bytes).unwrap(), page);
        for cut in [0, 7, 15, 19, 27, bytes.len() - 1] {
            assert!(decode_page(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
