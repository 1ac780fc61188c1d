//! What a node reports at `GET /v1/status`: one typed form, which the node serves and
//! [`NodeClient::status`](super::NodeClient::status) reads back, and the CLI prints.

use std::net::SocketAddr;

use agentstore_core::ConsistencyLevel;
use agentstore_core::config::ConflictStrategy;
use serde::{Deserialize, Serialize};

/// A node, the cluster as it sees it, and what each collection gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub node: String,
    /// Every member, this node included, in id order.
    pub members: Vec<MemberStatus>,
    /// Replicas per key (N).
    pub replicas: usize,
    /// Write quorum (W).
    pub write_quorum: usize,
    /// Read quorum (R).
    pub read_quorum: usize,
    /// Requests this node is coordinating.
    pub in_flight: usize,
    /// Every named collection, then `(default)`.
    pub collections: Vec<CollectionStatus>,
    /// The node's member of the Raft group (strong collections).
    pub raft: RaftStatus,
    /// The node's causal broadcast (causal collections).
    pub causal: CausalStatus,
    /// Writes to signed collections this node refused (forged, altered, unsigned).
    pub signed_writes_refused: u64,
}

/// A member as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The node.
    pub id: String,
    /// Where it listens for peers.
    pub peer_addr: Option<SocketAddr>,
    /// Where it serves clients, once it has said so.
    pub client_addr: Option<SocketAddr>,
    /// `alive`, `suspect` or `dead`.
    pub liveness: String,
    /// The share of keys it replicates (the shares add up to N).
    pub share: f64,
}

/// A collection's settings and what it gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionStatus {
    /// Its name (`(default)` for the collections not named).
    pub name: String,
    /// `local`, `redis` or `supabase`.
    pub backend: String,
    /// The level it is configured for.
    pub consistency: ConsistencyLevel,
    /// How concurrent writes resolve.
    pub conflict: ConflictStrategy,
    /// Whether its values are encrypted at rest.
    pub encrypted: bool,
    /// Whether its writes must be signed by their writers.
    pub signed: bool,
    /// The time to live of values written without one, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Its replication settings.
    pub replication: ReplicationStatus,
    /// What it gets.
    pub guarantee: GuaranteeStatus,
}

/// Replication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// `async`, `sync` or `quorum`.
    pub strategy: String,
    /// Replicas (N).
    pub n: u8,
    /// Write quorum (W).
    pub w: u8,
    /// Read quorum (R).
    pub r: u8,
}

/// The guarantee a collection gets, computed from its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuaranteeStatus {
    /// The level delivered.
    pub level: ConsistencyLevel,
    /// What it means.
    pub summary: String,
    /// What it does not promise.
    pub caveat: Option<String>,
}

/// The node's member of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This member.
    pub id: String,
    /// `leader`, `follower`, `candidate`, `learner`, `shutdown`, or `down` after a failed
    /// write to its files.
    pub state: String,
    /// The current term.
    pub term: u64,
    /// The leader it follows, if known.
    pub leader: Option<String>,
    /// The index of the last entry in its log.
    pub last_log: Option<u64>,
    /// The last entry known committed.
    pub committed: Option<u64>,
    /// The last entry applied here.
    pub applied: Option<u64>,
    /// The index the log was compacted up to.
    pub snapshot: Option<u64>,
    /// The voters.
    pub voters: Vec<String>,
    /// Members that receive the log without voting.
    pub learners: Vec<String>,
    /// On the leader: how long ago a quorum acknowledged it.
    pub quorum_ack_ms: Option<u64>,
    /// Leader changes seen since the node started.
    pub leader_changes: u64,
    /// The last write to the Raft files failed with this, until one succeeds.
    pub failure: Option<String>,
}

/// The node's causal broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalStatus {
    /// What it has applied, as a session token (`agentstore-session` header form).
    pub applied: String,
}
