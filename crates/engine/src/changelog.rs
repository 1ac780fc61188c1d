//! The change feed of an engine that keeps its records in redb: every record a transaction
//! writes is also appended, in the same transaction, to a numbered log (`changes`), so a
//! watcher resumes from a position without a gap, across restarts and crashes alike, and sees
//! the changes in the order they were applied (on a causal store that is a causal order, on a
//! Raft state machine the log's order).
//!
//! Positions are numbered from 1, one per changed record, by the file that holds them, and
//! carry the file's feed id (random, drawn when the log is created): a position means
//! something only to the feed that handed it out, and another feed refuses it rather than
//! read its own changes from a number that names others. The log keeps
//! the last [`RETAINED`] changes; older positions answer [`EngineError::PositionUnavailable`],
//! and a watcher must list the keys again (a scan) before it watches from now.
//!
//! A watcher reads the log in a read transaction and waits on [`Head`] (the last position
//! committed) for more: the log, not the notification, carries the changes, so a slow
//! watcher misses nothing.

use std::time::Duration;

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::watch;

use crate::batch::decode;
use crate::error::EngineError;
use crate::{Key, Record};

/// Position → the changed key and its record: key length (u32, little-endian), key, record.
pub const CHANGES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("changes");
/// `next`: the position the next change takes; `feed`: the feed's id.
pub const CHANGES_META: TableDefinition<'_, &str, u64> = TableDefinition::new("changes_meta");

/// How many changes the log keeps: enough for a watcher that was away for a while on a busy
/// node (a hundred thousand writes), small beside the records (each entry is one record).
pub const RETAINED: u64 = 100_000;
/// Trimming waits until this many changes are past [`RETAINED`], so a commit rarely trims,
/// and trims a run of entries at once.
const TRIM_EVERY: u64 = 1_024;
/// A page reads at most this many entries, matching or not: a watcher of a quiet prefix on a
/// busy node moves on in bounded steps.
const SCAN_MAX: usize = 10_000;

/// A place in one feed: the feed's id and a change's number in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The feed (one per file).
    pub feed: u64,
    /// The change's number (0: before the first).
    pub seq: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}-{}", self.feed, self.seq)
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("`{text}` is not a feed position (`<feed>-<number>`)");
        let (feed, seq) = text.split_once('-').ok_or_else(invalid)?;
        Ok(Self {
            feed: u64::from_str_radix(feed, 16).map_err(|_| invalid())?,
            seq: seq.parse().map_err(|_| invalid())?,
        })
    }
}

/// One change: the record `key` holds from `position` on (a tombstone for a delete).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Its position in the engine's feed.
    pub position: u64,
    /// The key.
    pub key: Key,
    /// The record it holds from then on.
    pub record: Record,
}

/// A page of the feed: the changes found, and the position to ask after next (the last
/// position read, whether or not it matched the prefix, so a watcher of a quiet prefix still
/// moves on).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangePage {
    /// The feed's id.
    pub feed: u64,
    /// Changes under the prefix, in order (their `position` is a number in `feed`).
    pub changes: Vec<Change>,
    /// Where the next page starts (after this number).
    pub last: u64,
}

impl ChangePage {
    /// The position to resume after.
    pub fn position(&self) -> Position {
        Position {
            feed: self.feed,
            seq: self.last,
        }
    }
}

/// The feed's id and last position committed, for watchers to wait on.
#[derive(Debug, Clone)]
pub struct Head {
    feed: u64,
    last: watch::Sender<u64>,
}

impl Head {
    /// The head of a feed as [`head_of`] read it.
    pub fn new((feed, last): (u64, u64)) -> Self {
        Self {
            feed,
            last: watch::Sender::new(last),
        }
    }

    /// A commit made `last` the last position.
    pub fn advance(&self, last: u64) {
        self.last.send_if_modified(|head| {
            let moved = *head != last;
            *head = last;
            moved
        });
    }

