//! The group-commit writer thread.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use agentstore_core::codec;
use agentstore_core::record::Record;
use redb::{Database, ReadableTable, Table};

use crate::file_handle::FileHandle as Handle;
use crate::redb_file::write_failure;
use tokio::sync::{mpsc, oneshot};

use super::changes::{Feed, Gathered};
use super::{DATA, FENCES};
use crate::batch;
use crate::changelog::ChangeLog;
use crate::clock::NodeClock;
use crate::error::EngineError;
use crate::group_commit;
use crate::two_phase::{RedbParticipant, TXN_LOCKS, TXN_STAGED, check_unlocked};
use crate::{Fence, Key, Write};

/// What a request asks the writer to do.
pub(super) enum Op {
    /// Apply a batch (refused if a prepared transaction holds one of its keys).
    Commit(Vec<Write>),
    /// Two-phase commit, first phase (see `crate::two_phase`).
    Prepare(String, Vec<Write>),
    /// Two-phase commit, second phase: commit (`true`) or abort.
    Resolve(String, bool),
}

pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Vec<Record>, EngineError>>,
}

/// Held by whoever is committing (the writer thread, or a caller committing inline), so a
/// caller can tell that nobody is.
pub(super) type Turn = Arc<Mutex<()>>;

pub(super) fn spawn(
    db: Arc<Handle>,
    clock: Arc<NodeClock>,
    turn: Turn,
    feed: Arc<Feed>,
    mut requests: mpsc::Receiver<Request>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("agentstore-writer".into())
        .spawn(move || {
            while let Some(mut group) = group_commit::next_group(&mut requests) {
                let _turn = turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                commit_group(&db, &clock, &feed, &mut group);
            }
        })
}

/// Applies every request of the group in one transaction, commits (fsync), then replies.
/// A request whose own checks fail gets its error and writes nothing; the others proceed.
/// If the commit itself fails, every request gets the error: none was acknowledged.
fn commit_group(db: &Handle, clock: &NodeClock, feed: &Feed, group: &mut Vec<Request>) {
    let ops: Vec<&Op> = group.iter().map(|r| &r.op).collect();
    let outcomes = match committed(db, clock, feed, &ops) {
        Ok(outcomes) => outcomes,
        Err(err) => group.iter().map(|_| Err(err.for_each_request())).collect(),
    };
    for (request, outcome) in group.drain(..).zip(outcomes) {
        // The caller may have gone away (cancelled); its write is committed regardless.
        let _ = request.reply.send(outcome);
    }
}

type Outcome = Result<Vec<Record>, EngineError>;

/// Applies one request on the calling thread (the caller holds the turn).
pub(super) fn commit_now(db: &Handle, clock: &NodeClock, feed: &Feed, op: &Op) -> Outcome {
    committed(db, clock, feed, &[op])?.pop().unwrap_or_else(|| {
        Err(EngineError::Internal {
            detail: "a one-batch group returned no outcome".into(),
        })
    })
}

/// [`apply_group`] on the file's current handle; a failure gives the handle up (see
/// [`Handle`]), so the next group opens the file again.
fn committed(
    db: &Handle,
    clock: &NodeClock,
    feed: &Feed,
    group: &[&Op],
) -> Result<Vec<Outcome>, EngineError> {
    let outcome = db
        .get()
        .and_then(|open| apply_group(&open, clock, feed, group));
    match &outcome {
        Ok(_) => db.succeeded(),
        Err(err) => db.failed(err),
    }
    outcome
}

fn apply_group(
    db: &Database,
    clock: &NodeClock,
    feed: &Feed,
    group: &[&Op],
) -> Result<Vec<Outcome>, EngineError> {
    let txn = db.begin_write().map_err(write_failure)?;
    let mut outcomes = Vec::with_capacity(group.len());
    let gather = feed.on();
    let mut gathered = Gathered::default();
    let mut changes = ChangeLog::open(&txn)?;
    {
        let mut table = txn.open_table(DATA).map_err(EngineError::storage)?;
        let mut fences = txn.open_table(FENCES).map_err(EngineError::storage)?;
        let mut locks = txn.open_table(TXN_LOCKS).map_err(EngineError::storage)?;
        let mut staged = txn.open_table(TXN_STAGED).map_err(EngineError::storage)?;
        for op in group {
            let writes = match op {
                Op::Commit(writes) => writes,
                Op::Prepare(..) | Op::Resolve(..) => {
                    // A resolved transaction writes its records inside the participant.
                    gathered.undescribed();
                    let physical_ms = clock.physical_ms();
                    let mut participant = RedbParticipant {
                        records: &mut table,
                        fences: &mut fences,
                        locks: &mut locks,
                        staged: &mut staged,
                        changes: &mut changes,
                    };
                    let hlc = &mut clock.lock();
                    outcomes.push(match op {
                        Op::Prepare(id, writes) => participant
                            .prepare(hlc, physical_ms, id, writes)
                            .map(|()| Vec::new()),
                        Op::Resolve(id, commit) => {
                            participant.resolve(hlc, physical_ms, id, *commit)
                        }
                        Op::Commit(_) => unreachable!("matched above"),
                    });
                    continue;
                }
            };
            let checked = check_unlocked(&locks, writes)
                .and_then(|()| check_fences(&fences, writes))
                .and_then(|accepted| Ok((accepted, prepare(&table, clock, writes)?)));
            match checked {
                Ok((accepted, results)) => {
                    for (key, record) in &results {
                        let bytes = codec::encode(record);
                        let before = table
                            .insert(key.as_bytes(), bytes.as_slice())
                            .map_err(write_failure)?;
                        if gather {
                            let before = before.as_ref().map(|b| b.value());
                            gathered.record(key, before, Some(&bytes));
                        }
                        drop(before);
                        changes.append(key, &bytes)?;
                    }
                    for fence in accepted {
                        fences
                            .insert(fence.lock.as_str(), fence.token)
                            .map_err(EngineError::storage)?;
                    }
                    outcomes.push(Ok(results.into_iter().map(|(_, record)| record).collect()));
                }
                Err(err) => outcomes.push(Err(err)),
            }
        }
    }
    let last = changes.finish()?;
    feed.commit(gathered, last, || txn.commit().map_err(write_failure))?;
    Ok(outcomes)
}

/// Refuses a batch fenced by a token older than the highest seen for its lock; returns the
/// fences to record once the batch is written.
fn check_fences(
    fences: &Table<'_, &str, u64>,
    writes: &[Write],
) -> Result<Vec<Fence>, EngineError> {
    batch::check_fences(
        |lock| {
            Ok(fences
                .get(lock)
                .map_err(EngineError::storage)?
                .map_or(0, |v| v.value()))
        },
        writes,
    )
}

fn prepare(
    table: &Table<'_, &[u8], &[u8]>,
    clock: &NodeClock,
    writes: &[Write],
) -> Result<Vec<(Key, Record)>, EngineError> {
    let stored = |key: &Key| {
        let bytes = table.get(key.as_bytes()).map_err(EngineError::storage)?;
        bytes
            .map(|bytes| batch::decode(key, bytes.value()))
            .transpose()
    };
    batch::prepare(stored, clock, writes)
}
