//! The Redis engine.
//!
//! Records live in Redis strings (`<prefix>r:<key>`); a sorted set (`<prefix>i`, every score 0)
//! indexes the keys so `scan` can list a prefix in byte order with `ZRANGEBYLEX`.
//!
//! Merges are computed by the same `agentstore_core::record::apply` as on every engine, and
//! written with an atomic compare-and-swap script: it replaces each record only if it still
//! holds the bytes the merge was computed from, else nothing is written and the batch is
//! retried on fresh data. So two clients writing at once never overwrite each other blindly,
//! and the merge logic exists once, in Rust, rather than again in Lua.
//!
//! Strong collections (`storage.redis.consistency: strong`) follow each write with
//! `WAIT replicas timeout` on a dedicated connection (WAIT blocks its connection, so it must not
//! share the multiplexed one). Fewer acknowledgements than required is
//! [`EngineError::ReplicationShortfall`]. This is synchronous replication, not linearizability:
//! Redis can still lose acknowledged writes on failover.

mod redlock;

pub use redlock::{LockGrant, Redlock};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentstore_core::codec;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::Mutex;

use crate::batch;
use crate::clock::NodeClock;
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::session;
use crate::{Engine, Fence, Key, Record, Write, batch_fences};

/// How a Redis engine is set up.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every Redis key agentstore writes, so it can share a database.
    pub prefix: String,
    /// For strong collections: replicas that must acknowledge each write, and how long to wait.
    pub wait: Option<WaitPolicy>,
    /// Where to count retries, if anywhere.
    pub metrics: Option<EngineMetrics>,
    /// Replicas (`redis://host:port`) that may serve reads made in a session (see
    /// [`crate::session`]) once they have reached the session's replication offset.
    pub read_replicas: Vec<String>,
}

/// `WAIT` settings of strong writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Replicas that must acknowledge.
    pub replicas: u64,
    /// How long to wait for them.
    pub timeout_ms: u64,
}

impl RedisOptions {
    /// Eventual (no WAIT) on `url`, with the default prefix `agentstore:`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "agentstore:".into(),
            wait: None,
            metrics: None,
            read_replicas: Vec::new(),
        }
    }
}

/// Compare-and-swap of several records at once, fencing, and index maintenance.
/// KEYS = index, n record keys, m fence keys. ARGV = n, m, then per record the expected bytes
/// ('' = absent), the new bytes and the index member, then per fence the token, then per
/// record its expiry in Unix ms ('' = none): Redis removes an expired value by itself (it
/// reads as absent from its expiry on anyway), and a write without one clears it (`SET`).
/// Returns {1, 0} if written, {0, 0} if a record changed since it was read (retry), and
/// {-1, j, highest} if fence j carries a token older than `highest` (nothing written).
/// Tokens are compared as Lua numbers, exact below 2^53.
const CAS_SCRIPT: &str = r"
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
for j = 1, m do
  local highest = tonumber(redis.call('GET', KEYS[1 + n + j]) or '0')
  if tonumber(ARGV[2 + 3 * n + j]) < highest then return {-1, j, highest} end
end
for i = 1, n do
  local current = redis.call('GET', KEYS[1 + i])
  local expected = ARGV[2 + i]
  if expected == '' then
    if current then return {0, 0} end
  elseif current ~= expected then
    return {0, 0}
  end
end
for i = 1, n do
  redis.call('SET', KEYS[1 + i], ARGV[2 + n + i])
  local expires = ARGV[2 + 3 * n + m + i]
  if expires ~= '' then redis.call('PEXPIREAT', KEYS[1 + i], expires) end
  redis.call('ZADD', KEYS[1], 0, ARGV[2 + 2 * n + i])
end
for j = 1, m do
  redis.call('SET', KEYS[1 + n + j], ARGV[2 + 3 * n + j])
end
return {1, 0}
";

/// Attempts before a batch that keeps losing to concurrent writers gives up.
const MAX_ATTEMPTS: u32 = 64;
/// Dedicated connections for strong writes (each runs one write + WAIT at a time).
const WAIT_CONNECTIONS: usize = 4;

