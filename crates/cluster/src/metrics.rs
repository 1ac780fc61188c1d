//! A node's own metrics, beside its engine's. The spec's four families:
//!
//! - **replication lag**: from a coordinator sending a write to a replica until the replica
//!   acknowledged it durably (histogram, by backend and level);
//! - **conflicts** detected when a replica merges a concurrent version, and resolved by the
//!   collection's strategy in that merge (by strategy);
//! - **consistency violations** observed: a read through this node that misses a write this
//!   node acknowledged to its clients (read-your-writes);
//! - **quorum availability**: outcomes of quorum operations, and the share of time the key
//!   space had a reachable write and read quorum (from the members' liveness).
//!
//! Plus hinted handoff, anti-entropy, handoff after membership changes and dropped messages.

use agentstore_core::replication::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use std::sync::atomic::AtomicU64;

use crate::transport::Dropped;

/// Registers `metric` under `name` and returns it: the handle updates what is registered.
pub(crate) fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Strategy {
    strategy: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Lag {
    backend: &'static str,
    level: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Violation {
    guarantee: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Quorum {
    op: &'static str,
}

fn lag_histogram() -> Histogram {
    // 100 µs to about 100 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

/// Handles to a node's metrics.
#[derive(Debug, Clone)]
pub(crate) struct NodeMetrics {
    replication_lag: Family<Lag, Histogram, fn() -> Histogram>,
    violations: Family<Violation, Counter>,
    quorum_reachable: Family<Quorum, Gauge<f64, AtomicU64>>,
    quorum_reachable_seconds: Family<Quorum, Counter<f64, AtomicU64>>,
    observed_seconds: Counter<f64, AtomicU64>,
    requests: Family<Request, Counter>,
    conflicts: Family<Strategy, Counter>,
    hints_stored: Counter,
    hints_delivered: Counter,
    repaired: Counter,
    handed_off: Counter,
    tombstones_collected: Counter,
    expired: Counter,
    dropped: Family<Dropped, Counter>,
}

impl NodeMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            replication_lag: Family::new_with_constructor(lag_histogram),
            violations: Family::default(),
            quorum_reachable: Family::default(),
            quorum_reachable_seconds: Family::default(),
            observed_seconds: Counter::default(),
            requests: Family::default(),
            conflicts: Family::default(),
            hints_stored: Counter::default(),
            hints_delivered: Counter::default(),
            repaired: Counter::default(),
            handed_off: Counter::default(),
            tombstones_collected: Counter::default(),
            expired: Counter::default(),
            dropped: Family::default(),
        };
        registry.register(
            "agentstore_replication_lag_seconds",
            "Time from sending a write to a replica until it acknowledged the write durably",
            metrics.replication_lag.clone(),
        );
        registry.register(
            "agentstore_consistency_violations",
            "Reads through this node that missed a write this node acknowledged (read_your_writes)",
            metrics.violations.clone(),
        );
        registry.register(
            "agentstore_quorum_reachable_ratio",
            "Share of the key space whose replicas that answer probes can form a quorum now",
            metrics.quorum_reachable.clone(),
        );
        registry.register(
            "agentstore_quorum_reachable_seconds",
            "Seconds during which a quorum was reachable, weighted by the share of the key space (divide by agentstore_observed_seconds for the share of time)",
            metrics.quorum_reachable_seconds.clone(),
        );
        registry.register(
            "agentstore_observed_seconds",
            "Seconds this node has observed quorum reachability",
            metrics.observed_seconds.clone(),
        );
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
            "agentstore_node_tombstones_collected",
            "Tombstones purged here once every replica held them and the grace period had passed",
            metrics.tombstones_collected.clone(),
        );
        registry.register(
            "agentstore_node_expired_requests",
            "Reads and forwarded writes received after their requester's deadline, dropped unanswered",
            metrics.expired.clone(),
        );
        registry.register(
            "agentstore_node_messages_dropped",
            "Messages to peers lost before sending (a full queue, or an unreachable peer), by message type",
            metrics.dropped.clone(),
        );
        metrics.start_at_zero();
        metrics
    }

    /// Creates the counters (and the lag histogram) whose labels are known in advance, at
    /// zero: a scraper sees them from the start (a rate over one is 0, not missing).
    fn start_at_zero(&self) {
        for op in ["write", "read", "forwarded_write"] {
            for outcome in ["ok", "quorum_failed", "not_a_replica", "local_failure"] {
                let _ = self.requests.get_or_create(&Request { op, outcome });
            }
        }
        for kind in agentstore_core::record::Kind::ALL {
            let _ = self.conflicts.get_or_create(&Strategy {
                strategy: kind.as_str(),
            });
        }
        let _ = self.violations.get_or_create(&Violation {
            guarantee: "read_your_writes",
        });
        // Counters only: a ratio gauge at 0 would say no quorum was reachable.
        for op in ["write", "read"] {
            let _ = self.quorum_reachable_seconds.get_or_create(&Quorum { op });
        }
        let _ = self.replication_lag.get_or_create(&Lag {
            backend: "cluster",
            level: "eventual",
        });
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

    pub(crate) fn replication_lag(&self, seconds: f64) {
        self.replication_lag
            .get_or_create(&Lag {
                backend: "cluster",
                level: "eventual",
            })
            .observe(seconds);
    }

    pub(crate) fn read_your_writes_violated(&self) {
        self.violations
            .get_or_create(&Violation {
                guarantee: "read_your_writes",
            })
            .inc();
    }

    /// `write` and `read`: the share of the key space with a reachable quorum, over the last
    /// `seconds`.
    pub(crate) fn quorum_reachable(&self, write: f64, read: f64, seconds: f64) {
        for (op, ratio) in [("write", write), ("read", read)] {
            let label = Quorum { op };
            self.quorum_reachable.get_or_create(&label).set(ratio);
            self.quorum_reachable_seconds
                .get_or_create(&label)
                .inc_by(ratio * seconds);
        }
        self.observed_seconds.inc_by(seconds);
    }

    pub(crate) fn expired(&self) {
        self.expired.inc();
    }

    pub(crate) fn tombstone_collected(&self) {
        self.tombstones_collected.inc();
    }

    pub(crate) fn handed_off(&self) {
        self.handed_off.inc();
    }
}

/// A registry's metrics in the OpenMetrics text format.
pub(crate) fn text(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
