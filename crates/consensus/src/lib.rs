//! Strong collections: one Raft group per cluster, through openraft, behind agentstore's own
//! adapter.
//!
//! The log ([`LogStore`]) and the state machine ([`StateMachine`]) live in redb files of their
//! own in the node's data directory. A log entry is a batch of writes ([`command`]) that every
//! replica applies atomically and deterministically, so multi-key writes, compare-and-set and
//! fenced writes are one entry each.

pub mod command;
mod group;
mod health;
mod log_store;
mod network;
pub mod sessions;
mod state_machine;
mod types;

pub use group::{Group, GroupConfig, GroupError, GroupStatus, LOG_FILE, ReadLevel, STATE_FILE};
pub use log_store::LogStore;
pub use network::{Rpc, RpcError, RpcFuture};
pub use state_machine::{GROUP_STAMP, StateMachine};
pub use types::{Applied, Command, MemberId, TypeConfig};
