//! The pure core of agentstore.
//!
//! Keys and collections, consistency levels, hybrid logical clocks, version vectors, CRDTs and
//! conflict resolution, records and their versioned encoding, quorum math and configuration.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and draws no randomness;
//! time is always an argument. That is what lets the same logic run in a node, in an
//! engine's transaction and in a deterministic simulator.

pub mod causal;
pub mod causal_sync;
pub mod codec;
pub mod config;
pub mod crdt;
pub mod hash;
pub mod hlc;
pub mod key;
pub mod level;
pub mod merkle;
pub mod node;
pub mod node_state;
pub mod ot;
pub mod placement;
pub mod quorum;
pub mod record;
pub mod replication;
pub mod session;
pub mod signing;
pub mod version;

pub use crdt::Crdt;
pub use hlc::{HybridClock, Timestamp};
pub use key::Key;
pub use level::ConsistencyLevel;
pub use node::NodeId;
pub use record::{Mutation, Record, Value};
pub use version::{Causality, Dot, VersionVector};
