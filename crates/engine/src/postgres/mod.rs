//! The PostgreSQL engine (a Supabase project is PostgreSQL).
//!
//! Records live in one table, `agentstore_records (key bytea primary key, record bytea)`, the
//! highest fencing token per lock in `agentstore_fences`; both are
//! created and upgraded by versioned migrations (`agentstore_migrations`) under an advisory
//! lock, so nodes starting together do not race.
//!
//! A batch of one unfenced write (the common case) is optimistic: read the row, merge, then
//! write only if the row still holds the bytes read (`UPDATE ... WHERE record IS NOT DISTINCT
//! FROM $read`, or `INSERT ... ON CONFLICT DO NOTHING` for a new key); zero rows written means a
//! concurrent writer won, and the write is merged again on fresh data. Two round trips.
//!
//! Any other batch is one transaction at the configured isolation (serializable by default): it makes
//! sure a row exists for every key of the batch (a placeholder with a NULL record), locks the
//! rows (`FOR UPDATE`), merges with the same `agentstore_core::record::apply` as every engine,
//! and writes the results. The placeholder matters at read committed: `FOR UPDATE` cannot lock
//! a row that does not exist yet, and two transactions creating the same key would otherwise
//! both think it absent. Serialization failures (40001) and deadlocks (40P01) are retried with
//! bounded, jittered backoff; the last one surfaces as a typed error.
//!
//! Statements are sent unnamed (`query_typed`), so the engine also works through Supavisor or
//! PgBouncer in transaction mode, which reject named prepared statements.

mod tls;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use agentstore_core::codec;
use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use crate::batch;
use crate::clock::NodeClock;
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::{Engine, Key, Record, Write, batch_fences};

/// Transaction isolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// SERIALIZABLE.
    Serializable,
    /// READ COMMITTED.
    ReadCommitted,
}

/// How a PostgreSQL engine is set up.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgresql://user:password@host:port/database`.
    pub url: String,
    /// Isolation of every transaction.
    pub isolation: Isolation,
    /// Most connections open at once.
    pub pool_size: usize,
    /// `application_name` of the connections (visible in `pg_stat_activity`).
    pub application_name: String,
    /// Where to count retries, if anywhere.
    pub metrics: Option<EngineMetrics>,
}

impl PostgresOptions {
    /// Serializable, 10 connections, on `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            isolation: Isolation::Serializable,
            pool_size: 10,
            application_name: "agentstore".into(),
            metrics: None,
        }
    }
}

/// Schema versions, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE agentstore_records (key bytea PRIMARY KEY, record bytea)",
    ),
    (
        2,
        "CREATE TABLE agentstore_fences (lock text PRIMARY KEY, token bigint NOT NULL)",
    ),
    // Two-phase commit: the prepared transaction holding a row, and its staged writes.
    (3, "ALTER TABLE agentstore_records ADD COLUMN txn text"),
    (
        4,
        "CREATE TABLE agentstore_txn_staged (txn text PRIMARY KEY, writes bytea NOT NULL)",
    ),
    // When a record's value expires (Unix ms), so expired rows can be deleted by an index.
    (
        5,
        "ALTER TABLE agentstore_records ADD COLUMN expires_at_ms bigint; \
         CREATE INDEX agentstore_records_expiry ON agentstore_records (expires_at_ms) \
         WHERE expires_at_ms IS NOT NULL",
    ),
];

/// The `expires_at_ms` column of `record`.
fn expiry(record: &Record) -> Option<i64> {
    record
        .expires_at_ms
        .map(|at| i64::try_from(at).unwrap_or(i64::MAX))
}

/// What a locked-rows transaction does once its rows are locked and checked.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    /// Write the batch.
    Commit,
    /// Lock the rows for this two-phase transaction and stage the batch.
    Prepare(&'a str),
}

/// Attempts before a transaction that keeps failing to serialize gives up.
const MAX_ATTEMPTS: u32 = 32;

