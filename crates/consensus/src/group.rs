//! [`Group`]: a node's member of the cluster's Raft group, the one thing the rest of agentstore
//! sees of openraft.
//!
//! Writes are proposed by the leader: a member that is not the leader forwards the command to
//! the leader it knows of and waits for its answer. Every proposal is numbered in the
//! proposing member's session (`crate::sessions`), and the state machine applies a number
//! once, so a proposal whose answer was lost (a leader killed or paused, a forward that timed
//! out, an entry discarded by a leader change) is sent again, to the new leader once there is
//! one, until the request's deadline. Each attempt is bounded (twice the election timeout), so
//! a dead leader costs one attempt, not the whole deadline. [`GroupError::Indeterminate`]
//! comes only when the deadline passes after an answer was lost: the write may have
//! applied. Linearizable reads are served by the leader after a read-index round
//! (openraft's `ReadPolicy::ReadIndex`: a heartbeat quorum confirms leadership; no clock
//! assumption); stale reads read the local state machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use agentstore_core::signing::Signatures;
use agentstore_core::{Key, Record, codec};
use agentstore_engine::{EngineError, PhysicalClock, SystemClock, Write};
use futures_util::future::{self, Either};
use openraft::Instant as _;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{BasicNode, Raft, ReadPolicy, ServerState, SnapshotPolicy};

use crate::command::{Op, decode_outcome, encode_command};
use crate::health::Health;
use crate::log_store::LogStore;
use crate::network::{
    MembershipChange, Network, Refusal, Reply, Request, Rpc, RpcError, ask, decode, encode,
};
use crate::sessions::encode_proposal;
use crate::state_machine::StateMachine;
use crate::types::{Applied, Command, MemberId, Snapshot, TypeConfig};

/// The log file inside the node's data directory.
pub const LOG_FILE: &str = "raft-log.redb";
/// The state-machine file inside the node's data directory.
pub const STATE_FILE: &str = "raft-state.redb";

/// How a node's member of the Raft group is set up.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// This member.
    pub id: MemberId,
    /// Where this member listens for peers.
    pub addr: String,
    /// Where the log and state machine files live.
    pub dir: PathBuf,
    /// The members the group starts with (this one included), by peer address. The member
    /// with the smallest id initializes the group once every other one has answered that it
    /// is not in a group yet; the others wait to be told.
    pub voters: BTreeMap<MemberId, String>,
    /// How long a write or read may take, retries included.
    pub request_timeout: Duration,
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// The election timeout's lower bound (the upper one is twice it).
    pub election_timeout: Duration,
    /// Entries between snapshots (the log is compacted up to a snapshot).
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot: a follower slightly behind catches
    /// up from the log instead of a whole snapshot (and it avoids a snapshot/purge race in
    /// openraft, #2116).
    pub kept_behind_snapshot: u64,
    /// The physical clock that stamps the writes this member proposes. Safety does not
    /// depend on it: entries apply in log order and each stamp follows the key's previous
    /// one whatever the clock says, so a skewed proposer only skews the stamps.
    pub clock: Arc<dyn PhysicalClock>,
    /// The check of signed collections every member runs before applying an entry (`None`:
    /// no collection is signed).
    pub signatures: Option<Arc<dyn Signatures>>,
    /// Where the log and state machine files are opened: the file system, or a test's disk.
    pub files: agentstore_engine::redb_file::Opener,
}

impl GroupConfig {
    /// Settings for a group on a local network: 100 ms heartbeats, elections after 0.5–1 s.
    pub fn new(
        id: MemberId,
        addr: String,
        dir: PathBuf,
        voters: BTreeMap<MemberId, String>,
    ) -> Self {
        Self {
            id,
            addr,
            dir,
            voters,
            request_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            snapshot_every: 10_000,
            kept_behind_snapshot: 1000,
            clock: Arc::new(SystemClock),
            signatures: None,
            files: agentstore_engine::redb_file::files(),
        }
    }
}