    /// Reads with `read` after `after` (from the head when `None`), waiting up to `wait` for
    /// a change under the prefix `read` looks for: returns as soon as a page has one.
    pub async fn wait_for(
        &self,
        after: Option<Position>,
        wait: Duration,
        read: impl Fn(u64) -> Result<ChangePage, EngineError>,
    ) -> Result<ChangePage, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut heads = self.last.subscribe();
        let mut after = match after {
            None => *heads.borrow_and_update(),
            Some(position) if position.feed == self.feed => position.seq,
            Some(position) => {
                return Err(EngineError::PositionUnavailable {
                    requested: position.to_string(),
                    detail: format!(
                        "it was handed out by another feed (this one is {:016x}): positions \
                         are per node, and per file",
                        self.feed
                    ),
                });
            }
        };
        loop {
            // Marked seen before reading: a commit after this point wakes the wait below.
            heads.borrow_and_update();
            let page = read(after)?;
            if !page.changes.is_empty() {
                return Ok(page);
            }
            after = page.last;
            if after < *heads.borrow() {
                // The page stopped at its scan bound, not at the head: read on.
                continue;
            }
            let woken = tokio::time::timeout_at(deadline, heads.changed()).await;
            if !matches!(woken, Ok(Ok(()))) {
                return Ok(page);
            }
        }
    }
}

/// The feed's log inside one write transaction: append what the transaction writes, then
/// [`ChangeLog::finish`].
#[allow(missing_debug_implementations)]
pub struct ChangeLog<'t> {
    log: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    next: u64,
    /// `next` when the transaction began: trimming is considered only when a transaction
    /// crosses a multiple of [`TRIM_EVERY`], not on every commit.
    began_at: u64,
    appended: bool,
    retained: u64,
}

/// A fresh feed id: random enough that two files never share one.
fn new_feed_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl<'t> ChangeLog<'t> {
    /// Opens the log's tables in `txn`.
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, EngineError> {
        let log = txn.open_table(CHANGES).map_err(EngineError::storage)?;
        let meta = txn.open_table(CHANGES_META).map_err(EngineError::storage)?;
        let next = meta
            .get("next")
            .map_err(EngineError::storage)?
            .map_or(1, |v| v.value());
        Ok(Self {
            log,
            meta,
            next,
            began_at: next,
            appended: false,
            retained: RETAINED,
        })
    }

    /// `key` now holds `record` (encoded as the records table keeps it).
    pub fn append(&mut self, key: &Key, record: &[u8]) -> Result<(), EngineError> {
        let key = key.as_bytes();
        let mut entry = Vec::with_capacity(4 + key.len() + record.len());
        entry.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
        entry.extend_from_slice(key);
        entry.extend_from_slice(record);
        self.log
            .insert(self.next, entry.as_slice())
            .map_err(EngineError::storage)?;
        self.next += 1;
        self.appended = true;
        Ok(())
    }

    /// The records changed without a description (a snapshot replaced them all): the log so
    /// far can no longer be replayed on top of them, so it is emptied, and every watcher
    /// gets [`EngineError::PositionUnavailable`] and lists the keys again.
    pub fn reset(&mut self) -> Result<(), EngineError> {
        self.log
            .retain(|_, _| false)
            .map_err(EngineError::storage)?;
        // A gap of one position past the last: a watcher at the last position is refused too.
        self.next += 1;
        self.appended = true;
        Ok(())
    }

    /// Keeps the next position and trims what is past [`RETAINED`]; the last position written
    /// in this transaction, if any, for [`Head::advance`] once it commits.
    pub fn finish(mut self) -> Result<Option<u64>, EngineError> {
        if !self.appended {
            return Ok(None);
        }
        self.meta
            .insert("next", self.next)
            .map_err(EngineError::storage)?;
        let keep_from = self.next.saturating_sub(self.retained);
        if keep_from > 0 && self.began_at / TRIM_EVERY != self.next / TRIM_EVERY {
            self.log
                .retain_in(..keep_from, |_, _| false)
                .map_err(EngineError::storage)?;
        }
        Ok(Some(self.next - 1))
    }
}

fn oldest(log: &impl ReadableTable<u64, &'static [u8]>) -> Result<Option<u64>, EngineError> {
    Ok(log
        .first()
        .map_err(EngineError::storage)?
        .map(|(position, _)| position.value()))
}

