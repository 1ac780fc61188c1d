//! agentstore for peer-to-peer AI agents.
//!
//! [`storage`] is the whole API: a [`storage::Storage`] built from a [`storage::Config`], with
//! per-collection consistency levels, backends and conflict strategies. See the crate's
//! README for a tour.

pub mod storage;
