//! What Raft members say to each other, and openraft's network over the node's transport.
//!
//! Requests and replies are postcard-encoded serde values behind a format byte; the node's
//! transport carries them as opaque bytes with a request id ([`Rpc`]). Besides openraft's
//! own RPCs (append, vote, pre-vote, snapshot), a member that is not the leader forwards
//! client proposals and linearizable reads to the leader.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, RaftNetworkV2};
use serde::{Deserialize, Serialize};

use crate::types::{Applied, Command, MemberId, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// The protocol format this build speaks.
const FORMAT: u8 = 1;

/// Why a call to another member got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The member could not be reached (nothing was delivered).
    #[error("member {0} is unreachable")]
    Unreachable(String),
    /// No reply arrived in time: the request may or may not have been delivered.
    #[error("no reply from member {member} within {timeout:?}")]
    Timeout {
        /// Who was asked.
        member: String,
        /// How long the caller waited.
        timeout: Duration,
    },
}

/// A reply in the making.
pub type RpcFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, RpcError>> + Send>>;

/// The node's transport as Raft sees it: send bytes to a member, get its reply bytes.
pub trait Rpc: Send + Sync + Debug + 'static {
    /// Sends `request` to `to`, which listens for peers at `addr`, and waits up to `timeout`
    /// for its reply.
    fn call(&self, to: &MemberId, addr: &str, request: Vec<u8>, timeout: Duration) -> RpcFuture;
}

/// A request from one member to another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    /// A client's command, for the leader to propose.
    Propose(Command),
    /// A linearizable read of one key, for the leader to serve.
    Read {
        key: Vec<u8>,
    },
    /// A linearizable scan, for the leader to serve.
    Scan {
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Whether the member is in a group already (asked before initializing one).
    Probe,
    /// A membership change, for the leader to make.
    Membership(MembershipChange),
}

/// A change of the group's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MembershipChange {
    /// Add a non-voting member that receives the log.
    AddLearner { id: MemberId, addr: String },
    /// Make these the voters (the others become learners, or leave when `remove_others`).
    SetVoters {
        voters: std::collections::BTreeSet<MemberId>,
        remove_others: bool,
    },
}

/// Why the leader did not serve a forwarded proposal or read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Refusal {
    /// The member asked is not the leader; nothing was proposed.
    NotLeader { leader: Option<(MemberId, String)> },
    /// The proposal was appended and then discarded on a leader change: it may still commit.
    Indeterminate(String),
    /// Anything else (a stopped or failed member).
    Failed(String),
}

/// A reply to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Append(Result<AppendEntriesResponse<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    Proposed(Result<Applied, Refusal>),
    /// The record's bytes, if any (agentstore's record encoding).
    Read(Result<Option<Vec<u8>>, Refusal>),
    /// The entries (agentstore-wire's entry list).
    Scanned(Result<Vec<u8>, Refusal>),
    Probed {
        initialized: bool,
    },
    /// Done, or why the leader refused the change.
    Membership(Result<Result<(), String>, Refusal>),
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT];
    // postcard fails only on types it cannot represent (none of ours) or a full buffer (a
    // Vec grows): an empty body then decodes as an error on the other side.
    out.extend(postcard::to_stdvec(value).unwrap_or_default());
    out
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((format, _)) => Err(format!(
            "Raft message of format {format}; this member speaks {FORMAT}"
        )),
        None => Err("empty Raft message".into()),
    }
}

/// openraft's network: one [`Link`] per member it talks to.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub(crate) rpc: Arc<dyn Rpc>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Link;

    async fn new_client(&mut self, target: MemberId, node: &BasicNode) -> Link {
        Link {
            rpc: Arc::clone(&self.rpc),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// The way to one member.
#[derive(Debug)]
pub(crate) struct Link {
    rpc: Arc<dyn Rpc>,
    target: MemberId,
    addr: String,
}

/// Sends `request` to `to` (at `addr`) and waits up to `timeout` for its reply. A reply
/// that does not decode counts as no reply from a reachable member (it is never acted on).
pub(crate) async fn ask(
    rpc: &dyn Rpc,
    to: &MemberId,
    addr: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, RpcError> {
    let bytes = rpc.call(to, addr, encode(request), timeout).await?;
    decode(&bytes).map_err(|_| RpcError::Unreachable(to.0.clone()))
}

impl Link {
    /// One of openraft's RPCs: `request`, answered by the reply `pick` accepts.
    async fn exchange<T>(
        &self,
        request: Request,
        action: RPCTypes,
        option: RPCOption,
        pick: fn(Reply) -> Option<Result<T, String>>,
    ) -> Result<T, RPCError<TypeConfig>> {
        let timeout = option.hard_ttl();
        match ask(&*self.rpc, &self.target, &self.addr, &request, timeout).await {
            Ok(reply) => match pick(reply) {
                Some(answer) => answer.map_err(remote),
                None => Err(remote("a reply of the wrong type".into())),
            },
            Err(err @ RpcError::Unreachable(_)) => {
                Err(RPCError::Unreachable(Unreachable::new(&err)))
            }
            Err(RpcError::Timeout { .. }) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.target.clone(),
                target: self.target.clone(),
                timeout,
            })),
        }
    }
}

fn remote(message: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(message))
}

fn vote_reply(reply: Reply) -> Option<Result<VoteResponse<TypeConfig>, String>> {
    match reply {
        Reply::Vote(answer) => Some(answer),
        _ => None,
    }
}

impl RaftNetworkV2<TypeConfig> for Link {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let pick = |reply| match reply {
            Reply::Append(answer) => Some(answer),
            _ => None,
        };
        let request = Request::Append(rpc);
        self.exchange(request, RPCTypes::AppendEntries, option, pick)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.exchange(Request::Vote(rpc), RPCTypes::Vote, option, vote_reply)
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.exchange(Request::PreVote(rpc), RPCTypes::Vote, option, vote_reply)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let timeout = option.hard_ttl();
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            reply = ask(&*self.rpc, &self.target, &self.addr, &request, timeout) => reply,
        };
        match reply {
            Ok(Reply::Snapshot(reply)) => {
                reply.map_err(|e| StreamingError::Network(NetworkError::from_string(e)))
            }
            Ok(_) => Err(StreamingError::Network(NetworkError::from_string(
                "a reply of the wrong type",
            ))),
            Err(RpcError::Timeout { .. }) => Err(StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: self.target.clone(),
                target: self.target.clone(),
                timeout,
            })),
            Err(err) => Err(StreamingError::Unreachable(Unreachable::new(&err))),
        }
    }
}