/// The Redis engine. Cheap to clone.
#[derive(Clone)]
pub struct RedisEngine {
    shared: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    /// Replicas for session reads, with the replication offset each last reported.
    readers: Vec<Reader>,
    next_reader: AtomicUsize,
    /// Reads served by a replica, and by the primary, in sessions.
    replica_reads: std::sync::atomic::AtomicU64,
    primary_reads: std::sync::atomic::AtomicU64,
    waiters: Vec<Mutex<ConnectionManager>>,
    next_waiter: AtomicUsize,
    options: RedisOptions,
    index: Vec<u8>,
    cas: Script,
    clock: Arc<NodeClock>,
}

/// A replica that may serve session reads.
struct Reader {
    conn: ConnectionManager,
    /// The replication offset it last reported (0: unknown).
    offset: std::sync::atomic::AtomicU64,
}

/// How often replicas are asked for their replication offset.
const OFFSET_POLL: Duration = Duration::from_millis(20);

/// `field:<n>` of an `INFO replication` answer.
fn info_offset(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        line.trim()
            .strip_prefix(field)?
            .strip_prefix(':')?
            .parse()
            .ok()
    })
}

/// Keeps each replica's reported offset fresh until the engine is dropped. A replica that
/// does not answer, or reports no offset (it is not replicating), is not read from.
async fn poll_offsets(shared: std::sync::Weak<Shared>) {
    loop {
        tokio::time::sleep(OFFSET_POLL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for reader in &shared.readers {
            let mut conn = reader.conn.clone();
            let info: Result<String, _> = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await;
            let offset = info
                .ok()
                .filter(|info| info.contains("master_link_status:up"))
                .and_then(|info| info_offset(&info, "slave_repl_offset"))
                .unwrap_or(0);
            reader.offset.store(offset, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

pub(crate) fn redis_error(err: RedisError) -> EngineError {
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
    {
        EngineError::Unavailable {
            backend: "redis",
            detail: err.to_string(),
        }
    } else {
        EngineError::Storage {
            detail: format!("redis: {err}"),
        }
    }
}

impl RedisEngine {
    /// Connects to Redis. Connections reconnect by themselves after a failure; calls made
    /// while Redis is down fail with [`EngineError::Unavailable`].
    pub async fn connect(
        options: RedisOptions,
        clock: Arc<NodeClock>,
    ) -> Result<Self, EngineError> {
        let client =
            redis::Client::open(options.url.as_str()).map_err(|e| EngineError::Storage {
                detail: format!("invalid Redis URL `{}`: {e}", options.url),
            })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(redis_error)?;
        let mut waiters = Vec::new();
        if let Some(wait) = options.wait {
            // A WAIT connection must answer after the WAIT timeout, not time out before it.
            let wait_config = config.clone().set_response_timeout(Some(
                Duration::from_millis(wait.timeout_ms) + Duration::from_secs(5),
            ));
            for _ in 0..WAIT_CONNECTIONS {
                let conn = client
                    .get_connection_manager_with_config(wait_config.clone())
                    .await
                    .map_err(redis_error)?;
                waiters.push(Mutex::new(conn));
            }
        }
        let mut readers = Vec::new();
        for url in &options.read_replicas {
            let replica = redis::Client::open(url.as_str()).map_err(|e| EngineError::Storage {
                detail: format!("invalid Redis replica URL `{url}`: {e}"),
            })?;
            let conn = replica
                .get_connection_manager_with_config(config.clone())
                .await
                .map_err(redis_error)?;
            readers.push(Reader {
                conn,
                offset: std::sync::atomic::AtomicU64::new(0),
            });
        }
        let index = format!("{}i", options.prefix).into_bytes();
        let engine = Self {
            shared: Arc::new(Shared {
                conn,
                readers,
                next_reader: AtomicUsize::new(0),
                replica_reads: Default::default(),
                primary_reads: Default::default(),
                waiters,
                next_waiter: AtomicUsize::new(0),
                index,
                cas: Script::new(CAS_SCRIPT),
                clock,
                options,
            }),
        };
        if !engine.shared.readers.is_empty() {
            tokio::spawn(poll_offsets(Arc::downgrade(&engine.shared)));
        }
        Ok(engine)
    }

    /// Reads made in sessions so far: (served by a replica, served by the primary).
    pub fn session_reads(&self) -> (u64, u64) {
        let shared = &self.shared;
        (
            shared.replica_reads.load(Ordering::Relaxed),
            shared.primary_reads.load(Ordering::Relaxed),
        )
    }

    /// Runs `read` where the current session may be served, and grows the session by the
    /// replication offset of what was read. Outside a session, or with no read replicas: the
    /// primary, as always, with no extra round trip.
    ///
    /// A replica serves the session only if the offset it last reported is at least the
    /// session's (offsets only grow, so it has everything the session saw); the offset read
    /// right after `read` on the same connection bounds what `read` saw from above, so the
    /// session's next read, wherever it goes, sees at least as much.
    async fn in_session<T: redis::FromRedisValue>(
        &self,
        read: redis::Cmd,
    ) -> Result<T, EngineError> {
        // Without replicas to read from, the primary serves every read and offsets say nothing.
        let token = session::current().filter(|_| !self.shared.readers.is_empty());
        let Some(token) = token else {
            let mut conn = self.shared.conn.clone();
            return read.query_async(&mut conn).await.map_err(redis_error);
        };
        let shared = &self.shared;
        let count = shared.readers.len();
        let start = shared.next_reader.fetch_add(1, Ordering::Relaxed);
        let reader = (0..count)
            .map(|i| &shared.readers[(start + i) % count.max(1)])
            .find(|r| r.offset.load(Ordering::Acquire) >= token.redis_offset.max(1));
        let (mut conn, field) = match reader {
            Some(reader) => {
                shared.replica_reads.fetch_add(1, Ordering::Relaxed);
                (reader.conn.clone(), "slave_repl_offset")
            }
            None => {
                shared.primary_reads.fetch_add(1, Ordering::Relaxed);
                (shared.conn.clone(), "master_repl_offset")
            }
        };
        let (value, info): (T, String) = redis::pipe()
            .add_command(read)
            .cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if let Some(offset) = info_offset(&info, field) {
            session::observe(|token| token.redis_offset = token.redis_offset.max(offset));
        }
        Ok(value)
    }

    /// After a write or a primary read in a session: the session includes the primary's
    /// replication offset, which counts what was written or read.
    async fn observe_primary(&self) -> Result<(), EngineError> {
        // Offsets only steer reads to replicas: without any, no round trip for them.
        if self.shared.readers.is_empty() || session::current().is_none() {
            return Ok(());
        }
        let mut conn = self.shared.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if let Some(offset) = info_offset(&info, "master_repl_offset") {
            session::observe(|token| token.redis_offset = token.redis_offset.max(offset));
        }
        Ok(())
    }

    fn record_key(&self, key: &Key) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.shared.options.prefix.len() + 2 + key.as_bytes().len());
        out.extend_from_slice(self.shared.options.prefix.as_bytes());
        out.extend_from_slice(b"r:");
        out.extend_from_slice(key.as_bytes());
        out
    }

    fn fence_key(&self, lock: &str) -> Vec<u8> {
        format!("{}f:{lock}", self.shared.options.prefix).into_bytes()
    }

    /// One attempt: read, merge, compare-and-swap. `Ok(None)` means another writer got there
    /// first and the batch should be retried.
    async fn try_commit(&self, writes: &[Write]) -> Result<Option<Vec<Record>>, EngineError> {
        let distinct = batch::distinct_keys(writes);
        let record_keys: Vec<Vec<u8>> = distinct.iter().map(|k| self.record_key(k)).collect();
        let mut conn = self.shared.conn.clone();
        let current: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut stored = Vec::with_capacity(distinct.len());
        for (key, bytes) in distinct.iter().zip(&current) {
            stored.push(batch::decode_stored(key, bytes.as_deref())?);
        }
        let results = batch::prepare(
            |key| {
                Ok(distinct
                    .iter()
                    .position(|k| *k == key)
                    .and_then(|i| stored[i].clone()))
            },
            &self.shared.clock,
            writes,
        )?;
        let finals = batch::final_records(&results);
        let fences = batch_fences(writes);
        let mut invocation = self.shared.cas.key(self.shared.index.as_slice());
        for key in &record_keys {
            invocation.key(key.as_slice());
        }
        for fence in &fences {
            invocation.key(self.fence_key(&fence.lock));
        }
        invocation.arg(record_keys.len()).arg(fences.len());
        for bytes in &current {
            invocation.arg(bytes.as_deref().unwrap_or(b""));
        }
        for (_, record) in &finals {
            invocation.arg(codec::encode(record));
        }
        for (key, _) in &finals {
            invocation.arg(key.as_bytes());
        }
        for fence in &fences {
            invocation.arg(fence.token);
        }
        for (_, record) in &finals {
            match record.expires_at_ms {
                Some(at) => invocation.arg(at),
                None => invocation.arg(""),
            };
        }
        let outcome: Vec<i64> = match &self.shared.options.wait {
            None => invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?,
            Some(wait) => {
                let slot = self.shared.next_waiter.fetch_add(1, Ordering::Relaxed)
                    % self.shared.waiters.len();
                let mut dedicated = self.shared.waiters[slot].lock().await;
                let outcome: Vec<i64> = invocation
                    .invoke_async(&mut *dedicated)
                    .await
                    .map_err(redis_error)?;
                if outcome.first() == Some(&1) {
                    Self::wait(&mut dedicated, *wait).await?;
                }
                outcome
            }
        };
        match outcome.as_slice() {
            [1, ..] => Ok(Some(results.into_iter().map(|(_, r)| r).collect())),
            [0, ..] => Ok(None),
            [-1, j, highest] => {
                let fence = usize::try_from(*j)
                    .ok()
                    .and_then(|j| fences.get(j - 1))
                    .cloned()
                    .unwrap_or(Fence {
                        lock: String::new(),
                        token: 0,
                    });
                Err(EngineError::Fenced {
                    lock: fence.lock,
                    token: fence.token,
                    highest: u64::try_from(*highest).unwrap_or(0),
                })
            }
            other => Err(EngineError::Internal {
                detail: format!("unexpected compare-and-swap reply {other:?}"),
            }),
        }
    }

    async fn wait(conn: &mut ConnectionManager, wait: WaitPolicy) -> Result<(), EngineError> {
        let acknowledged: u64 = redis::cmd("WAIT")
            .arg(wait.replicas)
            .arg(wait.timeout_ms)
            .query_async(conn)
            .await
            .map_err(redis_error)?;
        if acknowledged < wait.replicas {
            return Err(EngineError::ReplicationShortfall {
                acknowledged,
                required: wait.replicas,
                timeout_ms: wait.timeout_ms,
            });
        }
        Ok(())
    }
}

/// The smallest byte string greater than every string starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Engine for RedisEngine {
    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let mut read = redis::cmd("GET");
        read.arg(self.record_key(key));
        let bytes: Option<Vec<u8>> = self.in_session(read).await?;
        batch::decode_stored(key, bytes.as_deref())
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let mut min = Vec::with_capacity(prefix.len() + 1);
        match start_after {
            Some(after) if after.as_bytes() >= prefix => {
                min.push(b'(');
                min.extend_from_slice(after.as_bytes());
            }
            _ => {
                min.push(b'[');
                min.extend_from_slice(prefix);
            }
        }
        let max = match prefix_end(prefix) {
            Some(end) => [b"(".as_slice(), &end].concat(),
            None => b"+".to_vec(),
        };
        let mut conn = self.shared.conn.clone();
        let members: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
            .arg(self.shared.index.as_slice())
            .arg(min)
            .arg(max)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Key> = members
            .into_iter()
            .map(|m| {
                Key::new(m).map_err(|e| EngineError::Storage {
                    detail: format!("redis index holds an invalid key: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        let record_keys: Vec<Vec<u8>> = keys.iter().map(|k| self.record_key(k)).collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, bytes) in keys.into_iter().zip(values) {
            if let Some(record) = batch::decode_stored(&key, bytes.as_deref())? {
                out.push((key, record));
            }
        }
        // Scans read the primary; a session then includes what they saw.
        self.observe_primary().await?;
        Ok(out)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        for attempt in 0..MAX_ATTEMPTS {
            if let Some(records) = self.try_commit(&writes).await? {
                self.observe_primary().await?;
                return Ok(records);
            }
            if let Some(metrics) = &self.shared.options.metrics {
                metrics.retry("redis");
            }
            // Lost a race: back off a little (growing, with jitter from the clock) and retry.
            let jitter = u64::from(self.shared.clock.physical_ms() as u32 % 7);
            tokio::time::sleep(Duration::from_micros((50 << attempt.min(6)) + jitter * 37)).await;
        }
        Err(EngineError::Contention {
            attempts: MAX_ATTEMPTS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_string_after_every_extension() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
