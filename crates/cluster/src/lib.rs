//! The agentstore node runtime.
//!
//! [`Node`] runs the sans-io replication [`Coordinator`](agentstore_core::replication::Coordinator)
//! against a [`LocalEngine`](agentstore_engine::LocalEngine) and a TCP [`Transport`] carrying
//! `agentstore-wire` frames, and finds its peers with SWIM ([`membership`]). A store reaches
//! the cluster through [`ClusterEngine`]; the HTTP client API that `agentstore node` serves
//! lives with the store (`p2p_ai_agents::storage::server`).

mod causal;
mod causal_store;
mod engine;
pub mod membership;
mod metrics;
mod node;
mod signatures;
mod strong;
mod transport;

pub use agentstore_consensus::{GroupStatus, ReadLevel};
pub use agentstore_trust::PeerTrust;
pub use causal::{CausalConfig, CausalEngine};
pub use engine::ClusterEngine;
pub use node::{MemberStatus, Node, NodeConfig, NodeError, RepairStep, ScanPage, Status};
pub use signatures::SignedCollections;
pub use strong::{StrongConfig, StrongEngine};
pub use transport::{Dropped, Incoming, PeerSecurity, Transport};