/// Why a group operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// No leader could be reached in time; nothing was applied.
    #[error("no Raft leader within {timeout_ms} ms ({detail}); nothing was applied")]
    NoLeader {
        /// How long it tried.
        timeout_ms: u64,
        /// The last reason.
        detail: String,
    },
    /// The write may or may not have been applied (its answer was lost); a read finds out.
    #[error("the write's outcome is unknown ({detail}): it may have been applied")]
    Indeterminate {
        /// What happened.
        detail: String,
    },
    /// The state machine refused the batch (a condition or a fence failed, a wrong kind).
    #[error(transparent)]
    Refused(EngineError),
    /// The log or the state machine failed on this node.
    #[error("Raft storage failure: {detail}")]
    Storage {
        /// What failed.
        detail: String,
    },
    /// A membership change was refused.
    #[error("membership change refused: {detail}")]
    Membership {
        /// Why.
        detail: String,
    },
    /// This member stopped after a failed write to its files ([`EngineError::DiskFull`] when
    /// the disk is full) and is reopened once they take writes again; nothing was applied.
    #[error("this node's Raft member is down after a failed write: {0}")]
    Down(EngineError),
}

/// What a member knows of the group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    /// This member.
    pub id: String,
    /// `leader`, `follower`, `candidate`, `learner`, `shutdown`, or `down` while a failed
    /// write keeps the member stopped (see [`GroupStatus::failure`]).
    pub state: &'static str,
    /// The current term.
    pub term: u64,
    /// The leader this member follows, if known.
    pub leader: Option<String>,
    /// The index of the last entry in this member's log.
    pub last_log: Option<u64>,
    /// The index of the last entry committed by a quorum, as this member knows it.
    pub committed: Option<u64>,
    /// The index of the last entry applied to this member's state machine.
    pub applied: Option<u64>,
    /// The index up to which the log was compacted into a snapshot.
    pub snapshot: Option<u64>,
    /// The voting members.
    pub voters: Vec<String>,
    /// Members that receive the log without voting.
    pub learners: Vec<String>,
    /// How long ago a quorum last acknowledged this member as leader (leaders only).
    pub quorum_ack_ms: Option<u64>,
    /// Leader changes seen by this member since it started.
    pub leader_changes: u64,
    /// The last write to the log or the state machine failed with this (until one succeeds).
    pub failure: Option<String>,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLevel {
    /// Linearizable: served by the leader after confirming its leadership with a quorum.
    Linearizable,
    /// This member's applied state, which may lag the leader.
    Stale,
}

/// What sending a call again may do, which decides what a lost answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// It may change the state and a copy would change it again: a lost answer is
    /// indeterminate at once (membership changes).
    MayApply,
    /// A numbered proposal (see `sessions`): a copy applies nothing more, so a lost answer is
    /// sent again, to the next leader if need be; indeterminate only if the deadline comes
    /// after an answer was lost.
    Once,
    /// It only reads: a lost answer is sent again.
    ReadOnly,
}

/// A node's member of the Raft group. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Group {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: MemberId,
    /// The running member; `None` while a failed write keeps it stopped. Shared: every call
    /// takes it, so a clone is one reference count.
    member: RwLock<Option<Arc<Member>>>,
    /// How the member was started, to start it again.
    config: GroupConfig,
    health: Arc<Health>,
    /// Set by [`Group::shutdown`]: a stopped member stays stopped.
    stopping: AtomicBool,
    /// This member's proposal session: its id and when it started.
    session: Vec<u8>,
    /// The numbers of the proposals in flight, and the next one.
    proposals: std::sync::Mutex<Proposals>,
    /// How long one attempt (here or at the leader) may take before it is sent again.
    attempt: Duration,
    rpc: Arc<dyn Rpc>,
    timeout: Duration,
    leader_changes: Arc<AtomicU64>,
    clock: Arc<dyn PhysicalClock>,
}

/// openraft's member and the state machine it applies to.
#[derive(Debug)]
struct Member {
    raft: Raft<TypeConfig, StateMachine>,
    state: StateMachine,
}

/// The proposals a member has in flight.
#[derive(Debug, Default)]
struct Proposals {
    next: u64,
    waiting: BTreeSet<u64>,
}

/// A proposal's place among those in flight, given up when it is answered (or dropped).
struct InFlight<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        agentstore_engine::lock(&self.inner.proposals)
            .waiting
            .remove(&self.seq);
    }
}

/// How often a member stopped by a failed write tries to start again.
const RESTART_EVERY: Duration = Duration::from_secs(1);

