//! The replicated state machine on redb: the records of strong collections, the fencing tokens
//! seen, the last applied log id and membership, and the last snapshot.
//!
//! Applying is deterministic: every replica that applies the same entries to the same state
//! computes the same records, byte for byte. The merge is `agentstore_core::record::apply`
//! through the engines' shared `prepare_batch`, stamped by a clock that starts fresh for each
//! entry at the time the leader proposed it, under one stamp node for the whole group
//! ([`GROUP_STAMP`]), so nothing depends on which replica applies or on its wall clock.
//!
//! Applying a group of entries is one transaction that also records the last applied log id,
//! so a crash never applies an entry twice (a counter increment stays exact). It is not
//! fsynced: the log is, and a member that lost its last applies in a crash applies them again
//! from the log; a snapshot's fsynced commit makes the state durable before any log it covers
//! is purged.

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use agentstore_core::codec::{self, Reader, put_bytes, put_uvarint};
use agentstore_core::hlc::HybridClock;
use agentstore_core::signing::{Signatures, check_record};
use agentstore_core::{Key, NodeId, Record};
use agentstore_engine::two_phase::{
    FENCES, RECORDS, RedbParticipant, TXN_LOCKS, TXN_STAGED, check_unlocked,
};
use agentstore_engine::{
    EngineError, check_fences, check_signatures, decode_stored, prepare_batch, redb_file,
};
use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use crate::command::{Op, decode_command, encode_outcome};
use agentstore_engine::changelog::{self, ChangeLog, ChangePage, Head};

use crate::health::{Health, redb_io};
use crate::log_store::{blocking, io_error};
use crate::sessions::{OUTCOMES, SESSIONS, Sessions, decode_proposal};
use crate::types::{
    Applied, Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, persist, restore,
};

/// The stamp node of every record a Raft group writes.
pub const GROUP_STAMP: &str = "raft";

/// `applied`, `membership`: small values rewritten by every apply.
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// The snapshot a lagging follower is sent: `meta`, `data`.
///
/// A table of its own because redb keeps a value inline in its B-tree leaf: a snapshot of
/// megabytes in `META`'s one leaf made every apply (which rewrites `applied` there) copy the
/// whole snapshot. Files written before kept it in `META` under `snapshot_meta` and
/// `snapshot_data`; [`StateMachine::open`] moves it.
const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");

/// The snapshot format this build writes (it reads 1, without two-phase locks, and 2, without
/// sessions, too).
const SNAPSHOT_FORMAT: u8 = 3;

/// The state machine of one node. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    stamp: NodeId,
    /// The signed collections' check, run on every entry's writes and every snapshot's
    /// records, the same on every member (the configuration is the cluster's).
    signatures: Option<Arc<dyn Signatures>>,
    /// Where a failed write is reported.
    health: Arc<Health>,
    /// The first write to fail on this file: redb answers every later one with "Previous I/O
    /// error occurred" until the file is opened again, so that first failure is the cause
    /// reported for all of them (a full disk stays a full disk).
    first_failure: Arc<OnceLock<(io::ErrorKind, String)>>,
    /// The last position of the change feed (see `agentstore_engine::changelog`).
    head: Arc<Head>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").finish_non_exhaustive()
    }
}

