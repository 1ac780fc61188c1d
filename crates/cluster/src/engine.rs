//! A node as an engine: what a store routes its collections to when it runs in a cluster.
//!
//! Reads are quorum reads, writes are quorum writes (forwarded when this node is not a
//! replica), scans ask every member. What leaderless replication cannot do atomically is
//! refused with [`EngineError::Unsupported`]: batches of more than one write, conditional
//! writes (compare-and-set) and fenced writes.

use std::sync::Arc;

use agentstore_core::replication::{LocalFailure, Outcome};
use agentstore_core::{Key, Record};
use agentstore_engine::changelog::ChangePage;
use agentstore_engine::{DynEngine, EngineError, EngineFuture, Write, single_unconditional};

use crate::node::{Node, NodeError};

/// A running node, seen as an engine.
#[derive(Debug, Clone)]
pub struct ClusterEngine {
    node: Arc<Node>,
    replicas: usize,
}

impl ClusterEngine {
    /// The engine of `node`, which places each key on `replicas` members.
    pub fn new(node: Arc<Node>, replicas: usize) -> Self {
        Self { node, replicas }
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

fn stopped(err: NodeError) -> EngineError {
    match err {
        NodeError::Stopped => EngineError::Closed,
        other => EngineError::Internal {
            detail: other.to_string(),
        },
    }
}

/// The engine error of an outcome for `key` that is not the answer asked for.
fn failure(key: &Key, outcome: Outcome) -> EngineError {
    match outcome {
        Outcome::QuorumFailed { answered, needed } => EngineError::QuorumFailed {
            acknowledged: answered,
            needed,
        },
        Outcome::LocalFailure { failure } => match failure {
            LocalFailure::DiskFull(detail) => EngineError::DiskFull { detail },
            LocalFailure::SignatureRefused(why) => EngineError::signature(key, why),
            LocalFailure::WrongKind(source) => EngineError::WrongKind {
                key: key.clone(),
                source,
            },
            LocalFailure::Storage(detail) => EngineError::Storage { detail },
        },
        other => EngineError::Internal {
            detail: format!("unexpected outcome {other:?}"),
        },
    }
}

impl DynEngine for ClusterEngine {
    fn backend(&self) -> &'static str {
        "cluster"
    }

    fn get<'a>(&'a self, key: &'a Key) -> EngineFuture<'a, Option<Record>> {
        Box::pin(async move {
            match self.node.read(key.clone()).await.map_err(stopped)? {
                Outcome::Read { record } => Ok(record),
                Outcome::QuorumFailed { answered, needed } => Err(EngineError::Unavailable {
                    backend: "cluster",
                    detail: format!("{answered} of the {needed} replicas needed answered in time"),
                }),
                other => Err(failure(key, other)),
            }
        })
    }

    fn scan<'a>(
        &'a self,
        prefix: &'a [u8],
        start_after: Option<&'a Key>,
        limit: usize,
    ) -> EngineFuture<'a, Vec<(Key, Record)>> {
        Box::pin(async move {
            let limit = u32::try_from(limit.min(1000)).unwrap_or(1000);
            let page = self
                .node
                .scan(prefix.to_vec(), start_after.cloned(), limit)
                .await
                .map_err(stopped)?;
            if page.unanswered.len() >= self.replicas {
                // Some key may have had every replica among the silent members.
                return Err(EngineError::Unavailable {
                    backend: "cluster",
                    detail: format!(
                        "{} member(s) did not answer the scan ({:?}); with N={} keys may be missing",
                        page.unanswered.len(),
                        page.unanswered,
                        self.replicas
                    ),
                });
            }
            Ok(page.entries)
        })
    }

    fn commit(&self, writes: Vec<Write>) -> EngineFuture<'_, Vec<Record>> {
        Box::pin(async move {
            let write = single_unconditional(writes)?;
            let key = write.key.clone();
            match self
                .node
                .write(write.key, write.mutation)
                .await
                .map_err(stopped)?
            {
                Outcome::Written { record } => Ok(vec![record]),
                other => Err(failure(&key, other)),
            }
        })
    }

    fn changes<'a>(
        &'a self,
        prefix: &'a [u8],
        after: Option<agentstore_engine::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> EngineFuture<'a, ChangePage> {
        Box::pin(self.node.changes(prefix, after, limit, wait))
    }
}
