//! Two-phase commit across engines, coordinated by this store.
//!
//! A transaction whose collections live on different engines (a cluster's Raft group and
//! PostgreSQL, or the embedded engine and PostgreSQL) commits in two phases:
//!
//! 1. The coordinator record `{participants, phase: preparing}` is written and fsynced to
//!    `transactions.redb` in the data directory.
//! 2. Every participant prepares its writes: checks their conditions, locks their keys and
//!    keeps them durably (see `agentstore_engine::two_phase`).
//! 3. The decision is fsynced to the record: `commit` if every participant prepared, else
//!    `abort`. This is the commit point.
//! 4. Every participant is told the decision; the record is deleted once all have applied it.
//!
//! Recovery runs when the store opens and then in the background until nothing is left: a
//! record still `preparing` (the coordinator stopped before deciding) is aborted everywhere,
//! a decided one is resolved again everywhere (resolving is idempotent); a transaction this
//! process is coordinating right now is left to its coordinator. So a coordinator
//! killed at any point ends all-or-nothing once it restarts. Until then the keys of a prepared
//! transaction stay locked (writes to them are refused with `in_transaction`); reads see the
//! values from before it. Reads across engines are not isolated from a commit in progress:
//! a reader may see one engine's part applied before the other's.
//!
//! Fault injection for tests: `AGENTSTORE_CRASH_AT=after-prepare` (or `after-decision`)
//! kills the process at that point of the next cross-engine transaction.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentstore_engine::{
    AnyEngine, Engine, EngineError, Instrumented, Record, Write, lock, redb_file,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Result, Storage, StorageError};

/// The coordinator's file inside the data directory.
pub(crate) const COORDINATOR_FILE: &str = "transactions.redb";

/// Transaction id → [`Entry`] (JSON).
const PENDING: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("pending");

/// Where a transaction stands, as the coordinator recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Preparing,
    Commit,
    Abort,
}

/// A coordinator record: the phase and one collection per participant (its engine is the
/// collection's, looked up again at recovery).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    phase: Phase,
    participants: Vec<String>,
}

/// The coordinator's durable log of unfinished transactions.
#[derive(Debug)]
pub(crate) struct Coordinator {
    path: PathBuf,
    db: std::sync::OnceLock<Database>,
    /// `node-random`: unique to this store even where several share a node id (clients
    /// on the default one), since a participant takes a second prepare of an id as a retry.
    prefix: String,
    sequence: AtomicU64,
    /// Transactions this store is coordinating right now: recovery leaves them alone (a
    /// `preparing` record of a live transaction is not an abandoned one).
    live: Mutex<HashSet<String>>,
}

/// Marks a transaction live for as long as it is held.
struct Live<'c> {
    coordinator: &'c Coordinator,
    txn: String,
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        lock(&self.coordinator.live).remove(&self.txn);
    }
}

fn storage(err: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(EngineError::Storage {
        detail: format!("transaction coordinator log: {err}"),
    })
}

/// Dies at `point` when `AGENTSTORE_CRASH_AT` names it: by SIGKILL, like a power cut or the
/// OOM killer (no destructor runs, no core dump is written), or by abort where that fails.
fn crash_point(point: &str) {
    if std::env::var("AGENTSTORE_CRASH_AT").is_ok_and(|at| at == point) {
        tracing::error!(point, "AGENTSTORE_CRASH_AT: killing the process");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}

impl Coordinator {
    pub(crate) fn new(data_dir: &Path, node: &str) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // 64 random bits from the standard library's per-process hash keys.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            path: data_dir.join(COORDINATOR_FILE),
            db: std::sync::OnceLock::new(),
            prefix: format!("{node}-{random:016x}"),
            sequence: AtomicU64::new(0),
            live: Mutex::new(HashSet::new()),
        }
    }

    /// Whether an earlier run left a log (there may be transactions to recover).
    pub(crate) fn has_log(&self) -> bool {
        self.path.exists()
    }

    fn db(&self) -> Result<&Database> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        if let Some(dir) = self.path.parent() {
            agentstore_engine::redb_file::create_private_dir(dir).map_err(storage)?;
        }
        let db = redb_file::create(&Database::builder(), &self.path).map_err(storage)?;
        Ok(self.db.get_or_init(|| db))
    }

    /// A new transaction id, live until the returned guard is dropped.
    fn begin(&self) -> Live<'_> {
        let txn = format!(
            "{}-{}",
            self.prefix,
            self.sequence.fetch_add(1, Ordering::Relaxed)
        );
        lock(&self.live).insert(txn.clone());
        Live {
            coordinator: self,
            txn,
        }
    }

    fn is_live(&self, txn: &str) -> bool {
        lock(&self.live).contains(txn)
    }

    fn record(&self, txn: &str, entry: &Entry) -> Result<()> {
        let bytes = serde_json::to_vec(entry).map_err(storage)?;
        let write = self.db()?.begin_write().map_err(storage)?;
        write
            .open_table(PENDING)
            .map_err(storage)?
            .insert(txn, bytes.as_slice())
            .map_err(storage)?;
        write.commit().map_err(storage)
    }

    fn forget(&self, txn: &str) -> Result<()> {
        let write = self.db()?.begin_write().map_err(storage)?;
        write
            .open_table(PENDING)
            .map_err(storage)?
            .remove(txn)
            .map_err(storage)?;
        write.commit().map_err(storage)
    }

    fn pending(&self) -> Result<Vec<(String, Entry)>> {
        let read = self.db()?.begin_read().map_err(storage)?;
        let table = match read.open_table(PENDING) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(storage(err)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (txn, bytes) = item.map_err(storage)?;
            let entry: Entry = serde_json::from_slice(bytes.value()).map_err(storage)?;
            out.push((txn.value().to_owned(), entry));
        }
        Ok(out)
    }
}

