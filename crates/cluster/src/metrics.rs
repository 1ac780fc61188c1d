//! A node's own metrics, beside its engine's: quorum outcomes per operation (the spec's quorum
//! availability), conflicts detected when a replica merges a concurrent version (the spec's
//! conflict rate, by strategy), and hinted handoff.

use agentstore_core::replication::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::transport::Dropped;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Strategy {
    strategy: &'static str,
}

/// Handles to a node's metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeMetrics {
    requests: Family<Request, Counter>,
    conflicts: Family<Strategy, Counter>,
    hints_stored: Counter,
    hints_delivered: Counter,
    repaired: Counter,
    handed_off: Counter,
    dropped: Family<Dropped, Counter>,
}

impl NodeMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "agentstore_node_requests",
            "Client requests coordinated by this node, by operation and outcome (quorum_failed: the quorum was not reachable in time)",
            metrics.requests.clone(),
        );
        registry.register(
            "agentstore_node_conflicts",
            "Concurrent versions detected (by version vector) when merging a replicated record, by conflict strategy; every one is resolved by the strategy's merge",
            metrics.conflicts.clone(),
        );
        registry.register(
            "agentstore_node_hints_stored",
            "Hints stored for replicas that missed a write",
            metrics.hints_stored.clone(),
        );
        registry.register(
            "agentstore_node_hints_delivered",
            "Hints acknowledged by the replica they were for",
            metrics.hints_delivered.clone(),
        );
        registry.register(
            "agentstore_node_anti_entropy_records",
            "Records sent to a peer because anti-entropy found their bucket different",
            metrics.repaired.clone(),
        );
        registry.register(
            "agentstore_node_handed_off_records",
            "Records purged here after every new replica acknowledged them (a join or a leave moved their key)",
            metrics.handed_off.clone(),
        );
        registry.register(
            "agentstore_node_messages_dropped",
            "Messages to peers lost before sending (a full queue, or an unreachable peer), by message type",
            metrics.dropped.clone(),
        );
        metrics
    }

    pub(crate) fn request(&self, op: &'static str, outcome: &Outcome) {
        let outcome = match outcome {
            Outcome::Written { .. } | Outcome::Read { .. } => "ok",
            Outcome::QuorumFailed { .. } => "quorum_failed",
            Outcome::NotAReplica { .. } => "not_a_replica",
            Outcome::LocalFailure { .. } => "local_failure",
        };
        self.requests.get_or_create(&Request { op, outcome }).inc();
    }

    pub(crate) fn conflict(&self, strategy: &'static str) {
        self.conflicts.get_or_create(&Strategy { strategy }).inc();
    }

    pub(crate) fn hint_stored(&self) {
        self.hints_stored.inc();
    }

    pub(crate) fn hint_delivered(&self) {
        self.hints_delivered.inc();
    }

    /// The counter the transport increments for every message it loses.
    pub(crate) fn dropped(&self) -> Family<Dropped, Counter> {
        self.dropped.clone()
    }

    pub(crate) fn repaired(&self) {
        self.repaired.inc();
    }

    pub(crate) fn handed_off(&self) {
        self.handed_off.inc();
    }
}
