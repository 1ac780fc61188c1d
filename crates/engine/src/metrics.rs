//! Engine metrics: latency of every operation, errors by kind, retries, WAIT shortfalls.
//!
//! Metrics live in a `prometheus_client` registry that the caller owns (one per node, so nodes
//! sharing a process in tests do not mix), ready to be served as `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::EngineError;
use crate::{Engine, Key, Record, Write};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    backend: &'static str,
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failure {
    backend: &'static str,
    op: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

/// Handles to the engine metrics of one registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    latency: Family<Operation, Histogram, fn() -> Histogram>,
    errors: Family<Failure, Counter>,
    retries: Family<BackendLabel, Counter>,
    wait_shortfalls: Family<BackendLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    // 10 µs to ~5 s.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

impl EngineMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            latency: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            retries: Family::default(),
            wait_shortfalls: Family::default(),
        };
        registry.register(
            "agentstore_engine_operation_seconds",
            "Latency of engine operations (get, scan, commit) by backend",
            metrics.latency.clone(),
        );
        registry.register(
            "agentstore_engine_errors",
            "Failed engine operations by backend, operation and error kind",
            metrics.errors.clone(),
        );
        registry.register(
            "agentstore_engine_retries",
            "Transactions retried after losing to a concurrent writer or a serialization failure",
            metrics.retries.clone(),
        );
        registry.register(
            "agentstore_engine_wait_shortfalls",
            "Strong writes that fewer replicas than required acknowledged in time",
            metrics.wait_shortfalls.clone(),
        );
        metrics
    }

    /// Counts one retry of a transaction on `backend`.
    pub fn retry(&self, backend: &'static str) {
        self.retries.get_or_create(&BackendLabel { backend }).inc();
    }

    fn failed(&self, backend: &'static str, op: &'static str, err: &EngineError) {
        if matches!(err, EngineError::ReplicationShortfall { .. }) {
            self.wait_shortfalls
                .get_or_create(&BackendLabel { backend })
                .inc();
        }
        self.errors
            .get_or_create(&Failure {
                backend,
                op,
                kind: err.kind(),
            })
            .inc();
    }
}

/// Any engine, measured.
#[derive(Debug, Clone)]
pub struct Instrumented<E> {
    inner: E,
    backend: &'static str,
    metrics: EngineMetrics,
    /// The latency histograms of get, scan and commit, looked up once: a label lookup per call
    /// would take a lock and hash the labels on every read.
    latency: [Histogram; 3],
}

impl<E: Engine> Instrumented<E> {
    /// Measures `inner`'s operations under the label `backend`.
    pub fn new(inner: E, backend: &'static str, metrics: EngineMetrics) -> Self {
        let latency = ["get", "scan", "commit"].map(|op| {
            metrics
                .latency
                .get_or_create(&Operation { backend, op })
                .clone()
        });
        Self {
            inner,
            backend,
            metrics,
            latency,
        }
    }

    fn observe<T>(
        &self,
        index: usize,
        op: &'static str,
        started: Instant,
        result: &Result<T, EngineError>,
    ) {
        self.latency[index].observe(started.elapsed().as_secs_f64());
        if let Err(err) = result {
            self.metrics.failed(self.backend, op, err);
        }
    }

    /// The measured engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }
}

impl<E: Engine> Engine for Instrumented<E> {
    async fn get(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let started = Instant::now();
        let result = self.inner.get(key).await;
        self.observe(0, "get", started, &result);
        result
    }

    async fn get_stale(&self, key: &Key) -> Result<Option<Record>, EngineError> {
        let started = Instant::now();
        let result = self.inner.get_stale(key).await;
        self.observe(0, "get", started, &result);
        result
    }

    async fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Record)>, EngineError> {
        let started = Instant::now();
        let result = self.inner.scan(prefix, start_after, limit).await;
        self.observe(1, "scan", started, &result);
        result
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<Record>, EngineError> {
        let started = Instant::now();
        let result = self.inner.commit(writes).await;
        self.observe(2, "commit", started, &result);
        result
    }

    async fn prepare(&self, txn: &str, writes: Vec<Write>) -> Result<(), EngineError> {
        let started = Instant::now();
        let result = self.inner.prepare(txn, writes).await;
        self.observe(2, "commit", started, &result);
        result
    }

    async fn resolve(&self, txn: &str, commit: bool) -> Result<Vec<Record>, EngineError> {
        let started = Instant::now();
        let result = self.inner.resolve(txn, commit).await;
        self.observe(2, "commit", started, &result);
        result
    }

    async fn changes(
        &self,
        prefix: &[u8],
        after: Option<crate::changelog::Position>,
        limit: usize,
        wait: std::time::Duration,
    ) -> Result<crate::changelog::ChangePage, EngineError> {
        // Not timed: a watch waits for changes by design.
        let result = self.inner.changes(prefix, after, limit, wait).await;
        if let Err(err) = &result {
            self.metrics.failed(self.backend, "changes", err);
        }
        result
    }

    async fn purge_expired(&self, now_ms: u64) -> Result<usize, EngineError> {
        let result = self.inner.purge_expired(now_ms).await;
        if let Err(err) = &result {
            self.metrics.failed(self.backend, "purge_expired", err);
        }
        result
    }
}
