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
        }
    }
}

/// Compare-and-swap of several records at once, fencing, and index maintenance.
/// KEYS = index, n record keys, m fence keys. ARGV = n, m, then per record the expected bytes
/// ('' = absent), the new bytes and the index member, then per fence the token.
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
    waiters: Vec<Mutex<ConnectionManager>>,
    next_waiter: AtomicUsize,
    options: RedisOptions,
    index: Vec<u8>,
    cas: Script,
    clock: Arc<NodeClock>,
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
            let wait_config = config.set_response_timeout(Some(
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
        let index = format!("{}i", options.prefix).into_bytes();
        Ok(Self {
            shared: Arc::new(Shared {
                conn,
                waiters,
                next_waiter: AtomicUsize::new(0),
                index,
                cas: Script::new(CAS_SCRIPT),
                clock,
                options,
            }),
        })
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
        let mut conn = self.shared.conn.clone();
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.record_key(key))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
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
        Ok(out)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        for attempt in 0..MAX_ATTEMPTS {
            if let Some(records) = self.try_commit(&writes).await? {
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
