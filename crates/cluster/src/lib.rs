//! The agentstore node runtime.
//!
//! [`Node`] runs the sans-io replication [`Coordinator`](agentstore_core::replication::Coordinator)
//! against a [`LocalEngine`](agentstore_engine::LocalEngine) and a TCP [`Transport`] carrying
//! `agentstore-wire` frames. This is the first slice of the cluster: every node knows every
//! peer from its configuration (no membership protocol yet); clients use the HTTP/JSON API
//! in [`http`].

pub mod http;
pub mod membership;
mod metrics;
mod node;
mod transport;

pub use node::{MemberStatus, Node, NodeConfig, NodeError, Status};
pub use transport::{Dropped, Incoming, Transport};