/// The PostgreSQL engine. Cheap to clone.
#[derive(Clone)]
pub struct PostgresEngine {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    options: PostgresOptions,
    clock: Arc<NodeClock>,
}

impl std::fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("isolation", &self.shared.options.isolation)
            .field("pool_size", &self.shared.options.pool_size)
            .finish_non_exhaustive()
    }
}

fn unavailable(detail: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable {
        backend: "postgres",
        detail: detail.to_string(),
    }
}

fn pg_error(err: tokio_postgres::Error) -> EngineError {
    // tokio-postgres displays a server error as just "db error"; say what the server said.
    let detail = match err.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => with_causes(&err),
    };
    let code = err.code().map(SqlState::code);
    // Class 08: connection exceptions; 57P01-57P03: the server is shutting down or starting.
    let connection_lost = err.is_closed()
        || code.is_none()
        || code.is_some_and(|c| c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03"));
    if connection_lost {
        unavailable(detail)
    } else {
        EngineError::Storage {
            detail: format!("postgres: {detail}"),
        }
    }
}

fn pool_error(err: deadpool_postgres::PoolError) -> EngineError {
    unavailable(with_causes(&err))
}

/// An error and its chain of causes ("cannot connect: TLS handshake: certificate not valid
/// for name ..."), since the outermost message alone rarely says what to fix.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn retryable(err: &tokio_postgres::Error) -> bool {
    matches!(err.code(), Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED)
}

/// What `connect` says about a URL that is not a database URL.
fn check_url(url: &str) -> Result<(), EngineError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Err(EngineError::InvalidSettings {
            detail: format!(
                "`{url}` is a Supabase project's API URL; agentstore needs the database \
                 connection string (Supabase dashboard: Connect > Connection string), e.g. \
                 postgresql://postgres:PASSWORD@db.PROJECT.supabase.co:5432/postgres"
            ),
        });
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(EngineError::InvalidSettings {
            detail: format!("`{url}` is not a postgresql:// connection URL"),
        });
    }
    Ok(())
}