/// The feed's id and the last position it handed out (0 when none), to start a [`Head`]
/// at, when the file is opened. Creates the feed (draws its id) if the file has none yet.
pub fn head_of(db: &redb::Database) -> Result<(u64, u64), EngineError> {
    let txn = db.begin_write().map_err(EngineError::storage)?;
    let head = {
        txn.open_table(CHANGES).map_err(EngineError::storage)?;
        let mut meta = txn.open_table(CHANGES_META).map_err(EngineError::storage)?;
        let stored = |name| -> Result<Option<u64>, EngineError> {
            Ok(meta
                .get(name)
                .map_err(EngineError::storage)?
                .map(|v| v.value()))
        };
        let last = stored("next")?.map_or(0, |next| next - 1);
        let feed = match stored("feed")? {
            Some(feed) => feed,
            None => {
                let feed = new_feed_id();
                meta.insert("feed", feed).map_err(EngineError::storage)?;
                feed
            }
        };
        (feed, last)
    };
    txn.commit().map_err(EngineError::storage)?;
    Ok(head)
}

fn feed_of(txn: &redb::ReadTransaction) -> Result<u64, EngineError> {
    let meta = txn.open_table(CHANGES_META).map_err(EngineError::storage)?;
    let feed = meta.get("feed").map_err(EngineError::storage)?;
    Ok(feed.map_or(0, |v| v.value()))
}

fn last_position(txn: &redb::ReadTransaction) -> Result<u64, EngineError> {
    let meta = txn.open_table(CHANGES_META).map_err(EngineError::storage)?;
    let next = meta.get("next").map_err(EngineError::storage)?;
    Ok(next.map_or(0, |v| v.value() - 1))
}

/// Up to `limit` changes under `prefix` after position `after`, read in `txn`.
pub fn read(
    txn: &redb::ReadTransaction,
    prefix: &[u8],
    after: u64,
    limit: usize,
) -> Result<ChangePage, EngineError> {
    let last = last_position(txn)?;
    let feed = feed_of(txn)?;
    let log = txn.open_table(CHANGES).map_err(EngineError::storage)?;
    let oldest = oldest(&log)?.unwrap_or(last + 1);
    if after > last || after + 1 < oldest {
        let at = |seq| Position { feed, seq };
        return Err(EngineError::PositionUnavailable {
            requested: at(after).to_string(),
            detail: format!(
                "this feed can resume after {} to {}",
                at(oldest.saturating_sub(1)),
                at(last)
            ),
        });
    }
    let mut page = ChangePage {
        feed,
        changes: Vec::new(),
        last: after,
    };
    for (scanned, entry) in log
        .range(after + 1..)
        .map_err(EngineError::storage)?
        .enumerate()
    {
        if page.changes.len() >= limit || scanned >= SCAN_MAX {
            break;
        }
        let (position, bytes) = entry.map_err(EngineError::storage)?;
        page.last = position.value();
        let bytes = bytes.value();
        let Some((key, record)) = split_entry(bytes) else {
            return Err(EngineError::Storage {
                detail: format!("change {} does not decode", position.value()),
            });
        };
        if !key.starts_with(prefix) {
            continue;
        }
        let key = Key::new(key).map_err(|e| EngineError::Storage {
            detail: format!("change {}: a stored key is invalid: {e}", position.value()),
        })?;
        let record = decode(&key, record)?;
        page.changes.push(Change {
            position: position.value(),
            key,
            record,
        });
    }
    Ok(page)
}

