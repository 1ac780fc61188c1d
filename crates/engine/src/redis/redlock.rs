//! Redlock over independent Redis masters, with fencing tokens.
//!
//! A lock is held when a majority of the masters granted it (`SET name value NX PX ttl`) and
//! time remains: validity = ttl − time spent acquiring − clock drift allowance (1% of ttl plus
//! 2 ms). Only the holder can extend or release it (atomic compare-and-delete on its random
//! value).
//!
//! Redlock alone cannot stop a holder that pauses past its validity from writing after the
//! lock passed to someone else. So every grant carries a **fencing token** that only increases
//! for a lock name, and engines refuse writes fenced by a token older than one they have seen
//! (see [`crate::Fence`]). Tokens: each master increments its counter atomically with granting
//! the lock; the grant takes the maximum over the masters that granted it and raises those
//! masters' counters to it before it counts as held. Any later grant shares a master with this
//! majority, and that master's counter is already at least this token, so the later token is
//! greater.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::Mutex;

use super::redis_error;
use crate::Fence;
use crate::error::EngineError;

const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return -1
";
const RAISE: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
";
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// A lock manager over 3, 5, ... independent Redis masters.
#[derive(Clone)]
pub struct Redlock {
    masters: Arc<Vec<Master>>,
}

struct Master {
    client: Client,
    /// Connected on first use, so a master that is down at start does not stop the others.
    conn: Mutex<Option<ConnectionManager>>,
}

impl std::fmt::Debug for Redlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redlock")
            .field("masters", &self.masters.len())
            .finish()
    }
}

/// A held lock.
#[derive(Debug, Clone)]
pub struct LockGrant {
    /// The lock's name.
    pub name: String,
    /// The fencing token of this grant.
    pub token: u64,
    value: String,
    valid_until: Instant,
}

impl LockGrant {
    /// The fence to attach to writes made under this lock.
    pub fn fence(&self) -> Fence {
        Fence {
            lock: self.name.clone(),
            token: self.token,
        }
    }

    /// Until when the lock is held for sure (already net of the drift allowance).
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }
}

/// 64 random bits (from the standard library's per-instance hash keys; no RNG dependency).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The value that identifies one grant, so only its holder can extend or release it.
fn random_value() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

