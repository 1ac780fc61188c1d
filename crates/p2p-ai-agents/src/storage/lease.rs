//! Leases with fencing tokens.
//!
//! A lock is a key of an `lww` collection; its value is the lease: who holds it, until when,
//! and the fencing token of the grant. Acquiring is a compare-and-set on that key that writes
//! the next token, fenced by that token itself, so the collection's engine raises the lock's
//! fence in the same atomic commit that grants it: from then on it refuses every write that
//! carries an older token (a holder that paused past its lease and woke up is fenced off at
//! once). Other engines refuse older tokens once they have seen the new one. On a strong
//! collection in a cluster, every grant is one Raft log entry.
//!
//! Expiry is judged by the clock of the store that acquires, so mutual exclusion is only as
//! good as the nodes' clock agreement (as for every lease); the fencing token is what keeps
//! writes safe when it fails.

use std::time::Duration;

use agentstore_core::config::ConflictStrategy;
use agentstore_core::record::{Mutation, Value};
use agentstore_engine::{Engine, EngineError, Expect, Fence, PhysicalClock, SystemClock, Write};
use serde::{Deserialize, Serialize};

use super::{Result, Storage, StorageError, Transaction, traced};

/// A granted lease: writes made under it carry [`Lease::fence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lock's key.
    pub lock: String,
    /// Who holds it.
    pub holder: String,
    /// The fencing token of this grant: higher than every earlier grant's.
    pub token: u64,
    /// When it expires, in milliseconds since the Unix epoch (the granting store's clock).
    pub expires_at_ms: u64,
}

impl Lease {
    /// The fence writes under this lease carry.
    pub fn fence(&self) -> Fence {
        Fence {
            lock: self.lock.clone(),
            token: self.token,
        }
    }
}

/// The value a lock key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// `None` once released.
    holder: Option<String>,
    token: u64,
    expires_at_ms: u64,
}

impl Storage {
    /// The lease state of `lock` and the version it was read at.
    async fn lease_state(
        &self,
        lock: &str,
    ) -> Result<(
        super::Call<'_>,
        Option<(State, agentstore_core::VersionVector)>,
    )> {
        let call = self.call(lock, None)?;
        if call.plan.conflict != ConflictStrategy::Register
            || call.plan.encrypted
            || call.plan.signed
        {
            return Err(Storage::wrong(
                &call,
                "lock",
                "a lock is a key of an lww collection that is neither encrypted nor signed",
            ));
        }
        let record = call.engine.get(&call.key).await?;
        let state = match record {
            Some(record) => match &record.value {
                Value::Register(Some(bytes)) => {
                    let state: State = serde_json::from_slice(bytes).map_err(|source| {
                        StorageError::Deserialize {
                            key: lock.to_owned(),
                            source,
                        }
                    })?;
                    Some((state, record.version))
                }
                _ => None,
            },
            None => None,
        };
        Ok((call, state))
    }

    /// Grants `holder` the lock `lock` (a key of an `lww` collection) for `ttl`, with a
    /// fencing token above every earlier grant's. A holder that still holds it renews it
    /// (same token, later expiry). Held by someone else and not expired:
    /// [`StorageError::LockHeld`].
    pub async fn acquire_lock(&self, lock: &str, holder: &str, ttl: Duration) -> Result<Lease> {
        traced("acquire_lock", lock, async move {
            loop {
                let (call, current) = self.lease_state(lock).await?;
                let now = SystemClock.now_ms();
                let (token, expect) = match &current {
                    None => (1, Expect::Absent),
                    Some((state, version)) => {
                        let live = state.holder.is_some() && now < state.expires_at_ms;
                        match &state.holder {
                            Some(other) if live && other != holder => {
                                return Err(StorageError::LockHeld {
                                    lock: lock.to_owned(),
                                    holder: other.clone(),
                                    expires_at_ms: state.expires_at_ms,
                                });
                            }
                            Some(_) if live => (state.token, Expect::Version(version.clone())),
                            _ => (state.token + 1, Expect::Version(version.clone())),
                        }
                    }
                };
                let lease = Lease {
                    lock: lock.to_owned(),
                    holder: holder.to_owned(),
                    token,
                    expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
                };
                let state = State {
                    holder: Some(lease.holder.clone()),
                    token,
                    expires_at_ms: lease.expires_at_ms,
                };
                if put_state(&call, &state, expect, lease.fence()).await? {
                    return Ok(lease);
                }
            }
        })
        .await
    }

    /// Releases `lease` if it is still the current grant of its lock (otherwise it expired
    /// and was granted again: nothing to do). The token counter is kept, so the next grant's
    /// token is still higher.
    pub async fn release_lock(&self, lease: &Lease) -> Result<()> {
        traced("release_lock", &lease.lock, async move {
            loop {
                let (call, current) = self.lease_state(&lease.lock).await?;
                let Some((state, version)) = current else {
                    return Ok(());
                };
                if state.token != lease.token || state.holder.is_none() {
                    return Ok(());
                }
                let released = State {
                    holder: None,
                    token: state.token,
                    expires_at_ms: 0,
                };
                match put_state(&call, &released, Expect::Version(version), lease.fence()).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    // A newer grant has been seen: this lease is over anyway.
                    Err(StorageError::Engine(EngineError::Fenced { .. })) => return Ok(()),
                    Err(err) => return Err(err),
                }
            }
        })
        .await
    }
}

/// Writes a lock's new state if the key is still as `expect` says, fenced by `fence`;
/// `false` if someone else changed it in between (look again).
async fn put_state(
    call: &super::Call<'_>,
    state: &State,
    expect: Expect,
    fence: Fence,
) -> Result<bool> {
    let bytes = Storage::encode(call, state)?;
    let write = Write::expecting(call.key.clone(), Mutation::Put(bytes), expect).fenced(fence);
    match call.engine.commit(vec![write]).await {
        Ok(_) => Ok(true),
        Err(EngineError::ExpectationFailed { .. }) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

impl Transaction<'_> {
    /// Fences every write of this transaction with `lease`: each engine refuses it whole if
    /// it has seen a newer token for the lease's lock.
    pub fn fenced(&mut self, lease: &Lease) -> &mut Self {
        self.with_fence(lease.fence())
    }

    /// Fences every write of this transaction with `fence`.
    pub(crate) fn with_fence(&mut self, fence: Fence) -> &mut Self {
        self.fence = Some(fence);
        self
    }
}