fn split_entry(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use agentstore_core::codec;
    use agentstore_core::hlc::Timestamp;
    use agentstore_core::record::Value;
    use agentstore_core::{NodeId, VersionVector};
    use redb::ReadableDatabase;
    use redb::backends::InMemoryBackend;

    use super::*;

    fn db() -> redb::Database {
        redb::Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .unwrap()
    }

    fn record(value: &str) -> Record {
        Record {
            value: Value::Register(Some(value.as_bytes().to_vec())),
            version: VersionVector::new(),
            stamp: Timestamp {
                wall_ms: 1,
                logical: 0,
                node: NodeId::new("n").unwrap(),
            },
            attestation: None,
            expires_at_ms: None,
        }
    }

    /// Appends one change per key in one transaction; `retained` bounds the log.
    fn commit(db: &redb::Database, keys: &[&str], retained: u64) -> Option<u64> {
        let txn = db.begin_write().unwrap();
        let mut log = ChangeLog::open(&txn).unwrap();
        log.retained = retained;
        for key in keys {
            log.append(&key.parse().unwrap(), &codec::encode(&record(key)))
                .unwrap();
        }
        let last = log.finish().unwrap();
        txn.commit().unwrap();
        last
    }

    fn keys(page: &ChangePage) -> Vec<String> {
        page.changes.iter().map(|c| c.key.to_string()).collect()
    }

    #[test]
    fn changes_come_back_in_order_by_prefix_and_a_page_moves_past_other_prefixes() {
        let db = db();
        let (feed, last) = head_of(&db).unwrap();
        assert_eq!(last, 0);
        assert_eq!(commit(&db, &["a:1", "b:1"], RETAINED), Some(2));
        assert_eq!(
            commit(&db, &[], RETAINED),
            None,
            "nothing written, no position"
        );
        assert_eq!(commit(&db, &["a:2"], RETAINED), Some(3));
        let txn = db.begin_read().unwrap();
        let page = read(&txn, b"a:", 0, 10).unwrap();
        assert_eq!(keys(&page), ["a:1", "a:2"]);
        assert_eq!(page.changes[1].record, record("a:2"));
        assert_eq!(
            page.position(),
            Position { feed, seq: 3 },
            "the feed's id stays, the page ends at the last change read"
        );
        let page = read(&txn, b"b:", 2, 10).unwrap();
        assert!(page.changes.is_empty());
        assert_eq!(page.last, 3, "a quiet prefix still moves on");
        let page = read(&txn, b"", 0, 1).unwrap();
        assert_eq!((keys(&page), page.last), (vec!["a:1".to_owned()], 1));
        assert_eq!(
            head_of(&db).unwrap(),
            (feed, 3),
            "the head survives reopening"
        );
    }

    #[test]
    fn a_trimmed_future_or_reset_position_is_refused_and_the_rest_resume() {
        let db = db();
        for i in 0..(2 * TRIM_EVERY + 10) {
            commit(&db, &[&format!("k:{i}")], 10);
        }
        let last = 2 * TRIM_EVERY + 10;
        let txn = db.begin_read().unwrap();
        let oldest = oldest(&txn.open_table(CHANGES).unwrap()).unwrap().unwrap();
        assert!(
            oldest > 1 && last - oldest < TRIM_EVERY + 10,
            "trimmed to {oldest}"
        );
        let refused = |after| {
            matches!(
                read(&txn, b"", after, 10),
                Err(EngineError::PositionUnavailable { .. })
            )
        };
        assert!(refused(0), "trimmed");
        assert!(refused(oldest - 2), "trimmed");
        assert!(!refused(oldest - 1), "the oldest kept follows it");
        assert!(refused(last + 1), "never handed out");
        assert_eq!(read(&txn, b"", last - 1, 10).unwrap().changes.len(), 1);
        drop(txn);

        let txn = db.begin_write().unwrap();
        let mut log = ChangeLog::open(&txn).unwrap();
        log.reset().unwrap();
        log.finish().unwrap();
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            matches!(
                read(&txn, b"", last, 10),
                Err(EngineError::PositionUnavailable { .. })
            ),
            "a watcher that was up to date must list again after a reset"
        );
        assert!(read(&txn, b"", last + 1, 10).unwrap().changes.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_a_commit_and_refuses_another_feeds_position() {
        let db = std::sync::Arc::new(db());
        let head = std::sync::Arc::new(Head::new(head_of(&db).unwrap()));
        let reader = {
            let (db, head) = (db.clone(), head.clone());
            tokio::spawn(async move {
                head.wait_for(None, Duration::from_secs(30), |after| {
                    read(&db.begin_read().unwrap(), b"a:", after, 10)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = commit(&db, &["a:1"], RETAINED).unwrap();
        head.advance(last);
        let page = reader.await.unwrap().unwrap();
        assert_eq!(keys(&page), ["a:1"]);

        let (feed, _) = head_of(&db).unwrap();
        let other = Position {
            feed: feed ^ 1,
            seq: 0,
        };
        let answer = head
            .wait_for(Some(other), Duration::ZERO, |after| {
                read(&db.begin_read().unwrap(), b"", after, 10)
            })
            .await;
        assert!(matches!(
            answer,
            Err(EngineError::PositionUnavailable { .. })
        ));
        assert_eq!(
            other.to_string().parse::<Position>().unwrap(),
            other,
            "a position reads back from its text"
        );
    }
}