fn storage(err: impl std::fmt::Display) -> GroupError {
    GroupError::Storage {
        detail: err.to_string(),
    }
}

fn leader_of(
    forward: &openraft::errors::ForwardToLeader<TypeConfig>,
) -> Option<(MemberId, String)> {
    forward
        .leader_id
        .clone()
        .zip(forward.leader_node.as_ref().map(|n| n.addr.clone()))
}

impl Group {
    /// Opens the log and state machine in `config.dir` and starts the member; a fresh group
    /// is initialized in the background (see [`GroupConfig::voters`]).
    pub async fn start(config: GroupConfig, rpc: Arc<dyn Rpc>) -> Result<Self, GroupError> {
        agentstore_engine::redb_file::create_private_dir(&config.dir).map_err(storage)?;
        let health = Arc::new(Health::default());
        let leader_changes = Arc::new(AtomicU64::new(0));
        let member = Member::start(&config, &rpc, &health, &leader_changes).await?;
        let group = Self {
            inner: Arc::new(Inner {
                id: config.id.clone(),
                member: RwLock::new(Some(Arc::new(member))),
                config: config.clone(),
                health,
                stopping: AtomicBool::new(false),
                session: format!(
                    "{}/{}",
                    config.id.0,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                )
                .into_bytes(),
                proposals: std::sync::Mutex::default(),
                attempt: (config.election_timeout * 2).max(Duration::from_millis(200)),
                rpc,
                timeout: config.request_timeout,
                clock: Arc::clone(&config.clock),
                leader_changes,
            }),
        };
        tokio::spawn(supervise(Arc::downgrade(&group.inner)));
        if config.voters.keys().next() == Some(&config.id) {
            tokio::spawn(group.clone().bootstrap(config.voters));
        }
        Ok(group)
    }

    /// The running member, or why there is none.
    fn member(&self) -> Result<Arc<Member>, GroupError> {
        let member = self
            .inner
            .member
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        member.clone().ok_or_else(|| {
            GroupError::Down(
                self.inner
                    .health
                    .failure()
                    .unwrap_or_else(|| EngineError::Storage {
                        detail: "the Raft member is starting again".to_owned(),
                    }),
            )
        })
    }

    /// `Err` with the failure while the last write to the Raft files failed.
    pub fn health(&self) -> Result<(), EngineError> {
        self.inner.health.failure().map_or(Ok(()), Err)
    }