impl PostgresEngine {
    /// Connects, creates or upgrades the schema, and opens a pool of `pool_size` connections.
    pub async fn connect(
        options: PostgresOptions,
        clock: Arc<NodeClock>,
    ) -> Result<Self, EngineError> {
        check_url(&options.url)?;
        let (url, tls) = tls::split(&options.url)?;
        let mut pg: tokio_postgres::Config =
            url.parse().map_err(|e| EngineError::InvalidSettings {
                detail: format!("invalid database URL: {e}"),
            })?;
        pg.application_name(&options.application_name);
        pg.connect_timeout(Duration::from_secs(5));
        pg.ssl_mode(tls.ssl_mode());
        // Single statements (the optimistic write path, reads) run at the configured isolation
        // too, not at the server's default.
        pg.options(match options.isolation {
            Isolation::Serializable => "-c default_transaction_isolation=serializable",
            Isolation::ReadCommitted => "-c default_transaction_isolation=read\\ committed",
        });
        let manager = Manager::from_config(
            pg,
            tls.connector()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let mut pool_config = PoolConfig::new(options.pool_size.max(1));
        pool_config.timeouts = Timeouts {
            wait: Some(Duration::from_secs(30)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        };
        let pool = Pool::builder(manager)
            .config(pool_config)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| EngineError::InvalidSettings {
                detail: format!("connection pool: {e}"),
            })?;
        let engine = Self {
            shared: Arc::new(Shared {
                pool,
                options,
                clock,
            }),
        };
        engine.migrate().await?;
        Ok(engine)
    }

    async fn migrate(&self) -> Result<(), EngineError> {
        let mut client = self.shared.pool.get().await.map_err(pool_error)?;
        // Read committed whatever the connection's default: each statement after the lock
        // must see what a migrator that held it before committed (a serializable snapshot
        // would be taken while waiting for the lock, and apply a migration twice).
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(pg_error)?;
        txn.execute_typed("SELECT pg_advisory_xact_lock(7234712347)", &[])
            .await
            .map_err(pg_error)?;
        txn.execute_typed(
            "CREATE TABLE IF NOT EXISTS agentstore_migrations \
             (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            &[],
        )
        .await
        .map_err(pg_error)?;
        let row = txn
            .query_typed_one(
                "SELECT coalesce(max(version), 0) FROM agentstore_migrations",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let current: i32 = row.get(0);
        let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current > latest {
            return Err(EngineError::InvalidSettings {
                detail: format!(
                    "the database schema is at version {current}, newer than this agentstore \
                     understands ({latest})"
                ),
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            txn.batch_execute(sql).await.map_err(pg_error)?;
            txn.execute_typed(
                "INSERT INTO agentstore_migrations (version) VALUES ($1)",
                &[(version, Type::INT4)],
            )
            .await
            .map_err(pg_error)?;
        }
        txn.commit().await.map_err(pg_error)
    }

    fn isolation(&self) -> IsolationLevel {
        match self.shared.options.isolation {
            Isolation::Serializable => IsolationLevel::Serializable,
            Isolation::ReadCommitted => IsolationLevel::ReadCommitted,
        }
    }

    /// The isolation levels writes really run at, as PostgreSQL reports them: that of a
    /// single statement (the optimistic path) and that of a multi-write transaction.
    pub async fn isolation_in_use(&self) -> Result<(String, String), EngineError> {
        let mut client = self.shared.pool.get().await.map_err(pool_error)?;
        let single = client
            .query_typed_one("SHOW transaction_isolation", &[])
            .await
            .map_err(pg_error)?;
        let txn = client
            .build_transaction()
            .isolation_level(self.isolation())
            .start()
            .await
            .map_err(pg_error)?;
        let batch = txn
            .query_typed_one("SHOW transaction_isolation", &[])
            .await
            .map_err(pg_error)?;
        Ok((single.get(0), batch.get(0)))
    }

    /// Whether this engine's connections are encrypted (TLS), as the server reports it.
    pub async fn connection_encrypted(&self) -> Result<bool, EngineError> {
        let client = self.shared.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_typed_one("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)", &[])
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// The pool's current size and limit.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.shared.pool.status();
        (status.size, status.max_size)
    }

    /// The optimistic path for a batch of one unfenced write: read the row, merge, and write
    /// only if the row still holds the bytes read (an atomic conditional statement). Two round
    /// trips instead of a five-statement transaction. `Ok(Err(reason))` means retry.
    async fn try_single(&self, write: &Write) -> Result<Result<Vec<Record>, String>, EngineError> {
        let client = self.shared.pool.get().await.map_err(pool_error)?;
        let key = write.key.as_bytes();
        let row = match client
            .query_typed_opt(
                "SELECT record, txn FROM agentstore_records WHERE key = $1",
                &[(&key, Type::BYTEA)],
            )
            .await
        {
            Ok(row) => row,
            Err(e) if retryable(&e) => return Ok(Err(e.to_string())),
            Err(e) => return Err(pg_error(e)),
        };
        if let Some(holder) = row.as_ref().and_then(|row| row.get::<_, Option<String>>(1)) {
            return Err(EngineError::InTransaction {
                key: write.key.clone(),
                txn: holder,
            });
        }
        let exists = row.is_some();
        let old: Option<Vec<u8>> = row.and_then(|row| row.get(0));
        let stored = batch::decode_stored(&write.key, old.as_deref())?;
        let results = batch::prepare(
            |_| Ok(stored.clone()),
            &self.shared.clock,
            std::slice::from_ref(write),
        )?;
        let new = codec::encode(&results[0].1);
        let expires = expiry(&results[0].1);
        let written = if exists {
            client
                .execute_typed(
                    "UPDATE agentstore_records SET record = $2, expires_at_ms = $4 \
                     WHERE key = $1 AND record IS NOT DISTINCT FROM $3 AND txn IS NULL",
                    &[
                        (&key, Type::BYTEA),
                        (&new, Type::BYTEA),
                        (&old, Type::BYTEA),
                        (&expires, Type::INT8),
                    ],
                )
                .await
        } else {
            client
                .execute_typed(
                    "INSERT INTO agentstore_records (key, record, expires_at_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO NOTHING",
                    &[(&key, Type::BYTEA), (&new, Type::BYTEA), (&expires, Type::INT8)],
                )
                .await
        };
        match written {
            Ok(1) => Ok(Ok(results.into_iter().map(|(_, r)| r).collect())),
            Ok(_) => Ok(Err("the row changed since it was read".into())),
            Err(e) if retryable(&e) => Ok(Err(e.to_string())),
            Err(e) => Err(pg_error(e)),
        }
    }

    /// One transaction that locks the batch's rows, checks them and does `step`.
    /// `Ok(Err(e))` is a retryable failure.
    async fn try_commit(
        &self,
        writes: &[Write],
        step: Step<'_>,
    ) -> Result<Result<Vec<Record>, tokio_postgres::Error>, EngineError> {
        let mut keys = batch::distinct_keys(writes);
        // A fixed lock order makes deadlocks between two batches rarer (they are retried anyway).
        keys.sort();
        let key_bytes: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let mut client = self.shared.pool.get().await.map_err(pool_error)?;
        let txn = match self.begin(&mut client).await? {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(e)),
        };
        let attempt = async {
            txn.execute_typed(
                "INSERT INTO agentstore_records (key, record) SELECT k, NULL FROM unnest($1::bytea[]) AS k \
                 ORDER BY k ON CONFLICT (key) DO NOTHING",
                &[(&key_bytes, Type::BYTEA_ARRAY)],
            )
            .await?;
            let rows = txn
                .query_typed(
                    "SELECT key, record, txn FROM agentstore_records WHERE key = ANY($1) ORDER BY key FOR UPDATE",
                    &[(&key_bytes, Type::BYTEA_ARRAY)],
                )
                .await?;
            let prepared = match step {
                Step::Prepare(id) => txn
                    .query_typed_opt(
                        "SELECT 1 FROM agentstore_txn_staged WHERE txn = $1",
                        &[(&id, Type::TEXT)],
                    )
                    .await?
                    .is_some(),
                Step::Commit => false,
            };
            Ok::<_, tokio_postgres::Error>((rows, prepared))
        };
        let (rows, prepared) = match attempt.await {
            Ok(found) => found,
            Err(e) if retryable(&e) => return Ok(Err(e)),
            Err(e) => return Err(pg_error(e)),
        };
        if prepared {
            // Prepared before (a coordinator retrying): the same answer, nothing new.
            return Ok(Ok(Vec::new()));
        }
        let results = prepare_on_rows(&rows, true, &self.shared.clock, writes)?;
        let fences = batch_fences(writes);
        let locks: Vec<&str> = fences.iter().map(|f| f.lock.as_str()).collect();
        let tokens: Vec<i64> = fences
            .iter()
            .map(|f| {
                i64::try_from(f.token).map_err(|_| EngineError::InvalidSettings {
                    detail: format!("fencing token {} exceeds PostgreSQL's bigint", f.token),
                })
            })
            .collect::<Result<_, _>>()?;
        if !fences.is_empty() {
            let highest = async {
                txn.execute_typed(
                    "INSERT INTO agentstore_fences (lock, token) SELECT l, 0 FROM unnest($1::text[]) AS l \
                     ORDER BY l ON CONFLICT (lock) DO NOTHING",
                    &[(&locks, Type::TEXT_ARRAY)],
                )
                .await?;
                txn.query_typed(
                    "SELECT lock, token FROM agentstore_fences WHERE lock = ANY($1) ORDER BY lock FOR UPDATE",
                    &[(&locks, Type::TEXT_ARRAY)],
                )
                .await
            };
            let rows = match highest.await {
                Ok(rows) => rows,
                Err(e) if retryable(&e) => return Ok(Err(e)),
                Err(e) => return Err(pg_error(e)),
            };
            for row in rows {
                let (lock, highest): (String, i64) = (row.get(0), row.get(1));
                if let Some(fence) = fences.iter().find(|f| f.lock == lock)
                    && fence.token < highest.unsigned_abs()
                {
                    return Err(EngineError::Fenced {
                        lock,
                        token: fence.token,
                        highest: highest.unsigned_abs(),
                    });
                }
            }
        }
        let finals = batch::final_records(&results);
        let final_keys: Vec<&[u8]> = finals.iter().map(|(k, _)| k.as_bytes()).collect();
        let final_records: Vec<Vec<u8>> = finals.iter().map(|(_, r)| codec::encode(r)).collect();
        let final_expiries: Vec<Option<i64>> = finals.iter().map(|(_, r)| expiry(r)).collect();
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&final_keys, Type::BYTEA_ARRAY),
            (&final_records, Type::BYTEA_ARRAY),
            (&final_expiries, Type::INT8_ARRAY),
        ];
        let staged = match step {
            Step::Prepare(_) => crate::batch_codec::encode_writes(writes),
            Step::Commit => Vec::new(),
        };
        let finish = async {
            match step {
                Step::Commit => {
                    txn.execute_typed(
                        "UPDATE agentstore_records SET record = v.record, expires_at_ms = v.expires \
                         FROM unnest($1::bytea[], $2::bytea[], $3::int8[]) AS v(key, record, expires) \
                         WHERE agentstore_records.key = v.key",
                        &params,
                    )
                    .await?;
                }
                Step::Prepare(id) => {
                    txn.execute_typed(
                        "UPDATE agentstore_records SET txn = $2 WHERE key = ANY($1)",
                        &[(&key_bytes, Type::BYTEA_ARRAY), (&id, Type::TEXT)],
                    )
                    .await?;
                    txn.execute_typed(
                        "INSERT INTO agentstore_txn_staged (txn, writes) VALUES ($1, $2)",
                        &[(&id, Type::TEXT), (&staged, Type::BYTEA)],
                    )
                    .await?;
                }
            }
            if !fences.is_empty() {
                txn.execute_typed(
                    "UPDATE agentstore_fences SET token = v.token \
                     FROM unnest($1::text[], $2::int8[]) AS v(lock, token) WHERE agentstore_fences.lock = v.lock",
                    &[(&locks, Type::TEXT_ARRAY), (&tokens, Type::INT8_ARRAY)],
                )
                .await?;
            }
            txn.commit().await
        };
        match finish.await {
            Ok(()) if matches!(step, Step::Prepare(_)) => Ok(Ok(Vec::new())),
            Ok(()) => Ok(Ok(results.into_iter().map(|(_, r)| r).collect())),
            Err(e) if retryable(&e) => Ok(Err(e)),
            Err(e) => Err(pg_error(e)),
        }
    }

    /// Starts a transaction at the configured isolation; `Ok(Err(e))` is a retryable failure.
    async fn begin<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<Result<deadpool_postgres::Transaction<'c>, tokio_postgres::Error>, EngineError>
    {
        match client
            .build_transaction()
            .isolation_level(self.isolation())
            .start()
            .await
        {
            Ok(txn) => Ok(Ok(txn)),
            Err(e) if retryable(&e) => Ok(Err(e)),
            Err(e) => Err(pg_error(e)),
        }
    }

    /// One transaction that commits or aborts what `id` prepared. `Ok(Err(e))` is a
    /// retryable failure.
    async fn try_resolve(
        &self,
        id: &str,
        commit: bool,
    ) -> Result<Result<Vec<Record>, tokio_postgres::Error>, EngineError> {
        let mut client = self.shared.pool.get().await.map_err(pool_error)?;
        let txn = match self.begin(&mut client).await? {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(e)),
        };
        let staged = match txn
            .query_typed_opt(
                "DELETE FROM agentstore_txn_staged WHERE txn = $1 RETURNING writes",
                &[(&id, Type::TEXT)],
            )
            .await
        {
            Ok(row) => row.map(|row| row.get::<_, Vec<u8>>(0)),
            Err(e) if retryable(&e) => return Ok(Err(e)),
            Err(e) => return Err(pg_error(e)),
        };
        let Some(staged) = staged else {
            // Not prepared here, or resolved already.
            return Ok(Ok(Vec::new()));
        };
        let writes = crate::two_phase::unconditional(
            crate::batch_codec::decode_writes(&staged).map_err(|e| EngineError::Storage {
                detail: format!("postgres holds invalid staged writes for {id}: {e}"),
            })?,
        );
        let attempt = async {
            let rows = txn
                .query_typed(
                    "UPDATE agentstore_records SET txn = NULL WHERE txn = $1 RETURNING key, record",
                    &[(&id, Type::TEXT)],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(rows)
        };
        let rows = match attempt.await {
            Ok(rows) => rows,
            Err(e) if retryable(&e) => return Ok(Err(e)),
            Err(e) => return Err(pg_error(e)),
        };
        let mut results = Vec::new();
        if commit {
            results = prepare_on_rows(&rows, false, &self.shared.clock, &writes)?;
            let finals = batch::final_records(&results);
            let keys: Vec<&[u8]> = finals.iter().map(|(k, _)| k.as_bytes()).collect();
            let records: Vec<Vec<u8>> = finals.iter().map(|(_, r)| codec::encode(r)).collect();
            let expiries: Vec<Option<i64>> = finals.iter().map(|(_, r)| expiry(r)).collect();
            if let Err(e) = txn
                .execute_typed(
                    "UPDATE agentstore_records SET record = v.record, expires_at_ms = v.expires \
                     FROM unnest($1::bytea[], $2::bytea[], $3::int8[]) AS v(key, record, expires) \
                     WHERE agentstore_records.key = v.key",
                    &[
                        (&keys, Type::BYTEA_ARRAY),
                        (&records, Type::BYTEA_ARRAY),
                        (&expiries, Type::INT8_ARRAY),
                    ],
                )
                .await
            {
                return if retryable(&e) {
                    Ok(Err(e))
                } else {
                    Err(pg_error(e))
                };
            }
        }
        match txn.commit().await {
            Ok(()) => Ok(Ok(results.into_iter().map(|(_, r)| r).collect())),
            Err(e) if retryable(&e) => Ok(Err(e)),
            Err(e) => Err(pg_error(e)),
        }
    }

    /// Runs `attempt` until it succeeds or fails for good, backing off between retryable
    /// failures (serialization failures, deadlocks, lost races).
    async fn retrying<F, Fut, E>(&self, mut attempt: F) -> Result<Vec<Record>, EngineError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Result<Vec<Record>, E>, EngineError>>,
        E: std::fmt::Display,
    {
        let mut last = None;
        for n in 0..MAX_ATTEMPTS {
            match attempt().await? {
                Ok(records) => return Ok(records),
                Err(err) => {
                    tracing::debug!(attempt = n, error = %err, "transaction retried");
                    if let Some(metrics) = &self.shared.options.metrics {
                        metrics.retry("postgres");
                    }
                    last = Some(err.to_string());
                    tokio::time::sleep(backoff(n)).await;
                }
            }
        }
        let detail = last.unwrap_or_default();
        tracing::warn!(%detail, "transaction gave up after {MAX_ATTEMPTS} attempts");
        Err(EngineError::Contention {
            attempts: MAX_ATTEMPTS,
        })
    }
}

/// The records `writes` make from locked rows (`key, record[, txn]`); with `refuse_locked`,
/// a row a prepared transaction holds refuses the batch.
fn prepare_on_rows(
    rows: &[tokio_postgres::Row],
    refuse_locked: bool,
    clock: &NodeClock,
    writes: &[Write],
) -> Result<Vec<(Key, Record)>, EngineError> {
    let mut stored: Vec<(Key, Option<Record>)> = Vec::with_capacity(rows.len());
    for row in rows {
        let key = Key::new(row.get::<_, Vec<u8>>(0)).map_err(|e| EngineError::Storage {
            detail: format!("postgres holds an invalid key: {e}"),
        })?;
        if refuse_locked && let Some(holder) = row.get::<_, Option<String>>(2) {
            return Err(EngineError::InTransaction { key, txn: holder });
        }
        let record = batch::decode_stored(&key, row.get::<_, Option<&[u8]>>(1))?;
        stored.push((key, record));
    }
    batch::prepare(
        |key| {
            Ok(stored
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, r)| r.clone()))
        },
        clock,
        writes,
    )
}