/// One participant of a transaction: an engine, and the writes (with their positions in
/// the transaction) it applies.
struct Part<'s> {
    collection: String,
    engine: &'s Instrumented<AnyEngine>,
    writes: Vec<Write>,
    positions: Vec<usize>,
}

impl Storage {
    /// Splits `writes` by the engine instance of their collections, in first-write order.
    fn parts(&self, writes: Vec<Write>) -> Vec<Part<'_>> {
        let mut parts: Vec<(super::routes::Instance, Part<'_>)> = Vec::new();
        for (position, write) in writes.into_iter().enumerate() {
            let route = self.inner.routes.get(write.key.collection());
            let at = match parts.iter().position(|(i, _)| *i == route.instance) {
                Some(at) => at,
                None => {
                    parts.push((
                        route.instance,
                        Part {
                            collection: write.key.collection().to_owned(),
                            engine: &route.engine,
                            writes: Vec::new(),
                            positions: Vec::new(),
                        },
                    ));
                    parts.len() - 1
                }
            };
            parts[at].1.writes.push(write);
            parts[at].1.positions.push(position);
        }
        parts.into_iter().map(|(_, part)| part).collect()
    }

    /// Commits `writes` across engines by two-phase commit; returns the record of each
    /// write, in order. The protocol runs on a task of its own, so a caller that gives up
    /// (a client that disconnects) does not leave it half done.
    pub(crate) async fn two_phase_commit(&self, writes: Vec<Write>) -> Result<Vec<Record>> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.run_two_phase_commit(writes).await;
        };
        let storage = self.clone();
        runtime
            .spawn(async move { storage.run_two_phase_commit(writes).await })
            .await
            .unwrap_or_else(|err| {
                Err(StorageError::Engine(EngineError::Internal {
                    detail: format!("the transaction's task failed: {err}"),
                }))
            })
    }

    async fn run_two_phase_commit(&self, writes: Vec<Write>) -> Result<Vec<Record>> {
        let coordinator = &self.inner.coordinator;
        let count = writes.len();
        let parts = self.parts(writes);
        let live = coordinator.begin();
        let txn = live.txn.clone();
        let mut entry = Entry {
            phase: Phase::Preparing,
            participants: parts.iter().map(|p| p.collection.clone()).collect(),
        };
        coordinator.record(&txn, &entry)?;
        let votes = futures_util::future::join_all(
            parts
                .iter()
                .map(|part| part.engine.prepare(&txn, part.writes.clone())),
        )
        .await;
        crash_point("after-prepare");
        // A participant that refused for certain holds nothing to abort; one whose answer
        // is unknown (a timeout) may have prepared, and is told to abort.
        let holds: Vec<bool> = votes
            .iter()
            .map(|vote| !matches!(vote, Err(err) if refused_before_locking(err)))
            .collect();
        let refusal = votes.into_iter().find_map(Result::err);
        entry.phase = if refusal.is_none() {
            Phase::Commit
        } else {
            Phase::Abort
        };
        // The commit point: once this is durable, the transaction happens.
        coordinator.record(&txn, &entry)?;
        crash_point("after-decision");
        let commit = entry.phase == Phase::Commit;
        let mut records: Vec<Option<Record>> = vec![None; count];
        let mut unfinished = None;
        for (part, _) in parts.iter().zip(&holds).filter(|(_, holds)| **holds) {
            match resolve(part.engine, &txn, commit).await {
                Ok(applied) => {
                    for (position, record) in part.positions.iter().zip(applied) {
                        records[*position] = Some(record);
                    }
                }
                Err(err) => unfinished = Some((part.collection.clone(), err)),
            }
        }
        if let Some((collection, err)) = unfinished {
            // No longer live, so the recovery it starts takes it up.
            drop(live);
            self.recover_in_background();
            return Err(StorageError::TransactionUnfinished {
                txn,
                committed: commit,
                collection,
                detail: err.to_string(),
            });
        }
        coordinator.forget(&txn)?;
        if let Some(refusal) = refusal {
            return Err(refusal.into());
        }
        // A participant that had applied the commit before (a retried resolve) returns no
        // records; read them.
        for part in &parts {
            for (write, position) in part.writes.iter().zip(&part.positions) {
                if records[*position].is_none() {
                    records[*position] = part.engine.get(&write.key).await?;
                }
            }
        }
        records
            .into_iter()
            .map(|record| {
                record.ok_or_else(|| {
                    StorageError::Engine(EngineError::Internal {
                        detail: "a committed write has no record".into(),
                    })
                })
            })
            .collect()
    }

    /// Resolves every transaction an earlier run left unfinished; returns how many are left.
    pub(crate) async fn recover_transactions(&self) -> Result<usize> {
        let coordinator = &self.inner.coordinator;
        let mut left = 0;
        for (txn, entry) in coordinator.pending()? {
            if coordinator.is_live(&txn) {
                // Its coordinator is at work in this process; it finishes it itself.
                continue;
            }
            let commit = entry.phase == Phase::Commit;
            if entry.phase == Phase::Preparing {
                // Never decided: nobody was told it committed, so it aborts.
                coordinator.record(
                    &txn,
                    &Entry {
                        phase: Phase::Abort,
                        ..entry.clone()
                    },
                )?;
            }
            let mut done = true;
            for collection in &entry.participants {
                let engine = &self.inner.routes.get(collection).engine;
                match engine.resolve(&txn, commit).await {
                    // An engine without two-phase commit never prepared anything.
                    Ok(_) | Err(EngineError::Unsupported { .. }) => {}
                    Err(err) => {
                        tracing::warn!(%txn, %collection, error = %err, "transaction recovery retries later");
                        done = false;
                    }
                }
            }
            if done {
                tracing::info!(%txn, committed = commit, "transaction recovered");
                coordinator.forget(&txn)?;
            } else {
                left += 1;
            }
        }
        Ok(left)
    }

    /// Keeps recovering unfinished transactions, every second, until none is left.
    pub(crate) fn recover_in_background(&self) {
        let storage = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            loop {
                match storage.recover_transactions().await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "transaction recovery failed"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// Whether a prepare's error says for certain that it locked and kept nothing.
fn refused_before_locking(err: &EngineError) -> bool {
    matches!(
        err,
        EngineError::Unsupported { .. }
            | EngineError::ExpectationFailed { .. }
            | EngineError::Fenced { .. }
            | EngineError::WrongKind { .. }
            | EngineError::EditRefused { .. }
            | EngineError::InTransaction { .. }
    )
}

/// Tells `engine` the decision, retrying a few times over about a second.
async fn resolve(
    engine: &Instrumented<AnyEngine>,
    txn: &str,
    commit: bool,
) -> Result<Vec<Record>, EngineError> {
    let mut attempt = 0;
    loop {
        match engine.resolve(txn, commit).await {
            Ok(records) => return Ok(records),
            Err(err) if attempt >= 3 => return Err(err),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_with_one_node_id_never_share_a_transaction_id() {
        // Participants take a second prepare of an id as a retry of the first: two clients
        // on the default node id must not collide.
        let dir = tempfile::tempdir().unwrap();
        let a = Coordinator::new(dir.path(), "local");
        let b = Coordinator::new(dir.path(), "local");
        let (first, second) = (a.begin().txn.clone(), b.begin().txn.clone());
        assert_ne!(first, second);
        assert_ne!(a.begin().txn, first, "ids of one store are unique too");
    }

    #[tokio::test]
    async fn recovery_aborts_what_an_earlier_run_left_but_not_a_transaction_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let config = super::super::Config {
            data_dir: Some(dir.path().display().to_string()),
            ..Default::default()
        };
        let storage = Storage::new(config).await.unwrap();
        let coordinator = &storage.inner.coordinator;
        let preparing = Entry {
            phase: Phase::Preparing,
            participants: vec!["notes".into()],
        };
        // Left by a coordinator that stopped before deciding.
        coordinator.record("gone-1", &preparing).unwrap();
        // Being coordinated by this store right now (between its record and its decision).
        let live = coordinator.begin();
        coordinator.record(&live.txn, &preparing).unwrap();

        assert_eq!(storage.recover_transactions().await.unwrap(), 0);
        let pending = coordinator.pending().unwrap();
        assert_eq!(
            pending.len(),
            1,
            "the abandoned one is resolved: {pending:?}"
        );
        assert_eq!(pending[0].0, live.txn);
        assert_eq!(
            pending[0].1.phase,
            Phase::Preparing,
            "recovery must not decide a live transaction"
        );

        // Once its coordinator is gone (the guard dropped), it is recovery's to end.
        drop(live);
        storage.recover_transactions().await.unwrap();
        assert!(coordinator.pending().unwrap().is_empty());
    }
}