    /// Initializes the group once every other configured voter says it is in no group yet.
    async fn bootstrap(self, voters: BTreeMap<MemberId, String>) {
        loop {
            let Ok(member) = self.member() else {
                return;
            };
            let raft = &member.raft;
            match raft.is_initialized().await {
                Ok(false) => {}
                _ => return,
            }
            let mut fresh = true;
            for (id, addr) in voters.iter().filter(|(id, _)| **id != self.inner.id) {
                let probe = Duration::from_secs(1);
                let answer = ask(&*self.inner.rpc, id, addr, &Request::Probe, probe).await;
                let initialized = match answer {
                    Ok(Reply::Probed { initialized }) => initialized,
                    _ => {
                        fresh = false;
                        break;
                    }
                };
                if initialized {
                    tracing::warn!(member = %id, "a configured voter is already in a Raft group; not initializing another");
                    return;
                }
            }
            if fresh {
                let members: BTreeMap<MemberId, BasicNode> = voters
                    .iter()
                    .map(|(id, addr)| (id.clone(), BasicNode::new(addr)))
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => tracing::info!("initialized the Raft group"),
                    Err(err) => tracing::info!(%err, "Raft group not initialized here"),
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Applies `writes` atomically through the log; returns the record of each write.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Vec<Record>, GroupError> {
        self.propose(Op::Batch(writes)).await
    }

    /// Two-phase commit, first phase, through the log: checks `writes`, locks their keys and
    /// keeps them for `txn` on every replica.
    pub async fn prepare(&self, txn: &str, writes: Vec<Write>) -> Result<(), GroupError> {
        let txn = txn.to_owned();
        self.propose(Op::Prepare { txn, writes }).await.map(drop)
    }

    /// Two-phase commit, second phase, through the log: applies (`commit`) or drops what
    /// `txn` prepared.
    pub async fn resolve(&self, txn: &str, commit: bool) -> Result<Vec<Record>, GroupError> {
        let txn = txn.to_owned();
        self.propose(if commit {
            Op::Commit { txn }
        } else {
            Op::Abort { txn }
        })
        .await
    }

    /// Proposes `op` and waits until it is applied; returns what applying it answered. The
    /// proposal is numbered in this member's session, so it is sent again (to the next leader,
    /// if the one asked is gone) until the deadline without ever applying twice.
    async fn propose(&self, op: Op) -> Result<Vec<Record>, GroupError> {
        let (in_flight, low) = {
            let mut proposals = agentstore_engine::lock(&self.inner.proposals);
            let seq = proposals.next;
            proposals.next += 1;
            proposals.waiting.insert(seq);
            let low = proposals.waiting.first().copied().unwrap_or(seq);
            (
                InFlight {
                    inner: &self.inner,
                    seq,
                },
                low,
            )
        };
        let command = Command(encode_proposal(
            &self.inner.session,
            in_flight.seq,
            low,
            &encode_command(self.inner.clock.now_ms(), &op),
        ));
        let request = Request::Propose(command.clone());
        let applied = self
            .at_leader(
                Effect::Once,
                || self.propose_here(command.clone()),
                &request,
                |reply| match reply {
                    Reply::Proposed(answer) => Some(answer),
                    _ => None,
                },
            )
            .await?;
        match decode_outcome(&applied.0).map_err(storage)? {
            Ok(records) => Ok(records),
            Err(refused) => Err(GroupError::Refused(refused)),
        }
    }

    /// The record of `key`, at `level`.
    pub async fn read(&self, key: &Key, level: ReadLevel) -> Result<Option<Record>, GroupError> {
        if level == ReadLevel::Stale {
            return self.member()?.state.get(key).map_err(storage);
        }
        let request = Request::Read {
            key: key.as_bytes().to_vec(),
        };
        self.at_leader(
            Effect::ReadOnly,
            || self.read_here(key),
            &request,
            |reply| match reply {
                Reply::Read(answer) => Some(answer.and_then(|bytes| {
                    bytes
                        .map(|bytes| codec::decode(&bytes))
                        .transpose()
                        .map_err(|e| Refusal::Failed(e.to_string()))
                })),
                _ => None,
            },
        )
        .await
    }

    /// Up to `limit` changes this member applied under `prefix` after position `after` of
    /// its feed (from now when `None`), waiting up to `wait` for one.
    pub async fn changes(
        &self,
        prefix: &[u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: Duration,
    ) -> Result<agentstore_engine::changelog::ChangePage, GroupError> {
        let state = self.member()?.state.clone();
        state
            .changes(prefix, after, limit, wait)
            .await
            .map_err(GroupError::Refused)
    }

    /// Up to `limit` records under `prefix` after `start_after`, at `level`.
    pub async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
        level: ReadLevel,
    ) -> Result<Vec<(Key, Record)>, GroupError> {
        if level == ReadLevel::Stale {
            return self
                .member()?
                .state
                .scan(prefix, start_after, limit)
                .map_err(storage);
        }
        let request = Request::Scan {
            prefix: prefix.to_vec(),
            after: start_after.map(|k| k.as_bytes().to_vec()),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        self.at_leader(
            Effect::ReadOnly,
            || self.scan_here(prefix, start_after, limit),
            &request,
            |reply| match reply {
                Reply::Scanned(answer) => Some(answer.and_then(|bytes| {
                    agentstore_wire::decode_entries(&bytes)
                        .map_err(|e| Refusal::Failed(e.to_string()))
                })),
                _ => None,
            },
        )
        .await
    }

    /// Serves a call here if this member leads, or sends `request` to the leader it knows of
    /// and takes the answer out of its reply (`from_reply`; `None` for a reply of another
    /// type). Each attempt has [`Inner::attempt`] at most, so a leader that died or stopped
    /// answering costs one attempt, and the next goes to the leader elected since. Refusals
    /// that applied nothing are retried until the request times out; a lost answer is retried
    /// or not as `effect` says.
    async fn at_leader<T, Here, Fut>(
        &self,
        effect: Effect,
        mut here: Here,
        request: &Request,
        from_reply: impl Fn(Reply) -> Option<Result<T, Refusal>>,
    ) -> Result<T, GroupError>
    where
        Here: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Refusal>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut backoff = Duration::from_millis(20);
        // An answer was lost: the write may have applied.
        let mut maybe_applied = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let limit = remaining.min(self.inner.attempt);
            // The leader this attempt went to (this member, unless it forwards).
            let mut asked = self.inner.id.clone();
            // A member stopped by a failed write knows no leader; it says why at once.
            let leader_before = self
                .member()?
                .raft
                .server_metrics()
                .borrow_watched()
                .current_leader
                .clone();
            let attempt = async {
                match here().await {
                    Err(Refusal::NotLeader {
                        leader: Some((leader, addr)),
                    }) if leader != self.inner.id => {
                        asked = leader.clone();
                        match ask(&*self.inner.rpc, &leader, &addr, request, limit).await {
                            Ok(reply) => from_reply(reply).unwrap_or_else(|| {
                                Err(Refusal::Failed("a reply of the wrong type".into()))
                            }),
                            // Delivered or not: the leader may have acted on it.
                            Err(err @ RpcError::Timeout { .. }) => {
                                Err(Refusal::Indeterminate(err.to_string()))
                            }
                            Err(RpcError::Unreachable(_)) => {
                                Err(Refusal::NotLeader { leader: None })
                            }
                        }
                    }
                    other => other,
                }
            };
            // An election while the answer is awaited means the leader asked is gone: the
            // attempt ends there, and the next goes to the new leader.
            let elected = self.leader_other_than(leader_before.as_ref(), limit);
            let outcome = match future::select(
                std::pin::pin!(tokio::time::timeout(limit, attempt)),
                std::pin::pin!(elected),
            )
            .await
            {
                Either::Left((Ok(outcome), _)) => outcome,
                Either::Right((true, _)) => Err(Refusal::Indeterminate(
                    "a new leader was elected while the answer was awaited".into(),
                )),
                Either::Left((Err(_), _)) | Either::Right((false, _)) => Err(
                    Refusal::Indeterminate(format!("no answer within {} ms", limit.as_millis())),
                ),
            };
            if let Err(Refusal::Indeterminate(_) | Refusal::NotLeader { leader: None }) = &outcome {
                // The leader asked is gone or silent: the next attempt waits for the member to
                // learn of another one (an election), not to ask the same one again.
                let remaining = deadline.saturating_duration_since(Instant::now());
                self.leader_other_than(Some(&asked), remaining.min(self.inner.attempt))
                    .await;
            }
            let detail = match outcome {
                Ok(value) => return Ok(value),
                Err(Refusal::Indeterminate(detail)) => match effect {
                    Effect::MayApply => return Err(GroupError::Indeterminate { detail }),
                    Effect::Once => {
                        maybe_applied = true;
                        detail
                    }
                    Effect::ReadOnly => detail,
                },
                Err(Refusal::NotLeader { leader }) => match leader {
                    Some((id, _)) => format!("{id} was the leader and no longer is"),
                    None => "no leader known".to_string(),
                },
                Err(Refusal::Failed(detail)) => detail,
            };
            if Instant::now() + backoff >= deadline {
                return Err(if maybe_applied {
                    GroupError::Indeterminate { detail }
                } else {
                    GroupError::NoLeader {
                        timeout_ms: self.inner.timeout.as_millis() as u64,
                        detail,
                    }
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Waits, `limit` at most, until this member knows of a leader other than `leader`;
    /// whether it does.
    async fn leader_other_than(&self, leader: Option<&MemberId>, limit: Duration) -> bool {
        let Ok(member) = self.member() else {
            return false;
        };
        let mut metrics = member.raft.server_metrics();
        let elected = async {
            loop {
                let known = metrics.borrow_watched().current_leader.clone();
                if known.is_some() && known.as_ref() != leader {
                    return true;
                }
                if metrics.changed().await.is_err() {
                    // The member stopped: no leader will be known here.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(limit, elected).await.unwrap_or(false)
    }

    /// Proposes `command` if this member leads.
    async fn propose_here(&self, command: Command) -> Result<Applied, Refusal> {
        match self.member_here()?.raft.client_write(command).await {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(Refusal::NotLeader {
                    leader: leader_of(&forward),
                })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward))) => {
                Err(Refusal::Indeterminate(format!(
                    "the entry was discarded by a leader change ({forward})"
                )))
            }
            // Anything else (a storage failure, a stopping member) may come after the entry
            // was appended: the write may have applied (a numbered proposal is sent again).
            Err(err) => Err(Refusal::Indeterminate(err.to_string())),
        }
    }

    /// Confirms `member` leads (read index) and waits until it has applied that far; the
    /// caller reads from the same member's state machine (a member started again after a
    /// failed write may be behind, and has confirmed nothing).
    async fn linearize_here(member: &Member) -> Result<(), Refusal> {
        match member.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward))) => {
                Err(Refusal::NotLeader {
                    leader: leader_of(&forward),
                })
            }
            Err(err) => Err(Refusal::Failed(err.to_string())),
        }
    }

    async fn read_here(&self, key: &Key) -> Result<Option<Record>, Refusal> {
        let member = self.member_here()?;
        Self::linearize_here(&member).await?;
        member
            .state
            .get(key)
            .map_err(|e| Refusal::Failed(e.to_string()))
    }

    async fn scan_here(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, Refusal> {
        let member = self.member_here()?;
        Self::linearize_here(&member).await?;
        member
            .state
            .scan(prefix, start_after, limit)
            .map_err(|e| Refusal::Failed(e.to_string()))
    }

    /// Serves a request another member sent; returns the reply's bytes.
    pub async fn serve(&self, request: &[u8]) -> Vec<u8> {
        let Ok(member) = self.member() else {
            // Stopped after a failed write: the sender hears nothing, as from a crashed node.
            return Vec::new();
        };
        let raft = &member.raft;
        let request = match decode::<Request>(request) {
            Ok(request) => request,
            // The sender cannot be answered in a form it reads; it times out.
            Err(_) => return Vec::new(),
        };
        let reply = match request {
            Request::Append(rpc) => {
                Reply::Append(raft.append_entries(rpc).await.map_err(|e| e.to_string()))
            }
            Request::Vote(rpc) => Reply::Vote(raft.vote(rpc).await.map_err(|e| e.to_string())),
            Request::PreVote(rpc) => {
                Reply::Vote(raft.pre_vote(rpc).await.map_err(|e| e.to_string()))
            }
            Request::Snapshot { vote, meta, data } => {
                let snapshot = Snapshot {
                    meta,
                    snapshot: data,
                };
                Reply::Snapshot(
                    raft.install_full_snapshot(vote, snapshot)
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            Request::Propose(command) => Reply::Proposed(self.propose_here(command).await),
            Request::Read { key } => Reply::Read(match Key::new(key.as_slice()) {
                Ok(key) => self
                    .read_here(&key)
                    .await
                    .map(|r| r.map(|r| codec::encode(&r))),
                Err(err) => Err(Refusal::Failed(err.to_string())),
            }),
            Request::Scan {
                prefix,
                after,
                limit,
            } => {
                let after = after.map(|k| Key::new(k.as_slice()));
                Reply::Scanned(match after.transpose() {
                    Ok(after) => self
                        .scan_here(&prefix, after.as_ref(), limit as usize)
                        .await
                        .map(|entries| agentstore_wire::encode_entries(&entries)),
                    Err(err) => Err(Refusal::Failed(err.to_string())),
                })
            }
            Request::Probe => Reply::Probed {
                initialized: raft.is_initialized().await.unwrap_or(true),
            },
            Request::Membership(change) => Reply::Membership(self.change_here(change).await),
        };
        encode(&reply)
    }

    /// What this member knows of the group now.
    pub fn status(&self) -> GroupStatus {
        let failure = self.inner.health.failure().map(|e| e.to_string());
        let Ok(member) = self.member() else {
            return GroupStatus {
                id: self.inner.id.0.clone(),
                state: "down",
                term: 0,
                leader: None,
                last_log: None,
                committed: None,
                applied: None,
                snapshot: None,
                voters: Vec::new(),
                learners: Vec::new(),
                quorum_ack_ms: None,
                leader_changes: self.inner.leader_changes.load(Ordering::Relaxed),
                failure,
            };
        };
        let watched = member.raft.metrics();
        let metrics = watched.borrow_watched();
        let state = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<String> = membership.voter_ids().map(|id| id.0).collect();
        let learners = membership.learner_ids().map(|id| id.0).collect();
        GroupStatus {
            id: self.inner.id.0.clone(),
            state,
            term: metrics.current_term,
            leader: metrics.current_leader.as_ref().map(|id| id.0.clone()),
            last_log: metrics.last_log_index,
            committed: metrics.cluster_committed.as_ref().map(|id| id.index()),
            applied: metrics.last_applied.as_ref().map(|id| id.index()),
            snapshot: metrics.snapshot.as_ref().map(|id| id.index()),
            voters: voters.into_iter().collect(),
            learners,
            quorum_ack_ms: metrics
                .last_quorum_acked
                .as_ref()
                .map(|at| at.elapsed().as_millis() as u64),
            leader_changes: self.inner.leader_changes.load(Ordering::Relaxed),
            failure,
        }
    }

    /// Adds `id` (listening for peers at `addr`) as a learner: it receives the log (or a
    /// snapshot) and does not vote. Made by the leader (a follower forwards it); returns once
    /// the change is committed, before the learner has caught up (its status shows it).
    pub async fn add_learner(&self, id: MemberId, addr: String) -> Result<(), GroupError> {
        self.change(MembershipChange::AddLearner { id, addr }).await
    }

    /// Makes `voters` the voting members (learners among them are promoted; voters left out
    /// become learners, or leave the group when `remove_others`). Made by the leader.
    pub async fn change_voters(
        &self,
        voters: BTreeSet<MemberId>,
        remove_others: bool,
    ) -> Result<(), GroupError> {
        self.change(MembershipChange::SetVoters {
            voters,
            remove_others,
        })
        .await
    }

    async fn change(&self, change: MembershipChange) -> Result<(), GroupError> {
        let request = Request::Membership(change.clone());
        let outcome = self
            .at_leader(
                Effect::MayApply,
                || self.change_here(change.clone()),
                &request,
                |reply| match reply {
                    Reply::Membership(answer) => Some(answer),
                    _ => None,
                },
            )
            .await?;
        outcome.map_err(|detail| GroupError::Membership { detail })
    }

    /// Makes `change` if this member leads; `Ok(Err(why))` if the leader refuses it.
    async fn change_here(&self, change: MembershipChange) -> Result<Result<(), String>, Refusal> {
        let member = self.member_here()?;
        let raft = &member.raft;
        let result = match change {
            MembershipChange::AddLearner { id, addr } => raft
                .add_learner(id, BasicNode::new(addr), false)
                .await
                .map(drop),
            MembershipChange::SetVoters {
                voters,
                remove_others,
            } => raft
                .change_membership(voters, !remove_others)
                .await
                .map(drop),
        };
        match result {
            Ok(()) => Ok(Ok(())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(Refusal::NotLeader {
                    leader: leader_of(&forward),
                })
            }
            Err(err) => Ok(Err(err.to_string())),
        }
    }

    /// Stops this member (its files stay; a restart recovers from them).
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        if let Ok(member) = self.member() {
            let _ = member.raft.shutdown().await;
        }
    }

    /// The running member, for a call served here; without one the caller hears "no leader"
    /// (nothing was applied).
    fn member_here(&self) -> Result<Arc<Member>, Refusal> {
        self.member()
            .map_err(|_| Refusal::NotLeader { leader: None })
    }
}

impl Member {
    /// Opens the log and the state machine in `config.dir` and starts openraft's member on
    /// them.
    async fn start(
        config: &GroupConfig,
        rpc: &Arc<dyn Rpc>,
        health: &Arc<Health>,
        leader_changes: &Arc<AtomicU64>,
    ) -> Result<Self, GroupError> {
        let log = LogStore::open_watched(
            &config.dir.join(LOG_FILE),
            config.id.clone(),
            Arc::clone(health),
            &config.files,
        )
        .map_err(storage)?;
        let state = StateMachine::open_with(&config.dir.join(STATE_FILE), &config.files)
            .map_err(storage)?
            .with_signatures(config.signatures.clone())
            .with_health(Arc::clone(health));
        let heartbeat = config.heartbeat.as_millis() as u64;
        let election = config.election_timeout.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: "agentstore".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.kept_behind_snapshot,
            // The replication streams learn of the leader's new entries as soon as `append`
            // returns (which is before its fsync; see log_store), not once the core has
            // drained its queue: a lone write reaches the followers sooner. Measured: lone
            // strong puts at a median of 0.99x etcd's without it, 1.03x with it.
            broadcast_submitted_on_append: Some(true),
            // A member that led before a restart must win an election again, in a new term.
            // Restored as leader in its old term (openraft's default), it would take its log
            // and state machine as complete, and neither is: applies are not fsynced, the
            // committed id is not kept, and entries it sent to followers before its own fsync
            // failed (a full disk) are in their logs, not in its own. It then wrote new
            // entries under the same log ids as committed ones the followers held, and an
            // acknowledged write was lost (`tests/disk_full.rs`, about one run in ten). An
            // election lets only a member holding every committed entry lead.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(storage)?;
        let network = Network {
            rpc: Arc::clone(rpc),
        };
        let raft = Raft::new(
            config.id.clone(),
            Arc::new(raft_config),
            network,
            log,
            state.clone(),
        )
        .await
        .map_err(storage)?;
        tokio::spawn(count_leader_changes(
            raft.clone(),
            Arc::clone(leader_changes),
        ));
        Ok(Self { raft, state })
    }
}

/// Starts the member again after openraft stopped it, which it does for good after any failed
/// write to the log or the state machine (a full disk, an I/O error). A restart is what a crash
/// and restart of the node would do: the files hold every entry whose write succeeded, and
/// only those were acknowledged. Until a start succeeds calls answer [`GroupError::Down`].
async fn supervise(inner: Weak<Inner>) {
    loop {
        let Some(raft) = inner.upgrade().and_then(|inner| {
            let member = inner.member.read().unwrap_or_else(PoisonError::into_inner);
            member.as_ref().map(|m| m.raft.clone())
        }) else {
            return;
        };
        let mut metrics = raft.metrics();
        while metrics.borrow_watched().running_state.is_ok() {
            if metrics.changed().await.is_err() {
                break;
            }
        }
        let why = match &metrics.borrow_watched().running_state {
            Err(fatal) => fatal.to_string(),
            Ok(()) => "the Raft core ended".to_owned(),
        };
        drop(metrics);
        let Some(group) = inner.upgrade() else { return };
        if group.stopping.load(Ordering::Acquire) {
            return;
        }
        if group.health.failure().is_none() {
            group
                .health
                .failed(LOG_FILE, &std::io::Error::other(why.clone()));
        }
        tracing::error!(reason = %why, "the Raft member stopped; starting it again once its files take writes");
        let stopped = group
            .member
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(group);
        // Every handle on the old files goes, so they can be opened again.
        let _ = raft.shutdown().await;
        drop((raft, stopped));
        loop {
            tokio::time::sleep(RESTART_EVERY).await;
            let Some(group) = inner.upgrade() else { return };
            if group.stopping.load(Ordering::Acquire) {
                return;
            }
            let started = Member::start(
                &group.config,
                &group.rpc,
                &group.health,
                &group.leader_changes,
            )
            .await;
            match started {
                Ok(member) => {
                    // Opening wrote to both files (each open commits): they take writes again.
                    group.health.succeeded();
                    *group.member.write().unwrap_or_else(PoisonError::into_inner) =
                        Some(Arc::new(member));
                    tracing::info!("the Raft member started again");
                    break;
                }
                Err(err) => tracing::debug!(%err, "the Raft member cannot start yet"),
            }
        }
    }
}

/// Counts the times the known leader changes, for metrics. It watches the server metrics
/// (state, leader, membership), which change rarely, not the whole metrics, which change with
/// every entry and would wake this task on every write.
async fn count_leader_changes(raft: Raft<TypeConfig, StateMachine>, changes: Arc<AtomicU64>) {
    let mut metrics = raft.server_metrics();
    let mut leader = metrics.borrow_watched().current_leader.clone();
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow_watched().current_leader.clone();
        if now != leader {
            if now.is_some() {
                changes.fetch_add(1, Ordering::Relaxed);
            }
            leader = now;
        }
    }
}