fn meta<T: for<'de> serde::Deserialize<'de>>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> io::Result<Option<T>> {
    let value = table.get(name).map_err(redb_io)?;
    value.map(|v| restore(v.value())).transpose()
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<(Key, Record), EngineError> {
    let key = Key::new(key).map_err(|e| EngineError::Storage {
        detail: format!("a stored key is invalid: {e}"),
    })?;
    let record = codec::decode(bytes).map_err(|source| EngineError::Decode {
        key: key.clone(),
        source,
    })?;
    Ok((key, record))
}

/// The record stored for `key` in `table`.
fn stored(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &Key,
) -> Result<Option<Record>, EngineError> {
    let value = table.get(key.as_bytes()).map_err(storage)?;
    decode_stored(key, value.as_ref().map(|v| v.value()))
}

/// Batches of at most this many entries apply on the state machine's own task.
const INLINE_APPLY: usize = 8;

impl StateMachine {
    /// Opens (creating if needed) the state machine at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, &redb_file::files())
    }

    /// [`StateMachine::open`] through `files`.
    pub fn open_with(path: &Path, files: &redb_file::Opener) -> io::Result<Self> {
        let db = files.open(&Database::builder(), path).map_err(redb_io)?;
        let txn = db.begin_write().map_err(redb_io)?;
        txn.open_table(RECORDS).map_err(redb_io)?;
        txn.open_table(FENCES).map_err(redb_io)?;
        txn.open_table(TXN_LOCKS).map_err(redb_io)?;
        txn.open_table(TXN_STAGED).map_err(redb_io)?;
        txn.open_table(SESSIONS).map_err(redb_io)?;
        txn.open_table(OUTCOMES).map_err(redb_io)?;
        move_snapshot_out_of_meta(&txn)?;
        txn.commit().map_err(redb_io)?;
        let head = changelog::head_of(&db).map_err(io_error)?;
        let stamp = NodeId::new(GROUP_STAMP).map_err(io_error)?;
        Ok(Self {
            db: Arc::new(db),
            stamp,
            signatures: None,
            health: Arc::default(),
            first_failure: Arc::default(),
            head: Arc::new(Head::new(head)),
        })
    }

    /// Reports failed writes to `health`.
    pub(crate) fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// `result` of a write, reported to the member's health when it failed.
    fn watched<T>(&self, result: io::Result<T>) -> io::Result<T> {
        let Err(err) = result else { return result };
        let (kind, detail) = self
            .first_failure
            .get_or_init(|| (err.kind(), err.to_string()));
        let cause = io::Error::new(*kind, detail.clone());
        self.health.failed(crate::group::STATE_FILE, &cause);
        Err(cause)
    }

    /// Checks the writes of signed collections before applying them (see
    /// `agentstore_core::signing`): an entry with a write whose signature does not hold
    /// applies nothing and answers the refusal, on every member alike, so a leader cannot
    /// slip a forged record into the group.
    pub fn with_signatures(mut self, signatures: Option<Arc<dyn Signatures>>) -> Self {
        self.signatures = signatures;
        self
    }

    /// The applied record of `key`, tombstones included.
    pub fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let txn = self.db.begin_read().map_err(storage)?;
        stored(&txn.open_table(RECORDS).map_err(storage)?, key)
    }

    /// Up to `limit` applied records whose keys start with `prefix`, after `start_after`.
    pub fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(RECORDS).map_err(storage)?;
        agentstore_engine::two_phase::scan_records(&table, prefix, start_after, limit)
    }

    /// Up to `limit` applied changes under `prefix` after position `after` of this member's
    /// feed (from now when `None`), waiting up to `wait` for one. Positions are this
    /// member's; a snapshot installed here replaces the records and ends every watch
    /// ([`EngineError::PositionUnavailable`]).
    pub async fn changes(
        &self,
        prefix: &[u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<ChangePage, EngineError> {
        self.head
            .wait_for(after, wait, |after| {
                let txn = self.db.begin_read().map_err(storage)?;
                changelog::read(&txn, prefix, after, limit)
            })
            .await
    }

    /// The last applied log id.
    pub fn applied(&self) -> io::Result<Option<LogId>> {
        let txn = self.db.begin_read().map_err(redb_io)?;
        let table = txn.open_table(META).map_err(redb_io)?;
        Ok(meta::<Option<LogId>>(&table, "applied")?.flatten())
    }
}

fn storage(err: impl std::fmt::Display) -> EngineError {
    EngineError::Storage {
        detail: err.to_string(),
    }
}

/// Applies one command inside the apply transaction: all its writes or none.
fn apply_command(
    tables: &mut RedbParticipant<'_, '_>,
    stamp: &NodeId,
    signatures: Option<&dyn Signatures>,
    command: &[u8],
) -> Result<Vec<Record>, EngineError> {
    let (at_ms, op) = decode_command(command).map_err(|e| EngineError::Storage {
        detail: format!("a log entry does not decode: {e}"),
    })?;
    if let Op::Batch(writes) | Op::Prepare { writes, .. } = &op {
        // The proposal time, not this member's clock: every member decides alike.
        check_signatures(signatures, writes, at_ms)?;
    }
    // A clock that starts fresh for every entry: the stamps depend on the stored records and
    // the proposal time only.
    let mut hlc = HybridClock::new(stamp.clone(), u64::MAX);
    let writes = match op {
        Op::Batch(writes) => writes,
        Op::Prepare { txn, writes } => {
            return tables
                .prepare(&mut hlc, at_ms, &txn, &writes)
                .map(|()| Vec::new());
        }
        Op::Commit { txn } => return tables.resolve(&mut hlc, at_ms, &txn, true),
        Op::Abort { txn } => return tables.resolve(&mut hlc, at_ms, &txn, false),
    };
    check_unlocked(&*tables.locks, &writes)?;
    let (records, fences) = (&mut *tables.records, &mut *tables.fences);
    let accepted = check_fences(
        |lock| Ok(fences.get(lock).map_err(storage)?.map_or(0, |v| v.value())),
        &writes,
    )?;
    let results = prepare_batch(|key| stored(records, key), &mut hlc, at_ms, &writes)?;
    for (key, record) in &results {
        let bytes = codec::encode(record);
        records
            .insert(key.as_bytes(), bytes.as_slice())
            .map_err(storage)?;
        tables.changes.append(key, &bytes)?;
    }
    for fence in accepted {
        fences
            .insert(fence.lock.as_str(), fence.token)
            .map_err(storage)?;
    }
    Ok(results.into_iter().map(|(_, record)| record).collect())
}

/// Snapshot bytes: format, then the records (wire's entry list), then the fences, then the
/// keys locked by prepared transactions and their staged writes.
fn encode_snapshot(txn: &ReadTransaction) -> io::Result<Vec<u8>> {
    let records = txn.open_table(RECORDS).map_err(redb_io)?;
    let mut entries = Vec::new();
    for item in records.iter().map_err(redb_io)? {
        let (key, value) = item.map_err(redb_io)?;
        entries.push(decode_record(key.value(), value.value()).map_err(io_error)?);
    }
    let mut out = vec![SNAPSHOT_FORMAT];
    put_bytes(&mut out, &agentstore_wire::encode_entries(&entries));
    let fences = txn.open_table(FENCES).map_err(redb_io)?;
    let mut listed = Vec::new();
    for item in fences.iter().map_err(redb_io)? {
        let (lock, token) = item.map_err(redb_io)?;
        listed.push((lock.value().to_owned(), token.value()));
    }
    put_uvarint(&mut out, listed.len() as u64);
    for (lock, token) in listed {
        put_bytes(&mut out, lock.as_bytes());
        put_uvarint(&mut out, token);
    }
    let locks = txn.open_table(TXN_LOCKS).map_err(redb_io)?;
    let mut held = Vec::new();
    for item in locks.iter().map_err(redb_io)? {
        let (key, txn) = item.map_err(redb_io)?;
        held.push((key.value().to_vec(), txn.value().as_bytes().to_vec()));
    }
    let staged = txn.open_table(TXN_STAGED).map_err(redb_io)?;
    let mut kept = Vec::new();
    for item in staged.iter().map_err(redb_io)? {
        let (txn, writes) = item.map_err(redb_io)?;
        kept.push((txn.value().as_bytes().to_vec(), writes.value().to_vec()));
    }
    let [sessions, outcomes] = [SESSIONS, OUTCOMES].map(|table| -> io::Result<Pairs> {
        let table = txn.open_table(table).map_err(redb_io)?;
        let mut pairs = Vec::new();
        for item in table.iter().map_err(redb_io)? {
            let (a, b) = item.map_err(redb_io)?;
            pairs.push((a.value().to_vec(), b.value().to_vec()));
        }
        Ok(pairs)
    });
    for pairs in [held, kept, sessions?, outcomes?] {
        put_uvarint(&mut out, pairs.len() as u64);
        for (a, b) in pairs {
            put_bytes(&mut out, &a);
            put_bytes(&mut out, &b);
        }
    }
    Ok(out)
}

/// Records `meta` and `data` as the current snapshot (what a lagging follower is sent).
fn keep_snapshot(txn: &WriteTransaction, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let mut table = txn.open_table(SNAPSHOT).map_err(redb_io)?;
    table
        .insert("meta", persist(meta)?.as_slice())
        .map_err(redb_io)?;
    table.insert("data", data).map_err(redb_io)?;
    Ok(())
}

/// Moves a snapshot kept in `META` (the layout of earlier files) to [`SNAPSHOT`].
fn move_snapshot_out_of_meta(txn: &WriteTransaction) -> io::Result<()> {
    let mut meta = txn.open_table(META).map_err(redb_io)?;
    let mut snapshot = txn.open_table(SNAPSHOT).map_err(redb_io)?;
    for (old, new) in [("snapshot_meta", "meta"), ("snapshot_data", "data")] {
        if let Some(value) = meta.remove(old).map_err(redb_io)? {
            snapshot.insert(new, value.value()).map_err(redb_io)?;
        }
    }
    Ok(())
}

/// What a snapshot holds: records, fences, two-phase locks (key, txn), staged writes
/// (txn, writes), and the proposal sessions' rows and kept outcomes (`sessions`).
struct SnapshotContents {
    entries: Vec<(Key, Record)>,
    fences: Vec<(String, u64)>,
    locks: Pairs,
    staged: Pairs,
    sessions: Pairs,
    outcomes: Pairs,
}

/// Byte-string pairs, as a snapshot lists the two-phase tables.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn decode_snapshot(bytes: &[u8]) -> io::Result<SnapshotContents> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut r = Reader::new(bytes);
    let format = r.u8().map_err(|e| invalid(e.to_string()))?;
    if !(1..=SNAPSHOT_FORMAT).contains(&format) {
        return Err(invalid(format!(
            "snapshot format {format}; this build reads 1 to {SNAPSHOT_FORMAT}"
        )));
    }
    let pairs = |r: &mut Reader<'_>| -> Result<Pairs, String> {
        let count = r.uvarint().map_err(|e| e.to_string())?;
        if count > r.remaining() as u64 {
            return Err("more pairs than bytes".into());
        }
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let a = r.slice().map_err(|e| e.to_string())?.to_vec();
            out.push((a, r.slice().map_err(|e| e.to_string())?.to_vec()));
        }
        Ok(out)
    };
    let decode = |r: &mut Reader<'_>| -> Result<SnapshotContents, String> {
        let entries = agentstore_wire::decode_entries(r.slice().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let count = r.uvarint().map_err(|e| e.to_string())?;
        if count > r.remaining() as u64 {
            return Err("more fences than bytes".into());
        }
        let mut fences = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let lock = String::from_utf8(r.slice().map_err(|e| e.to_string())?.to_vec())
                .map_err(|_| "a lock name is not UTF-8".to_string())?;
            fences.push((lock, r.uvarint().map_err(|e| e.to_string())?));
        }
        let (locks, staged) = if format >= 2 {
            (pairs(r)?, pairs(r)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let (sessions, outcomes) = if format >= 3 {
            (pairs(r)?, pairs(r)?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(SnapshotContents {
            entries,
            fences,
            locks,
            staged,
            sessions,
            outcomes,
        })
    };
    decode(&mut r).map_err(invalid)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let db = Arc::clone(&self.db);
        let built = blocking(move || {
            // One read transaction for the data and its meta, so they describe the same state.
            let (meta, data) = {
                let txn = db.begin_read().map_err(redb_io)?;
                let table = txn.open_table(META).map_err(redb_io)?;
                let applied = meta::<Option<LogId>>(&table, "applied")?.flatten();
                let membership =
                    meta::<StoredMembership>(&table, "membership")?.unwrap_or_default();
                let data = encode_snapshot(&txn)?;
                (
                    SnapshotMeta {
                        last_log_id: applied,
                        last_membership: membership,
                    },
                    data,
                )
            };
            let txn = db.begin_write().map_err(redb_io)?;
            keep_snapshot(&txn, &meta, &data)?;
            txn.commit().map_err(redb_io)?;
            Ok(Snapshot {
                meta,
                snapshot: data,
            })
        })
        .await;
        self.watched(built)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let txn = self.db.begin_read().map_err(redb_io)?;
        let table = txn.open_table(META).map_err(redb_io)?;
        let applied = meta::<Option<LogId>>(&table, "applied")?.flatten();
        let membership = meta::<StoredMembership>(&table, "membership")?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch: Vec<Entry> = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let db = Arc::clone(&self.db);
        let stamp = self.stamp.clone();
        let signatures = self.signatures.clone();
        let head = Arc::clone(&self.head);
        let small = batch.len() <= INLINE_APPLY;
        let apply = move || {
            let mut txn = db.begin_write().map_err(redb_io)?;
            // Not fsynced: every entry applied here is in the log, durable on a majority, and
            // a member that restarts behind (its last applies lost) re-applies them from the
            // log, once each (the applied id moves with the effects). A snapshot's commit is
            // fsynced, and makes every earlier apply durable with it, before the log it covers
            // can be purged. This keeps one fsync (the log's) on a write's path instead of two.
            txn.set_durability(Durability::None).map_err(redb_io)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut changes = ChangeLog::open(&txn).map_err(io_error)?;
            {
                let mut records = txn.open_table(RECORDS).map_err(redb_io)?;
                let mut fences = txn.open_table(FENCES).map_err(redb_io)?;
                let mut locks = txn.open_table(TXN_LOCKS).map_err(redb_io)?;
                let mut staged = txn.open_table(TXN_STAGED).map_err(redb_io)?;
                let mut tables = RedbParticipant {
                    records: &mut records,
                    fences: &mut fences,
                    locks: &mut locks,
                    staged: &mut staged,
                    changes: &mut changes,
                };
                let mut outcomes_kept = txn.open_table(OUTCOMES).map_err(redb_io)?;
                let mut session_rows = txn.open_table(SESSIONS).map_err(redb_io)?;
                let mut sessions = Sessions {
                    outcomes: &mut outcomes_kept,
                    sessions: &mut session_rows,
                };
                let mut meta = txn.open_table(META).map_err(redb_io)?;
                let mut applied = None;
                for entry in &batch {
                    let mut run = |command: &[u8]| {
                        encode_outcome(&apply_command(
                            &mut tables,
                            &stamp,
                            signatures.as_deref(),
                            command,
                        ))
                    };
                    let index = entry.log_id.index;
                    let outcome = match &entry.payload {
                        EntryPayload::Normal(command) => match decode_proposal(&command.0) {
                            None => run(&command.0),
                            Some(Ok(proposal)) => {
                                sessions.apply(index, &proposal, run).map_err(io_error)?
                            }
                            Some(Err(e)) => encode_outcome(&Err(EngineError::Storage {
                                detail: format!("a log entry does not decode: {e}"),
                            })),
                        },
                        EntryPayload::Membership(membership) => {
                            let stored = StoredMembership::new(
                                Some(entry.log_id.clone()),
                                membership.clone(),
                            );
                            meta.insert("membership", persist(&stored)?.as_slice())
                                .map_err(redb_io)?;
                            encode_outcome(&Ok(Vec::new()))
                        }
                        EntryPayload::Blank => encode_outcome(&Ok(Vec::new())),
                    };
                    sessions.sweep(index).map_err(io_error)?;
                    outcomes.push(Applied(outcome));
                    applied = Some(entry.log_id.clone());
                }
                meta.insert("applied", persist(&applied)?.as_slice())
                    .map_err(redb_io)?;
            }
            let last = changes.finish().map_err(io_error)?;
            txn.commit().map_err(redb_io)?;
            if let Some(last) = last {
                head.advance(last);
            }
            Ok(outcomes)
        };
        // A few entries apply in well under a millisecond without an fsync: run them here
        // rather than pay two thread hand-offs on every strong write's path.
        let outcomes = self.watched(if small {
            apply()
        } else {
            blocking(apply).await
        })?;
        for (responder, outcome) in responders.into_iter().zip(outcomes) {
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), io::Error> {
        let mut contents = decode_snapshot(&data)?;
        if let Some(signatures) = &self.signatures {
            // A snapshot from an honest leader holds no record the check refuses.
            contents
                .entries
                .retain(|(key, record)| check_record(&**signatures, key, record).is_ok());
        }
        let meta = meta.clone();
        let db = Arc::clone(&self.db);
        let head = Arc::clone(&self.head);
        let installed = blocking(move || {
            let txn = db.begin_write().map_err(redb_io)?;
            // The records are replaced wholesale: watchers must list them again.
            let mut changes = ChangeLog::open(&txn).map_err(io_error)?;
            changes.reset().map_err(io_error)?;
            let last = changes.finish().map_err(io_error)?;
            {
                let mut records = txn.open_table(RECORDS).map_err(redb_io)?;
                records.retain(|_, _| false).map_err(redb_io)?;
                for (key, record) in &contents.entries {
                    records
                        .insert(key.as_bytes(), codec::encode(record).as_slice())
                        .map_err(redb_io)?;
                }
                let mut fences = txn.open_table(FENCES).map_err(redb_io)?;
                fences.retain(|_, _| false).map_err(redb_io)?;
                for (lock, token) in &contents.fences {
                    fences.insert(lock.as_str(), *token).map_err(redb_io)?;
                }
                let utf8 = |bytes: &[u8]| {
                    String::from_utf8(bytes.to_vec()).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "a transaction id is not UTF-8")
                    })
                };
                let mut locks = txn.open_table(TXN_LOCKS).map_err(redb_io)?;
                locks.retain(|_, _| false).map_err(redb_io)?;
                for (key, holder) in &contents.locks {
                    locks
                        .insert(key.as_slice(), utf8(holder)?.as_str())
                        .map_err(redb_io)?;
                }
                let mut staged = txn.open_table(TXN_STAGED).map_err(redb_io)?;
                staged.retain(|_, _| false).map_err(redb_io)?;
                for (holder, writes) in &contents.staged {
                    staged
                        .insert(utf8(holder)?.as_str(), writes.as_slice())
                        .map_err(redb_io)?;
                }
                for (definition, pairs) in [
                    (SESSIONS, &contents.sessions),
                    (OUTCOMES, &contents.outcomes),
                ] {
                    let mut table = txn.open_table(definition).map_err(redb_io)?;
                    table.retain(|_, _| false).map_err(redb_io)?;
                    for (a, b) in pairs {
                        table.insert(a.as_slice(), b.as_slice()).map_err(redb_io)?;
                    }
                }
                let mut table = txn.open_table(META).map_err(redb_io)?;
                table
                    .insert("applied", persist(&meta.last_log_id)?.as_slice())
                    .map_err(redb_io)?;
                table
                    .insert("membership", persist(&meta.last_membership)?.as_slice())
                    .map_err(redb_io)?;
            }
            keep_snapshot(&txn, &meta, &data)?;
            txn.commit().map_err(redb_io)?;
            if let Some(last) = last {
                head.advance(last);
            }
            Ok(())
        })
        .await;
        self.watched(installed)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let txn = self.db.begin_read().map_err(redb_io)?;
        let table = txn.open_table(SNAPSHOT).map_err(redb_io)?;
        let Some(meta) = meta::<SnapshotMeta>(&table, "meta")? else {
            return Ok(None);
        };
        let data = table
            .get("data")
            .map_err(redb_io)?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        Ok(Some(Snapshot {
            meta,
            snapshot: data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use agentstore_core::record::Mutation;
    use agentstore_engine::Write;

    use super::*;
    use crate::command::encode_command;

    fn run(sm: &StateMachine, op: &Op) -> Result<Vec<Record>, EngineError> {
        let txn = sm.db.begin_write().unwrap();
        let outcome = {
            let (mut records, mut fences) = (
                txn.open_table(RECORDS).unwrap(),
                txn.open_table(FENCES).unwrap(),
            );
            let (mut locks, mut staged) = (
                txn.open_table(TXN_LOCKS).unwrap(),
                txn.open_table(TXN_STAGED).unwrap(),
            );
            let mut changes = ChangeLog::open(&txn).unwrap();
            let mut tables = RedbParticipant {
                records: &mut records,
                fences: &mut fences,
                locks: &mut locks,
                staged: &mut staged,
                changes: &mut changes,
            };
            apply_command(
                &mut tables,
                &sm.stamp,
                sm.signatures.as_deref(),
                &encode_command(1, op),
            )
        };
        txn.commit().unwrap();
        outcome
    }

    /// Keys of collection `s` need an attestation `sig:` + the value, signed at 1 ms.
    #[derive(Debug)]
    struct Toy;

    impl Signatures for Toy {
        fn required(&self, key: &Key) -> bool {
            key.collection() == "s"
        }

        fn verify(
            &self,
            _key: &Key,
            value: Option<&[u8]>,
            attestation: &[u8],
        ) -> Result<u64, agentstore_core::signing::SignatureRefused> {
            if attestation == [&b"sig:"[..], value.unwrap_or_default()].concat() {
                Ok(1)
            } else {
                Err(agentstore_core::signing::SignatureRefused::Invalid(
                    "toy".into(),
                ))
            }
        }
    }

    #[tokio::test]
    async fn every_member_refuses_an_entry_with_a_forged_signed_write_and_a_snapshot_drops_one() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("a"))
            .unwrap()
            .with_signatures(Some(Arc::new(Toy)));
        let key = Key::new(b"s:k".to_vec()).unwrap();
        let signed = |value: &str, attestation: &str| {
            Write::new(
                key.clone(),
                Mutation::Signed {
                    value: Some(value.as_bytes().to_vec()),
                    attestation: attestation.as_bytes().to_vec(),
                },
            )
        };
        run(&sm, &Op::Batch(vec![signed("v", "sig:v")])).unwrap();
        let other = Write::new(
            Key::new(b"plain:k".to_vec()).unwrap(),
            Mutation::Put(vec![1]),
        );
        for forged in [
            signed("forged", "sig:v"),
            Write::new(key.clone(), Mutation::Put(b"unsigned".to_vec())),
        ] {
            assert!(matches!(
                run(&sm, &Op::Batch(vec![other.clone(), forged.clone()])),
                Err(EngineError::SignatureRefused { .. })
            ));
            let prepare = Op::Prepare {
                txn: "t".into(),
                writes: vec![forged],
            };
            assert!(matches!(
                run(&sm, &prepare),
                Err(EngineError::SignatureRefused { .. })
            ));
        }
        let record = sm.get(&key).unwrap().unwrap();
        assert_eq!(
            record.value,
            agentstore_core::record::Value::Register(Some(b"v".to_vec()))
        );
        assert_eq!(
            sm.get(&other.key).unwrap(),
            None,
            "nothing of a refused entry applies"
        );

        // A leader that skips the check cannot pass a forged record on by snapshot either.
        let lax = StateMachine::open(&dir.path().join("b")).unwrap();
        run(&lax, &Op::Batch(vec![signed("forged", "sig:v")])).unwrap();
        let data = encode_snapshot(&lax.db.begin_read().unwrap()).unwrap();
        let mut member = StateMachine::open(&dir.path().join("c"))
            .unwrap()
            .with_signatures(Some(Arc::new(Toy)));
        member
            .install_snapshot(&SnapshotMeta::default(), data)
            .await
            .unwrap();
        assert_eq!(member.get(&key).unwrap(), None);
    }

    #[tokio::test]
    async fn a_snapshot_carries_prepared_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let source = StateMachine::open(&dir.path().join("a")).unwrap();
        let key = Key::new(b"tx:k".to_vec()).unwrap();
        let put = |v: &str| Write::new(key.clone(), Mutation::Put(v.as_bytes().to_vec()));
        run(&source, &Op::Batch(vec![put("before")])).unwrap();
        let prepare = Op::Prepare {
            txn: "t1".into(),
            writes: vec![put("after")],
        };
        run(&source, &prepare).unwrap();
        let data = encode_snapshot(&source.db.begin_read().unwrap()).unwrap();

        let mut copy = StateMachine::open(&dir.path().join("b")).unwrap();
        copy.install_snapshot(&SnapshotMeta::default(), data)
            .await
            .unwrap();
        assert!(matches!(
            run(&copy, &Op::Batch(vec![put("other")])),
            Err(EngineError::InTransaction { .. })
        ));
        let applied = run(&copy, &Op::Commit { txn: "t1".into() }).unwrap();
        assert_eq!(applied.len(), 1);
        let record = copy.get(&key).unwrap().unwrap();
        assert_eq!(
            record.value,
            agentstore_core::record::Value::Register(Some(b"after".to_vec()))
        );
    }

    #[tokio::test]
    async fn a_snapshot_kept_by_an_earlier_layout_is_still_served_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        let mut source = StateMachine::open(&path).unwrap();
        let key = Key::new(b"tx:k".to_vec()).unwrap();
        let put = Write::new(key.clone(), Mutation::Put(b"v".to_vec()));
        run(&source, &Op::Batch(vec![put])).unwrap();
        let built = source.build_snapshot().await.unwrap();
        drop(source);
        // Rewrite the file in the earlier layout: the snapshot beside `applied` in `META`.
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(SNAPSHOT).unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                let kept = persist(&built.meta).unwrap();
                meta.insert("snapshot_meta", kept.as_slice()).unwrap();
                meta.insert("snapshot_data", built.snapshot.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }

        let mut reopened = StateMachine::open(&path).unwrap();
        let served = reopened.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(served.meta, built.meta);
        assert_eq!(served.snapshot, built.snapshot);
        let txn = reopened.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert!(meta.get("snapshot_data").unwrap().is_none());
        assert!(meta.get("snapshot_meta").unwrap().is_none());
    }
}