/// A random delay for retry number `attempt`: exponential, capped, fully jittered.
fn backoff(attempt: u32) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let cap_micros = 200u64 << attempt.min(7);
    Duration::from_micros(random % cap_micros)
}

impl Engine for PostgresEngine {
    /// Deletes every row whose value expired by `now_ms` (and that no prepared transaction
    /// holds); returns how many. A row written before the `expires_at_ms` column existed is
    /// not found by it until it is written again.
    async fn purge_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        let client = self.shared.pool.get().await.map_err(pool_error)?;
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        client
            .execute_typed(
                "DELETE FROM agentstore_records WHERE expires_at_ms <= $1 AND txn IS NULL",
                &[(&now, Type::INT8)],
            )
            .await
            .map(|deleted| deleted as usize)
            .map_err(pg_error)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let client = self.shared.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_typed_opt(
                "SELECT record FROM agentstore_records WHERE key = $1",
                &[(&key.as_bytes(), Type::BYTEA)],
            )
            .await
            .map_err(pg_error)?;
        batch::decode_stored(
            key,
            row.as_ref().and_then(|row| row.get::<_, Option<&[u8]>>(0)),
        )
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let lower: &[u8] = match start_after {
            Some(after) if after.as_bytes() >= prefix => after.as_bytes(),
            _ => prefix,
        };
        let exclusive = start_after.is_some_and(|after| after.as_bytes() >= prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = if exclusive {
            "SELECT key, record FROM agentstore_records WHERE key > $1 AND record IS NOT NULL \
             AND substring(key from 1 for length($2)) = $2 ORDER BY key LIMIT $3"
        } else {
            "SELECT key, record FROM agentstore_records WHERE key >= $1 AND record IS NOT NULL \
             AND substring(key from 1 for length($2)) = $2 ORDER BY key LIMIT $3"
        };
        let client = self.shared.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query_typed(
                sql,
                &[
                    (&lower, Type::BYTEA),
                    (&prefix, Type::BYTEA),
                    (&limit, Type::INT8),
                ],
            )
            .await
            .map_err(pg_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key = Key::new(row.get::<_, Vec<u8>>(0)).map_err(|e| EngineError::Storage {
                detail: format!("postgres holds an invalid key: {e}"),
            })?;
            if let Some(record) = batch::decode_stored(&key, row.get::<_, Option<&[u8]>>(1))? {
                out.push((key, record));
            }
        }
        Ok(out)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let writes = &writes;
        self.retrying(|| async move {
            Ok(match writes.as_slice() {
                [single] if single.fence.is_none() => self.try_single(single).await?,
                _ => self
                    .try_commit(writes, Step::Commit)
                    .await?
                    .map_err(|e| e.to_string()),
            })
        })
        .await
    }

    async fn prepare(&self, txn: &str, writes: Vec<Write>) -> Result<(), EngineError> {
        let writes = &writes;
        self.retrying(|| self.try_commit(writes, Step::Prepare(txn)))
            .await
            .map(drop)
    }

    async fn resolve(&self, txn: &str, commit: bool) -> Result<Vec<Record>, EngineError> {
        self.retrying(|| self.try_resolve(txn, commit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn a_project_api_url_gets_an_error_that_says_which_url_is_needed() {
        let err = check_url("https://project.supabase.co")
            .unwrap_err()
            .to_string();
        assert!(err.contains("database connection string"), "{err}");
        assert!(check_url("postgresql://postgres@127.0.0.1:5432/test").is_ok());
        assert!(check_url("mysql://x").is_err());
    }
}