impl Redlock {
    /// A lock manager over `urls`, which must be an odd number (3 or more) of independent
    /// masters (not replicas of each other).
    pub fn new(urls: &[String]) -> Result<Self, EngineError> {
        if urls.len() < 3 || urls.len().is_multiple_of(2) {
            return Err(EngineError::InvalidSettings {
                detail: format!(
                    "Redlock needs an odd number of independent masters, at least 3; got {}",
                    urls.len()
                ),
            });
        }
        let masters = urls
            .iter()
            .map(|url| {
                let client =
                    Client::open(url.as_str()).map_err(|e| EngineError::InvalidSettings {
                        detail: format!("invalid Redis URL `{url}`: {e}"),
                    })?;
                Ok(Master {
                    client,
                    conn: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(Self {
            masters: Arc::new(masters),
        })
    }

    fn quorum(&self) -> usize {
        self.masters.len() / 2 + 1
    }

    /// Runs `script` on every master at once, each bounded by `timeout`; a master that fails
    /// or is too slow answers `None`.
    async fn on_all(
        &self,
        script: &'static str,
        keys: &[String],
        args: Vec<String>,
        timeout: Duration,
    ) -> Vec<Option<i64>> {
        let mut calls = tokio::task::JoinSet::new();
        for index in 0..self.masters.len() {
            let (masters, keys, args) = (Arc::clone(&self.masters), keys.to_vec(), args.clone());
            calls.spawn(async move {
                let reply = tokio::time::timeout(timeout, async {
                    let mut conn = masters[index].connection(timeout).await?;
                    let script = Script::new(script);
                    let mut invocation = script.prepare_invoke();
                    for key in &keys {
                        invocation.key(key);
                    }
                    for arg in &args {
                        invocation.arg(arg);
                    }
                    invocation
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .map_err(redis_error)
                })
                .await;
                (index, reply.ok().and_then(Result::ok))
            });
        }
        let mut replies = vec![None; self.masters.len()];
        while let Some(Ok((index, reply))) = calls.join_next().await {
            replies[index] = reply;
        }
        replies
    }

    /// One attempt to take `name` for `ttl`.
    pub async fn acquire(&self, name: &str, ttl: Duration) -> Result<LockGrant, EngineError> {
        let value = random_value();
        let (lock_key, token_key) = (
            format!("agentstore:lock:{name}"),
            format!("agentstore:lock-token:{name}"),
        );
        let per_master = (ttl / 10).clamp(Duration::from_millis(5), Duration::from_millis(200));
        let start = Instant::now();
        let ttl_ms = ttl.as_millis().to_string();
        let replies = self
            .on_all(
                ACQUIRE,
                &[lock_key.clone(), token_key.clone()],
                vec![value.clone(), ttl_ms],
                per_master,
            )
            .await;
        let granted: Vec<(usize, u64)> = replies
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.and_then(|t| u64::try_from(t).ok()).map(|t| (i, t)))
            .collect();
        let mut ok = granted.len() >= self.quorum();
        let token = granted.iter().map(|(_, t)| *t).max().unwrap_or(0);
        if ok {
            let raised = self
                .on_all(RAISE, &[token_key], vec![token.to_string()], per_master)
                .await;
            let raised_on_granting = granted.iter().filter(|(i, _)| raised[*i].is_some()).count();
            ok = raised_on_granting >= self.quorum();
        }
        let drift = ttl / 100 + Duration::from_millis(2);
        let validity = ttl.checked_sub(start.elapsed() + drift);
        match validity {
            Some(validity) if ok && !validity.is_zero() => Ok(LockGrant {
                name: name.to_owned(),
                token,
                value,
                valid_until: start + validity,
            }),
            _ => {
                // Undo the partial grant so others need not wait for it to expire.
                self.on_all(RELEASE, &[lock_key], vec![value], per_master)
                    .await;
                Err(EngineError::LockNotAcquired {
                    lock: name.to_owned(),
                    granted: granted.len(),
                    needed: self.quorum(),
                })
            }
        }
    }

    /// Tries to take `name` up to `attempts` times, waiting a random moment between tries.
    pub async fn acquire_with_retry(
        &self,
        name: &str,
        ttl: Duration,
        attempts: u32,
    ) -> Result<LockGrant, EngineError> {
        let mut last = None;
        for _ in 0..attempts.max(1) {
            match self.acquire(name, ttl).await {
                Ok(grant) => return Ok(grant),
                Err(err) => last = Some(err),
            }
            tokio::time::sleep(Duration::from_millis(1 + random_u64() % 20)).await;
        }
        Err(last.unwrap_or(EngineError::Internal {
            detail: "no lock attempt was made".into(),
        }))
    }

    /// Extends a held lock to `ttl` from now; fails if a majority no longer holds it for us.
    pub async fn extend(&self, grant: &mut LockGrant, ttl: Duration) -> Result<(), EngineError> {
        let start = Instant::now();
        let per_master = (ttl / 10).clamp(Duration::from_millis(5), Duration::from_millis(200));
        let replies = self
            .on_all(
                EXTEND,
                &[format!("agentstore:lock:{}", grant.name)],
                vec![grant.value.clone(), ttl.as_millis().to_string()],
                per_master,
            )
            .await;
        let extended = replies.iter().filter(|r| **r == Some(1)).count();
        let validity = ttl.checked_sub(start.elapsed() + ttl / 100 + Duration::from_millis(2));
        match validity {
            Some(validity) if extended >= self.quorum() && Instant::now() < grant.valid_until => {
                grant.valid_until = start + validity;
                Ok(())
            }
            _ => Err(EngineError::LockNotAcquired {
                lock: grant.name.clone(),
                granted: extended,
                needed: self.quorum(),
            }),
        }
    }

    /// Releases a held lock on every master that still holds it for this grant.
    pub async fn release(&self, grant: LockGrant) {
        let per_master = Duration::from_millis(200);
        self.on_all(
            RELEASE,
            &[format!("agentstore:lock:{}", grant.name)],
            vec![grant.value],
            per_master,
        )
        .await;
    }
}

impl Master {
    async fn connection(&self, timeout: Duration) -> Result<ConnectionManager, EngineError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let conn = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(redis_error)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}
