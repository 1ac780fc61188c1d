//! The local engine's commits as a feed: each commit that changes records is numbered, and
//! the digests of the records it changed (before and after) go to the subscriber, in commit
//! order. A node's anti-entropy trees follow it, so comparing with a peer reads no record.
//!
//! A snapshot of the records ([`LocalEngine::snapshot`]) carries the number of the last
//! commit it includes: the subscriber applies only later commits on top of it. Commits and
//! snapshots take the feed's lock, so a number is never handed out between a commit and its
//! report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use agentstore_core::merkle::entry_digest;
use agentstore_core::node_state::Change;
use redb::ReadableTable;
use tokio::sync::mpsc;

use super::{DATA, LocalEngine};
use crate::changelog::{self, ChangePage, Head};
use crate::error::EngineError;
use crate::{Key, Record, batch, lock};

/// One commit as the feed reports it: its number and what it changed (`None`: records
/// changed in a way the feed does not describe, such as a two-phase step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The commit's number (increasing by one per commit that changed records).
    pub seq: u64,
    /// The records it changed.
    pub changes: Option<Vec<Change>>,
}

#[derive(Debug)]
pub(super) struct Feed {
    /// Whether anyone listens: writers compute digests only then.
    on: AtomicBool,
    state: Mutex<FeedState>,
    /// The last position of the durable change log (`crate::changelog`), for watchers.
    pub(super) head: Head,
}

#[derive(Debug, Default)]
struct FeedState {
    seq: u64,
    subscriber: Option<mpsc::UnboundedSender<Committed>>,
}

/// What one transaction changed, gathered as it writes.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    changes: Vec<Change>,
    /// Records changed without a description.
    undescribed: bool,
}

impl Gathered {
    /// `key` held `before` (encoded) and now holds `after`.
    pub(super) fn record(&mut self, key: &Key, before: Option<&[u8]>, after: Option<&[u8]>) {
        let digest = |bytes: &[u8]| entry_digest(key.as_bytes(), bytes);
        self.changes.push(Change {
            key: key.clone(),
            before: before.map(digest),
            after: after.map(digest),
        });
    }

    /// Records changed in a way not described change by change.
    pub(super) fn undescribed(&mut self) {
        self.undescribed = true;
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.undescribed
    }
}

impl Feed {
    /// A feed whose change log is at `head` (see [`changelog::head_of`]).
    pub(super) fn new(head: (u64, u64)) -> Self {
        Self {
            on: AtomicBool::new(false),
            state: Mutex::default(),
            head: Head::new(head),
        }
    }

    /// Whether writers should gather changes.
    pub(super) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Commits with `commit` and reports what it changed, under the feed's lock.
    /// `last` is the change log's last position after the commit, if it wrote any.
    pub(super) fn commit<T>(
        &self,
        gathered: Gathered,
        last: Option<u64>,
        commit: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let advance = |done: T| {
            if let Some(last) = last {
                self.head.advance(last);
            }
            done
        };
        if !self.on() || gathered.is_empty() {
            return commit().map(advance);
        }
        let mut state = lock(&self.state);
        let done = commit()?;
        state.seq += 1;
        let report = Committed {
            seq: state.seq,
            changes: (!gathered.undescribed).then_some(gathered.changes),
        };
        if let Some(subscriber) = &state.subscriber
            && subscriber.send(report).is_err()
        {
            state.subscriber = None;
            self.on.store(false, Ordering::Relaxed);
        }
        Ok(advance(done))
    }
}

impl LocalEngine {
    /// Subscribes to the engine's commits (replacing an earlier subscriber): every commit
    /// from now on that changes records is reported, in order.
    pub fn commits(&self) -> mpsc::UnboundedReceiver<Committed> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let feed = &self.shared.feed;
        lock(&feed.state).subscriber = Some(sender);
        feed.on.store(true, Ordering::Relaxed);
        receiver
    }

    /// Up to `limit` changes under `prefix` after position `after` (from now when `None`),
    /// waiting up to `wait` for one (see [`crate::changelog`]).
    pub async fn changes(
        &self,
        prefix: &[u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<ChangePage, EngineError> {
        let head = &self.shared.feed.head;
        head.wait_for(after, wait, |after| {
            changelog::read(&self.read_txn()?, prefix, after, limit)
        })
        .await
    }

    /// Every record whose key passes `wanted`, read in one snapshot, with the number of the
    /// last commit the snapshot includes. Blocks the calling thread for the read.
    pub fn snapshot(
        &self,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Result<(u64, Vec<(Key, Record)>), EngineError> {
        let (seq, txn) = {
            let state = lock(&self.shared.feed.state);
            (state.seq, self.read_txn()?)
        };
        let table = txn.open_table(DATA).map_err(EngineError::storage)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(EngineError::storage)? {
            let (key, value) = entry.map_err(EngineError::storage)?;
            if !wanted(key.value()) {
                continue;
            }
            let key = Key::new(key.value()).map_err(|e| EngineError::Storage {
                detail: format!(
                    "stored key {:?} is invalid: {e}",
                    key.value().escape_ascii().to_string()
                ),
            })?;
            let record = batch::decode(&key, value.value())?;
            records.push((key, record));
        }
        Ok((seq, records))
    }
}
